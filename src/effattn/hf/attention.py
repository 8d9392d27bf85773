"""effattn as a Hugging Face ``attn_implementation``.

:func:`register` adds an attention function to ``transformers.AttentionInterface`` and a mask
builder to ``transformers.AttentionMaskInterface`` under one name, so that
``from_config(cfg, attn_implementation="effattn")`` (or ``model.set_attn_implementation``) runs
every attention layer through :func:`effattn.attention`.

Layout: HF hands attention ``[B, H, T, D]``; the function transposes to effattn's ``[B, T, H, D]``
once (a view) and the output goes back as HF expects, ``[B, T_q, H_q, D]``. GQA passes through
unrepeated (effattn takes ``H_q % H_kv == 0``).

Masks: the mask builder (:func:`effattn_mask`) returns a small :class:`HFMask` instead of a dense
``[B, 1, T_q, T_k]`` tensor for every pattern HF composes from its structured factories: the
query/key offsets HF computed from the cache, window bounds (sliding windows, causal or
bidirectional), per-row segment ids (chunked attention, packed sequences) and, only when some token
is padding, the 2-D ``key_valid [B, T_k]`` (:mod:`effattn.hf._structure` reads the mask function).
Without padding or segments and with the queries at the end of the keys the call is effattn's
bottom-right ``causal=True`` (+ ``window``); otherwise an effattn ``BlockMask`` is built per tile from
index ranges (``O(B (T/64)^2)``) and the rule runs inside partial tiles only. Masks with no known
structure (image-token overlays, user mask functions) are materialized by HF's own ``sdpa_mask``
and read through a ``mask_mod``; a one-time warning says so. A 4-D mask passed in by the caller is
honoured: bool as is, float as an additive bias (entries at the dtype's minimum or ``-inf`` are
masked). Fully masked query rows (left padding) give zeros.

With a :class:`~effattn.hf.CompressedCache` the call recognises the keys its ``update`` returned,
hands the queries to the policy and attends to the kept tokens (ragged heads masked by the cache's
``key_mask``) plus the new ones; see :mod:`effattn.hf.cache`.

Not supported (raising instead of computing something else): attention dropout during training,
``position_bias`` (T5-style relative bias), ``output_attentions`` (warns and returns ``None``
weights, as SDPA does), flex ``BlockMask`` masks.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

import effattn.hf._compat  # noqa: F401  (checks the transformers version)
from effattn.exact import BACKENDS, attention, check_mod_signature
from effattn.hf._decode import one_query_attention
from effattn.hf._handshake import HANDSHAKE, CompressedInputs, WindowInputs
from effattn.hf._structure import parse_mask_function, segment_ids, structured_block_mask, structured_mask_mod

__all__ = [
    "HFMask",
    "attend_compressed",
    "effattn_mask",
    "is_effattn",
    "make_attention_function",
    "register",
    "registered",
]

# Names transformers itself owns: registering effattn under one of them would hijack it.
_RESERVED = {
    "eager",
    "sdpa",
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
    "flex_attention",
    "paged|eager",
}
_REGISTERED: dict[str, dict] = {}
_warned_dense = False


@dataclass(frozen=True, eq=False)  # eq would compare tensors elementwise
class HFMask:
    """The mask effattn's mask builder hands its attention function (instead of ``[B,1,Tq,Tk]``).

    Query ``i`` of the call sits at cache position ``q_offset + i``, key ``j`` at ``kv_offset + j``;
    with ``causal`` a query sees keys at positions ``<=`` its own. ``key_valid`` (bool
    ``[B, kv_length]``, False at padding) is ``None`` when no key is padding. A window bounds the
    distance ``d = q_pos - kv_pos``: ``d <= window_left`` and ``-d <= window_right`` (None:
    unbounded; HF's ``sliding_window=w`` is ``window_left = w - 1``). ``q_segment [B, q_length]`` /
    ``kv_segment [B, kv_length]`` (long): a query sees a key only when their ids are equal (chunked
    attention's chunks, packed sequences, or both). Nothing here is ``T_q x T_k``.
    """

    causal: bool
    key_valid: torch.Tensor | None
    q_offset: int
    kv_offset: int
    q_length: int
    kv_length: int
    batch_size: int
    window_left: int | None = None
    window_right: int | None = None
    q_segment: torch.Tensor | None = None
    kv_segment: torch.Tensor | None = None

    @property
    def structured(self) -> bool:
        """Whether anything beyond plain causal/bidirectional is described (window, segments)."""
        return self.window_left is not None or self.window_right is not None or self.q_segment is not None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, 1, self.q_length, self.kv_length)

    @property
    def ndim(self) -> int:
        return 4

    @property
    def bottom_right(self) -> bool:
        """The queries are the last ``q_length`` positions of the keys (effattn's ``causal=True``)."""
        return self.q_offset + self.q_length == self.kv_offset + self.kv_length

    def query_valid(self) -> torch.Tensor | None:
        """bool ``[B, q_length]``: which queries are real tokens (None: all), when the queries lie
        inside the keys' span."""
        if self.key_valid is None:
            return None
        lo = self.q_offset - self.kv_offset
        if lo < 0 or lo + self.q_length > self.kv_length:
            return None
        return self.key_valid[:, lo : lo + self.q_length]


def effattn_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    allow_is_causal_skip: bool = True,
    device: torch.device | str = "cpu",
    **kwargs,
):
    """The ``AttentionMaskInterface`` entry: an :class:`HFMask` (no ``T_q x T_k`` tensor) for every
    pattern built from HF's structured factories -- causal, bidirectional, sliding windows (causal or
    bidirectional), chunked attention, packed sequences (``position_ids`` that restart), each with
    left padding -- and HF's dense bool mask (``sdpa_mask``) only for the others (overlays such as
    image tokens, user ``or``/``and`` mask functions), with a one-time warning.

    Example::

        >>> from transformers.masking_utils import sliding_window_causal_mask_function
        >>> m = effattn_mask(1, 4096, 4096, mask_function=sliding_window_causal_mask_function(256))
        >>> type(m).__name__, m.causal, m.window_left
        ('HFMask', True, 255)
    """
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    mask_function = causal_mask_function if mask_function is None else mask_function
    q_offset = int(q_offset)
    kv_offset = int(kv_offset)
    if isinstance(attention_mask, HFMask):
        # built ahead by generate (compileable caches: create_masks_for_generate), then handed back
        # by the forward's mask creation: pass it through when it is for this call
        m = attention_mask
        have, want = (m.q_length, m.kv_length, m.q_offset, m.kv_offset), (q_length, kv_length, q_offset, kv_offset)
        if have != want:
            raise ValueError(
                f"a prebuilt HFMask for (q_length, kv_length, q_offset, kv_offset) = {have} reached a call with {want}"
            )
        return m
    pattern = parse_mask_function(mask_function)
    if pattern is not None and (pattern.packed is not None or pattern.positions is not None):
        # HF detects packing only without a cache: queries and keys are the same T tokens
        n = (pattern.packed if pattern.packed is not None else pattern.positions).shape[-1]
        if pattern.packed is None or (q_offset, kv_offset, q_length, kv_length) != (0, 0, n, n):
            pattern = None
    if pattern is not None:
        valid = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if valid is not None:
            valid = valid[:, kv_offset : kv_offset + kv_length].to(device=device, dtype=torch.bool)
        if pattern.padding is not None:
            extra = prepare_padding_mask(pattern.padding, kv_length, kv_offset)
            extra = extra[:, kv_offset : kv_offset + kv_length].to(device=device, dtype=torch.bool)
            valid = extra if valid is None else valid & extra
        if valid is not None:
            if bool(valid.all()):
                valid = None
            elif valid.shape[0] != batch_size:
                valid = valid.expand(batch_size, -1)
        return HFMask(
            pattern.causal,
            valid,
            q_offset,
            kv_offset,
            q_length,
            kv_length,
            batch_size,
            window_left=pattern.left,
            window_right=None if pattern.causal else pattern.right,
            q_segment=segment_ids(pattern, batch_size, q_offset, q_length, device),
            kv_segment=segment_ids(pattern, batch_size, kv_offset, kv_length, device),
        )
    global _warned_dense
    if not _warned_dense:
        _warned_dense = True
        warnings.warn(
            "effattn.hf: this model's mask function has a part with no known structure (an overlay "
            "such as image tokens, or a user mask function); it is materialized as HF's dense bool "
            "[B, 1, T_q, T_k] mask (as HF's SDPA path does) and applied through a mask_mod",
            stacklevel=2,
        )
    kwargs.pop("allow_is_bidirectional_skip", None)
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        device=device,
        **kwargs,
    )


def _and(fns):
    if not fns:
        return None
    if len(fns) == 1:
        return fns[0]

    def mm(b, h, qi, kv):
        m = fns[0](b, h, qi, kv)
        for f in fns[1:]:
            m = m & f(b, h, qi, kv)
        return m

    return mm


def _dense_mask_fns(mask: torch.Tensor, Tq: int, Tk: int):
    """A caller's / HF's 4-D mask as (mask_mod, score_mod)."""
    if mask.dim() != 4 or tuple(mask.shape[-2:]) != (Tq, Tk):
        raise ValueError(
            f"attention_mask must be [batch, 1 or heads, T_q, T_k] = [*, *, {Tq}, {Tk}], got {tuple(mask.shape)}"
        )
    Bm, Hm = mask.shape[:2]
    if mask.dtype == torch.bool:
        return (lambda b, h, qi, kv: mask[b % Bm, h % Hm, qi, kv]), None
    if not mask.is_floating_point():
        raise TypeError(f"attention_mask must be bool or floating, got {mask.dtype}")
    bias = mask.float()
    allowed = bias > torch.finfo(mask.dtype).min / 2  # HF writes dtype-min (or -inf) where masked

    def mask_fn(b, h, qi, kv):
        return allowed[b % Bm, h % Hm, qi, kv]

    def score_fn(s, b, h, qi, kv):
        return s + bias[b % Bm, h % Hm, qi, kv].to(s.dtype)

    return mask_fn, score_fn


def _check_unsupported(module, dropout, position_bias, kwargs) -> None:
    if dropout and module.training:
        raise NotImplementedError(
            f"effattn attention has no dropout (got dropout={dropout}); set the config's attention_dropout=0 "
            "or call model.eval()"
        )
    if position_bias is not None:
        raise NotImplementedError("effattn attention does not take HF's position_bias (T5-style); use eager/sdpa")
    if kwargs.get("output_attentions", False):
        warnings.warn("effattn attention does not return attention weights (output_attentions)", stacklevel=3)


def make_attention_function(
    backend: str = "auto", mask_mod: Callable | None = None, score_mod: Callable | None = None
) -> Callable:
    """An ``AttentionInterface`` function running :func:`effattn.attention` with ``backend``.

    ``mask_mod(b, h, q_pos, kv_pos)`` / ``score_mod(score, b, h, q_pos, kv_pos)`` (optional) are
    applied on top of the model's mask, with HF cache positions (query ``i`` of a call at
    ``q_offset + i``; for a :class:`~effattn.hf.CompressedCache` a key's original position).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if mask_mod is not None:
        check_mod_signature("mask_mod", mask_mod, 4)
    if score_mod is not None:
        check_mod_signature("score_mod", score_mod, 5)

    def effattn_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
        s_aux: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        _check_unsupported(module, dropout, position_bias, kwargs)
        q = query.transpose(1, 2)  # [B, T, H, D]: the one layout change at the boundary
        pending = HANDSHAKE.take(key)  # keys a CompressedCache.update returned (effattn.hf._handshake)
        if pending is not None:
            if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
                HANDSHAKE.discard()
                raise ValueError("packed sequences (cu_seq_lens_q/k) cannot be decoded with a CompressedCache")
            need_pos = mask_mod is not None or score_mod is not None
            inputs = pending.resolve(q, attention_mask, module, scaling, need_pos)
            if isinstance(inputs, WindowInputs):  # a sliding layer keeps HF's sliding cache: go on as usual
                key, value = inputs.key, inputs.value
            else:
                o = attend_compressed(q, inputs, scaling, softcap, s_aux, backend, mask_mod, score_mod)
                return o, None

        if backend in ("auto", "sdpa") and mask_mod is None and score_mod is None:
            fast = _decode_step(query, key, value, attention_mask, is_causal, module, sliding_window, scaling, kwargs)
            if fast is not None:  # one query, nothing masked but a window: GQA packed as rows, no tiles
                return fast(softcap, s_aux), None
        k, v = key.transpose(1, 2), value.transpose(1, 2)
        Tq, Tk = q.shape[1], k.shape[1]
        cu_seqlens = _packed_lengths(kwargs, attention_mask, q.shape[0], Tq, Tk)
        masks: list[Callable] = []
        scores: list[Callable] = []
        causal, window = False, None
        q_off, kv_off = Tk - Tq, 0  # positions given to the user's mods
        if attention_mask is None:
            causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
            if sliding_window is not None and causal:
                window = int(sliding_window)
        elif isinstance(attention_mask, HFMask):
            m = attention_mask
            if (m.q_length, m.kv_length) != (Tq, Tk):
                raise ValueError(
                    f"the model's mask is for (T_q, T_k) = {(m.q_length, m.kv_length)} but attention got "
                    f"{(Tq, Tk)}; a cache whose update returns another length than get_mask_sizes() said?"
                )
            q_off, kv_off = m.q_offset, m.kv_offset
            plain = m.key_valid is None and m.q_segment is None and m.bottom_right
            if plain and m.causal:  # effattn's own causal (+ window): SDPA or tiles skipped by bounds
                causal = True
                # a window reaching past the first key (a sliding cache's decode step, a short prompt)
                # bounds nothing: plain causal keeps the SDPA backend
                if m.window_left is not None and m.window_left < Tk - 1:
                    window = (m.window_left, 0)
            elif plain and m.window_left is None and m.window_right is None:
                pass  # bidirectional
            elif plain and m.window_left is not None and m.window_right is not None:
                window = (m.window_left, m.window_right)
            elif cu_seqlens is not None:
                raise ValueError(
                    "cu_seq_lens_q/k (packed sequences) together with padding or a cache offset in the mask: "
                    "pack without padding and without a cache"
                )
            elif backend in ("auto", "tiled"):
                extra = None
                if mask_mod is not None:
                    extra = lambda b, h, qi, kv: mask_mod(b, h, qi + q_off, kv + kv_off)  # noqa: E731
                bm = structured_block_mask(m, extra)
                o = attention(
                    q,
                    k,
                    v,
                    block_mask=bm,
                    score_mod=_user_score(score_mod, q_off, kv_off),
                    scale=scaling,
                    softcap=softcap,
                    sinks=s_aux,
                    backend=backend,
                )
                return o, None
            else:  # a backend that takes no block mask: the same rule as a mask_mod
                masks.append(structured_mask_mod(m))
        elif isinstance(attention_mask, torch.Tensor):
            mfn, sfn = _dense_mask_fns(attention_mask, Tq, Tk)
            masks.append(mfn)
            if sfn is not None:
                scores.append(sfn)
        else:
            raise TypeError(
                f"effattn attention takes an HFMask, a 4-D bool/float tensor or None as attention_mask, "
                f"got {type(attention_mask).__name__}"
            )
        if mask_mod is not None:
            masks.append(lambda b, h, qi, kv: mask_mod(b, h, qi + q_off, kv + kv_off))
        if score_mod is not None:
            scores.append(lambda s, b, h, qi, kv: score_mod(s, b, h, qi + q_off, kv + kv_off))
        o = attention(
            q,
            k,
            v,
            causal=causal,
            window=window,
            mask_mod=_and(masks),
            score_mod=_chain(scores),
            scale=scaling,
            softcap=softcap,
            sinks=s_aux,
            cu_seqlens=cu_seqlens,
            backend=backend,
        )
        return o, None

    effattn_attention_forward.backend = backend
    return effattn_attention_forward


def _decode_step(query, key, value, attention_mask, is_causal, module, sliding_window, scaling, kwargs):
    """For one new query over a cache with nothing masked but a causal window (a decode step with
    ``DynamicCache`` / ``StaticCache`` / a sliding cache, no padding, no gradient): a callable computing it
    as one SDPA call with the query heads of each KV group stacked as rows (``[B, H_kv, G, D]`` against
    ``[B, H_kv, T_k, D]``; PyTorch's CPU kernel is about 1.5x faster this way than with ``enable_gqa``), a
    window applied by slicing the last keys; else None. The callable takes ``(softcap, sinks)``; see
    :func:`effattn.hf._decode.one_query_attention`."""
    B, Hq, Tq, D = query.shape
    if Tq != 1 or kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        return None
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return None  # the gradient rule for non-finite keys needs the general path
    Hkv, Tk = key.shape[1], key.shape[2]
    if Hq % Hkv or key.shape[0] != B:
        return None
    left = None
    if attention_mask is None:
        if not bool(is_causal if is_causal is not None else getattr(module, "is_causal", True)):
            return None
        left = None if sliding_window is None else int(sliding_window) - 1
    elif isinstance(attention_mask, HFMask):
        m = attention_mask
        if not (m.causal and m.key_valid is None and m.q_segment is None and m.bottom_right):
            return None
        if (m.q_length, m.kv_length) != (Tq, Tk):
            return None  # the general path raises the mismatch
        left = m.window_left
    else:
        return None
    if left is not None and left < Tk - 1:
        key, value = key[:, :, Tk - left - 1 :], value[:, :, Tk - left - 1 :]

    return functools.partial(one_query_attention, query, key, value, scaling)


def _packed_lengths(kwargs: dict, attention_mask, B: int, Tq: int, Tk: int) -> torch.Tensor | None:
    """``cu_seqlens`` from HF's flash-attention packing kwargs (``cu_seq_lens_q/k``, as
    ``DataCollatorWithFlattening`` gives), or None; raises on layouts effattn cannot pack."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        return None
    if cu_q is None or cu_k is None or not torch.equal(cu_q, cu_k):
        raise ValueError(
            "cu_seq_lens_q and cu_seq_lens_k must both be given and equal (packed self-attention); got "
            f"{None if cu_q is None else cu_q.tolist()} and {None if cu_k is None else cu_k.tolist()}"
        )
    if B != 1 or Tq != Tk or int(cu_q[-1]) != Tq:
        raise ValueError(
            f"cu_seq_lens_q/k pack one row: need batch 1 and T_q == T_k == cu_seq_lens[-1], got batch {B}, "
            f"(T_q, T_k) = {(Tq, Tk)}, cu_seq_lens[-1] = {int(cu_q[-1])}"
        )
    if isinstance(attention_mask, HFMask) and attention_mask.q_segment is not None:
        return None  # HF found the packing in position_ids already: the mask's segments carry it
    if isinstance(attention_mask, torch.Tensor):
        raise ValueError("cu_seq_lens_q/k with a dense 4-D attention_mask: give one or the other")
    return cu_q.to(torch.long)


def _user_score(score_mod, q_off: int, kv_off: int):
    if score_mod is None:
        return None
    return lambda s, b, h, qi, kv: score_mod(s, b, h, qi + q_off, kv + kv_off)


def _chain(fns):
    if not fns:
        return None
    if len(fns) == 1:
        return fns[0]

    def sm(s, b, h, qi, kv):
        for f in fns:
            s = f(s, b, h, qi, kv)
        return s

    return sm


def attend_compressed(
    q: torch.Tensor,
    inputs: CompressedInputs,
    scaling: float | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    backend: str = "auto",
    mask_mod: Callable | None = None,
    score_mod: Callable | None = None,
) -> torch.Tensor:
    """Attention of the new queries ``q [B, t, H_q, D]`` over a :class:`~effattn.hf.CompressedCache`
    layer (``inputs``, from :class:`effattn.hf._handshake.CompressedInputs`): the kept keys (left-padded
    per head, ``key_mask`` False at padding) followed by the new tokens in the last slots, so
    bottom-right causal is right among the new ones (one new query sees every slot, so a ring buffer may
    give them in any order: :mod:`effattn.hf._streaming`; with nothing to mask it is one SDPA call,
    :func:`effattn.hf._decode.one_query_attention`). ``mask_mod``/``score_mod`` see original
    positions (``inputs.positions``, ``inputs.query_positions``)."""
    k, v, key_mask = inputs.k, inputs.v, inputs.key_mask  # k/v [B, T, H_kv, D], key_mask [B, H_kv, T]
    positions, q_positions = inputs.positions, inputs.query_positions
    plain = key_mask is None and mask_mod is None and score_mod is None and backend in ("auto", "sdpa")
    if plain and q.shape[1] == 1 and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        # one query sees every slot (in any order: a ring buffer's): the decode-step path, one SDPA call
        return one_query_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scaling, softcap, s_aux)
    G = q.shape[2] // k.shape[2]
    masks = []
    if key_mask is not None:
        masks.append(lambda b, h, qi, kv: key_mask[b, h // G, kv])
    if mask_mod is not None:
        masks.append(lambda b, h, qi, kv: mask_mod(b, h, q_positions[qi], positions[b, h // G, kv]))
    sm = None
    if score_mod is not None:

        def sm(s, b, h, qi, kv):
            return score_mod(s, b, h, q_positions[qi], positions[b, h // G, kv])

    return attention(
        q,
        k,
        v,
        causal=True,
        mask_mod=_and(masks),
        score_mod=sm,
        scale=scaling,
        softcap=softcap,
        sinks=s_aux,
        backend=backend,
    )


def register(
    name: str = "effattn",
    *,
    backend: str = "auto",
    mask_mod: Callable | None = None,
    score_mod: Callable | None = None,
) -> str:
    """Register effattn attention with transformers as ``attn_implementation=name``.

    Adds :func:`make_attention_function` ``(backend, mask_mod, score_mod)`` to
    ``AttentionInterface`` and :func:`effattn_mask` to ``AttentionMaskInterface`` (without the
    latter transformers would give a custom implementation no mask at all, losing padding).
    Registering a name again replaces its settings. Returns ``name``.

    Example::

        >>> import effattn.hf
        >>> effattn.hf.register("effattn_tiled", backend="tiled")
        'effattn_tiled'
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name must be a non-empty string without '/' (a Hub kernel), got {name!r}")
    if name in _RESERVED:
        raise ValueError(f"name {name!r} belongs to transformers' own attention; choose another, e.g. 'effattn'")
    fn = make_attention_function(backend, mask_mod, score_mod)
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, effattn_mask)
    _REGISTERED[name] = {"backend": backend, "mask_mod": mask_mod, "score_mod": score_mod}
    return name


def registered() -> dict[str, dict]:
    """The names registered through :func:`register` and their settings."""
    return {k: dict(v) for k, v in _REGISTERED.items()}


def is_effattn(attn_implementation: str | None) -> bool:
    """Whether ``attn_implementation`` is a name registered through :func:`register`."""
    return attn_implementation in _REGISTERED
