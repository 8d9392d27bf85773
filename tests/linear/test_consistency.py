"""Generic consistency tests for every op of the linear family (DESIGN.md, 'Consistency tests').

Parametrized over ``effattn.linear.REGISTRY``: a newly registered op is covered with no edit here.
What each op's own test file checks (chunk vs naive forward and gradients, bf16, odd sizes, gate
validation) is not repeated; these tests chain the forms and check the properties every causal
recurrent op must have:

- decoding with ``step`` (token by token, and a few tokens at a time) equals the full naive and
  chunk outputs and final state;
- one chunk call equals several calls on consecutive pieces with the state carried, forward and
  backward (gradients reach the inputs of earlier pieces and ``initial_state`` through the carried
  state);
- packed sequences (``cu_seqlens``) equal a per-sequence loop of the naive form;
- no future leakage: changing every per-token input (gates included) after position t changes no
  output at positions <= t;
- long sequences (T = 16384) with very strong and near-zero decay give finite outputs and states,
  and finite gradients at a shorter length;
- generic bad input raises ValueError/TypeError naming the argument;
- where the optional ``fla`` package is importable, our naive forms agree with fla's own naive
  references (an independent implementation).

Inputs come from each op's ``make_inputs``; which of them are per-token (``[B, T, ...]``) is found by
calling it at two lengths, and their names from the naive form's signature, so nothing here knows
any op's gate names except the fla adapters.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from effattn.linear import REGISTRY
from tests.helpers import assert_fp32_close, rel_rms

OPS = sorted(REGISTRY)
H = 2  # heads; the batch sizes used below (1, 2, 3) never equal it, see _per_token_names
D = 16  # head dim


# ------------------------------------------------------------------------------------------------
# helpers: named inputs, per-token slicing, states
# ------------------------------------------------------------------------------------------------


class Inputs:
    """An op's ``make_inputs`` result with names: ``values[name]``; ``call(fn)`` rebuilds the call."""

    def __init__(self, op, args: tuple, kwargs: dict, per_token: frozenset[str]):
        sig = inspect.signature(op.naive)
        positional = [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.op = op
        self.pos_names = positional[: len(args)]
        self.values = dict(zip(self.pos_names, args, strict=True))
        self.values.update(kwargs)
        self.per_token = per_token

    def copy(self, **changes) -> Inputs:
        new = object.__new__(Inputs)
        new.op, new.pos_names, new.per_token = self.op, self.pos_names, self.per_token
        new.values = {**self.values, **changes}
        return new

    def call(self, fn, **extra):
        args = [self.values[n] for n in self.pos_names]
        kwargs = {n: x for n, x in self.values.items() if n not in self.pos_names}
        kwargs.update(extra)
        return fn(*args, **kwargs)

    def seq_slice(self, a: int, b: int) -> Inputs:
        """Tokens ``[a, b)`` of every per-token input; other inputs are shared."""
        return self.copy(**{n: self.values[n][:, a:b] for n in self.per_token})

    def tensors(self, names) -> list[torch.Tensor]:
        return [self.values[n] for n in names if isinstance(self.values.get(n), torch.Tensor)]


_PER_TOKEN_CACHE: dict[str, frozenset[str]] = {}


def _per_token_names(op) -> frozenset[str]:
    """Names of the inputs laid out ``[B, T, ...]``: those whose dim 1 follows T between two calls."""
    if op.name not in _PER_TOKEN_CACHE:
        a5, k5 = op.make_inputs(3, 5, H, 8)
        a7, k7 = op.make_inputs(3, 7, H, 8)
        i5, i7 = Inputs(op, a5, k5, frozenset()), Inputs(op, a7, k7, frozenset())
        names = set()
        for n, x in i5.values.items():
            y = i7.values[n]
            if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[:2] == (3, 5) and y.shape[:2] == (3, 7):
                names.add(n)
        _PER_TOKEN_CACHE[op.name] = frozenset(names)
    return _PER_TOKEN_CACHE[op.name]


def make(op, B: int, T: int, *, seed: int, gate_strength: float = 0.5, d: int = D, h: int = H) -> Inputs:
    torch.manual_seed(seed)
    args, kwargs = op.make_inputs(B, T, h, d, device="cpu", dtype=torch.float32, gate_strength=gate_strength)
    return Inputs(op, args, kwargs, _per_token_names(op))


def state_parts(state) -> tuple[torch.Tensor, ...]:
    return tuple(state) if isinstance(state, (tuple, list)) else (state,)


def like_state(state, parts):
    return tuple(parts) if isinstance(state, (tuple, list)) else parts[0]


def prefix_state(op, B: int, *, seed: int, gate_strength: float = 0.5, d: int = D, h: int = H):
    """A realistic carried state: the naive form's final state after a random 9-token prefix.
    (A random tensor would not do for states with constraints, e.g. a positive normaliser.)"""
    _, s = make(op, B, 9, seed=seed, gate_strength=gate_strength, d=d, h=h).call(op.naive, output_final_state=True)
    assert s is not None, f"{op.name}: naive form returned no final state with output_final_state=True"
    return like_state(s, [p.detach().clone() for p in state_parts(s)])


def assert_state_close(s, ref, tol: float, name: str) -> None:
    ps, pr = state_parts(s), state_parts(ref)
    assert len(ps) == len(pr), f"{name}: {len(ps)} state tensors, expected {len(pr)}"
    for i, (a, b) in enumerate(zip(ps, pr, strict=True)):
        assert a.shape == b.shape, f"{name}[{i}]: shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        assert a.dtype == torch.float32, f"{name}[{i}]: states are float32, got {a.dtype}"
        assert_fp32_close(a, b, tol=tol, name=f"{name}[{i}]")


def cat_states(states: list):
    """Concatenate per-sequence states ``[1, ...]`` along the batch dim (tuple-aware)."""
    parts = [state_parts(s) for s in states]
    return like_state(states[0], [torch.cat([p[j] for p in parts]) for j in range(len(parts[0]))])


# ------------------------------------------------------------------------------------------------
# step (decoding) equals the full forms
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPS)
def test_step_equals_naive_and_chunk(name):
    op = REGISTRY[name]
    B, T = 2, 37
    x = make(op, B, T, seed=0)
    h0 = prefix_state(op, B, seed=1)
    o_n, s_n = x.call(op.naive, initial_state=h0, output_final_state=True)
    o_c, s_c = x.call(op.chunk, initial_state=h0, output_final_state=True, chunk_size=16)

    for sizes in ([1] * T, [1, 2, 5, 3, 7, 1, 4, 6, 8]):  # token by token, then a few at a time
        assert sum(sizes) == T
        state, outs, a = h0, [], 0
        for n in sizes:
            o, state = x.seq_slice(a, a + n).call(op.step, initial_state=state, output_final_state=True)
            assert o.shape[1] == n, f"step on {n} tokens returned {o.shape[1]} outputs"
            outs.append(o)
            a += n
        o_s = torch.cat(outs, dim=1)
        assert o_s.dtype == o_n.dtype
        assert_fp32_close(o_s, o_n, name=f"step{sizes[:3]} output vs naive")
        assert_state_close(state, s_n, 1e-5, f"step{sizes[:3]} final state vs naive")
        assert_fp32_close(o_s, o_c, name=f"step{sizes[:3]} output vs chunk")
        assert_state_close(state, s_c, 1e-5, f"step{sizes[:3]} final state vs chunk")


