"""Static sparse patterns: local window, dilated, strided, BigBird and axial attention.

The selection does not depend on the data; each pattern is an analytic block mask (tiles classified
from their index ranges, never from a ``T x T`` matrix) run by the exact family's tiled engine.

- **local** (Longformer's sliding window; Beltagy et al. 2020, "Longformer: The Long-Document
  Transformer"): query ``i`` sees ``j`` with ``0 <= i - j < w`` (causal) or ``|i - j| < w``.
- **dilated** (Sparse Transformer's strided head / LongNet-style dilation): keys at distances
  ``0, d, 2d, ..., (w - 1) d`` (behind, and ahead when not causal). Tokens are permuted into their
  residue classes ``mod d`` so the pattern becomes a plain band there: cost ``O(T w)``, not ``O(T w d)``.
- **strided** (Child et al. 2019, "Generating Long Sequences with Sparse Transformers"): the
  union, in one softmax ("merged" heads), of the local band of ``stride`` keys and the *summary
  columns* ``j = s * stride + stride - 1`` (the last key of every stride; the fixed pattern with
  ``c = 1``), so every key is two hops away. The ``T / stride`` summary keys are appended to K/V
  (``O(T (stride + T / stride))`` work); a summary column inside the band is masked in its appended
  copy so that no key is counted twice.
- **bigbird** (Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences"): block-level
  global (the first ``g`` blocks attend to and are attended by every block), sliding window of
  ``w`` blocks and ``r`` random blocks per query block and head, drawn with a ``torch.Generator``
  seeded by ``seed``; in causal mode random blocks come only from the strict past.
- **axial** (Ho et al. 2019, "Axial Attention in Multidimensional Transformers"): tokens of a
  row-major ``rows x cols`` grid; row attention, then column attention over its output:
  ``o = col_attn(q, k, row_attn(q, k, v))``. Two engine calls, every value reaches every query.
"""

from __future__ import annotations

import math

import torch

from effattn._checks import check_int, check_positive_int, check_qkv
from effattn.exact import (
    BlockMask,
    MaskMod,
    attention,
    causal_mask,
    create_block_mask,
    dilated_mask,
    sliding_window_mask,
    window_bounds,
)
from effattn.sparse._blockwise import (
    check_grid,
    check_self_attention,
    concat_mask,
    default_block,
    num_blocks,
)
from effattn.sparse._common import SparseMethod, check_block_size, register


def _check_causal(causal) -> bool:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    return causal


# ------------------------------------------------------------------------------------------ local
def local_mask(T_q: int, T_k: int, *, window: int | tuple[int, int], causal: bool) -> MaskMod:
    """The local-window rule (bottom-right aligned for ``T_q != T_k``) as an analytic mask mod."""
    left, right = window_bounds(window, _check_causal(causal))
    return sliding_window_mask(left, right, T_k - T_q)


def local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | tuple[int, int], causal: bool = False
) -> torch.Tensor:
    """Sliding-window attention: ``window=w`` sees the ``w`` keys ending at the query (causal) or
    ``|i - j| < w``; ``(left, right)`` as FlashAttention's ``window_size``.

    Example::

        >>> q = k = v = torch.randn(1, 100, 2, 16)
        >>> local_attention(q, k, v, window=8, causal=True).shape
        torch.Size([1, 100, 2, 16])
    """
    B, Tq, Tk, Hq, *_ = check_qkv(q, k, v)
    bm = create_block_mask(local_mask(Tq, Tk, window=window, causal=causal), 1, 1, Tq, Tk, device=q.device)
    return attention(q, k, v, block_mask=bm, backend="tiled")


def _local_dense(q, k, *, window, causal=False):
    return create_block_mask(
        local_mask(q.shape[1], k.shape[1], window=window, causal=causal), 1, 1, q.shape[1], k.shape[1], device=q.device
    ).to_dense()


