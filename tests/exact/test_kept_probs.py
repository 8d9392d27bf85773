"""The tiled engine's kept probability tiles: when the score tiles are small next to q
(``KEPT_PROBS_PER_Q_ELEMENT``), the forward keeps them and the backward uses them instead of recomputing.
Both paths must give the reference's output and gradients; the kept path must only run when asked for."""

import pytest
import torch

from effattn import attention
from effattn.exact import tiled
from effattn.exact.block_mask import BlockMask
from tests.helpers import assert_fp32_close


@pytest.fixture
def kept_calls(monkeypatch):
    """Records, per engine forward, whether it kept its probability tiles."""
    calls = []
    forward = tiled.tiled_forward

    def spy(q, k, v, plan, sinks=None, kept=None):
        calls.append(kept is not None)
        return forward(q, k, v, plan, sinks, kept)

    monkeypatch.setattr(tiled, "tiled_forward", spy)
    return calls


def _ragged_head_mask(T, H, blk, gen):
    """A per-head block mask with ragged and empty key lists and partial tiles (the sparse selectors' kind)."""
    nq = -(-T // blk)
    idx = torch.stack([torch.randperm(nq, generator=gen)[:4] for _ in range(H * nq)]).view(1, H, nq, 4)
    counts = torch.randint(0, 5, (1, H, nq), generator=gen)
    partial = torch.rand(1, H, nq, 4, generator=gen) < 0.5
    keep = lambda b, h, i, j: ((i + 2 * j + h) % 3 != 0).float()  # noqa: E731
    return BlockMask.from_kv_indices(
        idx, T, T, q_block=blk, kv_block=blk, kv_counts=counts, keep_mod=keep, kv_partial=partial
    )


@pytest.mark.parametrize("kept", [True, False])
@pytest.mark.parametrize("case", ["causal_sinks", "ragged_heads_gqa", "ragged_small_tiles"])
def test_kept_and_recomputed_backward_match_the_reference(case, kept, kept_calls, monkeypatch):
    monkeypatch.setattr(tiled, "KEPT_PROBS_PER_Q_ELEMENT", 10**6 if kept else 0)
    if case == "ragged_small_tiles":
        monkeypatch.setattr(tiled, "TILE_ELEMENTS", 2048)  # several key chunks per row: the row max moves
    gen = torch.Generator().manual_seed(3)
    B, T, H, Hkv, D = 2, 90, 4, 2 if case == "ragged_heads_gqa" else 4, 8
    q = torch.randn(B, T, H, D, generator=gen).requires_grad_(True)
    k, v = (torch.randn(B, T, Hkv, D, generator=gen).requires_grad_(True) for _ in range(2))
    inputs = [q, k, v]
    if case == "causal_sinks":
        sinks = torch.randn(H, generator=gen).requires_grad_(True)
        inputs.append(sinks)
        kw = {"causal": True, "sinks": sinks}
        ref_kw = kw
    else:
        bm = _ragged_head_mask(T, H, 16, gen)
        dense = bm.to_dense()
        kw = {"block_mask": bm}
        ref_kw = {"mask_mod": lambda b, h, i, j: dense[0, h, i, j]}
    o, lse = attention(q, k, v, return_lse=True, backend="tiled", **kw)
    assert kept_calls == [kept]
    o_ref, lse_ref = attention(q, k, v, return_lse=True, backend="reference", **ref_kw)
    assert_fp32_close(o, o_ref, 1e-5)
    finite = torch.isfinite(lse_ref)
    assert torch.equal(finite, torch.isfinite(lse)) and bool((~finite).any()) == (case != "causal_sinks")
    assert_fp32_close(lse[finite], lse_ref[finite], 1e-5)
    do, dlse = torch.randn_like(o), torch.randn_like(lse)
    loss = (o * do).sum() + (lse[finite] * dlse[finite]).sum()
    loss_ref = (o_ref * do).sum() + (lse_ref[finite] * dlse[finite]).sum()
    for g, g_ref in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(loss_ref, inputs)):
        assert_fp32_close(g, g_ref, 1e-4)


def test_tiles_are_kept_only_for_a_backward_and_under_the_limit(kept_calls, monkeypatch):
    q, k, v = (torch.randn(1, 64, 2, 16) for _ in range(3))
    qg = q.clone().requires_grad_(True)
    attention(q, k, v, causal=True, backend="tiled")  # nothing needs a gradient
    with torch.no_grad():
        attention(qg, k, v, causal=True, backend="tiled")
    attention(qg, k, v, causal=True, backend="tiled", score_mod=lambda s, b, h, i, j: s * 0.5)
    attention(qg, k, v, causal=True, backend="tiled")  # 64 x 64 causal tiles: ~2 entries per element of q
    monkeypatch.setattr(tiled, "KEPT_PROBS_PER_Q_ELEMENT", 1)
    attention(qg, k, v, causal=True, backend="tiled")
    assert kept_calls == [False, False, False, True, False]
