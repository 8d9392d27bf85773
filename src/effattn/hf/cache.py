"""``CompressedCache``: a transformers ``Cache`` whose layers keep what an :mod:`effattn.kv` policy selects.

Usage::

    effattn.hf.register()                                     # attn_implementation="effattn"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="effattn")
    cache = effattn.hf.CompressedCache(make_policy("snapkv", budget=256))
    model.generate(ids, max_new_tokens=64, cache=cache)       # or past_key_values=cache

How the queries reach the policy. Scoring policies (H2O, SnapKV, TOVA, ...) need the new
tokens' RoPE'd queries. kvpress recomputes them in forward hooks on the attention modules
(``q_proj`` + RoPE from the hidden states), which ties it to a list of model classes. Here the
registered effattn attention function already receives them, so the cache works in two steps,
through one explicit object (:mod:`effattn.hf._handshake`): ``Cache.update(k, v, layer_idx)`` only
records the new keys/values, posts a ``PendingUpdate`` and returns them; the attention call that
consumes exactly those tensors (the same objects) takes it and resolves it with the queries: the
layer's :class:`effattn.kv.CompressedLayerCache` (the per-layer cache protocol) appends, scores,
evicts, and returns what these queries attend to (every kept token plus the new ones, as H2O and
kvpress do), as ``CompressedInputs``. So any
decoder whose attention module calls ``cache.update`` and then the attention interface works
(Llama, Mistral, Qwen2/3, ...), with no per-model code -- but only with an effattn
``attn_implementation``: an update whose keys no effattn attention consumed raises at the next
cache access instead of letting SDPA/eager attend to the new tokens alone.

Ragged heads. A policy keeps a different set (and, for PyramidKV/CAKE/DuoAttention, a different
number) of tokens per kv head; the cache left-pads every head to the longest and the attention
call masks the padding with the cache's ``key_mask`` (``mask_mod``), so padding is never
attended. New tokens sit in the last slots of every head, so effattn's bottom-right causal mask
holds among them.

Positions: ``get_seq_length()`` counts tokens *seen* (kept or evicted), so RoPE positions and
HF's input slicing continue as with a full cache; ``lengths(layer)`` and ``nbytes`` tell what is
kept.

StreamingLLM's positions inside the cache (``make_policy("streaming_llm")``, ``reindex=True``): the
model rotates keys at their text positions ``p_j`` before ``Cache.update``; the cache keeps them so and,
at each attention call, rotates the key in slot ``j`` of the ``L`` slots by ``j + s - L - p_j`` (``s``:
tokens seen, so the newest token stays where the model put its query). Every query-key distance is then
the distance of slots inside the cache, which is the paper's rule (keys cached before rotation and
rotated by cache position), written for keys that arrive rotated. It needs the model's RoPE
frequencies: read from its ``...RotaryEmbedding`` module when the cache is built with ``model=``, else
from the config (plain RoPE only: ``rope_type`` ``"default"``); RoPE types whose frequencies change with
the length (``dynamic``, ``longrope``) are refused.

StreamingLLM in ring buffers (``ring=True``, the default, for a StreamingLLM policy with an int budget
larger than its sinks and no per-head budgets): the kept set is always the sinks plus one contiguous run
of recent tokens, so each layer keeps one preallocated buffer of ``budget + 1`` slots instead of the
general policy cache; a decode step writes the new token into the slot of the token evicted one step
earlier, re-rotates only the sinks (the window's re-index rotation is 0) and attends to the buffer in
place, in ring order (:mod:`effattn.hf._streaming`). The same keys as the general path, so the same
logits up to float32 rounding (the order of the softmax sum); ``ring=False`` keeps the general path.

Left-padded batches: when the prefill's mask has padding, the cache keeps one
:class:`~effattn.kv.CompressedKVCache` per row and gives each only its real tokens, so no policy
ever scores, keeps or counts padding (a row is compressed exactly as if generated alone; the
policies' positions count its real tokens). The rows' kept tokens are left-padded to one length
for the attention call and masked there. It costs one policy update per row and layer.

Sliding-window layers (Gemma 2/3, gpt-oss, Qwen2's upper layers: ``config.layer_types`` holding
``"sliding_attention"`` beside ``"full_attention"``) keep HF's own ``DynamicSlidingWindowLayer``: its
last ``sliding_window - 1`` tokens are already a bounded cache, and a policy evicting inside the window
would change what the model was trained to see. The policy compresses the full-attention layers only;
a sliding layer's update still passes through the handshake (so it, too, needs an effattn attention) and
comes back as :class:`~effattn.hf._handshake.WindowInputs`, attended with the model's windowed mask. A
model whose layers are all sliding (Mistral with ``sliding_window`` set) has nothing to compress: refused.

Supported: transformers >= 5.0, < 6 (tested with 5.24); decoder-only models with full-attention
layers, optionally alternating with sliding-window layers; greedy
or sampled decoding, padded or not. Not supported, each with an error: encoder-decoder models,
models with no full-attention layer or with other layer types (chunked, linear/SSM layers),
padding that first appears after an unpadded prefill, registered ``mask_mod``/``score_mod`` with
a padded batch, beam search / assisted decoding (``reorder_cache``, ``crop``, batch reindexing).
"""

