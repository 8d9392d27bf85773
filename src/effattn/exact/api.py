"""``effattn.attention``: one entry point over the backends of :mod:`effattn.exact.backends`.

Each backend declares what it supports as data (:class:`~effattn.exact.backends.Capabilities`:
devices, dtypes, head dims, GQA, mask kinds, score mods and features, backward, determinism, size
bounds), and ``why_not(call)`` derives from it the human-readable reasons it cannot run a call
(empty means it can, as xFormers' fmha operators do). ``auto`` tries the backends with an
``auto_priority`` in ascending order (``sdpa``, then ``tiled``) and runs the first with no reasons;
:func:`explain` prints the reasons and the rule.
"""

from __future__ import annotations

import dataclasses
import inspect
import textwrap
from dataclasses import dataclass

import torch

from effattn._checks import check_cu_seqlens, check_qkv, check_scale
from effattn.exact.backends import REGISTRY, AttentionCall, auto_order, backend_names
from effattn.exact.backends.reference import ReferenceBackend
from effattn.exact.backends.sdpa import SdpaBackend
from effattn.exact.backends.tiled import TiledBackend
from effattn.exact.block_mask import BlockMask
from effattn.exact.masks import (
    alibi,
    and_masks,
    causal_mask,
    check_mod_signature,
    compose_score_mods,
    document_ids_from_cu_seqlens,
    document_mask,
    score_mod_tensors,
    sliding_window_mask,
    tanh_softcap,
    window_bounds,
)
from effattn.exact.nonfinite import nonfinite_keys, poison_rows, zero_keys

__all__ = [
    "BACKENDS",
    "AttentionCall",
    "Explanation",
    "ReferenceBackend",
    "SdpaBackend",
    "TiledBackend",
    "attention",
    "attention_call",
    "explain",
]

#: The names ``backend=`` takes: ``"auto"`` and every registered backend (auto's order first).
BACKENDS = ("auto", *backend_names())


def _build_call(
    q,
    k,
    v,
    *,
    causal,
    window,
    mask_mod,
    score_mod,
    block_mask,
    scale,
    softcap,
    alibi_slopes,
    sinks,
    cu_seqlens,
    return_lse,
) -> AttentionCall:
    B, Tq, Tk, Hq, Hkv, D, Dv = check_qkv(q, k, v)
    scale = check_scale(scale, D)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    win = window_bounds(window, causal) if window is not None else None
    if mask_mod is not None:
        check_mod_signature("mask_mod", mask_mod, 4)
    if score_mod is not None:
        check_mod_signature("score_mod", score_mod, 5)
    if softcap is not None:
        tanh_softcap(softcap)  # validates
    for name, t in (("alibi_slopes", alibi_slopes), ("sinks", sinks)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (Hq,)):
            raise ValueError(f"{name} must be a tensor of shape [heads_q] = [{Hq}], got {getattr(t, 'shape', t)!r}")
    if cu_seqlens is not None:
        if Tq != Tk:
            raise ValueError(f"cu_seqlens packs self-attention: seq_q ({Tq}) must equal seq_k ({Tk})")
        check_cu_seqlens(cu_seqlens, B, Tq)
    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask must be an effattn BlockMask, got {type(block_mask).__name__}")
        if (block_mask.q_len, block_mask.kv_len) != (Tq, Tk):
            raise ValueError(
                f"block_mask is for (q_len, kv_len) = {(block_mask.q_len, block_mask.kv_len)}, the call has {(Tq, Tk)}"
            )
        Bm, Hm = block_mask.kv_indices.shape[:2]
        if Bm not in (1, B) or Hm not in (1, Hq):
            raise ValueError(f"block_mask batch/heads dims {(Bm, Hm)} must be 1 or match (batch, heads_q) = {(B, Hq)}")
        if causal or window is not None or mask_mod is not None or cu_seqlens is not None:
            raise ValueError(
                "block_mask already carries the mask: build it with the mask_mod "
                "(create_block_mask / BlockMask.from_kv_indices(mask_mod=...)) instead of also "
                "passing causal/window/mask_mod/cu_seqlens"
            )
    call = AttentionCall(
        q,
        k,
        v,
        B,
        Tq,
        Tk,
        Hq,
        Hkv,
        D,
        Dv,
        scale,
        causal,
        win,
        mask_mod,
        score_mod,
        softcap,
        alibi_slopes,
        sinks,
        cu_seqlens,
        block_mask,
        bool(return_lse),
    )
    parts = []
    if causal:
        parts.append(causal_mask(call.offset))
    if win is not None:
        parts.append(sliding_window_mask(win[0], win[1], call.offset))
    if cu_seqlens is not None:
        parts.append(document_mask(document_ids_from_cu_seqlens(cu_seqlens, Tq)))
    if mask_mod is not None:
        parts.append(mask_mod)
    call.mask_mod = parts[0] if len(parts) == 1 else (and_masks(*parts) if parts else None)
    call.score_mod = compose_score_mods(
        tanh_softcap(softcap) if softcap is not None else None,
        alibi(alibi_slopes, call.offset) if alibi_slopes is not None else None,
        score_mod,
    )
    call.mod_tensors = score_mod_tensors(call.score_mod)
    return call