# ------------------------------------------------------------------------------------------------
# one call equals several calls with the state carried (forward and backward)
# ------------------------------------------------------------------------------------------------


def _leaves(x: Inputs, h0):
    """Fresh leaf copies of the differentiable inputs (``op.differentiable_args``) and of ``h0``."""
    names = [n for n in x.op.differentiable_args if isinstance(x.values.get(n), torch.Tensor)]
    assert names, f"{x.op.name}: no differentiable input found among {x.op.differentiable_args}"
    leaves = {n: x.values[n].detach().clone().requires_grad_(True) for n in names}
    h0 = like_state(h0, [p.detach().clone().requires_grad_(True) for p in state_parts(h0)])
    return x.copy(**leaves), leaves, h0


@pytest.mark.parametrize("name", OPS)
def test_chunked_calls_carry_state(name):
    op = REGISTRY[name]
    B, T, cuts = 2, 37, [0, 13, 14, 30, 37]  # pieces of 13, 1, 16 and 7 tokens
    base = make(op, B, T, seed=2)
    h0_base = prefix_state(op, B, seed=3)
    torch.manual_seed(4)
    results = []
    d_o = d_s = None
    for split in (False, True):
        x, leaves, h0 = _leaves(base, h0_base)
        if split:
            state, outs = h0, []
            for a, b in zip(cuts[:-1], cuts[1:], strict=True):
                o, state = x.seq_slice(a, b).call(op.chunk, initial_state=state, output_final_state=True, chunk_size=8)
                outs.append(o)
            o = torch.cat(outs, dim=1)
        else:
            o, state = x.call(op.chunk, initial_state=h0, output_final_state=True, chunk_size=8)
        if d_o is None:  # one random upstream gradient on the output and on every final-state tensor
            d_o = torch.randn_like(o)
            d_s = [torch.randn_like(p) for p in state_parts(state)]
        loss = (o * d_o).sum() + sum((p * g).sum() for p, g in zip(state_parts(state), d_s, strict=True))
        loss.backward()
        grads = {n: t.grad for n, t in leaves.items()}
        grads.update({f"initial_state[{i}]": p.grad for i, p in enumerate(state_parts(h0))})
        results.append((o.detach(), state, grads))

    (o1, s1, g1), (o2, s2, g2) = results
    assert_fp32_close(o2, o1, name="output, pieces vs one call")
    assert_state_close(
        like_state(s2, [p.detach() for p in state_parts(s2)]),
        like_state(s1, [p.detach() for p in state_parts(s1)]),
        1e-5,
        "final state, pieces vs one call",
    )
    for n, g in g1.items():
        assert g is not None and g2[n] is not None, f"no gradient reached {n}"
        assert_fp32_close(g2[n], g, tol=1e-4, name=f"grad {n}, pieces vs one call")


