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
  needs; :func:`step_routing_attention` is that one-token form); ``num_clusters`` may then exceed ``T``.

``local_heads`` (the paper mixes routing heads and local-attention heads, half and half:
``local_heads = H // 2``): the first ``local_heads`` query heads attend to a sliding window of
``window`` keys instead (``window`` defaults to ``w``); default 0, every head routed.
Without a router (``num_clusters=`` instead), the centroids are random unit vectors drawn from
``seed`` (data-independent, so causal calls stay causal).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from effattn._checks import check_int, check_positive_int, check_qkv, check_scale
from effattn.exact import BlockMask, attention
from effattn.sparse._buckets import (
    attention_lse,
    chunk_query_block,
    engine_block,
    expand_kv,
    gather_tokens,
    merge_occurrences,
    round_mask,
    rowless,
    sorted_attention,
    window_round,
)
from effattn.sparse._common import SparseMethod, check_block_size, register, softmax_over_slots
from effattn.sparse.kmeans import KMeansRouter, centroid_cosine, nearest_centroid, random_centroids

_WORD = 31  # cluster-membership bits per int32 word (the sign bit stays unused)


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
            sq = centroid_cosine(qr, centroids).transpose(-1, -2)  # [B, H, K, T]
            sk = centroid_cosine(kr, centroids).transpose(-1, -2)
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
            hk = rowless(h)
            seen = None
            for wq, wk in zip(earlier_q, earlier_k):
                s = (wq[b, h, qi] & wk[b, hk, ki]) != 0
                seen = s if seen is None else seen | s
            return ~seen

        bm = BlockMask.from_kv_indices(
            idx,
            N,
            N,
            q_block=bq,
            kv_block=bk,
            mask_mod=mask if bool(partial.any()) else None,
            kv_partial=partial,
        )
        qs, ks, vs = gather_tokens(qr, q_order), gather_tokens(kr, k_order), gather_tokens(vr, k_order)
        # the merge weights exp(lse - lse_total) of a query met in several clusters need the lse's gradient
        o, lse = attention_lse(qs, ks, vs, bm, scale)
        return merge_occurrences(o, lse, q_order, T)


def _check(q, k, v, router, num_clusters, local_heads, window, causal, cluster_window=None):
    B, Tq, Tk, Hq, Hkv, D, Dv = check_qkv(q, k, v)
    if Tq != Tk:
        raise ValueError(f"routing attention is self-attention: seq_q ({Tq}) must equal seq_k ({Tk})")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    G = Hq // Hkv
    check_int("local_heads", local_heads, 0, Hq)
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
        K = check_positive_int("num_clusters", num_clusters)
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
            q[:, :, :L],
            k[:, :, : L // G],
            v[:, :, : L // G],
            causal=causal,
            window=window or w,
            scale=scale,
            return_lse=True,
            backend="tiled",
        )
        outs.append(o_l)
        lses.append(lse_l)
    if Hr:
        qr = q[:, :, L:]
        kr, vr = expand_kv(k[:, :, L // G :], G), expand_kv(v[:, :, L // G :], G)
        centroids = router.centroids if router is not None else random_centroids(Hr, q.shape[-1], K, seed)
        if causal:
            with torch.no_grad():
                rnd = window_round(nearest_centroid(qr, centroids), nearest_centroid(kr, centroids), w)
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
                rnd = window_round(nearest_centroid(qr, centroids), nearest_centroid(kr, centroids), w)
                parts.append(rnd.dense_visible())
            else:
                parts.append(_Balanced(qr, kr, centroids).dense())
    return torch.cat(parts, 1)


# ------------------------------------------------------------------------------- decoding
@dataclass
class RoutingDecodeState:
    """What causal routing attention with a fixed ``cluster_window`` needs to continue one token at a time.

    Bounded whatever the context (``n`` = real tokens seen by a row):

    - ``pos [B]``: ``n``;
    - local heads: the last ``min(window, n)`` keys and values, ``lk [B, <= window, L_kv, D]``,
      ``lv [B, <= window, L_kv, Dv]`` with ``lmask [B, <= window]``, a ring (token ``i`` in slot
      ``i % window``; ``L_kv = local_heads / G`` key heads with GQA groups of ``G``);
    - routing heads (one ring set per query head: its own clusters, GQA keys expanded): for every
      cluster the last ``cluster_window`` keys and values routed there, ``rk [B, H_r, K, <= cw, D]``,
      ``rv [B, H_r, K, <= cw, Dv]`` with ``rmask [B, H_r, K, <= cw]``, and the per-cluster counts
      ``rcount [B, H_r, K]`` (the ``j``-th key of a cluster in slot ``j % cluster_window``).

    The buffers grow with the context up to these bounds. A field also reads as ``state["rk"]``.
    Built by :func:`routing_decode_state` (after a prefix) or by :func:`step_routing_attention` from
    ``None`` (an empty sequence).
    """

    pos: torch.Tensor
    lk: torch.Tensor
    lv: torch.Tensor
    lmask: torch.Tensor
    rk: torch.Tensor
    rv: torch.Tensor
    rmask: torch.Tensor
    rcount: torch.Tensor

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in _STATE_FIELDS:
            raise KeyError(f"RoutingDecodeState has no field {name!r}; fields: {_STATE_FIELDS}")
        return getattr(self, name)

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in (getattr(self, f) for f in _STATE_FIELDS))


_STATE_FIELDS = tuple(f.name for f in fields(RoutingDecodeState))


def _grow(buf: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``buf`` padded with zeros along ``dim`` to ``size`` (unchanged if already that long)."""
    extra = size - buf.shape[dim]
    if extra <= 0:
        return buf
    shape = list(buf.shape)
    shape[dim] = extra
    return torch.cat([buf, buf.new_zeros(shape)], dim=dim)


def _put(buf: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``buf.scatter(dim, index, src)``: in place for inference, out of place while autograd records."""
    if torch.is_grad_enabled() and (buf.requires_grad or src.requires_grad):
        return buf.scatter(dim, index, src)
    return buf.scatter_(dim, index, src)


def _check_valid(valid, shape: tuple[int, ...], layout: str) -> torch.Tensor | None:
    if valid is None:
        return None
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != shape:
        raise ValueError(f"valid must be a bool tensor {layout} = {shape}, got {valid!r:.80}")
    return valid


def routing_decode_state(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    router: KMeansRouter | None = None,
    num_clusters: int | None = None,
    seed: int = 0,
    local_heads: int = 0,
    window: int | None = None,
    cluster_window: int,
    valid: torch.Tensor | None = None,
) -> RoutingDecodeState:
    """The :class:`RoutingDecodeState` after the prefix ``q, k, v [B, T, H, *]`` of a causal call.

    Arguments as :func:`routing_attention` with ``causal=True`` (``q`` gives the query head count
    only). ``valid [B, T]`` (bool) leaves out the positions where it is False (left padding): a row's
    state then holds its real tokens only. No router update.

    Example::

        >>> q = k = v = torch.randn(1, 20, 2, 8)
        >>> st = routing_decode_state(q, k, v, num_clusters=3, local_heads=1, window=4, cluster_window=5)
        >>> tuple(st.lk.shape), tuple(st.rk.shape), st.rcount.sum().item()
        ((1, 4, 1, 8), (1, 1, 3, 5, 8), 20)
    """
    _, G, Hr, K, _ = _check(q, k, v, router, num_clusters, local_heads, window, True, cluster_window)
    B, T = k.shape[:2]
    vm = _check_valid(valid, (B, T), "[batch, seq]")
    vm = torch.ones(B, T, dtype=torch.bool, device=k.device) if vm is None else vm
    L, Lkv, W, CW = local_heads, local_heads // G, window or cluster_window, cluster_window
    D = q.shape[-1]
    idx = vm.long().cumsum(1) - 1  # index of each real token in its row
    n = vm.sum(1)
    # local ring: token i of a row in slot i % W, the last W tokens kept
    cl = min(W, int(n.max())) if L and T else 0
    keep = vm & (idx >= (n - W)[:, None])
    slot = torch.where(keep, idx % W, cl)  # slot cl: a token no later query sees, cut off below
    ring = {}
    for name, x in (("lk", k[:, :, :Lkv]), ("lv", v[:, :, :Lkv])):
        buf = x.new_zeros(B, cl + 1, Lkv, x.shape[-1])
        ring[name] = _put(buf, 1, slot[:, :, None, None].expand(B, T, Lkv, x.shape[-1]), x)[:, :cl]
    lmask = torch.zeros(B, cl + 1, dtype=torch.bool, device=k.device).scatter_(1, slot.clamp(max=cl), keep)
    # routing rings: per head and cluster, the j-th key routed there in slot j % CW, the last CW kept
    kr, vr = expand_kv(k[:, :, Lkv:], G), expand_kv(v[:, :, Lkv:], G)
    if Hr:
        ck = nearest_centroid(kr, router.centroids if router is not None else random_centroids(Hr, D, K, seed))
    else:
        ck = torch.zeros(B, 0, T, dtype=torch.long, device=k.device)
    member = torch.nn.functional.one_hot(ck, K).bool() & vm[:, None, :, None]  # [B, Hr, T, K]
    count = member.long().sum(2)  # [B, Hr, K]
    j = (member.long().cumsum(2) - 1).gather(-1, ck[..., None])[..., 0]  # index within the cluster
    keep = vm[:, None] & (j >= count.gather(-1, ck) - CW)
    cr = min(CW, int(count.max())) if Hr and count.numel() else 0
    dest = torch.where(keep, ck * cr + j % CW, K * cr)  # [B, Hr, T]; K * cr: dropped
    for name, x in (("rk", kr), ("rv", vr)):
        Dx = x.shape[-1]
        buf = x.new_zeros(B, Hr, K * cr + 1, Dx)
        buf = _put(buf, 2, dest[..., None].expand(B, Hr, T, Dx), x.transpose(1, 2))
        ring[name] = buf[:, :, : K * cr].reshape(B, Hr, K, cr, Dx)
    rmask = torch.zeros(B, Hr, K * cr + 1, dtype=torch.bool, device=k.device).scatter_(2, dest, keep)
    return RoutingDecodeState(
        pos=n, lmask=lmask[:, :cl], rmask=rmask[:, :, : K * cr].reshape(B, Hr, K, cr), rcount=count, **ring
    )


def _check_state(state, B: int, Lkv: int, Hr: int, K: int, D: int, Dv: int, W: int, CW: int) -> RoutingDecodeState:
    if not isinstance(state, RoutingDecodeState):
        raise TypeError(
            f"state must be a RoutingDecodeState (or None for an empty sequence), got {type(state).__name__}"
        )
    if tuple(state.pos.shape) != (B,):
        raise ValueError(f"state holds batch {tuple(state.pos.shape)}, q has batch {B}")
    want = {
        "lk": (B, None, Lkv, D),
        "lv": (B, None, Lkv, Dv),
        "rk": (B, Hr, K, None, D),
        "rv": (B, Hr, K, None, Dv),
        "rcount": (B, Hr, K),
    }
    for name, shape in want.items():
        got = tuple(state[name].shape)
        if len(got) != len(shape) or any(s is not None and g != s for g, s in zip(got, shape)):
            raise ValueError(
                f"state.{name} has shape {got}, these arguments need {tuple('*' if s is None else s for s in shape)}"
            )
    if state.lk.shape[1] > W or state.rk.shape[3] > CW:
        raise ValueError(
            f"state rings hold {state.lk.shape[1]} local / {state.rk.shape[3]} cluster slots, more than "
            f"window={W} / cluster_window={CW}: a state of other arguments"
        )
    return state


def step_routing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: RoutingDecodeState | None,
    *,
    router: KMeansRouter | None = None,
    num_clusters: int | None = None,
    seed: int = 0,
    local_heads: int = 0,
    window: int | None = None,
    cluster_window: int,
    valid: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, RoutingDecodeState]:
    """One token of causal routing attention: ``q [B, 1, H, D]``, ``k, v [B, 1, H_kv, *]`` at position
    ``state.pos`` -> ``(o [B, 1, H, D_v], new_state)``; equals row ``pos`` of
    ``routing_attention(..., causal=True, cluster_window=cluster_window)`` over the whole sequence.

    The local heads write the key into their ring and attend to the ring (the last ``window`` keys);
    a routing head sends the query and the key to their nearest centroids (the router's current ones:
    no update here, the caller decides when the centroids move), writes the key into its cluster's
    ring and attends to the query's cluster ring, ``o = softmax(scale * q . k_ring) v_ring``; a query
    whose cluster holds no key gets zeros from that head. ``state=None`` starts an empty sequence.
    ``valid [B]`` (bool): a row where it is False (padding) keeps its state and gets zeros.

    Example::

        >>> q = k = v = torch.randn(1, 12, 2, 8)
        >>> kw = dict(num_clusters=3, local_heads=1, window=4, cluster_window=3)
        >>> full = routing_attention(q, k, v, causal=True, **kw)
        >>> state = routing_decode_state(q[:, :11], k[:, :11], v[:, :11], **kw)
        >>> o, state = step_routing_attention(q[:, 11:], k[:, 11:], v[:, 11:], state, **kw)
        >>> torch.allclose(o, full[:, 11:], atol=1e-5), state.pos.tolist()
        (True, [12])
    """
    _, G, Hr, K, _ = _check(q, k, v, router, num_clusters, local_heads, window, True, cluster_window)
    B, T, H, D = q.shape
    if T != 1:
        raise ValueError(
            f"step_routing_attention decodes one token: q must be [batch, 1, heads, head_dim], got {tuple(q.shape)}"
        )
    kw = dict(
        router=router,
        num_clusters=num_clusters,
        seed=seed,
        local_heads=local_heads,
        window=window,
        cluster_window=cluster_window,
    )
    L, Lkv, W, CW, Dv = local_heads, local_heads // G, window or cluster_window, cluster_window, v.shape[-1]
    if state is None:
        state = routing_decode_state(q[:, :0], k[:, :0], v[:, :0], **kw)
    st = _check_state(state, B, Lkv, Hr, K, D, Dv, W, CW)
    vm = _check_valid(valid, (B,), "[batch]")
    vm = torch.ones(B, dtype=torch.bool, device=q.device) if vm is None else vm
    scale = check_scale(scale, D)
    q1, k1, v1 = q[:, 0], k[:, 0], v[:, 0]  # [B, H, D]
    n = st.pos
    new = {}
    outs = []
    if L:
        need = min(W, int(torch.where(vm, n, 0).max()) + 1)
        lk, lv, lmask = _grow(st.lk, 1, need), _grow(st.lv, 1, need), _grow(st.lmask, 1, need)
        slot = (n % W).clamp(max=lk.shape[1] - 1)[:, None]  # a padded row writes its old value back
        for name, buf, x in (("lk", lk, k1[:, :Lkv]), ("lv", lv, v1[:, :Lkv])):
            idx = slot[:, :, None, None].expand(B, 1, Lkv, x.shape[-1])
            x = torch.where(vm[:, None, None], x, buf.gather(1, idx)[:, 0])
            new[name] = _put(buf, 1, idx, x[:, None])
        new["lmask"] = lmask.scatter(1, slot, lmask.gather(1, slot) | vm[:, None])
        keys = expand_kv(new["lk"], G).transpose(1, 2)  # [B, L, slots, D]
        vals = expand_kv(new["lv"], G).transpose(1, 2)
        outs.append(softmax_over_slots(q1[:, :L], keys, vals, new["lmask"][:, None], scale))
    else:
        new.update(lk=st.lk, lv=st.lv, lmask=st.lmask)
    if Hr:
        centroids = router.centroids if router is not None else random_centroids(Hr, D, K, seed)
        qr, kr, vr = q1[:, L:], expand_kv(k[:, :, Lkv:], G)[:, 0], expand_kv(v[:, :, Lkv:], G)[:, 0]
        cq = nearest_centroid(qr[:, None], centroids)[..., 0]  # [B, Hr]
        ck = nearest_centroid(kr[:, None], centroids)[..., 0]
        count = st.rcount
        c_now = count.gather(-1, ck[..., None])[..., 0]  # keys already in the new key's cluster
        need = min(CW, int(torch.where(vm[:, None], c_now, 0).max()) + 1)
        rk, rv, rmask = _grow(st.rk, 3, need), _grow(st.rv, 3, need), _grow(st.rmask, 3, need)
        C = rk.shape[3]
        flat = ck * C + (c_now % CW).clamp(max=C - 1)  # [B, Hr]: the key's slot, clusters flattened
        rk, rv, rmask = rk.reshape(B, Hr, K * C, D), rv.reshape(B, Hr, K * C, Dv), rmask.reshape(B, Hr, K * C)
        for name, buf, x in (("rk", rk, kr), ("rv", rv, vr)):
            idx = flat[..., None, None].expand(B, Hr, 1, x.shape[-1])
            x = torch.where(vm[:, None, None], x, buf.gather(2, idx)[:, :, 0])
            new[name] = _put(buf, 2, idx, x[:, :, None]).reshape(B, Hr, K, C, x.shape[-1])
        rmask = rmask.scatter(2, flat[..., None], rmask.gather(2, flat[..., None]) | vm[:, None, None])
        new["rmask"] = rmask = rmask.reshape(B, Hr, K, C)
        new["rcount"] = count + torch.nn.functional.one_hot(ck, K) * vm[:, None, None].long()
        g = cq[:, :, None, None]
        keys = new["rk"].gather(2, g[..., None].expand(B, Hr, 1, C, D))[:, :, 0]  # the query's cluster ring
        vals = new["rv"].gather(2, g[..., None].expand(B, Hr, 1, C, Dv))[:, :, 0]
        outs.append(softmax_over_slots(qr, keys, vals, rmask.gather(2, g.expand(B, Hr, 1, C))[:, :, 0], scale))
    else:
        new.update(rk=st.rk, rv=st.rv, rmask=st.rmask, rcount=st.rcount)
    o = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
    o = o.masked_fill(~vm[:, None, None], 0.0)
    return o[:, None].to(q.dtype), RoutingDecodeState(pos=n + vm.long(), **new)


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
