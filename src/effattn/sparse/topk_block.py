"""Top-k block retrieval by pooled block scores (MoBA; the max- and last-key variants).

Keys are cut into blocks of ``block`` tokens. Each key block gets a representative ``r_j``; each
query block ``i`` a pooled query ``p_i``; the block scores ``s_ij = p_i . r_j`` pick, per head, the
``top_k`` best *candidate* blocks, and the query block attends (exact softmax, tiled engine) to the
selected blocks plus its own block:

    S_i = {i} U top_k { j in C_i : s_ij } ;   o_t = softmax_{keys in blocks S_i} (q_t k^T / sqrt(d)) V

- causal (default): ``C_i = {j < i}``, the complete blocks that end before block ``i`` begins; the
  own block is attended with the causal mask. The pooled query must not read queries after a
  token either, so ``p_i`` is the mean of the ``block`` queries *ending at* the block's first
  position (see :func:`effattn.sparse._blockwise.causal_query_pool`): the selection of position
  ``t`` depends on positions ``<= t`` only. A query block with fewer than ``top_k`` candidates
  (the first ones) takes all of them.
- non-causal: ``C_i`` = every other block; ``p_i`` = mean of the block's queries.

Representatives (``representative=``): ``"mean"`` (mean-pooled keys: MoBA; Lu et al. 2025,
"MoBA: Mixture of Block Attention for Long-Context LLMs"), ``"max"`` (elementwise max-pooled keys,
an upper-bound-style proxy as in Quest; the plain max-pooled top-k kept under this name now that
HiP's hierarchical pruning is :mod:`effattn.sparse.hip`), ``"last"`` (the block's last key: the old
stand-in for the trained landmark token of Mohtashami & Jaggi 2023, "Landmark Attention:
Random-Access Infinite Context Length for Transformers", which is now :mod:`effattn.sparse.landmark`).
MoBA gates each query separately; here gating is per query block
so the selection is a :class:`~effattn.exact.block_mask.BlockMask` (one tile list per query block).

Selection is per query head (``BlockMask`` with ``H_m = H_q``); with GQA each query head scores the
representatives of its own key head, so heads sharing K/V may select different blocks. Selection
runs under ``torch.no_grad`` (top-k is not differentiable); gradients flow through the attention.
Cost: ``O(T^2 / block^2 * d)`` for the scores, ``O(T * (top_k + 1) * block * d)`` for the attention.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from effattn._checks import check_positive_int, check_qkv, check_tensor
from effattn.exact import BlockMask, attention
from effattn.sparse._blockwise import (
    NEG_INF,
    block_mask_from_selection,
    block_pool,
    causal_query_pool,
    check_self_attention,
    default_block,
    num_blocks,
)
from effattn.sparse._common import SparseMethod, check_block_size, check_top_k, register, softmax_over_slots

REPRESENTATIVES = ("mean", "max", "last")


def block_scores(q: torch.Tensor, k: torch.Tensor, *, block: int, causal: bool, representative: str = "mean"):
    """Pooled block scores ``[B, H_q, n, n]`` (float32, no grad) and the candidate mask ``[n, n]``."""
    if representative not in REPRESENTATIVES:
        raise ValueError(f"representative must be one of {REPRESENTATIVES}, got {representative!r}")
    T = k.shape[1]
    n = num_blocks(T, block)
    with torch.no_grad():
        qf, kf = q.detach().float(), k.detach().float()
        p = causal_query_pool(qf, block) if causal else block_pool(qf, block, "mean")  # [B, n, Hq, D]
        r = block_pool(kf, block, representative)  # [B, n, Hkv, D]
        G = q.shape[2] // k.shape[2]
        r = r.repeat_interleave(G, dim=2)
        scores = torch.einsum("bihd,bjhd->bhij", p, r)
        i = torch.arange(n, device=q.device).view(n, 1)
        j = torch.arange(n, device=q.device).view(1, n)
        candidates = (j < i) if causal else (j != i)
    return scores, candidates


def topk_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block: int = 64,
    top_k: int,
    causal: bool = True,
    representative: str = "mean",
) -> BlockMask:
    """The selection as a per-head :class:`BlockMask` ``[B, H_q, n, top_k + 1]`` (own block + top-k).

    ``top_k`` may be at most the number of candidates of the last query block (``n - 1`` blocks,
    ``n = ceil(T / block)``); more raises.

    Example::

        >>> q = k = torch.randn(1, 256, 2, 16)
        >>> bm = topk_block_mask(q, k, block=32, top_k=2)
        >>> bm.kv_counts[0, 0].tolist()
        [1, 2, 3, 3, 3, 3, 3, 3]
    """
    check_tensor("q", q, 4, "[batch, seq, heads_q, head_dim]")
    check_tensor("k", k, 4, "[batch, seq, heads_kv, head_dim]")
    T = check_self_attention(q, k, "topk_block_attention")
    if q.shape[2] % k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: heads_q % heads_kv and head_dim must match")
    check_block_size("block", block, T)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    n = num_blocks(T, block)
    check_top_k("top_k", top_k, n - 1)
    scores, candidates = block_scores(q, k, block=block, causal=causal, representative=representative)
    with torch.no_grad():
        val, idx = scores.masked_fill(~candidates, NEG_INF).topk(top_k, dim=-1)
        return block_mask_from_selection(idx, val > NEG_INF, T, block, causal)


def topk_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block: int = 64,
    top_k: int,
    causal: bool = True,
    representative: str = "mean",
) -> torch.Tensor:
    """Each query block attends to its own block and its ``top_k`` best-scoring candidate blocks.

    Example::

        >>> q = k = v = torch.randn(1, 256, 2, 16)
        >>> topk_block_attention(q, k, v, block=32, top_k=2).shape
        torch.Size([1, 256, 2, 16])
    """
    check_qkv(q, k, v)
    bm = topk_block_mask(q, k, block=block, top_k=top_k, causal=causal, representative=representative)
    return attention(q, k, v, block_mask=bm, backend="tiled")


def attention_mass_kept(q: torch.Tensor, k: torch.Tensor, block_mask: BlockMask, causal: bool = True) -> torch.Tensor:
    """Fraction of the full attention's softmax mass that a selection keeps, per query: ``[B, H_q, T_q]``.

    ``mass_t = sum_{j selected} exp(s_tj) / sum_{j visible} exp(s_tj) = exp(lse_selected - lse_full)``,
    both log-sum-exps from the tiled engine (``O(T)`` memory; the full one costs a dense pass).
    The full attention is causal or not as ``causal`` says; a query with no visible key at all
    counts as 1 (nothing to lose). For a selection over the original keys only (not for methods
    that attend to pooled or appended keys: HiLo's Lo-Fi heads, Combiner, strided's summaries).

    Example::

        >>> q = k = torch.randn(1, 128, 2, 16)
        >>> m = attention_mass_kept(q, k, topk_block_mask(q, k, block=16, top_k=7))
        >>> bool(((m > 0) & (m <= 1 + 1e-5)).all())
        True
    """
    check_tensor("q", q, 4, "[batch, seq_q, heads_q, head_dim]")
    check_tensor("k", k, 4, "[batch, seq_k, heads_kv, head_dim]")
    with torch.no_grad():
        q, k = q.detach(), k.detach()
        v = k.new_zeros(k.shape[0], k.shape[1], k.shape[2], 1)
        _, lse_sel = attention(q, k, v, block_mask=block_mask, return_lse=True, backend="tiled")
        _, lse_full = attention(q, k, v, causal=causal, return_lse=True, backend="tiled")
        empty = lse_full == NEG_INF
        return torch.exp(lse_sel - lse_full.masked_fill(empty, 0.0)).masked_fill(empty, 1.0)


@dataclass
class TopKBlockDecodeState:
    """What causal top-k block attention needs to continue one token at a time, after ``t`` tokens:

    every key and value so far ``k [B, t, H_kv, D]``, ``v [B, t, H_kv, Dv]`` (any earlier block may be
    selected, so this grows with the context, as a KV cache); the representatives of the complete
    blocks ``reps [B, t // block, H_kv, D]`` (float32); the last ``min(block, t)`` queries
    ``q_recent [B, <= block, H_q, D]`` and the pooled query of the last token's block
    ``pooled [B, H_q, D]`` (float32). Built by :func:`topk_block_decode_state` (after a prefix) or by
    :func:`step_topk_block_attention` from ``None`` (an empty sequence).
    """

    k: torch.Tensor
    v: torch.Tensor
    reps: torch.Tensor
    q_recent: torch.Tensor
    pooled: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in (getattr(self, f.name) for f in fields(self)))


def _check_decode_args(q, k, v, block, representative) -> None:
    check_qkv(q, k, v)
    check_self_attention(q, k, "top-k block decoding")
    check_block_size("block", block, q.shape[1])
    if representative not in REPRESENTATIVES:
        raise ValueError(f"representative must be one of {REPRESENTATIVES}, got {representative!r}")


def topk_block_decode_state(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block: int = 64, representative: str = "mean"
) -> TopKBlockDecodeState:
    """The :class:`TopKBlockDecodeState` after the prefix ``q [B, t, H_q, D]``, ``k, v [B, t, H_kv, *]``
    of a causal :func:`topk_block_attention` call (``t = 0`` gives the empty state).

    Example::

        >>> q = k = v = torch.randn(1, 40, 2, 8)
        >>> st = topk_block_decode_state(q, k, v, block=16)
        >>> tuple(st.k.shape), tuple(st.reps.shape), tuple(st.q_recent.shape)
        ((1, 40, 2, 8), (1, 2, 2, 8), (1, 16, 2, 8))
    """
    _check_decode_args(q, k, v, block, representative)
    B, t, Hq, D = q.shape
    done = t // block * block  # tokens in complete blocks
    with torch.no_grad():
        if done:
            reps = block_pool(k[:, :done].detach().float(), block, representative)
        else:
            reps = k.new_zeros(B, 0, k.shape[2], D, dtype=torch.float32)
        lo = max(0, (t - 1) // block * block - block + 1)  # the queries pooled for the last token's block
        first = (t - 1) // block * block
        pooled = q[:, lo : first + 1].detach().float().mean(1) if t else q.new_zeros(B, Hq, D, dtype=torch.float32)
    return TopKBlockDecodeState(k=k, v=v, reps=reps, q_recent=q[:, max(0, t - block) :], pooled=pooled)


def step_topk_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: TopKBlockDecodeState | None,
    *,
    block: int = 64,
    top_k: int,
    representative: str = "mean",
) -> tuple[torch.Tensor, TopKBlockDecodeState]:
    """One token of causal top-k block attention: ``q [B, 1, H_q, D]``, ``k, v [B, 1, H_kv, *]`` at
    position ``t`` (the state's length) -> ``(o [B, 1, H_q, D_v], new_state)``; equals row ``t`` of
    ``topk_block_attention(..., causal=True)`` over the whole sequence (same ``block``, ``top_k``,
    ``representative``).

    The token's block is ``i = t // block``; its pooled query ``p_i`` (mean of the ``block`` queries
    ending at position ``i * block``) is formed when the block begins. The query attends (exact softmax)
    to its own block's keys up to ``t`` and to the ``min(top_k, i)`` earlier blocks ``j`` with the
    largest ``p_i . r_j`` (``r_j`` the block's representative, made when the block completes; with
    GQA each query head scores its own key head's representatives).

    Example::

        >>> q = k = v = torch.randn(1, 48, 2, 8)
        >>> full = topk_block_attention(q, k, v, block=8, top_k=2)
        >>> state = topk_block_decode_state(q[:, :47], k[:, :47], v[:, :47], block=8)
        >>> o, state = step_topk_block_attention(q[:, 47:], k[:, 47:], v[:, 47:], state, block=8, top_k=2)
        >>> torch.allclose(o, full[:, 47:], atol=1e-5), tuple(state.k.shape)
        (True, (1, 48, 2, 8))
    """
    _check_decode_args(q, k, v, block, representative)
    check_positive_int("top_k", top_k)
    B, T, Hq, D = q.shape
    if T != 1:
        raise ValueError(
            f"step_topk_block_attention decodes one token: q must be [batch, 1, heads, head_dim], got {tuple(q.shape)}"
        )
    if state is None:
        state = topk_block_decode_state(q[:, :0], k[:, :0], v[:, :0], block=block, representative=representative)
    if not isinstance(state, TopKBlockDecodeState):
        raise TypeError(f"state must be a TopKBlockDecodeState (or None), got {type(state).__name__}")
    Hkv, Dv, t = k.shape[2], v.shape[3], state.k.shape[1]
    if state.k.shape[0] != B or state.k.shape[2:] != k.shape[2:] or state.v.shape[2:] != v.shape[2:]:
        raise ValueError(
            f"state holds keys {tuple(state.k.shape)}, values {tuple(state.v.shape)}; "
            f"this step has k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if state.reps.shape[1] != t // block:
        raise ValueError(
            f"state has {state.reps.shape[1]} block representatives after {t} tokens; "
            f"block={block} needs {t // block} (a state of another block size)"
        )
    k_all, v_all = torch.cat([state.k, k], 1), torch.cat([state.v, v], 1)
    q_recent = torch.cat([state.q_recent, q], 1)[:, -block:]
    reps, pooled = state.reps, state.pooled
    with torch.no_grad():
        if t % block == 0:  # a new block begins: its pooled query reads positions t - block + 1 .. t
            pooled = q_recent.detach().float().mean(1)
        if (t + 1) % block == 0:  # the block is complete: later blocks may select it
            reps = torch.cat([reps, block_pool(k_all[:, t + 1 - block :].detach().float(), block, representative)], 1)
        i = t // block
        own = torch.arange(i * block, t + 1, device=q.device).expand(B, Hq, -1)
        if i:
            G = Hq // Hkv
            scores = torch.einsum("bhd,bjhd->bhj", pooled, reps[:, :i].repeat_interleave(G, dim=2))
            sel = scores.topk(min(top_k, i), dim=-1).indices  # [B, Hq, top]
            pos = (sel[..., None] * block + torch.arange(block, device=q.device)).flatten(2)
            pos = torch.cat([pos, own], -1)
        else:
            pos = own
        head = torch.arange(Hq, device=q.device)[None, :, None] // (Hq // Hkv)
        flat = (pos * Hkv + head).flatten(1)  # [B, Hq * n_keys] into the flattened (position, head) axis
    n_keys = pos.shape[-1]
    kk = k_all.reshape(B, -1, D).gather(1, flat[..., None].expand(-1, -1, D)).view(B, Hq, n_keys, D)
    vv = v_all.reshape(B, -1, Dv).gather(1, flat[..., None].expand(-1, -1, Dv)).view(B, Hq, n_keys, Dv)
    keep = torch.ones(B, Hq, n_keys, dtype=torch.bool, device=q.device)
    o = softmax_over_slots(q[:, 0], kk, vv, keep, D**-0.5)
    return o[:, None].to(q.dtype), TopKBlockDecodeState(k_all, v_all, reps, q_recent, pooled)


def _dense(q, k, *, causal=True, **params):
    return topk_block_mask(q, k, causal=causal, **params).to_dense()


def _params(T: int) -> dict:
    block = default_block(T)
    n = num_blocks(T, block)
    return {"block": block, "top_k": max(1, min(n // 16 - 1, n - 1)), "representative": "mean"}


register(
    SparseMethod(
        name="topk_block",
        attend=topk_block_attention,
        dense_mask=_dense,
        make_params=_params,
        content_based=True,
    )
)
