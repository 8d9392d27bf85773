"""The Routing Transformer layer as a mixer (``"routing"``): projections, RoPE on the local heads and
the router's EMA step around :func:`effattn.sparse.routing_attention` (prefill) and
:func:`effattn.sparse.step_routing_attention` (decoding)."""

from __future__ import annotations

import torch
from torch import nn

from effattn._checks import check_int, check_positive_int
from effattn.nn.mixers._base import (
    MixerBase,
    check_heads,
    check_state_size_args,
    check_x_and_valid,
    merge_heads,
    split_heads,
)
from effattn.nn.registry import register_mixer
from effattn.nn.rope import RotaryEmbedding
from effattn.sparse import (
    KMeansRouter,
    RoutingDecodeState,
    routing_attention,
    routing_decode_state,
    step_routing_attention,
)

__all__ = ["RoutingMixer"]


@register_mixer("routing")
class RoutingMixer(MixerBase):
    """Routing Transformer layer (Roy, Saffar, Vaswani, Grangier, "Efficient Content-Based Sparse
    Attention with Routing Transformers", 2021), causal, on :func:`effattn.sparse.routing_attention`.

    ``q, k, v = W_qkv x`` in ``heads`` heads; ``y = W_o o``. As in the paper, half the heads
    (``local_heads``, default ``heads // 2``) are local: exact softmax over the last ``window`` keys
    (RoPE on their q/k). The others are routing heads: an online spherical k-means
    (:class:`effattn.sparse.KMeansRouter`, ``num_clusters`` centroids per head, shared by queries and
    keys; the centroids are a buffer moved by an EMA step in every training-mode forward, over the
    call's real tokens and after its selection, never by a gradient) sends each query and key to its
    nearest centroid, and a query attends to the ``cluster_window`` most recent keys of its cluster
    at positions ``<= t`` (its own key included when it landed there); a query with no such key gets
    zeros from that head. ``cluster_window`` is fixed (not ``T // num_clusters``), so what a token
    sees does not depend on the length of the call: prefill, chunked prefill and token-by-token
    decoding compute the same thing. The routing heads carry no position encoding (routing is by
    content; a rotation would make a token's cluster depend on its position); order comes from
    causality and the local heads.

    Decoding state (a :class:`effattn.sparse.RoutingDecodeState`, bounded whatever the context; its
    fields read as ``state["rk"]``; ``n`` = real tokens seen):
    ``pos [B]`` (``n``); for the local heads the last ``min(window, n)`` rotated keys and values,
    ``lk, lv [B, <= window, local_heads, D]`` with ``lmask`` (a ring: token ``i`` in slot
    ``i % window``); for every routing head and cluster the last ``cluster_window`` keys and values
    routed there, ``rk, rv [B, H_r, num_clusters, <= cluster_window, D]`` with ``rmask`` and the
    per-cluster counts ``rcount [B, H_r, num_clusters]`` (the ``j``-th key of a cluster in slot
    ``j % cluster_window``). A decoding step (:func:`effattn.sparse.step_routing_attention`) routes the new query
    and key with the same centroids (eval mode: unchanged), writes the key into its cluster's ring and
    attends to the query's cluster ring and the local ring: exactly the keys the full forward gives
    that query. Buffers grow
    with the context up to these bounds (:meth:`state_size`). Prefill runs the sparse engine (row by
    row when the batch is left-padded), decoding is batched; a call with a state is run token by token.

    Example::

        >>> mixer = RoutingMixer(32, 4, num_clusters=4, cluster_window=8, window=8).eval()
        >>> x = torch.randn(1, 40, 32)
        >>> y, state = mixer(x[:, :39])                   # prefill (sparse engine)
        >>> y_last, state = mixer(x[:, 39:], state)       # one decoding step
        >>> torch.allclose(y_last, mixer(x)[0][:, 39:], atol=1e-5)
        True
        >>> tuple(state["rk"].shape)                      # [B, routing heads, clusters, <= cluster_window, D]
        (1, 2, 4, 8, 8)
    """

    # the LM raises with this under effattn.dist.sequence_parallel (docs/dist.md lists it)
    sequence_parallel_unsupported = (
        "its queries and keys are clustered by k-means over the whole sequence and attend within "
        "clusters, so every rank would need every other rank's keys (a global clustering and a "
        "content-dependent all-to-all), which sequence sharding is meant to avoid; not implemented"
    )

    def __init__(
        self,
        dim: int,
        heads: int,
        num_clusters: int = 8,
        cluster_window: int = 128,
        window: int = 128,
        local_heads: int | None = None,
        decay: float = 0.999,
        rope: bool = True,
        rope_base: float = 10000.0,
        seed: int = 0,
    ):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, check_heads(dim, heads)
        for name, val in (("num_clusters", num_clusters), ("cluster_window", cluster_window), ("window", window)):
            check_positive_int(name, val)
        local_heads = check_int("local_heads", heads // 2 if local_heads is None else local_heads, 0, heads)
        self.num_clusters, self.cluster_window, self.window = num_clusters, cluster_window, window
        self.local_heads, self.routing_heads = local_heads, heads - local_heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, rope_base) if rope and local_heads else None
        self.router = (
            KMeansRouter(self.routing_heads, self.head_dim, num_clusters, decay=decay, seed=seed)
            if self.routing_heads
            else None
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, local_heads={self.local_heads}, window={self.window}, "
            f"num_clusters={self.num_clusters}, cluster_window={self.cluster_window}"
        )

    def state_size(self, batch: int, seq_len: int) -> int:
        """Bytes of decoding state at most held for ``batch`` sequences at context ``seq_len``: local
        rings of ``min(window, seq_len)`` tokens, routing rings of ``min(cluster_window, seq_len)``
        slots per cluster, their masks and counts (parameter dtype for keys and values)."""
        check_state_size_args(batch, seq_len)
        el = self.wqkv.weight.element_size()
        D, L, Hr, K = self.head_dim, self.local_heads, self.routing_heads, self.num_clusters
        cl, cr = min(self.window, seq_len) if L else 0, min(self.cluster_window, seq_len)
        per_row = 8 + cl * (2 * L * D * el + 1) + Hr * K * (cr * (2 * D * el + 1) + 8)
        return batch * per_row

    # ------------------------------------------------------------------ prefill
    def _sparse(self, q, k, v):
        """One row (or an unpadded batch) through the sparse engine, the router's EMA step left out."""
        training = self.router is not None and self.router.training
        if training:
            self.router.train(False)  # the layer makes one EMA step itself, over the real tokens only
        try:
            return routing_attention(q, k, v, causal=True, **self._op_args())
        finally:
            if training:
                self.router.train(True)

    def _op_args(self) -> dict:
        """The arguments the sparse op and its step form share (no router: one fixed cluster)."""
        routed = {"router": self.router} if self.router is not None else {"num_clusters": 1}
        return dict(routed, local_heads=self.local_heads, window=self.window, cluster_window=self.cluster_window)

    def _prefill(self, q, k, v, valid):
        B, T, H, D = q.shape
        L = self.local_heads
        if valid is not None and bool(valid.all()):
            valid = None
        if self.rope is not None:
            pos = torch.arange(T, device=q.device) if valid is None else (valid.long().cumsum(1) - 1).clamp(min=0)
            q = torch.cat([self.rope.apply(q[:, :, :L], pos), q[:, :, L:]], 2)
            k = torch.cat([self.rope.apply(k[:, :, :L], pos), k[:, :, L:]], 2)
        if valid is None:
            o = self._sparse(q, k, v)
        else:
            o = q.new_zeros(B, T, H, v.shape[-1])
            for b in range(B):
                lo = T - int(valid[b].sum())
                if not bool(valid[b, lo:].all()):
                    raise ValueError("valid: routing supports left padding only (False then True per row)")
                if lo < T:
                    o[b, lo:] = self._sparse(q[b : b + 1, lo:], k[b : b + 1, lo:], v[b : b + 1, lo:])[0]
        return o, routing_decode_state(q, k, v, valid=valid, **self._op_args())

    def _step(self, q, k, v, valid, st: RoutingDecodeState):
        """One token per row ``q, k, v [B, 1, H, D]`` (``valid [B]`` or None): RoPE at each row's position."""
        if self.rope is not None:
            L, pos = self.local_heads, st.pos[:, None]
            q = torch.cat([self.rope.apply(q[:, :, :L], pos), q[:, :, L:]], 2)
            k = torch.cat([self.rope.apply(k[:, :, :L], pos), k[:, :, L:]], 2)
        return step_routing_attention(q, k, v, st, valid=valid, **self._op_args())

    def forward(self, x, state=None, valid=None):
        valid = check_x_and_valid(x, self.dim, valid)
        B, T, _ = x.shape
        q, k, v = (split_heads(t, self.heads) for t in self.wqkv(x).chunk(3, dim=-1))
        if state is None:
            o, state = self._prefill(q, k, v, valid)
        else:
            if not isinstance(state, RoutingDecodeState):
                raise ValueError(
                    f"state must be the RoutingDecodeState a RoutingMixer call returned, got {type(state).__name__}"
                )
            if tuple(state.pos.shape) != (B,):
                raise ValueError(f"state holds batch {tuple(state.pos.shape)}, x has batch {B}")
            outs = []
            for t in range(T):
                sl = slice(t, t + 1)
                o_t, state = self._step(q[:, sl], k[:, sl], v[:, sl], None if valid is None else valid[:, t], state)
                outs.append(o_t)
            o = torch.cat(outs, 1) if outs else q.new_zeros(q.shape)
        if self.training and self.router is not None:
            L = self.local_heads
            sel = slice(None) if valid is None else valid
            qr, kr = q[:, :, L:][sel], k[:, :, L:][sel]  # [B, T, Hr, D] or [N, Hr, D]
            if valid is not None:
                qr, kr = qr[None], kr[None]
            if qr.shape[1]:
                self.router.update(qr, kr)
        return self.o_proj(merge_heads(o)), state