# ------------------------------------------------------------------------------------ dispatch
@dataclass
class Explanation:
    """Which backend runs a call and why: the reasons each backend refuses it, read from the declared
    capabilities, and the rule that picked the backend (``auto``'s order, or the backend asked for)."""

    backend: str
    reasons: dict[str, list[str]]
    requested: str = "auto"
    order: tuple[str, ...] = ()

    def verdict(self, name: str) -> str:
        """Why backend ``name`` was or was not chosen, in one line."""
        rs = self.reasons[name]
        if name == self.backend:
            if self.requested != "auto":
                return f"chosen: asked for with backend={name!r}"
            return "chosen: the first backend in auto's order whose declared capabilities fit the call"
        if rs:
            return "refused: " + "; ".join(rs)
        if self.requested != "auto":
            return f"can run; not asked for (backend={self.requested!r})"
        if name not in self.order:
            return "can run; never chosen by auto (no auto priority)"
        return f"can run; {self.backend!r} comes first in auto's order"

    def __str__(self) -> str:
        if self.requested == "auto":
            manual = [n for n in self.reasons if n not in self.order]
            rule = (
                "auto tries " + " > ".join(self.order) + " (ascending auto_priority) and takes the first whose "
                "declared capabilities fit the call"
            )
            if manual:
                rule += f"; {', '.join(manual)} {'runs' if len(manual) == 1 else 'run'} only when asked for by name"
        else:
            rule = f"backend={self.requested!r} was asked for"
        width = max(map(len, self.reasons))

        def wrap(text: str, indent: int) -> str:  # fits a 100-column terminal
            return textwrap.fill(text, 100, initial_indent="  ", subsequent_indent=" " * indent)

        lines = [f"backend: {self.backend}", wrap(f"rule: {rule}", 8)]
        for name in self.reasons:
            lines.append(wrap(f"{name:<{width}}  {self.verdict(name)}", width + 4))
        caps = REGISTRY[self.backend].capabilities
        lines.append(wrap(f"{self.backend} declares: {caps.summary}; {caps.describe()}", 4))
        return "\n".join(lines)


