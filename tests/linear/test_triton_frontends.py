"""Every linear front end with Triton kernels: ``backend="triton"`` equals ``backend="torch"`` through the
public call (outputs, final states, gradients of every differentiable input including gates, betas and the
initial state), and the ``auto`` decision of :func:`effattn.linear.choose_linear_backend` without a GPU.

The registry is enumerated: an op whose chunk form takes ``backend`` is checked here, and the set of such
ops is pinned, so a front end that loses its ``backend`` keyword fails. On the CPU the kernels run in
Triton's interpreter (``TRITON_INTERPRET=1`` set before anything imports triton); with CUDA the same tests
run compiled on the GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import inspect  # noqa: E402

import pytest  # noqa: E402

from effattn.linear import (  # noqa: E402
    REGISTRY,
    choose_linear_backend,
    chunk_delta_rule,
    chunk_lightning_attn,
    chunk_linear_attn,
    chunk_retention,
    chunk_simple_gla,
)
from effattn.linear._triton import AUTO_MAX_DIM, triton_linear_status  # noqa: E402
from tests.helpers import assert_fp32_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS = triton_linear_status(torch.device(DEVICE))
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not RUNS[0], reason=f"triton cannot run here: {RUNS[1]}"
)

# the front ends whose chunk form has the Triton kernels (scalar decay: simple GLA = Mamba-2 SSD, RetNet,
# Lightning, linear attention with every feature map; the gated delta rule's kernels: DeltaNet, Gated DeltaNet)
WITH_TRITON = {
    "simple_gla",
    "retnet",
    "lightning_attn",
    "linear_attn",
    "linear_attn_elu1",
    "based",
    "cottention",
    "delta_rule",
    "gated_delta_rule",
}


def _takes_backend(op) -> bool:
    return "backend" in inspect.signature(op.chunk).parameters


def test_the_ops_with_a_backend_keyword_are_pinned():
    assert {name for name in REGISTRY if _takes_backend(REGISTRY[name])} == WITH_TRITON
    # same signature otherwise: the chunk form's parameters are the naive form's + chunk_size + backend
    for name in WITH_TRITON:
        op = REGISTRY[name]
        chunk = list(inspect.signature(op.chunk).parameters)
        assert chunk == [*inspect.signature(op.naive).parameters, "chunk_size", "backend"], name
        assert inspect.signature(op.chunk).parameters["backend"].default == "auto"


def _state_parts(shape, gen):
    """A random initial state of ``shape`` (a tuple of shapes for the normalised linear attentions, whose
    normaliser ``z`` is kept positive so that the denominator stays away from 0)."""
    if isinstance(shape[0], (tuple, list)):
        S, z = shape
        return (0.5 * torch.randn(*S, generator=gen)).to(DEVICE), (1.0 + torch.rand(*z, generator=gen)).to(DEVICE)
    return (0.5 * torch.randn(*shape, generator=gen)).to(DEVICE)


def _ran_triton(t: torch.Tensor) -> bool:
    """Whether the autograd graph of ``t`` holds a Triton kernel's node (so a front end that drops its
    ``backend`` keyword, running PyTorch twice, fails the equality tests)."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ in ("_ScalarDecayChunkBackward", "_GatedDeltaChunkBackward"):
            return True
        todo.extend(n for n, _ in node.next_functions)
    return False


def _run(op, backend, args, kwargs, s0, cu_seqlens=None):
    """Chunk form with ``backend``: outputs, final state and the gradients of a random weighted sum of both
    with respect to every floating input and every part of the initial state."""
    names = [p for p in inspect.signature(op.naive).parameters][: len(args)]
    leaves = {n: x.detach().clone().requires_grad_() for n, x in zip(names, args) if x.is_floating_point()}
    call_args = [leaves.get(n, x) for n, x in zip(names, args)]
    parts = s0 if isinstance(s0, tuple) else (s0,)
    state_leaves = [p.detach().clone().requires_grad_() for p in parts]
    state = tuple(state_leaves) if isinstance(s0, tuple) else state_leaves[0]
    o, s = op.chunk(
        *call_args,
        **kwargs,
        initial_state=state,
        output_final_state=True,
        cu_seqlens=cu_seqlens,
        chunk_size=16,
        backend=backend,
    )
    s_parts = s if isinstance(s, tuple) else (s,)
    assert _ran_triton(o) == (backend == "triton"), f"{op.name}: backend={backend!r} not honoured"
    gen = torch.Generator().manual_seed(11)
    loss = (o.double() * torch.randn(o.shape, generator=gen).to(DEVICE)).sum()
    for p in s_parts:
        loss = loss + (p.double() * torch.randn(p.shape, generator=gen).to(DEVICE)).sum()
    loss.backward()
    grads = {n: x.grad for n, x in leaves.items()} | {f"state[{i}]": p.grad for i, p in enumerate(state_leaves)}
    return o.detach(), [p.detach() for p in s_parts], grads


