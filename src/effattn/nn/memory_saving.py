"""Training-memory mechanisms that :class:`effattn.nn.LM` applies to its block stack.

Each one changes what is kept for the backward pass, never the math (except the 8-bit one, whose
error is bounded):

- **recomputation** (``LMConfig(checkpoint="block" | "mixer" | "mlp")``): the wrapped part runs under
  non-reentrant :func:`torch.utils.checkpoint.checkpoint`; only its inputs are kept and its forward is
  run again in the backward (Chen et al., "Training Deep Nets with Sublinear Memory Cost", 2016).
- **chunked MLP** (``LMConfig(chunked_mlp=c)``): the token-wise MLP runs on sequence chunks of ``c``
  tokens, each chunk checkpointed, so the ``[T, hidden]`` intermediate never exists at once
  (Luo et al., "Mini-Sequence Transformer: Optimizing Intermediate Memory for Long Sequences
  Training", 2024).
- **reversible residual stream** (``LMConfig(reversible=True)``): two streams ``x1 = x2 = h``;
  per block ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)`` with ``F = mixer(norm(.))``, ``G = mlp(norm(.))``,
  output ``(y1 + y2) / 2``. :func:`reversible_stack` keeps only the last block's outputs and
  reconstructs ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)`` in the backward (Gomez et al., "The Reversible
  Residual Network", 2017; Kitaev et al., "Reformer: The Efficient Transformer", 2020).
- **8-bit saved activations** (``LMConfig(mesa=True)``, :class:`Int8SavedActivations`): every float
  tensor saved for the backward is stored as int8 with one scale per channel (last dimension),
  ``q = round(127 x / s)``, ``s >= max|x|`` over the other dimensions, the scale a running estimate
  (Pan et al., "Mesa: A Memory-saving Training Framework for Transformers", 2021).

Example::

    >>> import torch
    >>> from effattn.nn.memory_saving import Int8SavedActivations
    >>> x = torch.randn(64, 32, requires_grad=True)
    >>> with Int8SavedActivations(min_numel=1) as mesa:
    ...     y = (x * x).sum()
    >>> y.backward()
    >>> bool(((x.grad - 2 * x).abs() <= 2 * mesa.last_bound + 1e-6).all())
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from effattn._checks import check_float, check_int
from effattn.dist import checkpoint_contexts
from effattn.moe import MoE
from effattn.nn.streambp import streambp_block

__all__ = [
    "CHECKPOINT_MODES",
    "Int8SavedActivations",
    "check_memory_options",
    "chunked_apply",
    "reversible_stack",
    "run_blocks",
]

CHECKPOINT_MODES = ("none", "block", "mixer", "mlp")


def check_memory_options(
    checkpoint_mode: str, reversible: bool, chunked_mlp: int, chunked_loss: int, mesa: bool, streambp: int = 0
) -> None:
    """Validate the memory options of :class:`effattn.nn.LMConfig` (names the bad one)."""
    if checkpoint_mode not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint must be one of {CHECKPOINT_MODES}, got {checkpoint_mode!r}")
    for name, value in (("reversible", reversible), ("mesa", mesa)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    check_int("chunked_mlp", chunked_mlp, minimum=0)
    check_int("chunked_loss", chunked_loss, minimum=0)
    if reversible and checkpoint_mode != "none":
        raise ValueError(
            f"reversible=True already recomputes every block in the backward; use checkpoint='none' "
            f"with it, got checkpoint={checkpoint_mode!r}"
        )
    check_int("streambp", streambp, minimum=0)
    if streambp:
        clash = {
            "checkpoint": checkpoint_mode != "none",
            "reversible": reversible,
            "chunked_mlp": bool(chunked_mlp),
            "mesa": mesa,
        }
        on = [k for k, v in clash.items() if v]
        if on:
            raise ValueError(
                f"streambp={streambp} already recomputes every block in sequence chunks of {streambp} tokens "
                f"(its MLP included); turn off {on} with it"
            )


def chunked_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``fn(x)`` for a token-wise ``fn`` on ``x [B, T, ...]``, computed on sequence chunks of ``chunk``
    tokens, each chunk recomputed in the backward (non-reentrant checkpoint): the peak intermediate is
    that of one chunk. Equal to ``fn(x)`` (forward and gradients) for any token-wise ``fn``.

    >>> import torch
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    >>> x = torch.randn(2, 9, 4)
    >>> torch.allclose(chunked_apply(mlp, x, 4), mlp(x), atol=1e-6)
    True
    """
    check_int("chunk", chunk, minimum=1)
    if x.dim() < 2:
        raise ValueError(f"x must be [batch, seq, ...], got shape {tuple(x.shape)}")
    if x.shape[1] <= chunk:
        return fn(x)
    grad = torch.is_grad_enabled()
    parts = [checkpoint(fn, piece, use_reentrant=False) if grad else fn(piece) for piece in x.split(chunk, dim=1)]
    return torch.cat(parts, dim=1)


