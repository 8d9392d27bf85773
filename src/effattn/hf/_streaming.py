"""StreamingLLM in a ring buffer: a decode step costs O(new token + sinks), not O(budget).

StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks") keeps the
first ``S`` tokens (sinks) and the ``W = budget - S`` most recent ones. Its kept set has a fixed shape:
the sinks are positions ``0 .. S-1`` and the window is one contiguous run ``[w_lo, seen)`` ending at the
newest token. So instead of appending, scoring and gathering ``budget`` tokens at every step (what the
general :class:`effattn.kv.CompressedKVCache` does for any policy), a layer holds one preallocated buffer
of ``S + W + 1`` slots in HF's layout ``[B, H_kv, S + W + 1, D]``: the sinks in slots ``0 .. S-1`` and the
window in a ring of ``W + 1`` slots, where position ``p >= S`` lives in slot ``S + (p - base) % (W + 1)``.
A step writes the new token into the slot of the token evicted one step earlier, and the one query
attends to the first ``L`` slots in place: softmax attention of a single query does not depend on the
order of its keys, so the ring never needs unrolling. Evicting is moving ``w_lo`` by one.

Positions inside the cache (``reindex``, the paper's rule): the general path rotates the key in slot
``j`` of the chronological layout ``[sinks | window | new]`` (``L`` slots) by ``j + seen - L - p_j``. The
window and the new token are contiguous and end at ``seen - 1`` in slot ``L - 1``, so their rotation is
0: they already sit where the model put them. Only the sinks move, all by ``seen - L``; they are kept
as the model rotated them (``sink_k``) and rotated again, ``S`` keys, whenever ``seen - L`` changes
(every step once the window is full). The rotation is :func:`effattn.kv.rotate_rope` on the same
values as the general path, so the keys are bitwise equal; only the order of the keys in the softmax
sum differs (float32 rounding).

Calls with several new tokens (a prefill, a chunk) unroll the kept tokens in order, append the new
ones and return that ``O(budget + t)`` layout (the general path's, re-indexed the same way), then
refill the ring.
"""

from __future__ import annotations

import torch

from effattn.kv import StreamingLLMPolicy, rotate_rope

__all__ = ["StreamingRingCache", "ring_eligible"]


def ring_eligible(policy) -> bool:
    """Whether ``policy`` has the fixed kept-set shape the ring needs: a :class:`StreamingLLMPolicy`
    with one int ``budget`` larger than ``sinks`` for every head (no ``ratio``, no ``head_budgets``)."""
    return (
        type(policy) is StreamingLLMPolicy
        and policy.head_budgets is None
        and policy.budget is not None
        and policy.budget > policy.sinks
    )


class _Ring:
    """One layer: ``k``/``v [B, H, S + W + 1, D]`` slots, the sinks as the model rotated them
    (``sink_k``), tokens seen, the window start ``w_lo`` and the ring's origin ``base``."""

    def __init__(self, sinks: int) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.sink_k: torch.Tensor | None = None
        self.seen = 0
        self.w_lo = self.base = sinks
        self.delta = 0  # rotation currently applied to the sink slots


