"""``effattn.attention``: one entry point over the SDPA, tiled and reference backends.

Each backend declares what it supports through ``why_not(call)`` (a list of human-readable
reasons it cannot run the call; empty means it can, as xFormers' fmha does); ``auto`` picks the
first backend with no reasons, in the order sdpa, tiled; :func:`explain` shows the reasoning.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from effattn._checks import check_cu_seqlens, check_qkv, check_scale
from effattn.exact.block_mask import BlockMask, create_block_mask
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
from effattn.exact.reference import MAX_DENSE_ELEMENTS, reference_attention
from effattn.exact.tiled import tiled_attention

BACKENDS = ("auto", "sdpa", "tiled", "reference")
_SDPA_HAS_GQA = "enable_gqa" in (torch.nn.functional.scaled_dot_product_attention.__doc__ or "")


@dataclass
class AttentionCall:
    """A validated, normalized attention call (what backends inspect)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    B: int
    Tq: int
    Tk: int
    Hq: int
    Hkv: int
    D: int
    Dv: int
    scale: float
    causal: bool
    window: tuple[int, int] | None
    user_mask_mod: object
    user_score_mod: object
    softcap: float | None
    alibi_slopes: torch.Tensor | None
    sinks: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    block_mask: BlockMask | None
    return_lse: bool
    mask_mod: object = None
    score_mod: object = None
    mod_tensors: tuple = field(default_factory=tuple)

    @property
    def offset(self) -> int:
        return self.Tk - self.Tq


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
                f"block_mask is for (q_len, kv_len) = {(block_mask.q_len, block_mask.kv_len)}, "
                f"the call has {(Tq, Tk)}"
            )
        Bm, Hm = block_mask.kv_indices.shape[:2]
        if Bm not in (1, B) or Hm not in (1, Hq):
            raise ValueError(
                f"block_mask batch/heads dims {(Bm, Hm)} must be 1 or match (batch, heads_q) = {(B, Hq)}"
            )
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


