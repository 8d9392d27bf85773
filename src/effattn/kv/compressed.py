"""A KV cache for all layers of a model that keeps only what a :class:`~effattn.kv.policy.Policy` selects.

Storage is ragged per ``(layer, kv head)``: head ``h`` of layer ``l`` holds its own keys and
values ``[B, n_lh, D]`` and the original positions of its tokens ``[B, n_lh]``, so heads with
smaller budgets really take less memory. :meth:`CompressedKVCache.update` appends the new
tokens, scores the candidates (kept + new) with the policy, keeps the top-``budget`` of each head,
and returns what attention must use for the new queries *now* (before the eviction, as H2O and
kvpress do: the new queries see every kept token and each other):

    k_all, v_all  [B, T_max, H_kv, D]   every head left-padded to the longest one
    key_mask      bool [B, H_kv, T_max] (False at padding; None when all heads are equally long)

Left padding puts every head's new tokens in the last ``t`` slots, so causal attention aligned
bottom-right (the library's convention) stays correct for a chunk of new queries.

When the policy applies: after every call with ``t > 1`` new tokens (prefill) and, for policies
with ``evicts_on_decode`` (StreamingLLM, H2O, A2SF, TOVA, DuoAttention), after every decoding
step. Prefill-only policies (SnapKV, PyramidKV, CAKE, K-norm, as in kvpress) let decoded tokens
accumulate. With a budget at least the context length nothing is evicted and the returned tensors
equal a full cache exactly.

Example::

    >>> import torch
    >>> from effattn.kv import CompressedKVCache, make_policy
    >>> cache = CompressedKVCache(make_policy("streaming_llm", budget=8, sinks=2), num_layers=1)
    >>> k = v = torch.randn(1, 20, 2, 16); q = torch.randn(1, 20, 4, 16)
    >>> k_all, v_all, key_mask = cache.update(0, k, v, q)      # prefill: attend to all 20
    >>> tuple(k_all.shape), key_mask is None, cache.lengths(0).tolist()
    ((1, 20, 2, 16), True, [[8, 8]])
    >>> cache.positions(0)[0, 0].tolist()                      # 2 sinks + 6 most recent
    [0, 1, 14, 15, 16, 17, 18, 19]
"""

from __future__ import annotations

import math

import torch

from effattn._checks import check_int, check_tensor
from effattn.kv.base import AttentionPattern, CachedKV, LayerCache, check_index
from effattn.kv.policy import Policy, ScoreContext

__all__ = ["CompressedKVCache", "CompressedLayerCache"]


