"""chunked_cross_entropy equals F.cross_entropy on full logits: loss and gradients, every option."""

import pytest
import torch
import torch.nn.functional as F

from effattn.train import chunked_cross_entropy
from tests.helpers import rel_rms


def _data(n=37, d=20, v=53, ignore=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=torch.float64).mul(0.3).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    if ignore:
        t[::5] = -100
    return h, w, t


def _reference(h, w, t, label_smoothing=0.0, z_loss=0.0, reduction="mean"):
    z = h @ w.T
    loss = F.cross_entropy(z, t, ignore_index=-100, label_smoothing=label_smoothing, reduction=reduction)
    if z_loss:
        keep = t != -100
        zl = z.logsumexp(-1).square()[keep].sum()
        loss = loss + z_loss * (zl / keep.sum() if reduction == "mean" else zl)
    return loss


@pytest.mark.parametrize("chunk", [1, 7, 37, 100])
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_equals_full_logits_float64(chunk, label_smoothing, z_loss, reduction):
    h, w, t = _data()
    loss = chunked_cross_entropy(
        h, w, t, chunk=chunk, label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction
    )
    ref = _reference(h, w, t, label_smoothing, z_loss, reduction)
    assert rel_rms(loss, ref) < 1e-12
    g = torch.autograd.grad(loss * 1.7, (h, w))
    r = torch.autograd.grad(ref * 1.7, (h, w))
    for a, b in zip(g, r):
        assert rel_rms(a, b) < 1e-10


def test_float32_batched_shape_and_ignored_rows_with_nonfinite_hidden():
    h, w, t = _data(ignore=True, seed=1)
    h32 = h.detach().float().reshape(1, 37, 20).clone()
    t32 = t.reshape(1, 37)
    h32[0, 0] = float("nan")  # t[0] is ignored: must not matter
    h32.requires_grad_()
    w32 = w.detach().float().requires_grad_()
    loss = chunked_cross_entropy(h32, w32, t32, chunk=8)
    gh, gw = torch.autograd.grad(loss, (h32, w32))
    clean = h32.detach().clone()
    clean[0, 0] = 0.0
    clean.requires_grad_()
    ref = F.cross_entropy((clean @ w32.T).flatten(0, 1), t32.flatten())
    rh, rw = torch.autograd.grad(ref, (clean, w32))
    assert rel_rms(loss, ref) < 1e-5 and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    assert rel_rms(gh, rh) < 1e-4 and rel_rms(gw, rw) < 1e-4
    assert float(gh[0, 0].abs().max()) == 0.0


def test_all_ignored_gives_zero():
    h, w, t = _data(n=5)
    t[:] = -100
    loss = chunked_cross_entropy(h, w, t, chunk=2)
    assert float(loss.detach()) == 0.0
    assert float(torch.autograd.grad(loss, h)[0].abs().max()) == 0.0


def test_bad_arguments():
    h, w, t = _data(n=5)
    with pytest.raises(ValueError, match="chunk"):
        chunked_cross_entropy(h, w, t, chunk=0)
    with pytest.raises(ValueError, match="targets must have"):
        chunked_cross_entropy(h, w, t[:3])
    with pytest.raises(ValueError, match="weight"):
        chunked_cross_entropy(h, w[:, :3], t)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 53\)"):
        chunked_cross_entropy(h, w, t.clamp_min(0) + 100)
    with pytest.raises(ValueError, match="label_smoothing"):
        chunked_cross_entropy(h, w, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="reduction"):
        chunked_cross_entropy(h, w, t, reduction="none")