# ------------------------------------------------------------------------------------------------
# 8-bit saved activations (Mesa)
# ------------------------------------------------------------------------------------------------


class Int8SavedActivations:
    """Context manager: tensors saved for the backward inside it are stored in int8 (Mesa).

    A float tensor of at least ``min_numel`` elements and 2 or more dims that is not one of ``skip``
    (parameters: their storage is shared, not copied) is stored as ``q = round(127 x / s)`` in int8 with
    one float32 scale per channel (the last dimension, the head-dim or feature channel), and restored as
    ``q s / 127``. The scale is a running estimate kept per saved tensor (its order in the forward and
    its channel count): ``r <- momentum r + (1 - momentum) max|x|``, and ``s = max(r, max|x|)``, so no
    value is clipped and each restored element is within ``s / 254`` of the original.
    ``last_bound`` is the largest such per-element bound of the last forward; ``stats`` counts bytes
    stored vs the float bytes they replace.
    """

    def __init__(self, momentum: float = 0.9, min_numel: int = 4096, skip: Iterable[torch.Tensor] = ()):
        self.momentum = check_float("momentum", momentum, 0.0, 1.0, hi_open=True)
        self.min_numel = check_int("min_numel", min_numel, minimum=1)
        self.running: dict[tuple[int, int], torch.Tensor] = {}
        self.skip_ptrs: set[int] = set()
        self.set_skip(skip)
        self.last_bound = 0.0
        self.stats = {"saved_bytes": 0, "float_bytes": 0}
        self._count = 0
        self._hooks: contextlib.AbstractContextManager | None = None
        self._packed: dict[tuple, tuple] = {}

    def set_skip(self, tensors: Iterable[torch.Tensor]) -> None:
        """Tensors (usually the model's parameters) never quantized, by storage address."""
        self.skip_ptrs = {t.data_ptr() for t in tensors}

    def _pack(self, t: torch.Tensor):
        if (
            not t.is_floating_point()
            or t.dim() < 2
            or t.numel() < self.min_numel
            or t.data_ptr() in self.skip_ptrs
            or isinstance(t, nn.Parameter)
        ):
            return t
        # one int8 copy per tensor: the same activation is often saved by several ops (q, k, v projections).
        # The address alone is no identity: a freed tensor's memory is soon reused by a new one of the same
        # shape, so a hit also needs the very tensor, still alive (a weak reference: holding the float
        # tensor would keep what int8 storage is meant to free).
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t._version)
        hit = self._packed.get(ident)
        if hit is not None and hit[0]() is t:
            return hit[1]
        x = t.detach()
        amax = x.abs().flatten(0, -2).amax(dim=0).float()
        key = (self._count, x.shape[-1])
        self._count += 1
        run = self.running.get(key)
        run = amax if run is None or run.shape != amax.shape else self.momentum * run + (1 - self.momentum) * amax
        self.running[key] = run
        scale = torch.maximum(run, amax).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(x.float() / scale * 127).clamp_(-127, 127).to(torch.int8)
        self.last_bound = max(self.last_bound, float(scale.max()) / 254)
        self.stats["saved_bytes"] += q.numel() + 4 * scale.numel()
        self.stats["float_bytes"] += x.numel() * x.element_size()
        packed = (q, scale, x.dtype)
        self._packed[ident] = (weakref.ref(t), packed)
        return packed

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        q, scale, dtype = packed
        return (q.float() * (scale / 127)).to(dtype)

    def __enter__(self) -> Int8SavedActivations:
        self._count = 0
        self.last_bound = 0.0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._packed = {}
        hooks, self._hooks = self._hooks, None
        hooks.__exit__(*exc)


# ------------------------------------------------------------------------------------------------
# reversible residual stream
# ------------------------------------------------------------------------------------------------