# ------------------------------------------------------------------------------------------------
# packed sequences (cu_seqlens) equal a per-sequence loop
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["naive", "chunk"])
@pytest.mark.parametrize("name", OPS)
def test_varlen_equals_per_sequence_loop(name, form):
    op = REGISTRY[name]
    lengths = [5, 17, 11]
    bounds = [0, 5, 22, 33]
    x = make(op, 1, sum(lengths), seed=5)
    h0 = prefix_state(op, len(lengths), seed=6)  # one state row per sequence
    cu = torch.tensor(bounds, dtype=torch.int32)
    extra = {"chunk_size": 8} if form == "chunk" else {}
    o, s = x.call(getattr(op, form), cu_seqlens=cu, initial_state=h0, output_final_state=True, **extra)

    # reference: the naive form on each sequence separately, with its own initial state
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        h0_i = like_state(h0, [p[i : i + 1] for p in state_parts(h0)])
        o_i, s_i = x.seq_slice(a, b).call(op.naive, initial_state=h0_i, output_final_state=True)
        outs.append(o_i)
        finals.append(s_i)
    assert o.shape == torch.cat(outs, 1).shape
    assert_fp32_close(o, torch.cat(outs, dim=1), name=f"{form} packed output vs per-sequence naive")
    assert_state_close(s, cat_states(finals), 1e-5, f"{form} packed final states vs per-sequence naive")