# ---------------------------------------------------------------------------------------- dilated
def _residue_order(T: int, dilation: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions sorted by ``p mod d`` (stable): ``(perm, inv)``."""
    pos = torch.arange(T, device=device)
    perm = torch.argsort(pos % dilation, stable=True)
    return perm, torch.argsort(perm)


def _dilated_permuted_mask(T: int, window: int, dilation: int, causal: bool, perm: torch.Tensor) -> MaskMod:
    """Dilated rule on *permuted* indices: ``fn`` applies it to the original positions ``perm[idx]``;
    tiles are classified as a band of ``window`` in the permuted order (within one residue class the
    permuted distance is the original distance divided by ``d``)."""
    rule = dilated_mask(window, dilation, 0, causal)
    band = sliding_window_mask(window - 1, 0 if causal else window - 1)
    cls = perm % dilation

    def fn(b, h, q, kv):
        return rule(b, h, perm[q], perm[kv])

    def blocks(ql, qh, kl, kh):
        any_, all_ = band.blocks(ql, qh, kl, kh)
        kh_c, qh_c = kh.clamp(max=T - 1), qh.clamp(max=T - 1)
        one_class = (cls[ql] == cls[qh_c]) & (cls[kl] == cls[kh_c]) & (cls[ql] == cls[kl])
        return any_, all_ & one_class

    return MaskMod(fn, blocks, f"dilated_permuted(window={window}, dilation={dilation})")


def dilated_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, dilation: int, causal: bool = False
) -> torch.Tensor:
    """Dilated local attention: keys at distances ``0, d, ..., (window - 1) d`` behind the query (and
    ahead when not causal), ``d = dilation``. Run in residue-class order (a permutation of q/k/v,
    differentiable) where the pattern is a band of ``window``.

    Example::

        >>> q = k = v = torch.randn(1, 100, 2, 16)
        >>> dilated_attention(q, k, v, window=4, dilation=3, causal=True).shape
        torch.Size([1, 100, 2, 16])
    """
    check_qkv(q, k, v)
    T = check_self_attention(q, k, "dilated_attention")
    check_positive_int("window", window)
    check_positive_int("dilation", dilation)
    _check_causal(causal)
    perm, inv = _residue_order(T, dilation, q.device)
    mm = _dilated_permuted_mask(T, window, dilation, causal, perm)
    bm = create_block_mask(mm, 1, 1, T, T, device=q.device)
    o = attention(q[:, perm], k[:, perm], v[:, perm], block_mask=bm, backend="tiled")
    return o[:, inv]


def _dilated_dense(q, k, *, window, dilation, causal=False):
    T = check_self_attention(q, k, "dilated_attention")
    i = torch.arange(T, device=q.device)
    return dilated_mask(window, dilation, 0, causal)(0, 0, i.view(-1, 1), i.view(1, -1)).view(1, 1, T, T)


# ---------------------------------------------------------------------------------------- strided
def _summary_columns_mask(stride: int, causal: bool) -> MaskMod:
    """Appended summary key ``s`` is position ``c = s * stride + stride - 1``; visible to query ``i``
    where it lies outside the query's band (``i - c >= stride``; non-causal also ``c - i >= stride``)."""

    def fn(b, h, q, s):
        c = s * stride + stride - 1
        far_behind = q - c >= stride
        return far_behind if causal else far_behind | (c - q >= stride)

    def blocks(ql, qh, sl, sh):
        cl, ch = sl * stride + stride - 1, sh * stride + stride - 1
        if causal:
            return cl <= qh - stride, ch <= ql - stride
        any_ = (qh - cl >= stride) | (ch - ql >= stride)
        return any_, (ql - ch >= stride) | (cl - qh >= stride)

    return MaskMod(fn, blocks, f"summary_columns(stride={stride})")


def strided_mask(T: int, *, stride: int, causal: bool) -> MaskMod:
    """The strided pattern over ``[T keys | T // stride summary keys]`` (see the module docstring)."""
    band = sliding_window_mask(stride - 1, 0 if causal else stride - 1)
    return concat_mask(T, band, _summary_columns_mask(stride, causal))


def strided_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, stride: int, causal: bool = False
) -> torch.Tensor:
    """Sparse Transformer attention: local band of ``stride`` keys plus every key at a position
    ``j = stride - 1 (mod stride)`` (behind the query when causal), in one softmax.

    Example::

        >>> q = k = v = torch.randn(1, 100, 2, 16)
        >>> strided_attention(q, k, v, stride=10, causal=True).shape
        torch.Size([1, 100, 2, 16])
    """
    check_qkv(q, k, v)
    T = check_self_attention(q, k, "strided_attention")
    check_positive_int("stride", stride)
    _check_causal(causal)
    ks, vs = k[:, stride - 1 :: stride], v[:, stride - 1 :: stride]
    kc, vc = torch.cat([k, ks], 1), torch.cat([v, vs], 1)
    bm = create_block_mask(strided_mask(T, stride=stride, causal=causal), 1, 1, T, kc.shape[1], device=q.device)
    return attention(q, kc, vc, block_mask=bm, backend="tiled")


