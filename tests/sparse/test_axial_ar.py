"""Axial Transformer's autoregressive pass (sparse.static.axial_ar_attention): dense reference,
no future leakage, and the receptive field (every earlier row, own row up to the token)."""

import pytest
import torch

from effattn.sparse import axial_ar_attention, axial_ar_reference
from tests.sparse._blockwise_checks import assert_no_lookahead, assert_same_fwd_bwd, qkv


@pytest.mark.parametrize("grid", [(7, 9), (9, 7), (1, 21), (21, 1), (3, 5)])
def test_matches_dense_reference(grid):
    q, k, v = qkv(T=grid[0] * grid[1])
    assert_same_fwd_bwd(axial_ar_attention(q, k, v, grid=grid), axial_ar_reference(q, k, v, grid=grid), (q, k, v))


@pytest.mark.parametrize("t0", [1, 6, 7, 30, 62])
def test_no_future_leakage(t0):
    q, k, v = qkv(T=63)
    assert_no_lookahead(axial_ar_attention, q, k, v, t0, grid=(7, 9))


def test_sees_every_earlier_row_and_its_own_row_up_to_itself():
    rows, cols = 5, 6
    q, k, v = qkv(B=1, T=rows * cols, Hq=2, Hkv=1, D=8)
    t = 3 * cols + 2  # row 3, column 2
    o = axial_ar_attention(q, k, v, grid=(rows, cols))
    (gv,) = torch.autograd.grad(o[0, t].sum(), v)
    seen = gv[0, :, 0].abs().sum(-1) > 0
    want = torch.zeros(rows * cols, dtype=torch.bool)
    want[: 3 * cols] = True  # all earlier rows (through the shifted column pass)
    want[3 * cols : t + 1] = True  # own row, causal
    assert torch.equal(seen, want)
    # the first row has no column context: it is plain causal row attention
    first = torch.nn.functional.scaled_dot_product_attention(
        q[:, :cols].transpose(1, 2),
        k[:, :cols].repeat_interleave(2, 2).transpose(1, 2),
        v[:, :cols].repeat_interleave(2, 2).transpose(1, 2),
        is_causal=True,
    ).transpose(1, 2)
    torch.testing.assert_close(o[:, :cols], first, atol=1e-5, rtol=1e-5)