def _choose(call: AttentionCall, backend: str) -> Explanation:
    names = ("auto", *backend_names())  # BACKENDS, plus any backend registered since import
    if backend not in names:
        raise ValueError(f"backend must be one of {names}, got {backend!r}")
    reasons = {name: REGISTRY[name].why_not(call) for name in backend_names()}
    order = tuple(auto_order())
    if backend == "auto":
        chosen = next((n for n in order if not reasons[n]), None)
        if chosen is None:
            detail = "; ".join(f"{n}: " + "; ".join(reasons[n]) for n in order)
            raise ValueError(f"no backend in auto's order {list(order)} can run this call: {detail}")
    else:
        if reasons[backend]:
            raise ValueError(f"backend={backend!r} cannot run this call: " + "; ".join(reasons[backend]))
        chosen = backend
    return Explanation(chosen, reasons, backend, order)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: int | tuple[int, int] | None = None,
    mask_mod=None,
    score_mod=None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Exact softmax attention, ``softmax(score_mod(q k^T * scale) + mask) v``.

    Args:
        q: ``[B, T_q, H_q, D]``; k: ``[B, T_k, H_kv, D]``; v: ``[B, T_k, H_kv, D_v]`` with
            ``H_q % H_kv == 0`` (GQA/MQA).
        causal: key ``j`` visible to query ``i`` iff ``j <= i + T_k - T_q`` (bottom-right aligned).
        window: an int ``w`` (the ``w`` keys ending at the query's position when causal, ``|i-j| < w``
            otherwise) or ``(left, right)`` as in FlashAttention.
        mask_mod: ``(b, h, q_idx, kv_idx) -> bool``; score_mod: ``(score, b, h, q_idx, kv_idx) -> score``
            (FlexAttention semantics; evaluated tile by tile). Gradients reach tensors the score mod
            captures (``ScoreMod.tensors`` or closure cells that require grad).
        block_mask: a prebuilt :class:`BlockMask` (from the sparse family or ``create_block_mask``).
        softcap: ``cap * tanh(s / cap)``, applied before ALiBi and ``score_mod``.
        alibi_slopes: ``[H_q]``; sinks: ``[H_q]`` learned sink logits (gpt-oss): an extra logit per
            head in the softmax denominator with no value.
        cu_seqlens: packed sequences (``B = 1``), attention stays within each sequence.
        return_lse: also return the log-sum-exp ``[B, H_q, T_q]`` (float32, or float64 for float64 input;
            ``-inf`` on empty rows; differentiable, so results merged by their lse train correctly).
        backend: ``"auto"`` | ``"sdpa"`` | ``"tiled"`` | ``"reference"`` (see :func:`explain`).

    Returns ``o [B, T_q, H_q, D_v]`` (or ``(o, lse)``), computed in float32 for float16/bfloat16/float32
    input and in float64 for float64 input (:func:`effattn.exact.compute_dtype`). Fully masked rows give
    zeros. A NaN or inf in a key or value reaches only the rows whose mask lets them see it (those rows
    are NaN; every other row equals a clean run, forward and backward): :mod:`effattn.exact.nonfinite`.

    Example::

        >>> q = k = v = torch.randn(1, 100, 4, 32)
        >>> o = attention(q, k, v, causal=True, window=16)
        >>> o.shape
        torch.Size([1, 100, 4, 32])
    """
    call = _build_call(
        q,
        k,
        v,
        causal=causal,
        window=window,
        mask_mod=mask_mod,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scale,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        cu_seqlens=cu_seqlens,
        return_lse=return_lse,
    )
    bad = nonfinite_keys(call.k, call.v)  # masked garbage must not reach any row: effattn.exact.nonfinite
    if bad is not None:
        k_clean, v_clean = zero_keys(call.k, call.v, bad)
        call = dataclasses.replace(call, k=k_clean, v=v_clean)
    o, lse = REGISTRY[_choose(call, backend).backend].run(call)
    if bad is not None:
        # which rows may see a bad key: the mask alone (no score_mod, sinks or scale), on the tiled engine
        # with q = k = 0 of head dim 1 and the bad flags as values, so every visible key weighs alike
        B, Tq, Hq, Tk, Hkv = call.B, call.Tq, call.Hq, call.Tk, call.Hkv
        with torch.no_grad():
            frac = attention(
                q.new_zeros(B, Tq, Hq, 1, dtype=torch.float32),
                q.new_zeros(B, Tk, Hkv, 1, dtype=torch.float32),
                bad.float()[..., None],
                causal=causal,
                window=window,
                mask_mod=mask_mod,
                block_mask=block_mask,
                cu_seqlens=cu_seqlens,
                backend="tiled",
            )
        o, lse = poison_rows(o, lse, frac[..., 0] > 0)
    return (o, lse) if return_lse else o


def explain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "auto", **kwargs) -> Explanation:
    """Which backend :func:`attention` would use for these arguments, and why each other one was not.

    Example::

        >>> q = torch.randn(1, 64, 2, 16)
        >>> print(explain(q, q, q, window=8).backend)
        tiled
    """
    return _choose(attention_call(q, k, v, **kwargs), backend)


def attention_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> AttentionCall:
    """The validated :class:`AttentionCall` that :func:`attention` builds for these keyword arguments
    (the rest at their defaults): what backends' ``why_not`` and ``run`` take.

    Example::

        >>> q = torch.randn(1, 10, 4, 16)
        >>> c = attention_call(q, q[:, :, :2], q[:, :, :2], causal=True, window=3)
        >>> c.mask_kinds, c.Hkv, c.window
        (('causal', 'window'), 2, (2, 0))
    """
    names = inspect.signature(attention).parameters
    unknown = set(kwargs) - set(names)
    if unknown:
        raise TypeError(f"unknown attention() arguments {sorted(unknown)}")
    defaults = {n: p.default for n, p in names.items() if p.default is not inspect.Parameter.empty}
    defaults.pop("backend")
    return _build_call(q, k, v, **{**defaults, **kwargs})
