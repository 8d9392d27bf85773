"""Routing Transformer attention (Roy, Saffar, Vaswani and Grangier 2021, "Efficient Content-Based
Sparse Attention with Routing Transformers").

Online k-means routes queries and keys: per head, ``K`` centroids ``mu_c`` are shared by queries and
keys; a token is compared with them by cosine similarity (``x / |x|`` against ``mu_c / |mu_c|``) and
a query attends, with exact softmax on the tiled engine, to the keys routed to its cluster(s).
The centroids are not trained by gradients: :class:`KMeansRouter` keeps them in a buffer and, in
training mode, moves each towards the mean of the normalized queries and keys assigned to it
(nearest centroid), ``mu_c <- decay * mu_c + (1 - decay) * mean{x_hat : argmax_c' x_hat . mu_c' = c}``,
after the call's selection is made (the update never affects the call that observes the data).

- non-causal (the paper's balanced variant): with ``w = T / K``, every centroid takes its ``w``
  nearest queries and its ``w`` nearest keys (top-k over the sequence), so all clusters have the
  same size. A token may so fall in several clusters or in none. A query attends to the union of
  the keys of the clusters it is in (the per-cluster results are combined by their log-sum-exps and
  a key shared by two of the query's clusters counts once: exact softmax over the union); a query
  in no cluster gets a zero output from the routing heads (as in the paper's implementation).
- causal: balanced top-k would make token ``t``'s cluster depend on every token's distance to the
  centroid, the future included. Each query and key therefore goes to its nearest centroid (a
  function of the token alone) and a query attends to the ``w = T // K`` most recent keys of its
  cluster at positions ``<= t`` (per-cluster sliding window in ``(cluster, position)`` order:
  ``O(T * w)`` work whatever the cluster sizes, and no look-ahead: the set of same-cluster keys at
  positions ``<= t`` depends on positions ``<= t`` only). The mask is checked on original positions.
  ``cluster_window=`` fixes ``w`` instead: the keys a query sees then no longer depend on ``T``, so a
  prefill, a longer call and token-by-token decoding agree (as :class:`effattn.nn.mixers.RoutingMixer`
  needs); ``num_clusters`` may then exceed ``T``.

``local_heads`` (the paper mixes routing heads and local-attention heads, half and half:
``local_heads = H // 2``): the first ``local_heads`` query heads attend to a sliding window of
``window`` keys instead (``window`` defaults to ``w``); default 0, every head routed.
Without a router (``num_clusters=`` instead), the centroids are random unit vectors drawn from
``seed`` (data-independent, so causal calls stay causal).
"""

from __future__ import annotations

import torch
from torch import nn

from effattn._checks import check_qkv, check_scale
from effattn.exact.api import attention
from effattn.exact.block_mask import BlockMask
from effattn.sparse._buckets import (
    NEG_INF,
    _rowless,
    attention_lse,
    chunk_query_block,
    engine_block,
    expand_kv,
    gather_tokens,
    round_mask,
    sorted_attention,
    window_round,
)
from effattn.sparse._common import SparseMethod, check_block_size, register

_WORD = 31  # cluster-membership bits per int32 word (the sign bit stays unused)


