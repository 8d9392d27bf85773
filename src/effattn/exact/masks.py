"""Composable mask mods and score mods (FlexAttention semantics).

A *mask mod* is ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = the query may attend to the
key); a *score mod* is ``score_mod(score, b, h, q_idx, kv_idx) -> score`` applied to the scaled
score ``q·k * scale`` before the softmax. The engines call them tile by tile with broadcastable
integer tensors (never on the whole ``T x T``), so any elementwise function of the indices works,
including table look-ups such as ``doc_ids[q_idx] == doc_ids[kv_idx]``.

The built-in masks are :class:`MaskMod` objects: besides the elementwise rule they know how to
classify a whole ``q-block x kv-block`` tile as empty / full / partial from the block's index
ranges (``blocks``), so a :class:`~effattn.exact.block_mask.BlockMask` for them costs
``O((T / block)^2)`` instead of ``O(T^2)`` mask evaluations.

Positions: query ``i`` sits at position ``i + offset`` of the key sequence; ``offset = T_k - T_q``
gives the bottom-right alignment the library uses for ``T_q != T_k`` (the last query sees every key).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch

MaskFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# blocks(q_lo, q_hi, k_lo, k_hi) -> (any_allowed, all_allowed); bounds are inclusive index tensors
# that broadcast ([nq, 1] against [1, nk]).
BlockFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class MaskMod:
    """A mask rule ``fn(b, h, q_idx, kv_idx) -> bool`` with an optional tile classifier ``blocks``.

    ``blocks`` must be conservative: ``any_allowed`` may be True for an empty tile and
    ``all_allowed`` may be False for a full one (both only cost time), never the reverse.
    """

    def __init__(self, fn: MaskFn, blocks: BlockFn | None = None, name: str = "mask"):
        self.fn, self.blocks, self.name = fn, blocks, name

    def __call__(self, b, h, q_idx, kv_idx):
        return self.fn(b, h, q_idx, kv_idx)

    def __repr__(self) -> str:
        return f"MaskMod({self.name})"


def _is_mask_mod(x) -> bool:
    return isinstance(x, MaskMod) or callable(x)


def check_mod_signature(name: str, fn, n_args: int) -> None:
    """Reject a mask/score mod whose signature cannot take ``n_args`` positional arguments."""
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    if isinstance(fn, MaskMod):
        return
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return
    try:
        sig.bind(*range(n_args))
    except TypeError as e:
        expected = "(b, h, q_idx, kv_idx)" if n_args == 4 else "(score, b, h, q_idx, kv_idx)"
        raise TypeError(f"{name} must have the signature {expected}; got {sig}: {e}") from None


# --------------------------------------------------------------------------------- masks
def full_mask() -> MaskMod:
    """Every key visible."""
    return MaskMod(
        lambda b, h, q, kv: (q >= 0) & (kv >= 0),
        lambda ql, qh, kl, kh: ((ql >= 0) & (kl >= 0),) * 2,
        "full",
    )


def causal_mask(offset: int = 0) -> MaskMod:
    """``kv_idx <= q_idx + offset`` (bottom-right aligned when ``offset = T_k - T_q``)."""
    return MaskMod(
        lambda b, h, q, kv: kv <= q + offset,
        lambda ql, qh, kl, kh: (kl <= qh + offset, kh <= ql + offset),
        f"causal(offset={offset})",
    )


def window_bounds(window: int | tuple[int, int], causal: bool) -> tuple[int, int]:
    """``window=w`` (int): a query sees the ``w`` keys ending at its own position (causal) or
    ``|i - j| < w`` (non-causal); ``(left, right)``: ``i - left <= j <= i + right`` (FlashAttention's
    ``window_size``). Returns ``(left, right)`` with ``right = 0`` when causal."""
    if isinstance(window, bool) or not isinstance(window, (int, tuple, list)):
        raise TypeError(f"window must be an int or a (left, right) pair, got {window!r}")
    if isinstance(window, int):
        if window < 1:
            raise ValueError(f"window must be >= 1 (keys visible per query), got {window}")
        left, right = window - 1, (0 if causal else window - 1)
    else:
        if len(window) != 2 or any(not isinstance(w, int) or w < 0 for w in window):
            raise ValueError(f"window as a pair must be (left >= 0, right >= 0), got {window!r}")
        left, right = window
        if causal:
            right = 0
    return left, right


def sliding_window_mask(left: int, right: int = 0, offset: int = 0) -> MaskMod:
    """``i - left <= j <= i + right`` where ``i = q_idx + offset`` (Longformer/Mistral local window)."""
    if left < 0 or right < 0:
        raise ValueError(f"window sizes must be >= 0, got left={left}, right={right}")

    def fn(b, h, q, kv):
        d = q + offset - kv
        return (d <= left) & (d >= -right)

    def blocks(ql, qh, kl, kh):
        dmin, dmax = ql + offset - kh, qh + offset - kl  # range of i - j over the tile
        return (dmin <= left) & (dmax >= -right), (dmax <= left) & (dmin >= -right)

    return MaskMod(fn, blocks, f"window(left={left}, right={right}, offset={offset})")


def prefix_lm_mask(prefix_len: int, offset: int = 0) -> MaskMod:
    """Bidirectional over the first ``prefix_len`` keys, causal after (prefix-LM / T5-style)."""
    causal = causal_mask(offset)
    return or_masks(
        MaskMod(
            lambda b, h, q, kv: kv < prefix_len, lambda ql, qh, kl, kh: (kl < prefix_len, kh < prefix_len), "prefix"
        ),
        causal,
    )


def sink_tokens_mask(num_sinks: int) -> MaskMod:
    """The first ``num_sinks`` keys are always visible (StreamingLLM's attention sinks)."""
    return MaskMod(
        lambda b, h, q, kv: kv < num_sinks,
        lambda ql, qh, kl, kh: (kl < num_sinks, kh < num_sinks),
        f"sinks({num_sinks})",
    )


def streaming_mask(window: int, num_sinks: int, offset: int = 0) -> MaskMod:
    """StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks"):
    causal, the last ``window`` keys plus ``num_sinks`` first keys."""
    return and_masks(
        causal_mask(offset), or_masks(sink_tokens_mask(num_sinks), sliding_window_mask(window - 1, 0, offset))
    )


def document_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[total]`` document index of every packed position."""
    pos = torch.arange(total, device=cu_seqlens.device)
    return torch.bucketize(pos, cu_seqlens[1:].to(pos.dtype), right=True)


def document_mask(doc_ids: torch.Tensor, kv_doc_ids: torch.Tensor | None = None) -> MaskMod:
    """Packed sequences: attend only within the same document (``doc_ids`` non-decreasing)."""
    kv_doc = doc_ids if kv_doc_ids is None else kv_doc_ids

    def fn(b, h, q, kv):
        return doc_ids[q] == kv_doc[kv]

    def blocks(ql, qh, kl, kh):
        qd0, qd1 = doc_ids[ql], doc_ids[qh]
        kd0, kd1 = kv_doc[kl], kv_doc[kh]
        return (qd0 <= kd1) & (kd0 <= qd1), (qd0 == qd1) & (kd0 == kd1) & (qd0 == kd0)

    return MaskMod(fn, blocks, "document")


def dilated_mask(window: int, dilation: int, offset: int = 0, causal: bool = True) -> MaskMod:
    """Dilated local attention (Sparse Transformer's strided pattern / LongNet-style): the ``window`` keys at
    distances ``0, d, 2d, ..., (window - 1) d`` with ``d = dilation`` (behind, and ahead if not causal)."""
    if window < 1 or dilation < 1:
        raise ValueError(f"window and dilation must be >= 1, got window={window}, dilation={dilation}")
    reach = (window - 1) * dilation

    def fn(b, h, q, kv):
        d = q + offset - kv
        ok = (d <= reach) & (torch.remainder(d, dilation) == 0)
        return ok & (d >= 0) if causal else ok & (d >= -reach)

    inner = sliding_window_mask(reach, 0 if causal else reach, offset)
    # only "any" is exact enough to skip tiles; partial tiles evaluate the rule
    return MaskMod(
        fn,
        lambda ql, qh, kl, kh: (inner.blocks(ql, qh, kl, kh)[0], torch.zeros_like(ql + kl, dtype=torch.bool)),
        f"dilated(window={window}, dilation={dilation})",
    )


def global_tokens_mask(num_global: int, offset: int = 0) -> MaskMod:
    """Longformer/BigBird global tokens: the first ``num_global`` positions attend to everything
    and are attended by every query (combine with a local window through :func:`or_masks`).

    Query ``q_idx`` sits at position ``q_idx + offset``, so in a partial call (the last ``T_q`` queries of
    a sequence, ``offset = T_k - T_q``) only queries whose *position* is below ``num_global`` are global.
    """
    g = num_global - offset  # a query index below g has a position below num_global
    return MaskMod(
        lambda b, h, q, kv: (q < g) | (kv < num_global),
        lambda ql, qh, kl, kh: ((ql < g) | (kl < num_global), (qh < g) | (kh < num_global)),
        f"global({num_global}, offset={offset})",
    )


def global_local_mask(num_global: int, window: int, offset: int = 0, causal: bool = False) -> MaskMod:
    """Static part of Longformer / BigBird: global tokens plus a local window (causal or not); query
    ``q_idx`` sits at position ``q_idx + offset`` (``offset = T_k - T_q`` for the last queries of a sequence)."""
    left, right = window_bounds(window, causal)
    local = sliding_window_mask(left, right, offset)
    m = or_masks(global_tokens_mask(num_global, offset), local)
    return and_masks(causal_mask(offset), m) if causal else m


def and_masks(*masks) -> MaskMod:
    """Intersection of mask mods."""
    if not masks:
        return full_mask()

    def fn(b, h, q, kv):
        out = masks[0](b, h, q, kv)
        for m in masks[1:]:
            out = out & m(b, h, q, kv)
        return out

    blocks = None
    if all(isinstance(m, MaskMod) and m.blocks is not None for m in masks):

        def blocks(ql, qh, kl, kh):
            parts = [m.blocks(ql, qh, kl, kh) for m in masks]
            any_, all_ = parts[0]
            for a, f in parts[1:]:
                any_, all_ = any_ & a, all_ & f
            return any_, all_

    return MaskMod(fn, blocks, "and(" + ", ".join(getattr(m, "name", "fn") for m in masks) + ")")


def or_masks(*masks) -> MaskMod:
    """Union of mask mods."""
    if not masks:
        raise ValueError("or_masks needs at least one mask mod")

    def fn(b, h, q, kv):
        out = masks[0](b, h, q, kv)
        for m in masks[1:]:
            out = out | m(b, h, q, kv)
        return out

    blocks = None
    if all(isinstance(m, MaskMod) and m.blocks is not None for m in masks):

        def blocks(ql, qh, kl, kh):
            parts = [m.blocks(ql, qh, kl, kh) for m in masks]
            any_, all_ = parts[0]
            for a, f in parts[1:]:
                any_, all_ = any_ | a, all_ | f
            return any_, all_

    return MaskMod(fn, blocks, "or(" + ", ".join(getattr(m, "name", "fn") for m in masks) + ")")


# --------------------------------------------------------------------------------- score mods
class ScoreMod:
    """A score rule ``fn(score, b, h, q_idx, kv_idx) -> score``; ``tensors`` lists the tensors it
    reads that may need gradients (the tiled backward returns their gradients)."""

    def __init__(self, fn: ScoreFn, tensors: Sequence[torch.Tensor] = (), name: str = "score_mod"):
        self.fn, self.tensors, self.name = fn, tuple(tensors), name

    def __call__(self, score, b, h, q_idx, kv_idx):
        return self.fn(score, b, h, q_idx, kv_idx)

    def __repr__(self) -> str:
        return f"ScoreMod({self.name})"


def tanh_softcap(cap: float) -> ScoreMod:
    """``cap * tanh(score / cap)`` (Gemma 2, Grok): bounds the logits."""
    if not (isinstance(cap, (int, float)) and math.isfinite(cap) and cap > 0):
        raise ValueError(f"softcap must be a finite number > 0, got {cap!r}")
    return ScoreMod(lambda s, b, h, q, kv: cap * torch.tanh(s / cap), (), f"softcap({cap})")


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The geometric slopes of ALiBi (Press et al. 2022, "Train Short, Test Long"), ``[num_heads]``."""

    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        s = pow2(num_heads)
    else:
        c = 2 ** math.floor(math.log2(num_heads))
        s = pow2(c) + pow2(2 * c)[0::2][: num_heads - c]
    return torch.tensor(s, dtype=torch.float32)


def alibi(slopes: torch.Tensor, offset: int = 0) -> ScoreMod:
    """ALiBi: ``score - slope_h * |i - j|`` with ``i = q_idx + offset`` (FlashAttention's convention)."""
    if not isinstance(slopes, torch.Tensor) or slopes.dim() != 1:
        raise ValueError(f"alibi_slopes must be a 1-D tensor [heads_q], got {getattr(slopes, 'shape', slopes)!r}")

    def fn(s, b, h, q, kv):
        return s - slopes.to(s.dtype)[h] * (q + offset - kv).abs().to(s.dtype)

    return ScoreMod(fn, (slopes,), "alibi")


def relative_position_bias(table: torch.Tensor, max_distance: int, offset: int = 0) -> ScoreMod:
    """Learned (or fixed) relative bias: ``score + table[h, clamp(j - i, -max, max) + max]`` with
    ``table [heads, 2 * max_distance + 1]`` (T5/Shaw-style, without T5's log buckets)."""
    if table.dim() != 2 or table.shape[1] != 2 * max_distance + 1:
        raise ValueError(
            f"table must be [heads, 2*max_distance+1] = [H, {2 * max_distance + 1}], got {tuple(table.shape)}"
        )

    def fn(s, b, h, q, kv):
        rel = (kv - q - offset).clamp(-max_distance, max_distance) + max_distance
        return s + table[h, rel].to(s.dtype)

    return ScoreMod(fn, (table,), "relative_bias")


def compose_score_mods(*mods) -> ScoreMod | None:
    """Apply score mods left to right; ``None`` entries are skipped."""
    mods = tuple(m for m in mods if m is not None)
    if not mods:
        return None
    if len(mods) == 1 and isinstance(mods[0], ScoreMod):
        return mods[0]

    def fn(s, b, h, q, kv):
        for m in mods:
            s = m(s, b, h, q, kv)
        return s

    return ScoreMod(
        fn, tuple(t for m in mods for t in score_mod_tensors(m)), "+".join(getattr(m, "name", "fn") for m in mods)
    )


def score_mod_tensors(score_mod) -> tuple[torch.Tensor, ...]:
    """Tensors a score mod reads that require gradients: ``ScoreMod.tensors`` or, for a plain
    function, tensors captured in its closure (as FlexAttention's captured buffers)."""
    if score_mod is None:
        return ()
    if isinstance(score_mod, ScoreMod):
        found = score_mod.tensors
    else:
        cells = getattr(score_mod, "__closure__", None) or ()
        found = []
        for c in cells:
            try:
                found.append(c.cell_contents)
            except ValueError:
                continue
    return tuple(t for t in found if isinstance(t, torch.Tensor) and t.requires_grad)
