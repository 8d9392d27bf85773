"""MoE layer: dropless and capacity dispatch against the per-token reference loop, losses, statistics."""

import doctest
import importlib
import math

import pytest
import torch

from effattn.moe import Experts, MoE, grouped_matmul, load_balancing_loss, reference_moe, z_loss
from tests.helpers import assert_fp32_close


def _ref(moe: MoE, x: torch.Tensor):
    flat = x.reshape(-1, x.shape[-1])
    y, kept = reference_moe(
        flat,
        moe.router.weight,
        moe.experts,
        moe.top_k,
        kind=moe.router.kind,
        normalize=moe.router.normalize,
        bias=moe.router.bias,
        capacity_factor=moe.capacity_factor,
    )
    if moe.shared is not None:
        y = y + moe.shared(flat)
    return y.view_as(x), kept


def _grads(moe, x, y, g):
    params = [x, moe.router.weight, moe.experts.w_in, moe.experts.w_out]
    if moe.shared is not None:
        params += list(moe.shared.parameters())
    return torch.autograd.grad(y, params, g)


@pytest.mark.parametrize(
    "dim,hidden,E,k,B,T,kw",
    [
        (16, 24, 4, 2, 2, 7, {}),  # grouped_mm form (rows of 16 bytes)
        (10, 14, 5, 2, 1, 13, {}),  # odd sizes: one matmul per expert slice
        (16, 24, 8, 3, 3, 5, {"router": "sigmoid"}),
        (12, 20, 6, 1, 1, 1, {"shared_experts": 2}),  # one token
        (16, 32, 4, 2, 2, 9, {"gemm": "loop", "expert": "gelu"}),
        (16, 24, 6, 2, 2, 11, {"normalize": False}),
    ],
)
def test_dropless_matches_reference(dim, hidden, E, k, B, T, kw):
    torch.manual_seed(0)
    moe = MoE(dim, hidden, E, k, **kw)
    x = torch.randn(B, T, dim, requires_grad=True)
    y = moe(x)
    y_ref, kept = _ref(moe, x)
    assert kept.all()
    assert_fp32_close(y, y_ref)
    assert moe.last_aux.dropped_fraction == 0.0
    assert moe.last_aux.tokens_per_expert.sum().item() == B * T * k
    g = torch.randn_like(y)
    for a, b in zip(_grads(moe, x, y, g), _grads(moe, x, y_ref, g)):
        assert_fp32_close(a, b, 1e-4, name="grad")


@pytest.mark.parametrize("cf,E,k,N", [(1.0, 4, 2, 37), (0.5, 8, 2, 50), (1.25, 5, 1, 23), (0.3, 3, 3, 17)])
def test_capacity_matches_reference_with_same_drops(cf, E, k, N):
    torch.manual_seed(1)
    moe = MoE(16, 20, E, k, capacity_factor=cf)
    with torch.no_grad():  # skew the router so that some experts overflow
        moe.router.weight[0] += 0.8
    x = torch.randn(1, N, 16, requires_grad=True)
    y = moe(x)
    y_ref, kept = _ref(moe, x)
    assert not kept.all(), "the case should drop something"
    assert moe.last_aux.dropped_fraction == pytest.approx(1.0 - kept.float().mean().item())
    cap = math.ceil(cf * N * k / E)
    assert moe.last_aux.tokens_per_expert.max().item() <= cap
    assert_fp32_close(y, y_ref)
    g = torch.randn_like(y)
    for a, b in zip(_grads(moe, x, y, g), _grads(moe, x, y_ref, g)):
        assert_fp32_close(a, b, 1e-4, name="grad")


def test_capacity_large_factor_equals_dropless():
    torch.manual_seed(2)
    a = MoE(8, 12, 4, 2)
    b = MoE(8, 12, 4, 2, capacity_factor=4.0)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 9, 8)
    assert torch.equal(a(x), b(x)) and b.last_aux.dropped_fraction == 0.0


def test_expert_choice_matches_loop():
    torch.manual_seed(3)
    E, k, N, dim = 4, 2, 13, 8
    moe = MoE(dim, 12, E, k, routing="expert_choice", capacity_factor=1.0)
    x = torch.randn(1, N, dim)
    y = moe(x)
    flat = x[0]
    s = torch.softmax(flat @ moe.router.weight.t(), -1)
    C = math.ceil(N * k / E)
    ref = torch.zeros_like(flat)
    for e in range(E):
        for n in s[:, e].topk(C).indices.tolist():
            ref[n] += s[n, e] * moe.experts.expert(flat[n], e)
    assert_fp32_close(y[0], ref)
    assert moe.last_aux.tokens_per_expert.tolist() == [C] * E


def test_grouped_matmul_forms_agree_and_empty_groups():
    torch.manual_seed(4)
    x, w = torch.randn(11, 8), torch.randn(4, 8, 12)
    counts = torch.tensor([3, 0, 8, 0])
    a = grouped_matmul(x, w, counts, "grouped_mm")
    b = grouped_matmul(x, w, counts, "loop")
    assert_fp32_close(a, b)
    assert_fp32_close(b[3:], x[3:] @ w[2])
    with pytest.raises(ValueError, match="grouped_mm cannot run"):
        grouped_matmul(torch.randn(3, 5), torch.randn(2, 5, 6), torch.tensor([1, 2]), "grouped_mm")


