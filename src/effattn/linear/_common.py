"""Machinery shared by the linear-attention / SSM / recurrent family.

Every op of the family has three forms with one signature style (DESIGN.md, fla's convention)::

    op(q, k, v, <gates...>, *, scale=None, initial_state=None, output_final_state=False,
       cu_seqlens=None) -> (o, final_state)

``naive_*`` (token-by-token, float32, the ground truth), ``chunk_*`` (chunkwise parallel,
differentiable, memory linear in T) and ``step_*`` (a few tokens against a carried state; it takes
the same arguments). Layout ``[B, T, H, D]``; states float32 ``[B, H, K, V]`` (a method whose state
is not one matrix, e.g. Mamba or Aaren, uses a tuple of float32 tensors); gates are log-space (<= 0).

Each method module registers a :class:`LinearOp` in :data:`REGISTRY` (an
:class:`effattn._registry.Registry` that imports every module of the package on first lookup), so that
generic consistency tests and the benchmark suite cover every op without listing them by hand. The
chunk helpers every chunkwise form uses (:func:`check_chunk_size`, :func:`to_chunks`,
:func:`from_chunks`) live here, once for the family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from effattn._checks import check_cu_seqlens, check_positive_int, check_same_dtype, check_tensor
from effattn._registry import Registry

State = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class LinearOp:
    """One registered method: its three forms and a factory of example inputs.

    ``make_inputs(B, T, H, D, *, device, dtype, gate_strength)`` returns ``(args, kwargs)`` for any
    of the forms (tensors as leaves, so tests can ask for their gradients). ``gate_strength`` in
    [0, 1] goes from near-zero to very strong decay where the method has gates.
    ``state_shape(B, H, D)`` gives the state's shape(s) for ``initial_state`` tests.
    """

    name: str
    naive: Callable
    chunk: Callable
    step: Callable
    make_inputs: Callable
    state_shape: Callable
    differentiable_args: tuple[str, ...] = field(default=("q", "k", "v"))


#: Every linear op by name (``REGISTRY["gla"]``, ``sorted(REGISTRY)``, ``REGISTRY.items()``, ``dict(REGISTRY)``).
REGISTRY: Registry[LinearOp] = Registry("linear op", package="effattn.linear")


def register(op: LinearOp) -> LinearOp:
    """Add ``op`` to :data:`REGISTRY` under ``op.name`` (a name taken by another op raises)."""
    REGISTRY.register(op.name, op)
    return op


def check_chunk_size(chunk_size) -> int:
    """The chunk length of every chunkwise form: an ``int >= 1`` (it need not divide T)."""
    return check_positive_int("chunk_size", chunk_size)


def to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``[B, T, H, *rest]`` -> ``[B, H, N, C, *rest]`` (a view where no padding is needed), zero-padded at
    the end to ``N * C`` tokens, ``N = ceil(T / C)``.

    Zero padding is neutral for every chunkwise kernel of the family: padded keys (and betas, routing
    masks) add nothing to the state, padded log-gates are 0 (no decay), and padded outputs are cut off.
    """
    B, T, H = x.shape[:3]
    rest = x.shape[3:]
    N = -(-T // chunk_size)
    pad = N * chunk_size - T
    if pad:
        x = torch.cat([x, x.new_zeros(B, pad, H, *rest)], dim=1)
    x = x.reshape(B, N, chunk_size, H, *rest)
    return x.permute(0, 3, 1, 2, *range(4, x.dim()))


def from_chunks(o: torch.Tensor, T: int) -> torch.Tensor:
    """``[B, H, N, C, V]`` -> ``[B, T, H, V]`` (drops the padding)."""
    B, H, N, C, V = o.shape
    return o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]


def check_linear_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """``q, k [B, T, H, K]``, ``v [B, T, H, V]``; returns ``(B, T, H, K, V)``."""
    check_tensor("q", q, 4, "[batch, seq, heads, key_dim]")
    check_tensor("k", k, 4, "[batch, seq, heads, key_dim]")
    check_tensor("v", v, 4, "[batch, seq, heads, value_dim]")
    check_same_dtype(q=q, k=k, v=v)
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, T, H, K]: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with q's B, T, H: q {tuple(q.shape)}, v {tuple(v.shape)}")
    B, T, H, K = q.shape
    return B, T, H, K, v.shape[3]


def check_state(name: str, state: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    """A carried state must have exactly ``shape``; it is used in float32."""
    if state is None:
        return None
    check_tensor(name, state, len(shape), str(list(shape)))
    if tuple(state.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(state.shape)}")
    return state.float()


def _slice_state(state: State | None, i: int) -> State | None:
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s[i : i + 1] for s in state)
    return state[i : i + 1]


def _cat_states(states: list[State]) -> State:
    if isinstance(states[0], tuple):
        return tuple(torch.cat([s[j] for s in states]) for j in range(len(states[0])))
    return torch.cat(states)


def run_varlen(
    op: Callable,
    cu_seqlens: torch.Tensor,
    seq_args: dict[str, torch.Tensor | None],
    other_kwargs: dict,
    initial_state: State | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, State | None]:
    """Packed sequences ``[1, total, ...]`` split at ``cu_seqlens``: run ``op`` per sequence with its
    own state (``initial_state[i]``), concatenate outputs; the final state is ``[N, ...]``."""
    total = next(t for t in seq_args.values() if t is not None).shape[1]
    check_cu_seqlens(cu_seqlens, 1, total)
    bounds = cu_seqlens.tolist()
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        piece = {n: (t[:, a:b] if t is not None else None) for n, t in seq_args.items()}
        o, s = op(
            **piece,
            **other_kwargs,
            initial_state=_slice_state(initial_state, i),
            output_final_state=output_final_state,
        )
        outs.append(o)
        finals.append(s)
    o = torch.cat(outs, dim=1)
    return o, (_cat_states(finals) if output_final_state else None)