# ------------------------------------------------------------------------------------------------
# causality: no future leakage
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["naive", "chunk"])
@pytest.mark.parametrize("name", OPS)
def test_no_future_leakage(name, form):
    op = REGISTRY[name]
    B, T = 2, 29
    x = make(op, B, T, seed=7)
    other = make(op, B, T, seed=8)  # a valid second draw: gates stay <= 0, beta in range, ...
    h0 = prefix_state(op, B, seed=9)
    extra = {"chunk_size": 8} if form == "chunk" else {}
    fn = getattr(op, form)
    o_ref, _ = x.call(fn, initial_state=h0, **extra)
    for t in (0, 12, 27):  # start, middle of a chunk, one before the end
        mixed = x.copy(
            **{n: torch.cat([x.values[n][:, : t + 1], other.values[n][:, t + 1 :]], dim=1) for n in x.per_token}
        )
        o, _ = mixed.call(fn, initial_state=h0, **extra)
        past_err = (o[:, : t + 1] - o_ref[:, : t + 1]).abs().max().item()
        scale = o_ref[:, : t + 1].abs().max().item()
        assert past_err <= 1e-6 * max(scale, 1.0), f"t={t}: outputs at <= t moved by {past_err:.3g}"
        # the perturbation is real: later outputs do change (otherwise this test proves nothing)
        assert rel_rms(o[:, t + 1 :], o_ref[:, t + 1 :]) > 1e-3, f"t={t}: future inputs had no effect"


# ------------------------------------------------------------------------------------------------
# numerical stability at long T
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate_strength", [1.0, 0.0], ids=["strong_decay", "near_zero_decay"])
@pytest.mark.parametrize("name", OPS)
def test_long_sequence_is_finite(name, gate_strength):
    op = REGISTRY[name]
    # B = H = 1 and a small head dim keep this to about a second per op on 2 cores
    x = make(op, 1, 16384, seed=10, gate_strength=gate_strength, d=16, h=1)
    with torch.no_grad():
        o, s = x.call(op.chunk, output_final_state=True)
    assert o.shape[1] == 16384
    assert torch.isfinite(o).all(), "non-finite output at T=16384"
    for i, p in enumerate(state_parts(s)):
        assert torch.isfinite(p).all(), f"non-finite final state [{i}] at T=16384"

    # backward at a shorter length (a chunk form's autograd graph at 16k would be slow on a CPU)
    y, leaves, h0 = _leaves(
        make(op, 1, 1024, seed=11, gate_strength=gate_strength, d=16, h=1),
        prefix_state(op, 1, seed=12, gate_strength=gate_strength, d=16, h=1),
    )
    o, _ = y.call(op.chunk, initial_state=h0)
    o.square().mean().backward()
    for n, t in [*leaves.items(), *(("initial_state", p) for p in state_parts(h0))]:
        assert t.grad is not None and torch.isfinite(t.grad).all(), f"non-finite gradient of {n} at T=1024"


# ------------------------------------------------------------------------------------------------
# generic bad input
# ------------------------------------------------------------------------------------------------


def _word(*names: str) -> str:
    return "|".join(rf"\b{re.escape(n)}\b" for n in names)