class _Reversible(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, x2, fns, groups, aux, *params):
        aux_values = []
        with torch.no_grad():
            for (f, g), mod in zip(fns, aux):
                x1 = x1 + f(x2)
                x2 = x2 + g(x1)
                if mod is not None:  # an MoE layer: its auxiliary loss becomes an output of this function
                    aux_values.append(mod.last_aux.loss.detach().clone())
        # plain attributes, not save_for_backward: the outputs must not pass through saved-tensor hooks
        # (a lossy hook would break the reconstruction)
        ctx.y = (x1.detach(), x2.detach())
        ctx.fns, ctx.groups, ctx.aux, ctx.n_params = fns, groups, aux, len(params)
        return (x1, x2, *aux_values)

    @staticmethod
    def backward(ctx, dy1, dy2, *d_aux):
        y1, y2 = ctx.y
        grads: list[torch.Tensor | None] = [None] * ctx.n_params
        d_aux = list(d_aux)
        for (f, g), (f_idx, g_idx, f_params, g_params), mod in zip(
            reversed(ctx.fns), reversed(ctx.groups), reversed(ctx.aux)
        ):
            with torch.enable_grad():
                y1_ = y1.detach().requires_grad_()
                gy = g(y1_)
            outs, gouts = [gy], [dy2]
            if mod is not None:  # the aux loss's gradient, from the recomputed router
                da = d_aux.pop()
                if da is not None:
                    outs.append(mod.last_aux.loss)
                    gouts.append(da)
            d = torch.autograd.grad(outs, (y1_, *g_params), gouts, allow_unused=True)
            if mod is not None:  # keep no graph alive in the layer's statistics
                mod.last_aux = dataclasses.replace(
                    mod.last_aux,
                    loss=mod.last_aux.loss.detach(),
                    lbl=mod.last_aux.lbl.detach(),
                    z_loss=mod.last_aux.z_loss.detach(),
                )
            dy1 = dy1 + d[0]
            _accumulate(grads, g_idx, d[1:])
            with torch.no_grad():
                x2 = y2 - gy
            with torch.enable_grad():
                x2_ = x2.detach().requires_grad_()
                fx = f(x2_)
            d = torch.autograd.grad(fx, (x2_, *f_params), dy1, allow_unused=True)
            dy2 = dy2 + d[0]
            _accumulate(grads, f_idx, d[1:])
            with torch.no_grad():
                x1 = y1 - fx
            y1, y2 = x1, x2
        ctx.y = None
        return (dy1, dy2, None, None, None, *grads)


def _accumulate(grads: list, idx: Sequence[int], new: Sequence[torch.Tensor | None]) -> None:
    for i, g in zip(idx, new):
        if g is not None:
            grads[i] = g if grads[i] is None else grads[i] + g


def reversible_stack(
    x: torch.Tensor,
    fns: Sequence[tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]],
    params: Sequence[tuple[Sequence[nn.Parameter], Sequence[nn.Parameter]]],
    aux: Sequence[MoE | None] | None = None,
) -> torch.Tensor:
    """The reversible two-stream stack: ``x1 = x2 = x``; per ``(F, G)`` of ``fns``,
    ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``; returns ``(y1 + y2) / 2``. Under autograd only the
    final streams are kept; the backward reconstructs each block's inputs from its outputs
    (RevNet, Gomez et al. 2017) and recomputes ``F``, ``G`` there. ``params[i]``: the parameters
    ``F_i`` and ``G_i`` use (their gradients are returned through this function). ``aux[i]``: the
    :class:`effattn.moe.MoE` that ``G_i`` calls (or None): its ``last_aux.loss`` is replaced by an output
    of the reversible function, so the auxiliary loss's gradient reaches the router through the
    recomputation (``lbl_scope="micro"``; the global scope counts routed tokens in the recomputation too).

    >>> import torch
    >>> f, g = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    >>> x = torch.randn(2, 3, 4)
    >>> y = reversible_stack(x, [(f, g)], [(list(f.parameters()), list(g.parameters()))])
    >>> y1 = x + f(x); torch.allclose(y, (y1 + x + g(y1)) / 2, atol=1e-6)
    True
    """
    if len(fns) != len(params):
        raise ValueError(f"fns and params must have one entry per block, got {len(fns)} and {len(params)}")
    flat: list[nn.Parameter] = []
    index: dict[int, int] = {}
    groups = []
    for f_params, g_params in params:
        ids = []
        for ps in (f_params, g_params):
            ps = [p for p in ps if p.requires_grad]
            for p in ps:
                if id(p) not in index:
                    index[id(p)] = len(flat)
                    flat.append(p)
            ids.append(([index[id(p)] for p in ps], ps))
        groups.append((ids[0][0], ids[1][0], ids[0][1], ids[1][1]))
    aux = list(aux) if aux is not None else [None] * len(fns)
    if len(aux) != len(fns):
        raise ValueError(f"aux must have one entry per block, got {len(aux)} for {len(fns)} blocks")
    if torch.is_grad_enabled() and (x.requires_grad or flat):
        for mod in aux:
            if mod is not None and mod.lbl_scope != "micro":
                raise ValueError(
                    f"reversible=True with an MoE layer of lbl_scope={mod.lbl_scope!r}: the recomputation in the "
                    "backward would count its tokens twice; use lbl_scope='micro' or checkpoint='mlp'"
                )
        y1, y2, *aux_out = _Reversible.apply(x, x, list(fns), groups, aux, *flat)
        for mod, loss in zip([m for m in aux if m is not None], aux_out):
            mod.last_aux = dataclasses.replace(mod.last_aux, loss=loss)
    else:
        y1 = y2 = x
        for f, g in fns:
            y1 = y1 + f(y2)
            y2 = y2 + g(y1)
    return (y1 + y2) / 2