class StreamingRingCache:
    """StreamingLLM's kept tokens of ``num_layers`` layers in ring buffers (module docstring); the
    :class:`effattn.hf.CompressedCache` storage for a :func:`ring_eligible` policy and an unpadded batch.

    ``update(layer_idx, k, v, inv_freq, need_positions=False)`` takes the new keys/values
    ``[B, H_kv, t, D]`` (HF's layout, RoPE'd at their text positions) and returns ``(k, v, positions)``:
    what the new queries attend to, ``[B, H_kv, L, D]`` (for ``t = 1`` views of the buffer in ring order,
    else chronological with the new tokens last), re-indexed when the policy says so, and the text
    position of every slot ``[L]`` (a decode step computes them only when ``need_positions``; else None).
    Inspection follows :class:`effattn.kv.CompressedKVCache`: ``seen``, ``lengths``, ``positions``
    (chronological), ``kept``, ``nbytes`` (kept tokens only; the buffer has one more slot).

    Example::

        >>> from effattn.kv import make_policy
        >>> cache = StreamingRingCache(make_policy("streaming_llm", budget=4, sinks=1, reindex=False), 1)
        >>> k = torch.randn(1, 2, 6, 8)
        >>> _ = cache.update(0, k, k, None)                          # prefill 6 tokens
        >>> for _ in range(2):                                       # two steps: tokens 6 and 7
        ...     _, _, pos = cache.update(0, k[:, :, :1], k[:, :, :1], None, need_positions=True)
        >>> pos.tolist(), cache.positions(0)[0, 0].tolist()          # 7 took the slot 3 had: ring order
        ([0, 7, 4, 5, 6], [0, 5, 6, 7])
    """

    def __init__(self, policy: StreamingLLMPolicy, num_layers: int):
        if not ring_eligible(policy):
            raise ValueError(
                f"StreamingRingCache needs a StreamingLLM policy with an int budget > sinks and no head_budgets, "
                f"got {policy!r}"
            )
        self.policy, self.num_layers = policy, num_layers
        self.sinks, self.window, self.reindex = policy.sinks, policy.budget - policy.sinks, policy.reindex
        self._layers = [_Ring(self.sinks) for _ in range(num_layers)]

    def __repr__(self) -> str:
        return f"StreamingRingCache({self.policy!r}, num_layers={self.num_layers}, nbytes={self.nbytes})"

    # ------------------------------------------------------------------ layout helpers
    def _slots(self, r: _Ring, first: int, last: int) -> torch.Tensor:
        """Ring slots of positions ``first .. last - 1`` (all >= sinks)."""
        p = torch.arange(first, last, device=r.k.device)
        return self.sinks + (p - r.base) % (self.window + 1)

    def _window(self, r: _Ring) -> tuple[int, int]:
        """The kept window ``[lo, hi)`` (empty while sinks are still arriving)."""
        return (r.w_lo, r.seen) if r.seen > self.sinks else (r.seen, r.seen)

    def _chronological(self, r: _Ring) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kept keys (as the model rotated them), values ``[B, H, n, D]`` and positions ``[n]``, in order."""
        n_s = min(r.seen, self.sinks)
        lo, hi = self._window(r)
        idx = self._slots(r, lo, hi)
        sink_k = r.sink_k[:, :, :n_s] if self.reindex else r.k[:, :, :n_s]
        k = torch.cat([sink_k, r.k.index_select(2, idx)], dim=2)
        v = torch.cat([r.v[:, :, :n_s], r.v.index_select(2, idx)], dim=2)
        pos = torch.cat([torch.arange(n_s, device=k.device), torch.arange(lo, hi, device=k.device)])
        return k, v, pos

    def _ring_positions(self, r: _Ring, length: int) -> torch.Tensor:
        """Text position of each of the first ``length`` slots, right after a step added its token."""
        n_s = min(r.seen, self.sinks)
        pos = torch.empty(length, dtype=torch.long, device=r.k.device)
        pos[:n_s] = torch.arange(n_s, device=r.k.device)
        if r.seen > self.sinks:
            pos[self._slots(r, r.w_lo, r.seen)] = torch.arange(r.w_lo, r.seen, device=r.k.device)
        return pos

    def _check(self, r: _Ring, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or k.shape[2] == 0:
            raise ValueError(
                f"k, v must be [batch, heads_kv, seq >= 1, head_dim] alike, got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        if r.k is not None:
            held = (r.k.shape[0], r.k.shape[1], r.k.shape[3], r.v.shape[3])
            if (k.shape[0], k.shape[1], k.shape[3], v.shape[3]) != held:
                raise ValueError(
                    f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit the cache, which holds "
                    f"[batch, heads_kv, head_dim, head_dim_v] = {list(held)}"
                )
            if k.dtype != r.k.dtype:
                raise TypeError(f"k has dtype {k.dtype}, the cache holds {r.k.dtype}")

    # ------------------------------------------------------------------ update
    def update(
        self,
        layer_idx: int,
        k: torch.Tensor,
        v: torch.Tensor,
        inv_freq: torch.Tensor | None,
        need_positions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Add ``k, v [B, H_kv, t, D]`` to ``layer_idx``; return what the new queries attend to (class
        docstring). ``inv_freq``: the model's RoPE frequencies, needed with ``reindex``."""
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx must be in [0, {self.num_layers}), got {layer_idx}")
        if self.reindex and inv_freq is None:
            raise ValueError("StreamingRingCache: reindex needs the model's RoPE frequencies (inv_freq)")
        r = self._layers[layer_idx]
        self._check(r, k, v)
        if k.shape[2] == 1 and r.k is not None:
            return self._step(r, k, v, inv_freq, need_positions)
        return self._extend(r, k, v, inv_freq)

    def _step(self, r: _Ring, k, v, inv_freq, need_positions: bool):
        """One new token: write it into its slot, rotate the sinks if their distance changed, attend in place."""
        S, p = self.sinks, r.seen
        slot = p if p < S else S + (p - r.base) % (self.window + 1)
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            r.k, r.v = r.k.clone(), r.v.clone()  # the slots of earlier steps stay saved for backward
        r.k[:, :, slot] = k[:, :, 0]
        r.v[:, :, slot] = v[:, :, 0]
        if p < S and self.reindex:
            r.sink_k[:, :, p] = k[:, :, 0]
        r.seen = p + 1
        n_s = min(r.seen, S)
        n_w = r.seen - r.w_lo if r.seen > S else 0  # the window with the new token
        length = n_s + n_w
        if self.reindex and n_s:
            delta = r.seen - length
            if delta != r.delta:
                sinks = r.sink_k[:, :, :n_s].transpose(1, 2)
                r.k[:, :, :n_s] = rotate_rope(sinks, torch.tensor(delta), inv_freq).transpose(1, 2)
                r.delta = delta
        pos = self._ring_positions(r, length) if need_positions else None
        out = r.k[:, :, :length], r.v[:, :, :length], pos
        if n_w == self.window + 1:  # the oldest window token leaves; its slot takes the next one
            r.w_lo += 1
        return out

    def _extend(self, r: _Ring, k, v, inv_freq):
        """Several new tokens (or the first call): chronological layout, then refill the ring."""
        B, H, t, D = k.shape
        S, W = self.sinks, self.window
        if r.k is None:
            kk, vv, pos = k, v, torch.arange(t, device=k.device)
        else:
            k0, v0, p0 = self._chronological(r)
            kk, vv = torch.cat([k0, k], dim=2), torch.cat([v0, v], dim=2)
            pos = torch.cat([p0, torch.arange(r.seen, r.seen + t, device=k.device)])
        seen, length = r.seen + t, kk.shape[2]
        k_att = kk
        delta = torch.arange(length, device=k.device) + seen - length - pos
        if self.reindex and bool(delta.any()):  # a first prefill keeps its text positions: no rotation
            k_att = rotate_rope(kk.transpose(1, 2), delta[:, None], inv_freq).transpose(1, 2)
        if r.k is None:
            r.k = k.new_zeros(B, H, S + W + 1, D)
            r.v = v.new_zeros(B, H, S + W + 1, v.shape[3])
            r.sink_k = k.new_zeros(B, H, S, D) if self.reindex else None
        elif torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            r.k, r.v = r.k.clone(), r.v.clone()
        n_s = min(seen, S)
        r.k[:, :, :n_s], r.v[:, :, :n_s] = kk[:, :, :n_s], vv[:, :, :n_s]
        if self.reindex:
            r.sink_k[:, :, :n_s] = kk[:, :, :n_s]
        r.seen, r.delta = seen, 0
        r.w_lo = r.base = max(S, seen - W)
        n_w = seen - r.w_lo if seen > S else 0
        if n_w:
            r.k[:, :, S : S + n_w], r.v[:, :, S : S + n_w] = kk[:, :, length - n_w :], vv[:, :, length - n_w :]
        return k_att, vv, pos

    # ------------------------------------------------------------------ inspection
    def seen(self, layer_idx: int) -> int:
        """Tokens added to ``layer_idx`` (kept or evicted): the next token's position."""
        return self._layers[layer_idx].seen

    def _count(self, r: _Ring) -> int:
        lo, hi = self._window(r)
        return min(r.seen, self.sinks) + hi - lo

    def lengths(self, layer_idx: int) -> torch.Tensor:
        """long ``[B, H_kv]``: tokens kept by each head (equal for every head)."""
        r = self._layers[layer_idx]
        if r.k is None:
            return torch.zeros(0, 0, dtype=torch.long)
        return torch.full(tuple(r.k.shape[:2]), self._count(r), dtype=torch.long, device=r.k.device)

    def positions(self, layer_idx: int) -> torch.Tensor:
        """long ``[B, H_kv, n]``: text positions of the kept tokens, ascending."""
        r = self._layers[layer_idx]
        if r.k is None:
            return torch.zeros(0, 0, 0, dtype=torch.long)
        return self._chronological(r)[2].expand(*r.k.shape[:2], -1)

    def kept(self, layer_idx: int, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k [B, n, D], v [B, n, D_v], positions [B, n])`` of one kv head, in order (keys as the
        model rotated them)."""
        r = self._layers[layer_idx]
        if r.k is None:
            raise ValueError(f"layer {layer_idx} holds nothing yet")
        if not 0 <= head < r.k.shape[1]:
            raise ValueError(f"head must be in [0, {r.k.shape[1]}), got {head!r}")
        k, v, pos = self._chronological(r)
        return k[:, head], v[:, head], pos.expand(k.shape[0], -1)

    @property
    def nbytes(self) -> int:
        """Bytes of the kept keys and values (the buffers hold one slot more per layer, plus the sinks'
        unrotated copy with ``reindex``)."""
        n = 0
        for r in self._layers:
            if r.k is not None:
                B, H = r.k.shape[:2]
                n += self._count(r) * B * H * (r.k.shape[3] * r.k.element_size() + r.v.shape[3] * r.v.element_size())
        return n

    @property
    def batch_size(self) -> int | None:
        return next((r.k.shape[0] for r in self._layers if r.k is not None), None)