def _bad_inputs(x: Inputs, h0):
    """(what, inputs, extra kwargs, accepted errors, regex the message must match). Works on the
    positional per-token inputs by name and position, so it fits q/k/v ops, Mamba's x/delta/Bm/Cm
    and Aaren's k/v (whose q has no time axis)."""
    seq = [n for n in x.pos_names if n in x.per_token and x.values[n].dim() == 4]
    assert len(seq) >= 2, f"{x.op.name}: expected two positional [B, T, ...] inputs, got {seq}"
    first = seq[0]
    if "q" in seq and "k" in seq:
        a, b = "q", "k"
    else:  # two inputs of one shape, e.g. Mamba's x and delta, Aaren's k and v
        a, b = next((a, b) for i, a in enumerate(seq) for b in seq[i + 1 :] if x.values[a].shape == x.values[b].shape)
    tb, tf = x.values[b], x.values[first]
    late = seq[min(2, len(seq) - 1)]  # v for q/k/v ops
    bad_h0 = list(state_parts(h0))
    bad_h0[0] = torch.zeros(*bad_h0[0].shape[:-1], bad_h0[0].shape[-1] + 1)
    if (a, b) == ("q", "k"):  # the key dim is shared by q and k (k and v may differ in theirs)
        yield "k head_dim != q head_dim", x.copy(k=tb[..., :-1]), {}, (ValueError,), _word(a, b)
    yield f"{b} heads != {a} heads", x.copy(**{b: tb[:, :, :-1]}), {}, (ValueError,), _word(a, b)
    yield f"{b} seq_len != {a} seq_len", x.copy(**{b: tb[:, :-1]}), {}, (ValueError,), _word(a, b)
    yield f"{first} of rank 3", x.copy(**{first: tf[..., 0]}), {}, (ValueError,), _word(first)
    yield f"integer {late}", x.copy(**{late: x.values[late].round().long()}), {}, (TypeError,), _word(late)
    yield f"float64 {b} with float32 {a}", x.copy(**{b: tb.double()}), {}, (TypeError,), _word(a, b)
    yield (
        "wrong-shaped initial_state",
        x,
        {"initial_state": like_state(h0, bad_h0)},
        (ValueError, TypeError),
        "initial_state",
    )


@pytest.mark.parametrize("form", ["naive", "chunk", "step"])
@pytest.mark.parametrize("name", OPS)
def test_bad_input_names_the_argument(name, form):
    op = REGISTRY[name]
    x = make(op, 2, 3, seed=13)
    h0 = prefix_state(op, 2, seed=14)
    fn = getattr(op, form)
    x.call(fn, initial_state=h0)  # the unmodified call is fine
    for what, bad, extra, errors, pattern in _bad_inputs(x, h0):
        with pytest.raises(errors, match=pattern):
            bad.call(fn, **extra)
            pytest.fail(f"{what}: no error")  # pragma: no cover


# ------------------------------------------------------------------------------------------------
# independent check against fla's naive references (optional dependency, skipped without it)
# ------------------------------------------------------------------------------------------------
#
# fla (flash-linear-attention) keeps a pure-PyTorch recurrence next to each kernel. Conventions that
# differ from ours and are bridged below:
# - layout: most take [B, T, H, *]; some (delta_rule_recurrence) take [B, H, T, *]. The layout is not
#   guessed from a version number but probed (_fla_is_head_first);
# - scale: some take ``scale``, others hard-code K ** -0.5; we call ours with scale = K ** -0.5;
# - our delta-rule ops L2-normalise q and k inside (``use_qk_l2norm=True``), fla's naive forms do not:
#   we hand fla the normalised q and k;
# - argument order of gates: simple_gla (q, k, v, g), gla (q, k, v, gk), delta_rule (q, k, v, beta),
#   gated_delta_rule (q, k, v, beta, g): matched by our input names;
# - our linear_attn is the identity feature map without normaliser, fla's naive_recurrent_linear_attn
#   with normalize=False (its default);
# - fla's naive_retention (RetNet) has no state and fixed decays 1 - 2^(-5-h), our retnet's default:
#   compared with our log_decay=None and no initial state, outputs only.

FLA_REFERENCES: dict[str, tuple[str, str, tuple[str, ...] | None]] = {
    # our op: (fla module, function, our gate inputs in fla's order after q, k, v; None: stateless)
    "simple_gla": ("fla.ops.simple_gla.naive", "naive_recurrent_simple_gla", ("g",)),
    "gla": ("fla.ops.gla.naive", "naive_recurrent_gla", ("gk",)),
    "delta_rule": ("fla.ops.delta_rule.naive", "delta_rule_recurrence", ("beta",)),
    "gated_delta_rule": ("fla.ops.gated_delta_rule.naive", "naive_recurrent_gated_delta_rule", ("beta", "g")),
    "retnet": ("fla.ops.retention.naive", "naive_retention", None),
    "linear_attn": ("fla.ops.linear_attn.naive", "naive_recurrent_linear_attn", ()),  # identity map
}


