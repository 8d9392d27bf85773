"""Combiner-style factorized full attention (Ren et al. 2021, "Combiner: Full Attention Transformer
with Sparse Computation Cost").

The sequence is cut into blocks of ``block`` tokens. A query attends *directly* to the keys of its
own block and, through one summary per block, to every other block (mean-pooled keys and values,
the uniform local factorization of Combiner-Fixed), all in one softmax:

    k̄_j = mean(k in block j),  v̄_j = mean(v in block j)
    o_t = softmax([q_t K_own^T, q_t k̄_J^T] / sqrt(d)) [V_own; v̄_J]

with ``J`` = every other block (non-causal) or the blocks before the query's block (causal; those
are complete, and the own block is attended with the causal mask). Every position is reachable:
directly or through its block's summary. Implementation: the ``n`` summaries are appended to K/V
(``T + n`` keys) and one analytic :class:`~effattn.exact.block_mask.BlockMask` over the concatenation
(own-block tiles + summary tiles) runs on the tiled engine: ``O(T (block + T / block))`` work.

``block = 1`` makes every summary a token and Combiner equals full (causal) attention; so does a
single block (``block >= T``). Summary keys are not original keys, so the registry's ``dense_mask``
is ``None``; :func:`combiner_reference` states the formula densely and the tests compare with it.
"""

from __future__ import annotations

import torch

from effattn._checks import check_int, check_qkv
from effattn.exact import MaskMod, attention, create_block_mask
from effattn.sparse._blockwise import block_pool, check_self_attention, concat_mask, default_block, num_blocks
from effattn.sparse._common import SparseMethod, check_block_size, register


def _own_block_mask(block: int, causal: bool) -> MaskMod:
    def fn(b, h, q, kv):
        same = q // block == kv // block
        return same & (kv <= q) if causal else same

    def blocks(ql, qh, kl, kh):
        bq0, bq1, bk0, bk1 = ql // block, qh // block, kl // block, kh // block
        any_ = (bq0 <= bk1) & (bk0 <= bq1)
        all_ = (bq0 == bq1) & (bk0 == bk1) & (bq0 == bk0)
        if causal:
            any_, all_ = any_ & (kl <= qh), all_ & (kh <= ql)
        return any_, all_

    return MaskMod(fn, blocks, f"own_block({block}, causal={causal})")


def _summary_mask(block: int, causal: bool) -> MaskMod:
    """Summary ``s`` (of block ``s``) is visible to query ``q`` iff ``s != q // block`` (causal: ``s < q // block``)."""

    def fn(b, h, q, s):
        return s < q // block if causal else s != q // block

    def blocks(ql, qh, sl, sh):
        bq0, bq1 = ql // block, qh // block
        if causal:
            return sl < bq1, sh < bq0
        return ~((sl == sh) & (bq0 == bq1) & (sl == bq0)), (sh < bq0) | (sl > bq1)

    return MaskMod(fn, blocks, f"summaries({block}, causal={causal})")


def combiner_mask(T: int, *, block: int, causal: bool) -> MaskMod:
    """The Combiner rule over ``[T keys | ceil(T / block) summaries]``."""
    return concat_mask(T, _own_block_mask(block, causal), _summary_mask(block, causal))