# ------------------------------------------------------------------------------------ backends
class SdpaBackend:
    """``torch.nn.functional.scaled_dot_product_attention`` without a dense mask: no mask,
    causal (``T_q == T_k``, or one query), GQA. At the hardware limit for these cases."""

    name = "sdpa"

    def why_not(self, c: AttentionCall) -> list[str]:
        r = []
        for flag, what in (
            (c.user_mask_mod is not None, "mask_mod"),
            (c.window is not None, "window"),
            (c.cu_seqlens is not None, "cu_seqlens"),
            (c.block_mask is not None, "block_mask"),
            (c.user_score_mod is not None, "score_mod"),
            (c.softcap is not None, "softcap"),
            (c.alibi_slopes is not None, "alibi_slopes"),
            (c.sinks is not None, "sinks"),
        ):
            if flag:
                r.append(f"{what} would need a dense T_q x T_k mask or bias")
        if c.return_lse:
            r.append("SDPA does not return the log-sum-exp")
        if c.causal and c.Tq != c.Tk and c.Tq != 1:
            r.append(f"SDPA's is_causal is top-left aligned; T_q={c.Tq} != T_k={c.Tk} needs bottom-right")
        return r

    def run(self, c: AttentionCall):
        q, k, v = (x.transpose(1, 2) for x in (c.q, c.k, c.v))
        is_causal = c.causal and c.Tq == c.Tk  # T_q == 1 bottom-right causal sees every key
        kwargs = {}
        if c.Hq != c.Hkv:
            if _SDPA_HAS_GQA:
                kwargs["enable_gqa"] = True
            else:
                k = k.repeat_interleave(c.Hq // c.Hkv, dim=1)
                v = v.repeat_interleave(c.Hq // c.Hkv, dim=1)
        # PyTorch's fused CPU kernel needs one head width for q, k and v; otherwise SDPA falls back to its
        # math path, which materializes the T_q x T_k scores (MLA's prefill at 8k: 7x slower). Zero columns
        # change nothing (the scale is explicit); one query row has no T x T matrix to avoid.
        Dv = v.shape[-1]
        if q.shape[-1] != Dv and c.Tq > 1:
            width = max(q.shape[-1], Dv)
            q, k, v = (torch.nn.functional.pad(x, (0, width - x.shape[-1])) for x in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=c.scale, **kwargs)
        return o[..., :Dv].transpose(1, 2), None


class TiledBackend:
    """Pure-PyTorch online-softmax tiles over a BlockMask (any mask/score mod), O(T) memory."""

    name = "tiled"

    def why_not(self, c: AttentionCall) -> list[str]:
        return []

    def run(self, c: AttentionCall):
        bm = c.block_mask
        if bm is None:
            bm = create_block_mask(c.mask_mod, c.B, c.Hq, c.Tq, c.Tk, device=c.q.device)
        return tiled_attention(
            c.q, c.k, c.v, bm, scale=c.scale, score_mod=c.score_mod, sinks=c.sinks, mod_tensors=c.mod_tensors
        )


class ReferenceBackend:
    """The materialized float32 formula (ground truth); refuses sizes above a bound."""

    name = "reference"

    def why_not(self, c: AttentionCall) -> list[str]:
        n = c.B * c.Hq * c.Tq * c.Tk
        if n > MAX_DENSE_ELEMENTS:
            return [f"would materialize {n} scores (> {MAX_DENSE_ELEMENTS}); use backend='tiled' (O(T) memory)"]
        return []

    def run(self, c: AttentionCall):
        mask = c.mask_mod
        if c.block_mask is not None:
            bm = c.block_mask
            mask = _dense_block_mask_mod(bm)
        return reference_attention(c.q, c.k, c.v, scale=c.scale, mask_mod=mask, score_mod=c.score_mod, sinks=c.sinks)


def _dense_block_mask_mod(bm: BlockMask):
    dense = bm.to_dense()
    return lambda b, h, q, kv: dense[b % dense.shape[0], h % dense.shape[1], q, kv]


_REGISTRY = {b.name: b for b in (SdpaBackend(), TiledBackend(), ReferenceBackend())}
_AUTO_ORDER = ("sdpa", "tiled")


@dataclass
class Explanation:
    """Which backend runs a call and why the others do not."""

    backend: str
    reasons: dict[str, list[str]]

    def __str__(self) -> str:
        lines = [f"backend: {self.backend}"]
        for name, rs in self.reasons.items():
            lines.append(f"  {name}: " + ("can run" if not rs else "; ".join(rs)))
        return "\n".join(lines)


def _choose(call: AttentionCall, backend: str) -> tuple[str, dict[str, list[str]]]:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    reasons = {name: b.why_not(call) for name, b in _REGISTRY.items()}
    if backend == "auto":
        chosen = next(n for n in _AUTO_ORDER if not reasons[n])
    else:
        if reasons[backend]:
            raise ValueError(f"backend={backend!r} cannot run this call: " + "; ".join(reasons[backend]))
        chosen = backend
    return chosen, reasons


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
        return_lse: also return the log-sum-exp ``[B, H_q, T_q]`` (float32; ``-inf`` on empty rows;
            differentiable, so results merged by their lse train correctly).
        backend: ``"auto"`` | ``"sdpa"`` | ``"tiled"`` | ``"reference"`` (see :func:`explain`).

    Returns ``o [B, T_q, H_q, D_v]`` (or ``(o, lse)``). Fully masked rows give zeros.

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
    chosen, _ = _choose(call, backend)
    o, lse = _REGISTRY[chosen].run(call)
    return (o, lse) if return_lse else o


def explain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "auto", **kwargs) -> Explanation:
    """Which backend :func:`attention` would use for these arguments, and why each other one was not.

    Example::

        >>> q = torch.randn(1, 64, 2, 16)
        >>> print(explain(q, q, q, window=8).backend)
        tiled
    """
    chosen, reasons = _choose(_call_for(q, k, v, **kwargs), backend)
    return Explanation(chosen, reasons)


def _call_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> AttentionCall:
    """The validated call :func:`attention` would make for these keyword arguments (the rest at their
    defaults)."""
    names = inspect.signature(attention).parameters
    unknown = set(kwargs) - set(names)
    if unknown:
        raise TypeError(f"explain() got unknown arguments {sorted(unknown)}")
    defaults = {n: p.default for n, p in names.items() if p.default is not inspect.Parameter.empty}
    defaults.pop("backend")
    return _build_call(q, k, v, **{**defaults, **kwargs})