@needs_triton
@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(WITH_TRITON))
def test_front_end_triton_equals_torch(name):
    """B=2, T=37 (three chunks of 16, the last one partial), H=2, D=12 (padded to 16 in the kernels)."""
    op = REGISTRY[name]
    torch.manual_seed(0)
    B, T, H, D = 2, 37, 2, 12
    args, kwargs = op.make_inputs(B, T, H, D, device=DEVICE, gate_strength=0.5)
    s0 = _state_parts(op.state_shape(B, H, D), torch.Generator().manual_seed(1))
    o, s, grads = _run(op, "triton", args, kwargs, s0)
    ro, rs, rgrads = _run(op, "torch", args, kwargs, s0)
    assert_fp32_close(o, ro, 1e-5, f"{name} o")
    for i, (a, r) in enumerate(zip(s, rs)):
        assert_fp32_close(a, r, 1e-5, f"{name} final state[{i}]")
    assert set(grads) == set(rgrads) and any(n.startswith("state") for n in grads)
    for n, r in rgrads.items():
        assert grads[n] is not None and r is not None, f"{name}: no gradient for {n}"
        assert_fp32_close(grads[n], r, 1e-4, f"{name} d{n}")


@needs_triton
@pytest.mark.cuda
def test_front_ends_with_packed_sequences_and_bf16():
    """Packed sequences (one state per sequence) through the public calls, and bf16 inputs: the output
    keeps the input dtype and equals the torch backend's bf16 result closely (both compute in float32)."""
    gen = torch.Generator().manual_seed(2)
    T, H, K = 29, 2, 8
    q, k, v = (torch.randn(1, T, H, K, generator=gen).to(DEVICE) for _ in range(3))
    beta = torch.rand(1, T, H, generator=gen).to(DEVICE)
    cu = torch.tensor([0, 9, 10, 29], device=DEVICE)
    s0 = torch.randn(3, H, K, K, generator=gen).to(DEVICE)
    for fn, extra in [
        (chunk_retention, ()),
        (chunk_delta_rule, (beta,)),
    ]:
        kw = dict(initial_state=s0, output_final_state=True, cu_seqlens=cu, chunk_size=16)
        o, s = fn(q, k, v, *extra, **kw, backend="triton")
        ro, rs = fn(q, k, v, *extra, **kw, backend="torch")
        assert_fp32_close(o, ro, 1e-5, f"{fn.__name__} o")
        assert_fp32_close(s, rs, 1e-5, f"{fn.__name__} state")
    lo = [x.bfloat16() for x in (q, k, v)]
    o = chunk_lightning_attn(*lo, backend="triton")[0]
    ro = chunk_lightning_attn(*lo, backend="torch")[0]
    assert o.dtype == torch.bfloat16
    assert (o.float() - ro.float()).abs().max() <= 2e-2 * ro.float().abs().max()