# ------------------------------------------------------------------------------------------------
# the block stack of effattn.nn.LM
# ------------------------------------------------------------------------------------------------


def _mlp(block: nn.Module, chunk: int, valid=None) -> Callable[[torch.Tensor], torch.Tensor]:
    def g(h: torch.Tensor) -> torch.Tensor:
        if isinstance(block.mlp, MoE):
            # an MoE layer routes over the whole batch (capacity, load balancing): not token-wise, no chunks
            return block.mlp(block.mlp_norm(h), valid)
        fn = lambda x: block.mlp(block.mlp_norm(x))  # noqa: E731
        return chunked_apply(fn, h, chunk) if chunk else fn(h)

    return g


def _block(block: nn.Module, h, state, valid, mode: str, chunk: int):
    def mix(x, s, v):
        return block.mixer(block.mixer_norm(x), s, v)

    g = _mlp(block, chunk, valid)
    if mode == "mixer":
        y, state = checkpoint(mix, h, state, valid, use_reentrant=False, context_fn=checkpoint_contexts)
    else:
        y, state = mix(h, state, valid)
    h = h + y
    if mode == "mlp":
        return h + checkpoint(g, h, use_reentrant=False), state
    return h + g(h), state


def run_blocks(blocks: nn.ModuleList, h: torch.Tensor, states: list, valid, config) -> tuple[torch.Tensor, list]:
    """Run :class:`effattn.nn.LM`'s blocks on ``h`` with the memory options of ``config`` (an
    :class:`effattn.nn.LMConfig`): ``checkpoint``, ``chunked_mlp``, ``reversible``, ``mesa``,
    ``streambp`` (:mod:`effattn.nn.streambp`).
    Recomputation and 8-bit storage apply only while autograd records (training); decoding with a
    carried ``state`` runs the same math directly. Returns ``(h, new_states)``."""
    mode = config.checkpoint
    chunk = config.chunked_mlp
    training = torch.is_grad_enabled()
    ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
    if config.mesa and training:
        mesa = getattr(blocks, "int8_saved_activations", None)
        if mesa is None:
            mesa = Int8SavedActivations()
            blocks.int8_saved_activations = mesa
        mesa.set_skip(blocks.parameters())
        ctx = mesa
    with ctx:
        if config.streambp and training and all(s is None for s in states):
            if valid is not None:
                raise ValueError("streambp: training batches with padding (valid) are not supported")
            for b in blocks:
                h = streambp_block(b, h, config.streambp)
            return h, [None] * len(blocks)
        if config.reversible:
            fresh = all(s is None for s in states)
            if fresh and training:
                fns = [
                    ((lambda x, b=b: b.mixer(b.mixer_norm(x), None, valid)[0]), _mlp(b, chunk, valid)) for b in blocks
                ]
                params = [
                    (
                        [*b.mixer_norm.parameters(), *b.mixer.parameters()],
                        [*b.mlp_norm.parameters(), *b.mlp.parameters()],
                    )
                    for b in blocks
                ]
                aux = [b.mlp if isinstance(b.mlp, MoE) else None for b in blocks]
                return reversible_stack(h, fns, params, aux), [None] * len(blocks)
            x1 = x2 = h
            new_states = []
            for b, s in zip(blocks, states):
                y, s = b.mixer(b.mixer_norm(x2), s, valid)
                x1 = x1 + y
                x2 = x2 + _mlp(b, chunk, valid)(x1)
                new_states.append(s)
            return (x1 + x2) / 2, new_states
        new_states = []
        for b, s in zip(blocks, states):
            if not chunk and (mode == "none" or not training or s is not None):
                h, s = b(h, s, valid)
            elif not training or s is not None:
                h, s = _block(b, h, s, valid, "none", chunk)
            elif mode == "block" and not chunk:
                # context_fn: the recompute runs under the same sequence parallelism, ring layers reuse
                # their first result (effattn.dist.checkpoint_contexts)
                h, s = checkpoint(b, h, s, valid, use_reentrant=False, context_fn=checkpoint_contexts)
            elif mode == "block":
                h, s = checkpoint(
                    _block, b, h, s, valid, "none", chunk, use_reentrant=False, context_fn=checkpoint_contexts
                )
            else:
                h, s = _block(b, h, s, valid, mode, chunk)
            new_states.append(s)
        return h, new_states