def _strided_dense(q, k, *, stride, causal=False):
    T = check_self_attention(q, k, "strided_attention")
    i = torch.arange(T, device=q.device).view(-1, 1)
    j = torch.arange(T, device=q.device).view(1, -1)
    band = (i - j < stride) & (j - i < (1 if causal else stride))
    column = (j % stride == stride - 1) & ((j <= i) if causal else True)
    return (band | column).view(1, 1, T, T)


# ---------------------------------------------------------------------------------------- bigbird
def bigbird_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block: int = 64,
    num_global_blocks: int = 1,
    num_window_blocks: int = 3,
    num_random_blocks: int = 2,
    causal: bool = False,
    seed: int = 0,
) -> BlockMask:
    """BigBird's block pattern as a per-head :class:`BlockMask` ``[1, H_q, n, n]`` (``n = ceil(T / block)``).

    Window: blocks ``i - (w - 1) ... i`` when causal, ``i - w // 2 ... i + w - 1 - w // 2`` otherwise.
    Random: ``num_random_blocks`` per query block and head, uniformly among the blocks that are not
    global or window blocks (and, in causal mode, lie strictly before the query block); a row with
    fewer eligible blocks takes them all. Same ``seed`` -> same blocks.
    """
    check_self_attention(q, k, "bigbird_attention")
    T, H = k.shape[1], q.shape[2]
    check_block_size("block", block, T)
    g = check_int("num_global_blocks", num_global_blocks, 0)
    w = check_positive_int("num_window_blocks", num_window_blocks)
    r = check_int("num_random_blocks", num_random_blocks, 0)
    _check_causal(causal)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    n = num_blocks(T, block)
    i = torch.arange(n).view(n, 1)
    j = torch.arange(n).view(1, n)
    glob = (j < g) | (i < g)
    win = (i - j <= w - 1) & (j <= i) if causal else (i - j <= w // 2) & (j - i <= w - 1 - w // 2)
    fixed = glob | win
    if causal:
        fixed = fixed & (j <= i)
    eligible = ~fixed & ((j < i) if causal else True)
    if r > 0:
        most = int(eligible.sum(-1).max())
        if r > most:
            raise ValueError(
                f"num_random_blocks={r} exceeds the {most} blocks available outside the global and window "
                f"blocks (n_blocks={n})"
            )
        gen = torch.Generator().manual_seed(seed)
        u = torch.rand(H, n, n, generator=gen).masked_fill(~eligible, -1.0)
        val, idx = u.topk(r, dim=-1)
        chosen = torch.zeros(H, n, n, dtype=torch.bool).scatter_(-1, idx, val >= 0)
        sel = fixed | chosen
    else:
        sel = fixed.expand(H, n, n)
    sel = sel.view(1, H, n, n).to(q.device)
    counts = sel.sum(-1)
    order = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices[..., : int(counts.max())]
    partial = (order == torch.arange(n, device=q.device).view(1, 1, n, 1)) & causal
    return BlockMask.from_kv_indices(
        order,
        T,
        T,
        q_block=block,
        kv_block=block,
        kv_counts=counts,
        mask_mod=causal_mask(0) if causal else None,
        kv_partial=partial,
    )


def bigbird_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block: int = 64,
    num_global_blocks: int = 1,
    num_window_blocks: int = 3,
    num_random_blocks: int = 2,
    causal: bool = False,
    seed: int = 0,
) -> torch.Tensor:
    """BigBird block-sparse attention (global + window + random blocks; see :func:`bigbird_mask`).

    Example::

        >>> q = k = v = torch.randn(1, 256, 2, 16)
        >>> bigbird_attention(q, k, v, block=16, num_random_blocks=2, causal=True, seed=1).shape
        torch.Size([1, 256, 2, 16])
    """
    check_qkv(q, k, v)
    bm = bigbird_mask(
        q,
        k,
        block=block,
        num_global_blocks=num_global_blocks,
        num_window_blocks=num_window_blocks,
        num_random_blocks=num_random_blocks,
        causal=causal,
        seed=seed,
    )
    return attention(q, k, v, block_mask=bm, backend="tiled")