def _pair(result):
    """fla's naive functions return ``(o, state)``, except stateless ones (``o`` alone)."""
    return result if isinstance(result, tuple) else (result, None)


def _fla_call(fn, tensors: list[torch.Tensor], kwargs: dict, head_first: bool):
    if head_first:
        tensors = [t.transpose(1, 2).contiguous() for t in tensors]
    o, s = _pair(fn(*tensors, **kwargs))
    return (o.transpose(1, 2) if head_first else o), s


def _fla_is_head_first(fn, tensors: list[torch.Tensor], kwargs: dict) -> bool:
    """Feed fla our ``[B, T, H, *]`` tensors as they are and change head 0 only. If fla reads dim 1
    as time, the other heads' outputs stay; if it reads dim 2 as time, 'head 0' is its first token
    and every later 'token' (our other heads) changes."""
    o1, _ = _pair(fn(*tensors, **kwargs))
    changed = [t.clone() for t in tensors]
    for t in changed:
        t[:, :, 0] = t[:, :, 0] * 0.5 + 0.1 if t.dim() > 3 else t[:, :, 0] * 0.5
    o2, _ = _pair(fn(*changed, **kwargs))
    return not torch.equal(o1[:, :, 1:], o2[:, :, 1:])


@pytest.mark.parametrize("name", sorted(set(OPS) & set(FLA_REFERENCES)))
def test_naive_matches_fla_reference(name):
    pytest.importorskip("fla")
    mod_name, fn_name, gate_names = FLA_REFERENCES[name]
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        pytest.skip(f"this fla version has no {mod_name}.{fn_name}: {e}")
    op = REGISTRY[name]
    B, T = 2, 23
    x = make(op, B, T, seed=15)
    scale = D**-0.5
    q, k, v = (x.values[n].float() for n in ("q", "k", "v"))
    our_params = inspect.signature(op.naive).parameters
    if "use_qk_l2norm" in our_params and x.values.get("use_qk_l2norm", our_params["use_qk_l2norm"].default):
        q, k = F.normalize(q, p=2.0, dim=-1, eps=1e-6), F.normalize(k, p=2.0, dim=-1, eps=1e-6)
    fla_params = inspect.signature(fn).parameters
    kwargs = {"scale": scale} if "scale" in fla_params else {}

    if gate_names is None:  # stateless reference with the op's default gates
        o, _ = x.copy(**{n: None for n in x.pos_names[3:]}).call(op.naive, scale=scale)
        tensors = [q, k, v]
        head_first = _fla_is_head_first(fn, tensors, kwargs)
        o_ref, _ = _fla_call(fn, tensors, kwargs, head_first)
        assert_fp32_close(o.float(), o_ref.float(), name=f"{name} output vs fla {fn_name}")
        return

    h0 = prefix_state(op, B, seed=16)
    o, s = x.call(op.naive, scale=scale, initial_state=h0, output_final_state=True)
    tensors = [q, k, v, *(x.values[n].float() for n in gate_names)]
    head_first = _fla_is_head_first(fn, tensors, {**kwargs, "output_final_state": True})
    o_ref, s_ref = _fla_call(
        fn, tensors, {**kwargs, "initial_state": h0.clone(), "output_final_state": True}, head_first
    )
    assert_fp32_close(o.float(), o_ref.float(), name=f"{name} output vs fla {fn_name}")
    assert_fp32_close(s, s_ref.float(), name=f"{name} final state vs fla {fn_name}")


# ------------------------------------------------------------------------------------------------
# the example in docs/linear.md runs
# ------------------------------------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "linear.md"


@pytest.mark.skipif(not DOC.exists(), reason="docs/linear.md not present")
def test_docs_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/linear.md has no python example"
    for code in blocks:
        exec(compile(code, str(DOC), "exec"), {"__name__": "docs_example", "math": math})
