"""Machinery shared by the linear-attention / SSM / recurrent family.

Every op of the family has three forms with one signature style (DESIGN.md, fla's convention)::

    op(q, k, v, <gates...>, *, scale=None, initial_state=None, output_final_state=False,
       cu_seqlens=None) -> (o, final_state)

``naive_*`` (token-by-token, float32, the ground truth), ``chunk_*`` (chunkwise parallel,
differentiable, memory linear in T) and ``step_*`` (a few tokens against a carried state; it takes
the same arguments). Layout ``[B, T, H, D]``; states float32 ``[B, H, K, V]`` (a method whose state
is not one matrix, e.g. Mamba or Aaren, uses a tuple of float32 tensors); gates are log-space (<= 0).

Each method module registers a :class:`LinearOp` so that generic consistency tests and the
benchmark suite cover every op without listing them by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from effattn._checks import check_cu_seqlens, check_same_dtype, check_tensor

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


REGISTRY: dict[str, LinearOp] = {}


def register(op: LinearOp) -> LinearOp:
    if op.name in REGISTRY:
        raise ValueError(f"linear op {op.name!r} is registered twice")
    REGISTRY[op.name] = op
    return op


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