def _bigbird_dense(q, k, *, causal=False, **params):
    return bigbird_mask(q, k, causal=causal, **params).to_dense()


# ------------------------------------------------------------------------------------------ axial
def axial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: tuple[int, int], causal: bool = False
) -> torch.Tensor:
    """Axial attention on a row-major ``rows x cols`` grid: ``o = col_attn(q, k, row_attn(q, k, v))``.

    Row attention: token ``(r, c)`` attends to ``(r, c')`` (``c' <= c`` when causal); column
    attention: to ``(r', c)`` (``r' <= r`` when causal), with the row outputs as values. Causal mode
    is causal-safe, and its two-hop field is the past "upper-left quadrant" ``r' <= r, c' <= c``
    (Ho et al. reach the rest of the earlier rows with an extra unmasked row pass over shifted rows:
    that is :func:`axial_ar_attention`).

    Example::

        >>> q = k = v = torch.randn(1, 6 * 8, 2, 16)
        >>> axial_attention(q, k, v, grid=(6, 8), causal=True).shape
        torch.Size([1, 48, 2, 16])
    """
    B, Tq, Tk, Hq, Hkv, D, Dv = check_qkv(q, k, v)
    T = check_self_attention(q, k, "axial_attention")
    rows, cols = check_grid(grid, T)
    _check_causal(causal)

    def along_rows(x):  # [B, T, H, E] -> [B * rows, cols, H, E]
        return x.reshape(B * rows, cols, *x.shape[2:])

    def along_cols(x):  # [B, T, H, E] -> [B * cols, rows, H, E]
        return x.reshape(B, rows, cols, *x.shape[2:]).transpose(1, 2).reshape(B * cols, rows, *x.shape[2:])

    o_row = attention(along_rows(q), along_rows(k), along_rows(v), causal=causal, backend="tiled")
    o_row = o_row.reshape(B, T, Hq, Dv)
    if Hq != Hkv:  # the row outputs are per query head: the column pass runs with H_kv = H_q
        k = k.repeat_interleave(Hq // Hkv, dim=2)
    o = attention(along_cols(q), along_cols(k), along_cols(o_row), causal=causal, backend="tiled")
    return o.reshape(B, cols, rows, Hq, Dv).transpose(1, 2).reshape(B, T, Hq, Dv)


def axial_ar_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: tuple[int, int]) -> torch.Tensor:
    """Causal axial attention with the Axial Transformer's shifted-row pass (Ho, Kalchbrenner,
    Weissenborn, Salimans 2019, "Axial Attention in Multidimensional Transformers"), as one op on a
    row-major ``rows x cols`` grid::

        u(r, c)   = softmax_{c'} (q(r, c) . k(r, c')) v(r, c')         (unmasked row pass)
        ctx(r, c) = softmax_{r'' < r} (q(r, c) . k(r'', c)) u(r'', c)  (column pass over the rows above)
        o(r, c)   = causal_row(q, k, v)(r, c) + ctx(r, c)      (row 0: ctx = 0)

    The row summaries ``u`` of a row see that whole row, so the column pass reads them only from
    strictly earlier rows (the paper's shift down by one row): token ``(r, c)`` sees every token of
    the rows above (two hops) and its own row up to ``c`` (the causal row pass, the paper's inner
    decoder), never its own row's future. The paper adds the outer context to the inner decoder's
    input across layers; as a single attention op, the two parts are summed (our choice).

    Example::

        >>> q = k = v = torch.randn(1, 6 * 8, 2, 16)
        >>> axial_ar_attention(q, k, v, grid=(6, 8)).shape
        torch.Size([1, 48, 2, 16])
    """
    B, Tq, Tk, Hq, Hkv, D, Dv = check_qkv(q, k, v)
    T = check_self_attention(q, k, "axial_ar_attention")
    rows, cols = check_grid(grid, T)

    def along_rows(x):
        return x.reshape(B * rows, cols, *x.shape[2:])

    def along_cols(x):  # [B, rows, cols, H, E] -> [B * cols, rows, H, E]
        return x.transpose(1, 2).reshape(B * cols, x.shape[1], *x.shape[3:])

    o_row = attention(along_rows(q), along_rows(k), along_rows(v), causal=True, backend="tiled").reshape(B, T, Hq, Dv)
    u = attention(along_rows(q), along_rows(k), along_rows(v), backend="tiled").reshape(B, rows, cols, Hq, Dv)
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=2)
    ctx = torch.zeros_like(u)
    if rows > 1:  # queries of rows 1.. against keys / row summaries of rows 0..rows-2, causal: r'' <= r - 1
        qg, kg = q.reshape(B, rows, cols, Hq, D), k.reshape(B, rows, cols, Hq, D)
        qa, ka, ua = along_cols(qg[:, 1:]), along_cols(kg[:, :-1]), along_cols(u[:, :-1])
        c = attention(qa, ka, ua, causal=True, backend="tiled")
        ctx[:, 1:] = c.reshape(B, cols, rows - 1, Hq, Dv).transpose(1, 2)
    return o_row + ctx.reshape(B, T, Hq, Dv)