def combiner_keys(k: torch.Tensor, v: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[k | k̄], [v | v̄]``: the block summaries appended to the keys and values (differentiable)."""
    return torch.cat([k, block_pool(k, block, "mean")], 1), torch.cat([v, block_pool(v, block, "mean")], 1)


def _check(q, k, v, block, causal):
    check_qkv(q, k, v)
    T = check_self_attention(q, k, "combiner_attention")
    check_block_size("block", block, T)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    return T


def combiner_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block: int = 64, causal: bool = False
) -> torch.Tensor:
    """Direct attention within the own block plus attention to the mean summaries of the other
    (causal: earlier) blocks, in one softmax.

    Example::

        >>> q = k = v = torch.randn(1, 100, 2, 16)
        >>> combiner_attention(q, k, v, block=10, causal=True).shape
        torch.Size([1, 100, 2, 16])
    """
    T = _check(q, k, v, block, causal)
    kc, vc = combiner_keys(k, v, block)
    bm = create_block_mask(combiner_mask(T, block=block, causal=causal), 1, 1, T, kc.shape[1], device=q.device)
    return attention(q, kc, vc, block_mask=bm, backend="tiled")


def combiner_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block: int = 64, causal: bool = False
) -> torch.Tensor:
    """The formula densely (small sizes): summaries by an explicit loop over blocks, the
    ``[T + n]``-key mask as a dense table, the reference backend. Ground truth for the tests."""
    T = _check(q, k, v, block, causal)
    n = num_blocks(T, block)
    ks = torch.stack([k[:, j * block : (j + 1) * block].mean(1) for j in range(n)], 1)
    vs = torch.stack([v[:, j * block : (j + 1) * block].mean(1) for j in range(n)], 1)
    t = torch.arange(T, device=q.device)
    own = t.view(-1, 1) // block == t.view(1, -1) // block
    summ = torch.arange(n, device=q.device).view(1, -1) != (t // block).view(-1, 1)
    if causal:
        own = own & (t.view(1, -1) <= t.view(-1, 1))
        summ = torch.arange(n, device=q.device).view(1, -1) < (t // block).view(-1, 1)
    allowed = torch.cat([own, summ], 1)
    return attention(
        q, torch.cat([k, ks], 1), torch.cat([v, vs], 1), mask_mod=lambda b, h, i, j: allowed[i, j], backend="reference"
    )


register(
    SparseMethod(
        name="combiner",
        attend=combiner_attention,
        dense_mask=lambda q, k, *, causal=False, **params: None,
        make_params=lambda T: {"block": default_block(T)},
        content_based=False,
    )
)


# ---------------------------------------------------------------------------------- Combiner-Axial


def combiner_axial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, width: int | None = None, causal: bool = False
) -> torch.Tensor:
    """Combiner-Axial (Ren et al. 2021, "Combiner: Full Attention Transformer with Sparse Computation
    Cost"): the sequence is read as rows of ``width`` tokens (default ``ceil(sqrt(T))``; the last row
    may be short). Token ``t`` in row ``r``, column ``c`` attends directly to its own row (causal: the
    columns ``<= c``) and, through one summary per column ``c'``, to the rest of that column: the rows
    ``< r`` (causal) or ``!= r`` (non-causal), all in one softmax::

        k̄_{r,c'} = mean(k at column c' in those rows),  v̄ likewise  (the uniform local expectation
        of Combiner-Fixed; empty regions are dropped)
        o_t = softmax([q_t K_row^T, q_t k̄_{r,:}^T] / sqrt(d)) [V_row; v̄_{r,:}]

    Every earlier (causal) or other position is reachable in one step. Work ``O(T * width)``: the
    column summaries are prefix (or total-minus-row) means computed by a cumulative sum over rows.
    ``width = T`` (one row) is full attention; ``width = 1`` gives each query its own token plus the
    mean of all earlier tokens (one column).

    Example::

        >>> q = k = v = torch.randn(1, 23, 2, 8)
        >>> combiner_axial_attention(q, k, v, width=5, causal=True).shape
        torch.Size([1, 23, 2, 8])
    """
    check_qkv(q, k, v)
    T = check_self_attention(q, k, "combiner_axial_attention")
    width = -(-T // max(1, int(T**0.5))) if width is None else width
    width = check_block_size("width", width, T)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    B, _, Hq, D = q.shape
    G = Hq // k.shape[2]
    k, v = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    R = -(-T // width)
    pad = R * width - T

    def grid(x):  # [B, T, H, D] -> [B, R, W, H, D], zero padded
        return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)).view(B, R, width, Hq, -1)

    present = torch.arange(R * width, device=q.device).view(R, width) < T  # [R, W]
    qg, kg, vg = grid(q), grid(k), grid(v)
    n = present.to(q.dtype)
    if causal:  # rows strictly above: exclusive prefix sums over rows

        def above(x, dim):  # exclusive prefix sum (shifted, not cumsum minus own row: exact causality)
            return torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), x.cumsum(dim).narrow(dim, 0, R - 1)], dim)

        ks, vs, cnt = above(kg, 1), above(vg, 1), above(n, 0)
    else:  # every other row: totals minus the own row
        ks, vs, cnt = kg.sum(1, keepdim=True) - kg, vg.sum(1, keepdim=True) - vg, n.sum(0, keepdim=True) - n
    ks = ks / cnt.clamp(min=1.0)[None, :, :, None, None]
    vs = vs / cnt.clamp(min=1.0)[None, :, :, None, None]
    keys, vals = torch.cat([kg, ks], 2), torch.cat([vg, vs], 2)  # [B, R, 2W, H, D]
    s = torch.einsum("brihd,brjhd->brhij", qg.float(), keys.float()) * D**-0.5
    col = torch.arange(width, device=q.device)
    own = present[:, None, :] & (col[None, None, :] <= col[None, :, None] if causal else True)  # [R, Wq, Wk]
    summ = (cnt > 0)[:, None, :].expand(R, width, width)
    allowed = torch.cat([own.expand(R, width, width), summ], 2)  # [R, Wq, 2W]
    p = s.masked_fill(~allowed[None, :, None], float("-inf")).softmax(-1)
    o = torch.einsum("brhij,brjhd->brihd", p, vals.float())
    return o.reshape(B, R * width, Hq, -1)[:, :T].to(q.dtype)


def combiner_axial_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, width: int, causal: bool = False
) -> torch.Tensor:
    """Combiner-Axial densely: the summaries of every (row, column) region by an explicit loop, then
    one ``[T, T + rows * width]`` mask over ``[keys | summaries]`` on the reference backend."""
    check_qkv(q, k, v)
    T = check_self_attention(q, k, "combiner_axial_reference")
    R = -(-T // width)
    t = torch.arange(T, device=q.device)
    ks, vs, ok = [], [], torch.zeros(T, R * width, dtype=torch.bool, device=q.device)
    for r in range(R):
        for c in range(width):
            rows = [r2 for r2 in range(R) if (r2 < r if causal else r2 != r) and r2 * width + c < T]
            idx = torch.tensor([r2 * width + c for r2 in rows], dtype=torch.long, device=q.device)
            ks.append(k[:, idx].mean(1) if rows else torch.zeros_like(k[:, 0]))
            vs.append(v[:, idx].mean(1) if rows else torch.zeros_like(v[:, 0]))
            if rows:
                ok[t // width == r, r * width + c] = True
    own = t.view(-1, 1) // width == t.view(1, -1) // width
    if causal:
        own = own & (t.view(1, -1) <= t.view(-1, 1))
    allowed = torch.cat([own, ok], 1)
    kc, vc = torch.cat([k, torch.stack(ks, 1)], 1), torch.cat([v, torch.stack(vs, 1)], 1)
    return attention(q, kc, vc, mask_mod=lambda b, h, i, j: allowed[i, j], backend="reference")


# -------------------------------------------------------------------------------- Combiner-Mixture


def _split_heads(q, k, v, fixed_heads):
    """``(q, k, v)`` of the first ``fixed_heads`` query heads and of the rest; kv heads are sliced
    when the split falls on a group boundary, else repeated to one per query head."""
    Hq, Hkv = q.shape[2], k.shape[2]
    G = Hq // Hkv
    if fixed_heads % G:
        k, v, G = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2), 1
    f = fixed_heads // G
    return (q[:, :, :fixed_heads], k[:, :, :f], v[:, :, :f]), (q[:, :, fixed_heads:], k[:, :, f:], v[:, :, f:])


def _check_mixture(q, k, v, fixed_heads, name):
    check_qkv(q, k, v)
    check_self_attention(q, k, name)
    Hq = q.shape[2]
    fixed_heads = Hq // 2 if fixed_heads is None else fixed_heads
    check_int("fixed_heads", fixed_heads, minimum=0)
    if fixed_heads > Hq:
        raise ValueError(f"fixed_heads must lie in [0, heads={Hq}], got {fixed_heads}")
    return fixed_heads


def combiner_mixture_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block: int = 64,
    width: int | None = None,
    fixed_heads: int | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Combiner-Mixture (Ren et al. 2021, "Combiner: Full Attention Transformer with Sparse Computation
    Cost"): different Combiner factorizations in different heads of one layer, so the heads together
    see each position both through a nearby block and through its column. Heads ``[0, fixed_heads)``
    run Combiner-Fixed (:func:`combiner_attention`, own block of ``block`` tokens + one mean summary
    per other block) and the others Combiner-Axial (:func:`combiner_axial_attention`, own row of
    ``width`` tokens + one mean summary per column of the other rows)::

        o_h = CombinerFixed_block(q_h, K, V)   for h < fixed_heads
        o_h = CombinerAxial_width(q_h, K, V)   otherwise

    Each head keeps full attention's support (every other, or earlier, position reachable in one
    step); the mixture's point is that the two factorizations summarize different groupings.
    Choices stated: the paper mixes its factorizations by head; effattn has Fixed and Axial (not
    Combiner-Logsparse), so those two are mixed; the default split is half and half
    (``fixed_heads = heads // 2``). With GQA the kv heads follow their query heads (a split inside
    a group repeats the shared kv head). Cost: the sum of the two parts.

    Example::

        >>> q = k = v = torch.randn(1, 50, 4, 8)
        >>> combiner_mixture_attention(q, k, v, block=8, width=7, causal=True).shape
        torch.Size([1, 50, 4, 8])
    """
    fixed_heads = _check_mixture(q, k, v, fixed_heads, "combiner_mixture_attention")
    (qf, kf, vf), (qa, ka, va) = _split_heads(q, k, v, fixed_heads)
    out = []
    if qf.shape[2]:
        out.append(combiner_attention(qf, kf, vf, block=block, causal=causal))
    if qa.shape[2]:
        out.append(combiner_axial_attention(qa, ka, va, width=width, causal=causal))
    return torch.cat(out, 2)


def combiner_mixture_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block: int = 64,
    width: int | None = None,
    fixed_heads: int | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Combiner-Mixture from the two dense statements (:func:`combiner_reference`,
    :func:`combiner_axial_reference`), head group by head group (small sizes)."""
    fixed_heads = _check_mixture(q, k, v, fixed_heads, "combiner_mixture_reference")
    T = q.shape[1]
    width = -(-T // max(1, int(T**0.5))) if width is None else width
    (qf, kf, vf), (qa, ka, va) = _split_heads(q, k, v, fixed_heads)
    out = []
    if qf.shape[2]:
        out.append(combiner_reference(qf, kf, vf, block=block, causal=causal))
    if qa.shape[2]:
        out.append(combiner_axial_reference(qa, ka, va, width=width, causal=causal))
    return torch.cat(out, 2)