class KMeansRouter(nn.Module):
    """Online spherical k-means with ``num_clusters`` centroids per head, shared by queries and keys.

    ``centroids [num_heads, num_clusters, head_dim]`` is a buffer (saved in the state dict, moved by
    ``.to()``, never a parameter: it gets no gradient); :meth:`update` applies the exponential moving
    average, and :func:`routing_attention` calls it when the router is in training mode.

    Example::

        >>> router = KMeansRouter(2, 16, 4, seed=0)
        >>> q = k = torch.randn(1, 32, 2, 16)
        >>> router.assign(q).shape
        torch.Size([1, 2, 32])
    """

    def __init__(self, num_heads: int, head_dim: int, num_clusters: int, decay: float = 0.999, seed: int | None = None):
        super().__init__()
        for name, val in (("num_heads", num_heads), ("head_dim", head_dim), ("num_clusters", num_clusters)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay!r}")
        self.num_heads, self.head_dim, self.num_clusters, self.decay = num_heads, head_dim, num_clusters, float(decay)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        init = torch.randn(num_heads, num_clusters, head_dim, generator=gen)
        self.register_buffer("centroids", nn.functional.normalize(init, dim=-1))

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, num_clusters={self.num_clusters}, "
            f"decay={self.decay}"
        )

    def _check(self, x: torch.Tensor, name: str) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[2:]) != (self.num_heads, self.head_dim):
            raise ValueError(
                f"{name} must be [batch, seq, {self.num_heads}, {self.head_dim}] for this router, "
                f"got {tuple(getattr(x, 'shape', ()))}"
            )

    def similarity(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of ``x [B, T, H, D]`` to every centroid: ``[B, H, T, K]`` (float32, no grad)."""
        self._check(x, "x")
        with torch.no_grad():
            return _cosine(x, self.centroids)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest centroid of every token: ``[B, H, T]``."""
        return self.similarity(x).argmax(-1)

    @torch.no_grad()
    def update(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """One EMA step towards the means of the normalized ``q`` and ``k`` assigned to each centroid.

        Centroids with no assigned token stay where they are.
        """
        self._check(q, "q")
        self._check(k, "k")
        x = torch.cat([q, k], 1).detach().float()
        x = nn.functional.normalize(x, dim=-1)
        c = _cosine(x, self.centroids).argmax(-1)  # [B, H, 2T]
        H, K, D = self.centroids.shape
        flat = (torch.arange(H, device=x.device).view(1, H, 1) * K + c).reshape(-1)
        xs = x.transpose(1, 2).reshape(-1, D)
        sums = torch.zeros(H * K, D, device=x.device).index_add_(0, flat, xs)
        counts = torch.zeros(H * K, device=x.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
        means = (sums / counts.clamp_min(1)[:, None]).view(H, K, D)
        hit = (counts > 0).view(H, K, 1)
        new = self.decay * self.centroids + (1 - self.decay) * means.to(self.centroids.dtype)
        self.centroids.copy_(torch.where(hit, new, self.centroids))


def _cosine(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    xn = nn.functional.normalize(x.detach().float(), dim=-1)
    cn = nn.functional.normalize(centroids.detach().float().to(x.device), dim=-1)
    return torch.einsum("bthd,hkd->bhtk", xn, cn)


def random_centroids(num_heads: int, head_dim: int, num_clusters: int, seed: int = 0) -> torch.Tensor:
    """Data-independent unit centroids ``[num_heads, num_clusters, head_dim]`` from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return nn.functional.normalize(torch.randn(num_heads, num_clusters, head_dim, generator=gen), dim=-1)


# ------------------------------------------------------------------------------- selection
def _membership_words(member: torch.Tensor) -> torch.Tensor:
    """``member [B, H, T, K]`` bool -> bit words ``[n_words, B, H, T]`` int32 (bit ``c % 31`` of word ``c // 31``)."""
    K = member.shape[-1]
    words = []
    for w0 in range(0, K, _WORD):
        part = member[..., w0 : w0 + _WORD].to(torch.int32)
        bits = torch.ones(part.shape[-1], dtype=torch.int32, device=member.device) << torch.arange(
            part.shape[-1], dtype=torch.int32, device=member.device
        )
        words.append((part * bits).sum(-1, dtype=torch.int32))
    return torch.stack(words)


def _prefix_words(K: int, device) -> torch.Tensor:
    """``[K, n_words]`` int32: the bits of the clusters ``< c`` for every ``c``."""
    below = torch.arange(K, device=device).view(1, K) < torch.arange(K, device=device).view(K, 1)
    return _membership_words(below).permute(1, 0)


class _Balanced:
    """Non-causal balanced routing: per centroid its ``w`` nearest queries and keys (top-k)."""

    def __init__(self, qr: torch.Tensor, kr: torch.Tensor, centroids: torch.Tensor):
        B, T, H, _ = qr.shape
        K = centroids.shape[1]
        self.T, self.K, self.w = T, K, T // K
        with torch.no_grad():
            sq = _cosine(qr, centroids).transpose(-1, -2)  # [B, H, K, T]
            sk = _cosine(kr, centroids).transpose(-1, -2)
            self.q_idx = sq.topk(self.w, dim=-1).indices.sort(-1).values  # [B, H, K, w]
            self.k_idx = sk.topk(self.w, dim=-1).indices.sort(-1).values
            mq = torch.zeros(B, H, K, T, dtype=torch.bool, device=qr.device).scatter_(-1, self.q_idx, True)
            mk = torch.zeros(B, H, K, T, dtype=torch.bool, device=qr.device).scatter_(-1, self.k_idx, True)
            self.words_q = _membership_words(mq.transpose(-1, -2))  # [n_words, B, H, T]
            self.words_k = _membership_words(mk.transpose(-1, -2))

    def dense(self) -> torch.Tensor:
        """``[B, H, T, T]``: query ``i`` and key ``j`` share a cluster."""
        shared = None
        for wq, wk in zip(self.words_q, self.words_k):
            s = (wq[..., :, None] & wk[..., None, :]) != 0
            shared = s if shared is None else shared | s
        return shared

    def attend(self, qr, kr, vr, scale: float):
        B, T, H, _ = qr.shape
        K, w = self.K, self.w
        q_order = self.q_idx.reshape(B, H, K * w)
        k_order = self.k_idx.reshape(B, H, K * w)
        bq, bk = chunk_query_block(w), engine_block(w)
        N = K * w
        with torch.no_grad():
            # a key shared with an earlier cluster of the query was already counted there
            cluster_of_slot = torch.arange(N, device=qr.device) // w
            prefix = _prefix_words(K, qr.device)[cluster_of_slot].permute(1, 0)[:, None, None]  # [nw, 1, 1, N]
            earlier_q = self.words_q.gather(-1, q_order.expand(self.words_q.shape[0], -1, -1, -1)) & prefix
            earlier_k = self.words_k.gather(-1, k_order.expand(self.words_k.shape[0], -1, -1, -1)) & prefix
            nq, per = N // bq, w // bk
            first = torch.arange(nq, device=qr.device) * bq // w * per  # first key block of the query block's cluster
            idx = (first[:, None] + torch.arange(per, device=qr.device)).expand(B, H, nq, per)
            q_any = (earlier_q != 0).any(0).view(B, H, nq, bq).any(-1)  # [B, H, nq]
            k_any = (earlier_k != 0).any(0).view(B, H, N // bk, bk).any(-1)
            partial = q_any[..., None] & k_any.gather(-1, idx.reshape(B, H, -1)).view(B, H, nq, per)

        def mask(b, h, qi, ki):
            hk = _rowless(h)
            seen = None
            for wq, wk in zip(earlier_q, earlier_k):
                s = (wq[b, h, qi] & wk[b, hk, ki]) != 0
                seen = s if seen is None else seen | s
            return ~seen

        bm = BlockMask.from_kv_indices(
            idx, N, N, q_block=bq, kv_block=bk, mask_mod=mask if bool(partial.any()) else None,
            kv_partial=partial,
        )
        qs, ks, vs = gather_tokens(qr, q_order), gather_tokens(kr, k_order), gather_tokens(vr, k_order)
        # the merge weights exp(lse - lse_total) of a query met in several clusters need the lse's gradient
        o, lse = attention_lse(qs, ks, vs, bm, scale)
        return _merge_occurrences(o, lse, q_order, T)


def _merge_occurrences(o: torch.Tensor, lse: torch.Tensor, dest: torch.Tensor, T: int):
    """Combine per-occurrence results ``o [B, N, H, Dv]``, ``lse [B, H, N]`` of queries ``dest [B, H, N]``
    by their log-sum-exps into ``[B, T, H, Dv]``, ``[B, H, T]``; a query with no occurrence gets zeros."""
    B, N, H, Dv = o.shape
    with torch.no_grad():
        m = torch.full((B, H, T), NEG_INF, device=o.device).scatter_reduce(-1, dest, lse.detach(), "amax")
        m = m.masked_fill(torch.isneginf(m), 0.0)
    lse_safe = lse.clamp_min(-1e30)  # finite gradients for empty occurrences
    wgt = torch.exp(lse_safe - m.gather(-1, dest))  # [B, H, N]
    den = torch.zeros(B, H, T, device=o.device).scatter_add(-1, dest, wgt)
    num = torch.zeros(B, H, T, Dv, device=o.device).scatter_add(
        2, dest[..., None].expand(B, H, N, Dv), wgt[..., None] * o.float().transpose(1, 2)
    )
    empty = den == 0
    out = (num / den.masked_fill(empty, 1.0)[..., None]).transpose(1, 2).to(o.dtype)
    lse_out = (torch.log(den.masked_fill(empty, 1.0)) + m).masked_fill(empty, NEG_INF)
    return out, lse_out


# ------------------------------------------------------------------------------- the op
def _check(q, k, v, router, num_clusters, local_heads, window, causal, cluster_window=None):
    B, Tq, Tk, Hq, Hkv, D, Dv = check_qkv(q, k, v)
    if Tq != Tk:
        raise ValueError(f"routing attention is self-attention: seq_q ({Tq}) must equal seq_k ({Tk})")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    G = Hq // Hkv
    if isinstance(local_heads, bool) or not isinstance(local_heads, int) or not 0 <= local_heads <= Hq:
        raise ValueError(f"local_heads must be an int in [0, heads_q={Hq}], got {local_heads!r}")
    if local_heads % G:
        raise ValueError(f"local_heads={local_heads} must be a multiple of heads_q / heads_kv = {G} (GQA groups)")
    Hr = Hq - local_heads
    if (router is None) == (num_clusters is None):
        raise ValueError("pass exactly one of router (a KMeansRouter) and num_clusters (random fixed centroids)")
    if router is not None:
        if not isinstance(router, KMeansRouter):
            raise TypeError(f"router must be a KMeansRouter, got {type(router).__name__}")
        if Hr and (router.num_heads != Hr or router.head_dim != D):
            raise ValueError(
                f"router has num_heads={router.num_heads}, head_dim={router.head_dim}; the routing heads "
                f"need num_heads = heads_q - local_heads = {Hr}, head_dim = {D}"
            )
        K = router.num_clusters
    else:
        if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
            raise ValueError(f"num_clusters must be a positive int, got {num_clusters!r}")
        K = num_clusters
    if cluster_window is not None:
        if not causal:
            raise ValueError("cluster_window applies to causal routing only (non-causal clusters hold T / K)")
        check_block_size("cluster_window", cluster_window, Tq)
    elif K > Tq:
        raise ValueError(f"num_clusters={K} exceeds the sequence length {Tq}")
    if not causal and Tq % K:
        raise ValueError(f"num_clusters={K} must divide the sequence length {Tq} (balanced clusters of T / K)")
    w = Tq // K if cluster_window is None else cluster_window
    if window is not None:
        check_block_size("window", window, Tq)
    return Tq, G, Hr, K, w


def routing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    router: KMeansRouter | None = None,
    num_clusters: int | None = None,
    seed: int = 0,
    causal: bool = False,
    local_heads: int = 0,
    window: int | None = None,
    cluster_window: int | None = None,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Routing attention (see the module docstring): ``q [B, T, H, D]``, ``k, v [B, T, H_kv, *]``.

    Give either ``router`` (a :class:`KMeansRouter` with ``num_heads = H - local_heads``; updated by EMA
    when in training mode) or ``num_clusters`` (fixed random centroids from ``seed``). Non-causal calls
    need ``num_clusters | T``. Causal calls take ``cluster_window`` (default ``T // num_clusters``): the
    most recent same-cluster keys a query sees. Returns ``o [B, T, H, D_v]`` (and ``lse [B, H, T]`` with
    ``return_lse``).

    Example::

        >>> q = k = v = torch.randn(1, 128, 4, 16)
        >>> router = KMeansRouter(num_heads=2, head_dim=16, num_clusters=8, seed=0)
        >>> routing_attention(q, k, v, router=router, causal=True, local_heads=2, window=16).shape
        torch.Size([1, 128, 4, 16])
    """
    T, G, Hr, K, w = _check(q, k, v, router, num_clusters, local_heads, window, causal, cluster_window)
    scale = check_scale(scale, q.shape[-1])
    L = local_heads
    outs, lses = [], []
    if L:
        o_l, lse_l = attention(
            q[:, :, :L], k[:, :, : L // G], v[:, :, : L // G], causal=causal, window=window or w, scale=scale,
            return_lse=True, backend="tiled",
        )
        outs.append(o_l)
        lses.append(lse_l)
    if Hr:
        qr = q[:, :, L:]
        kr, vr = expand_kv(k[:, :, L // G :], G), expand_kv(v[:, :, L // G :], G)
        centroids = router.centroids if router is not None else random_centroids(Hr, q.shape[-1], K, seed)
        if causal:
            with torch.no_grad():
                rnd = window_round(_cosine(qr, centroids).argmax(-1), _cosine(kr, centroids).argmax(-1), w)
            o_r, lse_r = sorted_attention(qr, kr, vr, rnd, round_mask(rnd), scale)
        else:
            o_r, lse_r = _Balanced(qr, kr, centroids).attend(qr, kr, vr, scale)
        outs.append(o_r)
        lses.append(lse_r)
        if router is not None and router.training:
            router.update(qr, kr)
    o = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
    if not return_lse:
        return o
    return o, (torch.cat(lses, 1) if len(lses) > 1 else lses[0])


def routing_dense_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    router: KMeansRouter | None = None,
    num_clusters: int | None = None,
    seed: int = 0,
    causal: bool = False,
    local_heads: int = 0,
    window: int | None = None,
    cluster_window: int | None = None,
) -> torch.Tensor:
    """The pairs :func:`routing_attention` attends to, ``[B, H, T, T]`` bool (small ``T`` only; the router's
    current centroids, no update)."""
    v = k[..., :1]
    T, G, Hr, K, w = _check(q, k, v, router, num_clusters, local_heads, window, causal, cluster_window)
    L = local_heads
    parts = []
    i = torch.arange(T, device=q.device)
    if L:
        d = i.view(T, 1) - i.view(1, T)
        win = window or w
        local = ((d >= 0) & (d < win)) if causal else (d.abs() < win)
        parts.append(local.expand(q.shape[0], L, T, T))
    if Hr:
        qr, kr = q[:, :, L:], expand_kv(k[:, :, L // G :], G)
        centroids = router.centroids if router is not None else random_centroids(Hr, q.shape[-1], K, seed)
        with torch.no_grad():
            if causal:
                rnd = window_round(_cosine(qr, centroids).argmax(-1), _cosine(kr, centroids).argmax(-1), w)
                parts.append(rnd.dense_visible())
            else:
                parts.append(_Balanced(qr, kr, centroids).dense())
    return torch.cat(parts, 1)


def _params(T: int) -> dict:
    """16 clusters of ``T / 16`` tokens: about 1/16 of the keys per query."""
    K = min(16, T)
    while T % K:
        K -= 1
    return {"num_clusters": K}


register(
    SparseMethod(
        name="routing", attend=routing_attention, dense_mask=routing_dense_mask, make_params=_params, content_based=True
    )
)