def axial_ar_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: tuple[int, int]) -> torch.Tensor:
    """:func:`axial_ar_attention` with dense ``T x T`` masks on the reference backend (small sizes)."""
    check_qkv(q, k, v)
    T = check_self_attention(q, k, "axial_ar_reference")
    rows, cols = check_grid(grid, T)
    t = torch.arange(T, device=q.device)
    r, c = t // cols, t % cols
    same_row = r[:, None] == r[None, :]
    causal_row = same_row & (t[None, :] <= t[:, None])
    above = (c[:, None] == c[None, :]) & (r[None, :] < r[:, None])

    def run(qq, kk, vv, m):
        return attention(qq, kk, vv, mask_mod=lambda b, h, i, j: m[i, j], backend="reference")

    u = run(q, k, v, same_row)
    kq = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    return run(q, k, v, causal_row) + run(q, kq, u, above)


def _square_grid(T: int) -> tuple[int, int]:
    rows = max(d for d in range(1, math.isqrt(T) + 1) if T % d == 0)
    return rows, T // rows


# ---------------------------------------------------------------------------------------- registry
def _none_mask(q, k, *, causal=False, **params):
    return None


register(
    SparseMethod(
        name="local",
        attend=local_attention,
        dense_mask=_local_dense,
        make_params=lambda T: {"window": max(1, T // 16)},
        content_based=False,
    )
)
register(
    SparseMethod(
        name="dilated",
        attend=dilated_attention,
        dense_mask=_dilated_dense,
        make_params=lambda T: {"window": max(1, T // 64), "dilation": 4},
        content_based=False,
    )
)
register(
    SparseMethod(
        name="strided",
        attend=strided_attention,
        dense_mask=_strided_dense,
        make_params=lambda T: {"stride": max(1, math.isqrt(T))},
        content_based=False,
    )
)


def _bigbird_params(T: int) -> dict:
    block = default_block(T)
    n = num_blocks(T, block)
    return {
        "block": block,
        "num_global_blocks": 1,
        "num_window_blocks": 3,
        "num_random_blocks": max(0, min(n // 16 - 3, n - 4)),
        "seed": 0,
    }


register(
    SparseMethod(
        name="bigbird",
        attend=bigbird_attention,
        dense_mask=_bigbird_dense,
        make_params=_bigbird_params,
        content_based=False,
    )
)
register(
    SparseMethod(
        name="axial",
        attend=axial_attention,
        dense_mask=_none_mask,
        make_params=lambda T: {"grid": _square_grid(T)},
        content_based=False,
    )
)