from __future__ import annotations

import functools

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from effattn._checks import check_int
from effattn.hf._handshake import HANDSHAKE, CompressedInputs, PendingUpdate, WindowInputs
from effattn.hf._streaming import StreamingRingCache, ring_eligible
from effattn.hf.attention import HFMask, is_effattn
from effattn.kv import CompressedKVCache, Policy, make_policy, rotate_rope

__all__ = ["CompressedCache", "check_model", "rope_frequencies"]

_NOT_CONSUMED = (
    "CompressedCache: the keys/values of layer {layer} were not consumed by an effattn attention "
    "function. CompressedCache needs the model to run with an effattn attn_implementation "
    "(effattn.hf.register(); from_config(..., attn_implementation='effattn') or "
    "model.set_attn_implementation('effattn')), whose attention hands the queries to the policy and "
    "masks the ragged heads; SDPA/eager would attend to the new tokens only."
)


def check_model(model_or_config) -> None:
    """Raise ``ValueError`` when a model (or its config) has a layout :class:`CompressedCache`
    does not support: encoder-decoder, layers other than full attention and sliding windows (chunked,
    linear/SSM), no full-attention layer at all (every layer sliding: nothing to compress),
    no attention modules with a ``layer_idx`` per decoder layer, or an attention implementation
    that is not a registered effattn one."""
    config = getattr(model_or_config, "config", model_or_config)
    name = type(model_or_config).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"CompressedCache supports decoder-only models; {name} ({config.model_type}) is an "
            "encoder-decoder (its cross-attention cache has no policy)"
        )
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"CompressedCache needs config.num_hidden_layers (an int > 0); {name} has {n!r}")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        other = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
        if other:
            raise ValueError(
                f"CompressedCache supports full-attention layers only (sliding-window layers beside them keep "
                f"HF's sliding cache); {name} has layer types {other} (use DynamicCache)"
            )
        if "full_attention" not in layer_types:
            raise ValueError(
                f"CompressedCache compresses full-attention layers; every layer of {name} is sliding-window "
                "(HF's sliding cache already bounds it to the window): use DynamicCache"
            )
    elif getattr(config, "sliding_window", None) is not None:
        raise ValueError(
            f"CompressedCache compresses full-attention layers; {name} has sliding_window="
            f"{config.sliding_window} on every layer (HF's sliding cache already bounds it): set it to None "
            "or use DynamicCache"
        )
    if isinstance(model_or_config, torch.nn.Module):
        attn = {
            m.layer_idx
            for m in model_or_config.modules()
            if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)
        }
        if attn != set(range(n)):
            raise ValueError(
                f"CompressedCache needs one attention module (an '...Attention' with layer_idx) per decoder "
                f"layer; {name} has them for layers {sorted(attn)} of {n}"
            )
        impl = getattr(config, "_attn_implementation", None)
        if not is_effattn(impl):
            raise ValueError(
                f"CompressedCache needs an effattn attn_implementation (effattn.hf.register(), then "
                f"from_config(..., attn_implementation='effattn')); the model runs {impl!r}"
            )