class _LayerStore:
    """Ragged storage of one layer: per kv head ``[B, n_h, D]`` keys/values and ``[B, n_h]`` positions."""

    def __init__(self) -> None:
        self.k: list[torch.Tensor] | None = None
        self.v: list[torch.Tensor] | None = None
        self.pos: list[torch.Tensor] | None = None
        self.state: dict[str, list[torch.Tensor]] = {}
        self.budgets: list[int] | None = None
        self.seen = 0

    def select(self, h: int, scores: torch.Tensor, budget: int) -> None:
        """Keep the ``budget`` highest-scoring tokens of head ``h`` (``scores [B, n_h]``), in order."""
        n = self.k[h].shape[1]
        if n <= budget:
            return
        idx = scores.topk(budget, dim=1).indices.sort(dim=1).values
        D, Dv = self.k[h].shape[-1], self.v[h].shape[-1]
        self.k[h] = self.k[h].gather(1, idx[..., None].expand(-1, -1, D))
        self.v[h] = self.v[h].gather(1, idx[..., None].expand(-1, -1, Dv))
        self.pos[h] = self.pos[h].gather(1, idx)
        for per_head in self.state.values():
            per_head[h] = per_head[h].gather(1, idx)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` in that order (every head keeps as many tokens in every row)."""
        if self.k is None:
            return
        index = index.to(self.k[0].device)
        self.k = [x.index_select(0, index) for x in self.k]
        self.v = [x.index_select(0, index) for x in self.v]
        self.pos = [x.index_select(0, index) for x in self.pos]
        self.state = {name: [x.index_select(0, index) for x in per_head] for name, per_head in self.state.items()}


def _pad_left(parts: list[torch.Tensor], length: int, fill, dim_head: int) -> torch.Tensor:
    """Stack per-head ``[B, n_h, ...]`` tensors left-padded to ``length`` along a new head axis."""
    out = []
    for x in parts:
        n = x.shape[1]
        if n < length:
            pad = x.new_full((x.shape[0], length - n, *x.shape[2:]), fill)
            x = torch.cat([pad, x], dim=1)
        out.append(x)
    return torch.stack(out, dim=dim_head)


class CompressedKVCache:
    """KV cache of ``num_layers`` attention layers compressed by ``policy``.

    Args:
        policy: a :class:`~effattn.kv.policy.Policy` (see :func:`effattn.kv.make_policy`).
        num_layers: attention layers sharing this cache (layer budgets of PyramidKV/CAKE use it).
        scale: softmax scale of the attention the policies score with (default ``1/sqrt(D)``).

    ``update(layer_idx, k, v, q) -> (k_all, v_all, key_mask)`` (see the module docstring);
    ``lengths(layer_idx)`` tokens kept ``[B, H_kv]``; ``positions(layer_idx)`` their original
    indices ``[B, H_kv, T_max]`` (``-1`` at padding); ``kept(layer_idx, head)`` the stored
    ``(k, v, positions)`` of one head; ``nbytes`` bytes of stored keys and values;
    ``layer(layer_idx)`` the per-layer state to hand to :class:`effattn.nn.Attention`.
    """

    def __init__(self, policy: Policy, num_layers: int, *, scale: float | None = None):
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be an effattn.kv.Policy (see make_policy), got {type(policy).__name__}")
        check_int("num_layers", num_layers, minimum=1)
        if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.policy = policy
        self.num_layers = num_layers
        self.scale = scale
        self.reset()

    def reset(self) -> None:
        """Forget every token of every layer."""
        self._layers = [_LayerStore() for _ in range(self.num_layers)]
        self.shared: dict = {}  # cross-layer bookkeeping of the policy (CAKE)

    def __repr__(self) -> str:
        return f"CompressedKVCache({self.policy!r}, num_layers={self.num_layers}, nbytes={self.nbytes})"

    # ------------------------------------------------------------------ inspection
    def _store(self, layer_idx: int) -> _LayerStore:
        check_int("layer_idx", layer_idx, minimum=0, maximum=self.num_layers - 1)
        return self._layers[layer_idx]

    @staticmethod
    def accepts(pattern: AttentionPattern) -> bool:
        """Whether a layer computing ``pattern`` can attend over a policy cache: the policy keeps a
        subset of the tokens, so only plain causal attention (no window, no mods) over keys and values."""
        return pattern.plain_causal and not pattern.key_only

    def layer(self, layer_idx: int) -> CompressedLayerCache:
        """The state of layer ``layer_idx`` for :class:`effattn.nn.Attention`."""
        self._store(layer_idx)
        return CompressedLayerCache(self, layer_idx)

    def reorder(self, index, layer_idx: int | None = None) -> None:
        """Keep rows ``index`` (long ``[B']``, repeats allowed: beam search) in that order, in every
        layer or in ``layer_idx`` only (what :meth:`CompressedLayerCache.reorder` does)."""
        index = check_index(index, self.batch_size)
        for st in self._layers if layer_idx is None else [self._store(layer_idx)]:
            st.reorder(index)

    def seen(self, layer_idx: int) -> int:
        """Tokens appended to ``layer_idx`` so far (kept or not): the next token's position."""
        return self._store(layer_idx).seen

    def lengths(self, layer_idx: int) -> torch.Tensor:
        """long ``[B, H_kv]``: tokens kept by each head of ``layer_idx`` (empty before the first update)."""
        st = self._store(layer_idx)
        if st.k is None:
            return torch.zeros(0, 0, dtype=torch.long)
        B = st.k[0].shape[0]
        return torch.tensor([[x.shape[1] for x in st.k]] * B, dtype=torch.long, device=st.k[0].device)

    def budgets(self, layer_idx: int) -> list[int] | None:
        """Per-head budgets last enforced in ``layer_idx`` (None before the policy first ran there)."""
        return self._store(layer_idx).budgets

    def positions(self, layer_idx: int) -> torch.Tensor:
        """long ``[B, H_kv, T_max]``: original positions of the kept tokens, ascending, right-aligned
        per head (``-1`` in the left padding of shorter heads)."""
        st = self._store(layer_idx)
        if st.k is None:
            return torch.zeros(0, 0, 0, dtype=torch.long)
        T = max(p.shape[1] for p in st.pos)
        return _pad_left(st.pos, T, -1, 1)

    def kept(self, layer_idx: int, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stored ``(k [B, n, D], v [B, n, D_v], positions [B, n])`` of one kv head."""
        st = self._store(layer_idx)
        if st.k is None:
            raise ValueError(f"layer {layer_idx} holds nothing yet")
        if not 0 <= head < len(st.k):
            raise ValueError(f"head must be in [0, {len(st.k)}), got {head!r}")
        return st.k[head], st.v[head], st.pos[head]

    @property
    def nbytes(self) -> int:
        """Bytes of stored keys and values (ragged: each head counts only what it keeps). Positions
        and policy scores (8 and 4 bytes per kept token) are bookkeeping, see :attr:`meta_nbytes`."""
        n = 0
        for st in self._layers:
            if st.k is not None:
                n += sum(x.numel() * x.element_size() for x in st.k + st.v)
        return n

    @property
    def meta_nbytes(self) -> int:
        """Bytes of positions and per-token policy state."""
        n = 0
        for st in self._layers:
            if st.pos is not None:
                n += sum(x.numel() * x.element_size() for x in st.pos)
                for per_head in st.state.values():
                    n += sum(x.numel() * x.element_size() for x in per_head)
        return n

    @property
    def batch_size(self) -> int | None:
        for st in self._layers:
            if st.k is not None:
                return st.k[0].shape[0]
        return None

    # ------------------------------------------------------------------ update
    def _check(self, st: _LayerStore, k, v, q) -> None:
        check_tensor("k", k, 4, "[batch, seq, heads_kv, head_dim]")
        check_tensor("v", v, 4, "[batch, seq, heads_kv, head_dim_v]")
        check_tensor("q", q, 4, "[batch, seq, heads_q, head_dim]")
        B, t, H, D = k.shape
        if tuple(v.shape[:3]) != (B, t, H):
            raise ValueError(f"v must match k in [batch, seq, heads_kv]: k {tuple(k.shape)}, v {tuple(v.shape)}")
        if q.shape[0] != B or q.shape[1] != t or q.shape[3] != D:
            raise ValueError(
                f"q must be [batch={B}, seq={t}, heads_q, head_dim={D}] like k {tuple(k.shape)}, got {tuple(q.shape)}"
            )
        if q.shape[2] % H != 0:
            raise ValueError(f"heads_q ({q.shape[2]}) must be a multiple of heads_kv ({H}): q {tuple(q.shape)}")
        if t == 0:
            raise ValueError(f"k must hold at least one new token, got shape {tuple(k.shape)}")
        if k.dtype != v.dtype or k.dtype != q.dtype:
            raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if st.k is not None:
            held = (st.k[0].shape[0], len(st.k), st.k[0].shape[2], st.v[0].shape[2])
            if (B, H, D, v.shape[3]) != held:
                raise ValueError(
                    f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit the cache, which holds "
                    f"[batch, heads_kv, head_dim, head_dim_v] = {list(held)}"
                )
            if k.dtype != st.k[0].dtype:
                raise TypeError(f"k has dtype {k.dtype}, the cache holds {st.k[0].dtype}")

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Append ``k, v [B, t, H_kv, D]`` (queries ``q [B, t, H_q, D]``, RoPE'd), apply the policy,
        and return ``(k_all, v_all, key_mask)`` for attention of these ``t`` queries."""
        st = self._store(layer_idx)
        self._check(st, k, v, q)
        B, t, H, _ = k.shape
        if st.k is None:
            st.k = [k.new_empty(B, 0, k.shape[3]) for _ in range(H)]
            st.v = [v.new_empty(B, 0, v.shape[3]) for _ in range(H)]
            st.pos = [torch.empty(B, 0, dtype=torch.long, device=k.device) for _ in range(H)]
        new_pos = torch.arange(st.seen, st.seen + t, device=k.device).expand(B, t)
        st.k = [torch.cat([st.k[h], k[:, :, h]], dim=1) for h in range(H)]
        st.v = [torch.cat([st.v[h], v[:, :, h]], dim=1) for h in range(H)]
        st.pos = [torch.cat([st.pos[h], new_pos], dim=1) for h in range(H)]
        for per_head in st.state.values():
            for h in range(H):
                per_head[h] = torch.cat([per_head[h], per_head[h].new_zeros(B, t)], dim=1)
        st.seen += t
        lens = [x.shape[1] for x in st.k]
        T = max(lens)
        ragged = min(lens) != T
        if ragged:
            k_all, v_all = _pad_left(st.k, T, 0.0, 2), _pad_left(st.v, T, 0.0, 2)
            pos_all = _pad_left(st.pos, T, -1, 1)
            key_mask = pos_all >= 0
        else:
            k_all, v_all = torch.stack(st.k, dim=2), torch.stack(st.v, dim=2)
            pos_all = torch.stack(st.pos, dim=1)
            key_mask = None
        if t > 1 or self.policy.evicts_on_decode:
            self._compress(layer_idx, st, k_all, v_all, pos_all, q)
        return k_all, v_all, key_mask

    def _compress(self, layer_idx, st, k_all, v_all, pos_all, q) -> None:
        t, H, T = q.shape[1], k_all.shape[2], k_all.shape[1]
        if t > 1 or st.budgets is None:
            st.budgets = [int(b) for b in self.policy.budgets(layer_idx, self.num_layers, H, st.seen)]
            if len(st.budgets) != H or min(st.budgets) < 1:
                raise ValueError(f"{self.policy!r} gave budgets {st.budgets} for {H} kv heads (need {H} ints >= 1)")
        state = {name: _pad_left(per_head, T, 0.0, 1) for name, per_head in st.state.items()}
        ctx = ScoreContext(
            layer_idx=layer_idx,
            num_layers=self.num_layers,
            keys=k_all,
            values=v_all,
            key_mask=pos_all >= 0,
            positions=pos_all,
            queries=q,
            query_positions=torch.arange(st.seen - t, st.seen, device=q.device),
            prefill=t > 1,
            scale=self.scale if self.scale is not None else 1.0 / math.sqrt(k_all.shape[-1]),
            seen=st.seen,
            budgets=list(st.budgets),
            state=state,
            shared=self.shared,
        )
        with torch.no_grad():  # selection is not differentiable; keys/values keep their graph
            scores = self.policy.score(ctx).float()
        if tuple(scores.shape) != tuple(pos_all.shape):
            raise ValueError(f"{self.policy!r}.score gave shape {tuple(scores.shape)}, expected {tuple(pos_all.shape)}")
        new_state = dict(ctx.new_state)
        new_state["_score"] = scores
        lens = [x.shape[1] for x in st.k]
        st.state = {name: [s[:, h, T - lens[h] :] for h in range(H)] for name, s in new_state.items()}
        for layer, budgets in self.policy.allocate(ctx, st.budgets).items():
            other = self._layers[layer]
            if other.k is None:
                continue
            other.budgets = list(budgets)
            for h in range(len(other.k)):
                other.select(h, other.state["_score"][h], budgets[h])


class CompressedLayerCache(LayerCache):
    """One layer's view of a :class:`CompressedKVCache`: the ``state`` that :class:`effattn.nn.Attention`
    carries between calls when a KV policy is on (the :class:`~effattn.kv.LayerCache` protocol).

    :meth:`update` needs the new queries ``q`` (the policy scores with them) and returns a
    :class:`~effattn.kv.CachedKV` whose ``head_mask`` marks the left padding of heads that keep fewer
    tokens. Positions continue the count of tokens seen (kept or evicted). Only plain causal
    attention can run over it (:meth:`check_pattern`); left padding is refused; rows can be
    reordered, but the cache cannot be cropped.

    Example::

        >>> import torch
        >>> from effattn.kv import CompressedKVCache, make_policy
        >>> layer = CompressedKVCache(make_policy("streaming_llm", budget=4, sinks=1), num_layers=1).layer(0)
        >>> k = v = torch.randn(1, 6, 2, 8); q = torch.randn(1, 6, 2, 8)
        >>> kv = layer.update(k, v, q=q)
        >>> tuple(kv.k.shape), layer.lengths().tolist(), layer.next_positions(1, 1).tolist()
        ((1, 6, 2, 8), [[4, 4]], [6])
    """

    is_compressed = True

    def __init__(self, cache: CompressedKVCache, layer_idx: int):
        self.cache, self.layer_idx = cache, layer_idx

    def __repr__(self) -> str:
        return f"CompressedLayerCache(layer={self.layer_idx}, lengths={self.cache.lengths(self.layer_idx).tolist()})"

    @property
    def batch_size(self) -> int | None:
        st = self.cache._layers[self.layer_idx]
        return None if st.k is None else st.k[0].shape[0]

    @property
    def seen(self) -> int:
        return self.cache.seen(self.layer_idx)

    @property
    def reindexes_positions(self) -> bool:
        """Whether the policy places tokens at their slots inside the cache (StreamingLLM's ``reindex``)."""
        return bool(getattr(self.cache.policy, "reindex", False))

    @property
    def nbytes(self) -> int:
        st = self.cache._layers[self.layer_idx]
        return 0 if st.k is None else sum(x.numel() * x.element_size() for x in st.k + st.v)

    def check_pattern(self, pattern: AttentionPattern) -> None:
        """A policy keeps a subset of the tokens: only plain causal attention over keys and values."""
        if not CompressedKVCache.accepts(pattern):
            raise ValueError("a KV policy needs a causal attention layer without window, mask_mod or score_mod")

    @staticmethod
    def _check_valid(valid) -> None:
        if valid is not None and not bool(valid.all()):
            raise ValueError("valid: left padding is not supported with a KV policy; run each row on its own")

    def next_positions(self, batch: int, seq=None, valid: torch.Tensor | None = None, device=None) -> torch.Tensor:
        """Positions ``[seq]`` of ``seq`` new tokens: they continue the count of tokens seen (kept or not).
        The older form ``next_positions(seq, device)`` still works."""
        if seq is None or not isinstance(seq, int):  # next_positions(seq, device)
            seq, device = batch, (seq if device is None else device)
        self._check_valid(valid)
        s = self.seen
        return torch.arange(s, s + seq, device=device)

    def update(
        self,
        k: torch.Tensor,
        v: torch.Tensor | None = None,
        q: torch.Tensor | None = None,
        *,
        valid: torch.Tensor | None = None,
    ) -> CachedKV:
        """Append ``k, v [B, t, H_kv, D]``, let the policy score them with ``q [B, t, H_q, D]`` and
        evict; return every kept token plus the new ones (``head_mask``: heads of unequal length)."""
        if v is None or q is None:
            raise TypeError("a policy cache needs v and the new queries q: update(k, v, q=q)")
        self._check_valid(valid)
        k_all, v_all, key_mask = self.cache.update(self.layer_idx, k, v, q)
        return CachedKV(k_all, v_all, head_mask=key_mask)

    def lengths(self) -> torch.Tensor:
        return self.cache.lengths(self.layer_idx)

    def positions(self) -> torch.Tensor:
        """long ``[B, H_kv, T_max]``: original positions of the kept tokens (``-1`` at padding)."""
        return self.cache.positions(self.layer_idx)

    def reset(self) -> None:
        """Forget this layer's tokens (the other layers of the shared cache keep theirs)."""
        self.cache._layers[self.layer_idx] = _LayerStore()

    def reorder(self, index) -> None:
        """Keep rows ``index`` of this layer in that order (beam search reorders every layer)."""
        self.cache.reorder(index, self.layer_idx)

    def crop(self, length: int) -> None:
        raise TypeError(
            "CompressedLayerCache cannot be cropped: the policy evicted tokens using the queries of the ones "
            "to be removed, and evicted tokens cannot come back"
        )