def test_padding_never_influences_result():
    torch.manual_seed(5)
    moe = MoE(8, 16, 4, 2, lbl_scope="micro")
    x = torch.randn(2, 6, 8)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[0, :2] = False
    valid[1, 5] = False
    x_bad = x.clone()
    x_bad[~valid] = float("nan")
    x_bad.requires_grad_(True)
    y = moe(x_bad, valid)
    aux = moe.last_aux
    assert torch.isfinite(y).all() and (y[~valid] == 0).all()
    assert aux.num_tokens == 9 and aux.tokens_per_expert.sum().item() == 18
    y_packed = moe(x[valid][None])
    assert_fp32_close(y[valid], y_packed[0])
    assert aux.lbl.item() == pytest.approx(moe.last_aux.lbl.item(), rel=1e-6)
    (y.sum() + aux.loss).backward()
    assert torch.isfinite(x_bad.grad).all() and (x_bad.grad[~valid] == 0).all()


def test_losses_by_hand():
    torch.manual_seed(6)
    moe = MoE(8, 16, 4, 2)
    x = torch.randn(1, 10, 8)
    moe(x)
    z = x[0] @ moe.router.weight.t()
    p = torch.softmax(z, -1)
    idx = p.topk(2, -1).indices.reshape(-1)
    f = torch.bincount(idx, minlength=4).float() / 20
    assert moe.last_aux.lbl.item() == pytest.approx(float(4 * (f * p.mean(0)).sum().detach()), rel=1e-5)
    assert moe.last_aux.z_loss.item() == pytest.approx(torch.logsumexp(z, -1).pow(2).mean().item(), rel=1e-5)
    assert float(load_balancing_loss(torch.full((4,), 2.5), 10, torch.full((4,), 5.0), 20.0)) == pytest.approx(1.0)
    assert float(z_loss(torch.zeros(0, 4))) == 0.0


def test_sigmoid_bias_update_balances_load():
    torch.manual_seed(7)
    moe = MoE(8, 8, 4, 1, router="sigmoid", aux_loss_coef=0.0)
    with torch.no_grad():
        moe.router.weight[2] += 2.0  # expert 2 takes most tokens
    x = torch.randn(1, 200, 8)
    moe(x)
    first = moe.last_aux.routed_per_expert.max().item()
    for _ in range(200):
        moe(x)
        moe.update_bias(rate=0.02)
    moe(x)
    assert moe.last_aux.routed_per_expert.max().item() < first
    assert moe.router.bias[2] < 0
    # the bias changes the choice, never the weights: each token's weights still sum to one
    rt = moe.router(x[0])
    assert torch.allclose(rt.weight, torch.ones_like(rt.weight))


def test_bad_input_errors():
    with pytest.raises(ValueError, match="top_k"):
        MoE(8, 16, 4, 5)
    with pytest.raises(ValueError, match="hidden"):
        MoE(8, 0, 4, 2)
    with pytest.raises(ValueError, match="router"):
        MoE(8, 16, 4, 2, router="relu")
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(8, 16, 4, 2, capacity_factor=0.0)
    with pytest.raises(ValueError, match="lbl_scope"):
        MoE(8, 16, 4, 2, lbl_scope="batch")
    with pytest.raises(ValueError, match="ep_group"):
        MoE(8, 16, 4, 2, ep_group=object())
    moe = MoE(8, 16, 4, 2)
    with pytest.raises(ValueError, match=r"last dim 8"):
        moe(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="rank 3"):
        moe(torch.randn(3, 8))
    with pytest.raises(ValueError, match="valid"):
        moe(torch.randn(2, 3, 8), torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("module", ["experts", "router", "dispatch", "losses", "layer", "comm"])
def test_docstring_examples(module):
    mod = importlib.import_module(f"effattn.moe.{module}")
    result = doctest.testmod(mod)
    assert result.failed == 0


def test_experts_reference_one_expert():
    torch.manual_seed(8)
    ex = Experts(3, 8, 8)
    x = torch.randn(4, 8)
    y = ex(x, torch.tensor([0, 4, 0]))
    assert_fp32_close(y, ex.expert(x, 1))


def test_reset_parameters_and_dtype_cast_keep_counts_exact():
    torch.manual_seed(9)
    moe = MoE(64, 64, 8, 2, shared_experts=1, lbl_scope="global")
    moe.reset_parameters(std=0.02)
    for p in (moe.router.weight, moe.experts.w_in, moe.experts.w_out, moe.shared.down.weight):
        assert abs(p.std().item() - 0.02) < 0.004
    moe(torch.randn(1, 5, 64))
    moe.to(torch.bfloat16)
    assert moe.lbl_counts.dtype == torch.int64 and moe.lbl_counts[-1].item() == 5
    y = moe(torch.randn(1, 3, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and moe.lbl_counts[-1].item() == 8


def test_model_level_hooks():
    from effattn.moe import reset_lbl_stats, update_bias

    torch.manual_seed(10)
    model = torch.nn.Sequential(MoE(8, 8, 4, 1, lbl_scope="global"), MoE(8, 8, 4, 1, router="sigmoid"))
    x = torch.randn(1, 6, 8)
    model(x)
    assert model[0].lbl_counts[-1].item() == 6 and model[1].router.load.sum().item() == 6
    assert reset_lbl_stats(model) == 2 and model[0].lbl_counts.sum().item() == 0
    assert update_bias(model, rate=0.1) == 1
    assert model[1].router.load.sum().item() == 0 and model[1].router.bias.abs().sum() > 0