def rope_frequencies(model_or_config) -> torch.Tensor:
    """The RoPE inverse frequencies ``[rot_dim / 2]`` of a transformers model (its ``...RotaryEmbedding``
    module's ``inv_freq``) or config (``rope_type`` ``"default"`` only: ``theta^(-2i / rot_dim)`` with
    ``rot_dim = head_dim * partial_rotary_factor``). Raises ``ValueError`` for RoPE types whose
    frequencies depend on the length (``dynamic``, ``longrope``) and for models without RoPE.

    Example::

        >>> import transformers
        >>> cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1)
        >>> rope_frequencies(cfg).shape
        torch.Size([8])
    """
    config = getattr(model_or_config, "config", model_or_config)
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_type" not in params and params:
        params = next(iter(params.values())) if isinstance(next(iter(params.values())), dict) else params
    rope_type = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if rope_type in ("dynamic", "longrope"):
        raise ValueError(
            f"StreamingLLM re-indexing needs fixed RoPE frequencies; rope_type {rope_type!r} changes them with "
            "the length (use make_policy('streaming_llm', reindex=False))"
        )
    if isinstance(model_or_config, torch.nn.Module):
        for m in model_or_config.modules():
            if type(m).__name__.endswith("RotaryEmbedding") and isinstance(getattr(m, "inv_freq", None), torch.Tensor):
                return m.inv_freq.detach().double().cpu()
    if rope_type != "default":
        raise ValueError(
            f"StreamingLLM re-indexing reads rope_type {rope_type!r} frequencies from the model: build the cache "
            "with CompressedCache(policy, model=model)"
        )
    theta = params.get("rope_theta", getattr(config, "rope_theta", None)) if isinstance(params, dict) else None
    if theta is None:
        raise ValueError(f"StreamingLLM re-indexing: {type(config).__name__} has no RoPE (rope_theta) to re-index")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rot = int(head_dim * params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
    return float(theta) ** (-torch.arange(0, rot - rot % 2, 2, dtype=torch.float64) / rot)


def _sliding_window(config, layer_idx: int) -> int | None:
    """The window of ``layer_idx`` when ``config.layer_types`` marks it ``"sliding_attention"``, else None."""
    types = getattr(config, "layer_types", None)
    if types is not None and types[layer_idx] == "sliding_attention":
        return int(config.sliding_window)
    return None


class CompressedLayer(CacheLayerMixin):
    """One layer of a :class:`CompressedCache` (the storage lives in the shared
    :class:`effattn.kv.CompressedKVCache`; this object answers HF's per-layer questions)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, parent: CompressedCache, layer_idx: int):
        super().__init__()
        self.parent, self.layer_idx = parent, layer_idx

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self.parent.update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.parent.get_seq_length(self.layer_idx)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.is_initialized = False

    def reorder_cache(self, beam_idx) -> None:
        self.parent.reorder_cache(beam_idx)

    def offload(self):  # nothing on this object to move
        pass

    def prefetch(self):
        pass


class CompressedCache(Cache):
    """A transformers ``Cache`` compressed by an :mod:`effattn.kv` policy (see the module docstring).

    Args:
        policy: an :class:`effattn.kv.Policy` (from :func:`effattn.kv.make_policy`) or a policy name,
            then built with ``make_policy(policy, **policy_kwargs)`` (e.g. ``budget=64``).
        model: optional; checked at once with :func:`check_model` (otherwise the first forward
            pass checks its config).
        ring: StreamingLLM (int budget > sinks, no ``head_budgets``) in ring buffers, O(1 + sinks) work
            per decode step (module docstring); ``False`` or another policy: the general policy cache.

    ``kv`` is the underlying :class:`effattn.kv.CompressedKVCache` (a
    :class:`~effattn.hf._streaming.StreamingRingCache` for StreamingLLM with ``ring``, same inspection
    methods; None before the first forward, and for a left-padded batch, which has one per row in
    ``rows``);
    ``lengths(layer_idx)`` tokens kept per head ``[B, H_kv]``; ``nbytes`` bytes of kept keys and
    values; ``get_seq_length()`` tokens seen.

    Example::

        >>> from effattn.kv import make_policy
        >>> cache = CompressedCache(make_policy("streaming_llm", budget=32, sinks=4))
        >>> cache.get_seq_length(), cache.nbytes
        (0, 0)
    """

    def __init__(self, policy: Policy | str, *, model=None, ring: bool = True, **policy_kwargs):
        if isinstance(policy, str):
            policy = make_policy(policy, **policy_kwargs)
        elif policy_kwargs:
            raise TypeError(
                f"policy settings {sorted(policy_kwargs)} go with a policy name; got a built {type(policy).__name__}"
            )
        if not isinstance(policy, Policy):
            raise TypeError(
                f"policy must be an effattn.kv.Policy (effattn.kv.make_policy(name, budget=...)) or a policy "
                f"name, got {type(policy).__name__}"
            )
        if not isinstance(ring, bool):
            raise TypeError(f"ring must be a bool (StreamingLLM in ring buffers where it applies), got {ring!r}")
        super().__init__(layers=[])
        self.policy = policy
        self.ring = ring and ring_eligible(policy)
        # one cache for the batch (no padding): a ring for StreamingLLM (effattn.hf._streaming), else the general one
        self.kv: CompressedKVCache | StreamingRingCache | None = None
        self.rows: list[CompressedKVCache] | None = None  # one per row (a left-padded batch)
        self._row_seen: list[int] = []  # rows mode: HF positions per layer (padding included)
        self._pending: PendingUpdate | None = None  # the last update, until its attention call takes it
        self._inv_freq: torch.Tensor | None = None  # RoPE frequencies, for StreamingLLM's re-indexing
        if model is not None:
            check_model(model)
            if self.reindex:
                self._inv_freq = rope_frequencies(model)

    def __repr__(self) -> str:
        return f"CompressedCache({self.policy!r}, seen={self.get_seq_length()}, nbytes={self.nbytes})"

    @property
    def reindex(self) -> bool:
        """Whether keys are placed at their slots inside the cache (StreamingLLM's ``reindex``)."""
        return bool(getattr(self.policy, "reindex", False))

    def _reindex_keys(self, k_all: torch.Tensor, orig: torch.Tensor, seen, module) -> torch.Tensor:
        """Rotate ``k_all [B, L, H_kv, D]`` (RoPE'd at ``orig [B, H_kv, L]``, -1 at padding) so that slot
        ``j`` sits at ``j + seen - L`` (``seen``: an int or long ``[B]``; see the module docstring)."""
        if self._inv_freq is None:
            self._inv_freq = rope_frequencies(module.config)
        L = k_all.shape[1]
        seen = torch.as_tensor(seen, device=k_all.device).view(-1, 1, 1)
        slot = torch.arange(L, device=k_all.device)
        delta = (slot + seen - L - orig.to(k_all.device)).masked_fill(orig.to(k_all.device) < 0, 0)
        return rotate_rope(k_all, delta.transpose(1, 2), self._inv_freq)

    # ------------------------------------------------------------------ HF's Cache API
    def _check_consumed(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            HANDSHAKE.discard(pending)
            raise RuntimeError(_NOT_CONSUMED.format(layer=pending.layer_idx))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Record the new ``[B, H_kv, t, D]`` keys/values of ``layer_idx`` and return them; the
        effattn attention call that consumes them applies the policy (module docstring)."""
        self._check_consumed()
        if not isinstance(key_states, torch.Tensor) or key_states.dim() != 4:
            raise ValueError(
                f"key_states must be [batch, heads_kv, seq, head_dim], got {getattr(key_states, 'shape', key_states)}"
            )
        check_int("layer_idx", layer_idx, minimum=0)
        while len(self.layers) <= layer_idx:
            self.layers.append(CompressedLayer(self, len(self.layers)))
        if isinstance(self.layers[layer_idx], CompressedLayer):
            self.layers[layer_idx].is_initialized = True
        self._pending = PendingUpdate(layer_idx, key_states, value_states, functools.partial(self._resolve, layer_idx))
        HANDSHAKE.post(self._pending)
        return key_states, value_states

    def _resolve(
        self, layer_idx: int, q: torch.Tensor, attention_mask, module, scaling, need_positions: bool
    ) -> CompressedInputs:
        """:meth:`PendingUpdate.resolve <effattn.hf._handshake.PendingUpdate>` of the last update,
        called by the effattn attention function with the new queries ``[B, t, H_q, D]``: run the
        policy update and return what they attend to in effattn's layout (positions ``[B, H_kv, T]``
        of every key slot, -1 at padding, only when ``need_positions``)."""
        pending, self._pending = self._pending, None
        if pending is None or pending.layer_idx != layer_idx:
            raise RuntimeError(f"CompressedCache: attention for layer {layer_idx} without a matching update")
        k_new, v_new = pending.key, pending.value
        if self.kv is None and self.rows is None:
            config = getattr(module, "config", None)
            if config is None:
                raise ValueError("CompressedCache: the attention module has no config to read the layer count from")
            check_model(config)
        window = _sliding_window(module.config, layer_idx)
        if window is not None:  # a sliding layer: HF's sliding cache, the model's windowed mask (docstring)
            layer = self.layers[layer_idx]
            if not isinstance(layer, DynamicSlidingWindowLayer):
                layer = self.layers[layer_idx] = DynamicSlidingWindowLayer(sliding_window=window)
            return WindowInputs(*layer.update(k_new, v_new))
        if isinstance(attention_mask, HFMask):
            q_valid = attention_mask.query_valid() if attention_mask.key_valid is not None else None
            if attention_mask.key_valid is not None and q_valid is None:
                raise ValueError("CompressedCache: the padding mask does not cover the new tokens")
        elif attention_mask is None:
            q_valid = None
        else:
            raise ValueError(
                "CompressedCache needs the model's mask from effattn's mask builder (an HFMask: plain causal "
                f"attention); got a {type(attention_mask).__name__} (a sliding/chunked/custom 4-D mask?)"
            )
        B, num_layers = q.shape[0], module.config.num_hidden_layers
        if self.kv is None and self.rows is None:
            if q_valid is None and self.ring:
                self.kv = StreamingRingCache(self.policy, num_layers)
            elif q_valid is None:
                self.kv = CompressedKVCache(self.policy, num_layers, scale=scaling)
            elif self.ring:
                self.rows = [StreamingRingCache(self.policy, num_layers) for _ in range(B)]
                self._row_seen = [0] * num_layers
            else:
                self.rows = [CompressedKVCache(self.policy, num_layers, scale=scaling) for _ in range(B)]
                self._row_seen = [0] * num_layers
        if not 0 <= layer_idx < num_layers:
            raise ValueError(f"CompressedCache: layer_idx {layer_idx} outside the model's {num_layers} layers")
        if self.rows is not None:
            if need_positions:
                raise NotImplementedError(
                    "a registered mask_mod/score_mod with a left-padded batch in a CompressedCache; run unpadded"
                )
            if self.ring:
                return self._update_ring_rows(layer_idx, k_new, v_new, q_valid, module)
            k_all, v_all, key_mask, orig, seen = self._update_rows(layer_idx, k_new, v_new, q, q_valid)
            if self.reindex:
                k_all = self._reindex_keys(k_all, orig, seen, module)
            return CompressedInputs(k_all, v_all, key_mask)
        if q_valid is not None:
            raise ValueError(
                "CompressedCache: padding appeared after an unpadded prefill; start a new cache for a padded batch"
            )
        if isinstance(self.kv, StreamingRingCache):
            return self._update_ring(layer_idx, k_new, v_new, module, need_positions)
        # kept tokens' positions before this update: the returned layout is [kept (left-padded) | new]
        layer = self.kv.layer(layer_idx)  # the per-layer cache protocol (effattn.kv.LayerCache)
        prev = layer.positions() if need_positions or self.reindex else None
        kv = layer.update(k_new.transpose(1, 2), v_new.transpose(1, 2), q=q)
        k_all, v_all, key_mask = kv.k, kv.v, kv.head_mask
        if not need_positions and not self.reindex:
            return CompressedInputs(k_all, v_all, key_mask)
        t, seen = q.shape[1], self.kv.seen(layer_idx)
        new_pos = torch.arange(seen - t, seen, device=q.device)
        positions = new_pos.expand(k_all.shape[0], k_all.shape[2], t)
        if prev.numel():
            positions = torch.cat([prev.to(q.device), positions], dim=-1)
        if self.reindex:
            k_all = self._reindex_keys(k_all, positions, seen, module)
        if not need_positions:
            return CompressedInputs(k_all, v_all, key_mask)
        return CompressedInputs(k_all, v_all, key_mask, positions, new_pos)

    def _update_ring(self, layer_idx, k_new, v_new, module, need_positions) -> CompressedInputs:
        """StreamingLLM in ring buffers: a decode step writes one slot and rotates only the sinks
        (:mod:`effattn.hf._streaming`); the same keys as :meth:`_reindex_keys` gives, in ring order."""
        if self.reindex and self._inv_freq is None:
            self._inv_freq = rope_frequencies(module.config)
        k, v, pos = self.kv.update(layer_idx, k_new, v_new, self._inv_freq, need_positions)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, L, H_kv, D] views
        if not need_positions:
            return CompressedInputs(k, v, None)
        t, seen = k_new.shape[2], self.kv.seen(layer_idx)
        positions = pos.expand(k.shape[0], k.shape[2], -1)
        return CompressedInputs(k, v, None, positions, torch.arange(seen - t, seen, device=k.device))

    def _update_ring_rows(self, layer_idx, k_new, v_new, q_valid, module) -> CompressedInputs:
        """A left-padded batch in rings: each row's ring gets its real tokens only (as
        :meth:`_update_rows`); the rows' keys are left-padded to one length (one copy of the kept set
        per step, no scoring, no gather) and the padding masked."""
        if self.reindex and self._inv_freq is None:
            self._inv_freq = rope_frequencies(module.config)
        B, H, t, _ = k_new.shape
        if B != len(self.rows):
            raise ValueError(f"CompressedCache holds {len(self.rows)} rows, the batch has {B}")
        outs = []
        for b in range(B):
            sel = slice(None) if q_valid is None else q_valid[b]
            if q_valid is not None and not bool(sel.any()):
                raise ValueError(f"CompressedCache: row {b} has no real token among the {t} new ones")
            outs.append(
                self.rows[b].update(layer_idx, k_new[b : b + 1, :, sel], v_new[b : b + 1, :, sel], self._inv_freq)
            )
        self._row_seen[layer_idx] += t
        T = max(o[0].shape[2] for o in outs)
        if all(o[0].shape[2] == T for o in outs):
            k_all, v_all, key_mask = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), None
        else:
            k_all = k_new.new_zeros(B, H, T, k_new.shape[-1])
            v_all = v_new.new_zeros(B, H, T, v_new.shape[-1])
            key_mask = torch.zeros(B, H, T, dtype=torch.bool, device=k_new.device)
            for b, (kb, vb, _) in enumerate(outs):
                n = kb.shape[2]
                k_all[b, :, T - n :], v_all[b, :, T - n :], key_mask[b, :, T - n :] = kb[0], vb[0], True
        return CompressedInputs(k_all.transpose(1, 2), v_all.transpose(1, 2), key_mask)

    def _update_rows(self, layer_idx, k_new, v_new, q, q_valid):
        """A left-padded batch: each row has its own cache and gives it its real tokens only, so
        the policy never sees padding (each row is compressed as if generated alone). The rows'
        results are left-padded to one length; new tokens stay in the last slots of every row."""
        B, H, t, _ = k_new.shape
        if B != len(self.rows):
            raise ValueError(f"CompressedCache holds {len(self.rows)} rows, the batch has {B}")
        k, v = k_new.transpose(1, 2), v_new.transpose(1, 2)  # [B, t, H, D]
        outs, origs, seens = [], [], []
        for b in range(B):
            sel = slice(None) if q_valid is None else q_valid[b]
            if q_valid is not None and not bool(sel.any()):
                raise ValueError(f"CompressedCache: row {b} has no real token among the {t} new ones")
            row = self.rows[b].layer(layer_idx)
            prev = row.positions()
            kv = row.update(k[b : b + 1, sel], v[b : b + 1, sel], q=q[b : b + 1, sel])
            outs.append((kv.k, kv.v, kv.head_mask))
            s, n_new = row.seen, kv.k.shape[1] - (prev.shape[-1] if prev.numel() else 0)
            new = torch.arange(s - n_new, s, device=k.device).expand(1, H, n_new)
            origs.append(torch.cat([prev.to(k.device), new], -1) if prev.numel() else new)
            seens.append(s)
        self._row_seen[layer_idx] += t
        T = max(o[0].shape[1] for o in outs)
        k_all = k.new_zeros(B, T, H, k.shape[-1])
        v_all = v.new_zeros(B, T, H, v.shape[-1])
        key_mask = torch.zeros(B, H, T, dtype=torch.bool, device=k.device)
        orig = torch.full((B, H, T), -1, dtype=torch.long, device=k.device)  # text positions, -1 at padding
        for b, (kb, vb, mb) in enumerate(outs):
            n = kb.shape[1]
            k_all[b, T - n :], v_all[b, T - n :] = kb[0], vb[0]
            key_mask[b, :, T - n :] = True if mb is None else mb[0]
            orig[b, :, T - n :] = origs[b][0]
        return k_all, v_all, key_mask, orig.masked_fill(~key_mask, -1), torch.tensor(seens, device=k.device)

    def _sliding(self, layer_idx: int) -> DynamicSlidingWindowLayer | None:
        layer = self.layers[layer_idx] if 0 <= layer_idx < len(self.layers) else None
        return layer if isinstance(layer, DynamicSlidingWindowLayer) else None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen by ``layer_idx`` (kept or evicted): the next token's position."""
        self._check_consumed()
        if self._sliding(layer_idx) is not None:
            return self._sliding(layer_idx).get_seq_length()
        if self.rows is not None:
            return self._row_seen[layer_idx] if 0 <= layer_idx < len(self._row_seen) else 0
        if self.kv is None or not 0 <= layer_idx < self.kv.num_layers:
            return 0
        return self.kv.seen(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if self._sliding(layer_idx) is not None:
            return self._sliding(layer_idx).get_mask_sizes(query_length)
        return self.get_seq_length(layer_idx) + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def reset(self) -> None:
        if self._pending is not None:
            HANDSHAKE.discard(self._pending)
        self._pending = None
        self.kv, self.rows, self._row_seen = None, None, []
        for layer in self.layers:
            layer.reset()

    def _unsupported(self, what: str):
        raise NotImplementedError(
            f"CompressedCache does not support {what} (beam search, assisted decoding, batch reindexing): "
            "the kept tokens differ per row and head; use greedy or sampled decoding"
        )

    def reorder_cache(self, beam_idx) -> None:
        self._unsupported("reorder_cache")

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            self._unsupported("crop")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._unsupported("batch_repeat_interleave")

    def batch_select_indices(self, indices) -> None:
        if self.get_seq_length() > 0:
            self._unsupported("batch_select_indices")

    # ------------------------------------------------------------------ what is kept
    def lengths(self, layer_idx: int) -> torch.Tensor:
        """long ``[B, H_kv]``: tokens kept by each kv head of ``layer_idx`` (a sliding layer: its window)."""
        sliding = self._sliding(layer_idx)
        if sliding is not None:
            B, H, n = sliding.keys.shape[:3]
            return torch.full((B, H), n, dtype=torch.long)
        if self.rows is not None:
            return torch.cat([r.lengths(layer_idx) for r in self.rows])
        if self.kv is None:
            return torch.zeros(0, 0, dtype=torch.long)
        return self.kv.lengths(layer_idx)

    @property
    def nbytes(self) -> int:
        """Bytes of kept keys and values (each head counts only what it keeps; sliding layers their window)."""
        window = sum(
            s.keys.nbytes + s.values.nbytes
            for i in range(len(self.layers))
            if (s := self._sliding(i)) is not None and s.is_initialized
        )
        if self.rows is not None:
            return window + sum(r.nbytes for r in self.rows)
        return window + (0 if self.kv is None else self.kv.nbytes)

    @property
    def num_layers(self) -> int:
        if self.rows is not None:
            return self.rows[0].num_layers
        return 0 if self.kv is None else self.kv.num_layers