@needs_triton
def test_triton_on_cpu_without_the_interpreter_says_how_to_enable_it(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 5, 1, 4)
    g = -torch.rand(1, 5, 1)
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run on cpu tensors: .*TRITON_INTERPRET=1"):
        chunk_simple_gla(q, q, q, g, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        chunk_delta_rule(q, q, q, torch.rand(1, 5, 1), backend="triton")
    # auto never needs the interpreter: the PyTorch form on CPU tensors
    assert torch.equal(chunk_simple_gla(q, q, q, g)[0], chunk_simple_gla(q, q, q, g, backend="torch")[0])


def test_bad_backend_names_the_argument():
    q = torch.randn(1, 5, 1, 4)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton'\), got 'cuda'"):
        chunk_linear_attn(q, q, q, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        chunk_retention(q, q, q, backend="Triton")


def test_float64_is_refused_by_triton_only():
    q = torch.randn(1, 5, 1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        choose_linear_backend("triton", "cuda", torch.float64, 4, 4, triton=(True, ""))
    assert chunk_lightning_attn(q, q, q, backend="auto")[0].dtype == torch.float64


@pytest.mark.parametrize(
    "device,dtype,K,V,status,expected,reason",
    [
        ("cuda", torch.bfloat16, 64, 64, (True, ""), "triton", "cover"),
        ("cuda", torch.float16, 128, 128, (True, ""), "triton", "cover"),
        ("cuda", torch.float32, 128, 129, (True, ""), "torch", "exceeds 128"),  # normalised V = 128 + 1
        ("cuda", torch.float32, 273, 64, (True, ""), "torch", "state [273, 64]"),  # Based's Taylor features
        ("cuda", torch.float64, 64, 64, (True, ""), "torch", "float64"),
        ("cuda", torch.float32, 64, 64, (False, "triton is not installed"), "torch", "not installed"),
        ("cpu", torch.float32, 64, 64, (True, ""), "torch", "cpu tensors run the PyTorch"),
        ("mps", torch.float32, 64, 64, (False, "device 'mps' not supported"), "torch", "mps"),
    ],
)
def test_auto_decision_without_a_gpu(device, dtype, K, V, status, expected, reason):
    choice, why = choose_linear_backend("auto", device, dtype, K, V, triton=status)
    assert choice == expected and reason in why
    assert AUTO_MAX_DIM == 128
    assert choose_linear_backend("torch", device, dtype, K, V, triton=status) == ("torch", "asked for")
    if not status[0]:
        with pytest.raises(RuntimeError, match=f"backend='triton' cannot run on {device} tensors"):
            choose_linear_backend("triton", device, dtype, K, V, triton=status)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_auto_goes_to_triton_for_cuda_tensors_and_runs_it(monkeypatch):
    """The front end acts on the decision: with the device type of a CUDA tensor (faked: the decision is
    taken from ``x.device.type``), auto calls the Triton launch; on CPU tensors it does not."""
    import effattn.linear._scalar_decay as sd

    calls = []

    def fake_triton(q, k, v, g, scale, state, chunk_size):
        calls.append(chunk_size)
        return sd.chunk_scalar_decay(q, k, v, g, scale, state, chunk_size)

    monkeypatch.setattr(sd, "chunk_scalar_decay_triton", fake_triton)
    real = sd.resolve_backend
    monkeypatch.setattr(
        sd, "resolve_backend", lambda b, x, v=None: choose_linear_backend(b, "cuda", x.dtype, x.shape[-1], v)[0]
    )
    q = torch.randn(1, 20, 2, 8)
    g = -torch.rand(1, 20, 2)
    o = chunk_simple_gla(q, q, q, g, chunk_size=16)[0]
    assert calls == [16] and torch.allclose(o, chunk_simple_gla(q, q, q, g, backend="torch")[0])
    monkeypatch.setattr(sd, "resolve_backend", real)
    chunk_simple_gla(q, q, q, g, chunk_size=16)
    assert calls == [16]  # CPU tensors: auto stays on PyTorch


@needs_triton
@pytest.mark.cuda
@pytest.mark.parametrize("D", [64, 128])
def test_kernels_at_the_benchmark_head_dims(D):
    """The head dims of the GPU benchmark and of auto's bound (AUTO_MAX_DIM): on a GPU this is where the
    kernels' on-chip tiles are largest (compile limits, register pressure); here their logic at those tiles."""
    gen = torch.Generator().manual_seed(D)
    B, T, H = 1, 19, 1
    q, k, v = (torch.randn(B, T, H, D, generator=gen).to(DEVICE) for _ in range(3))
    g = -torch.rand(B, T, H, generator=gen).to(DEVICE) * 0.5
    beta = torch.rand(B, T, H, generator=gen).to(DEVICE)
    for name, args in [("simple_gla", (q, k, v, g)), ("gated_delta_rule", (q, k, v, g, beta))]:
        op = REGISTRY[name]
        s0 = _state_parts(op.state_shape(B, H, D), gen)
        o, s, grads = _run(op, "triton", args, {}, s0)
        ro, rs, rgrads = _run(op, "torch", args, {}, s0)
        assert_fp32_close(o, ro, 1e-5, f"{name} D={D} o")
        assert_fp32_close(s[0], rs[0], 1e-5, f"{name} D={D} final state")
        for n, r in rgrads.items():
            assert_fp32_close(grads[n], r, 1e-4, f"{name} D={D} d{n}")
