"""Global-batch load balancing and expert parallelism on 2 and 4 gloo ranks == one process."""

import pytest
import torch
import torch.distributed as dist

from effattn.dist import spawn
from effattn.moe import MoE, load_balancing_loss
from tests.helpers import assert_fp32_close

DIM, HIDDEN = 8, 12


def _make(E, k, seed=0, **kw):
    torch.manual_seed(seed)
    moe = MoE(DIM, HIDDEN, E, k, **kw)
    with torch.no_grad():
        moe.router.weight[0] += 0.5  # unbalanced on purpose
    return moe


def _rank_batches(world, steps=1, seed=1):
    """Per rank and micro-batch: x [2, 7, DIM] and a valid mask with unequal counts per rank."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(world):
        per = []
        for s in range(steps):
            x = torch.randn(2, 7, DIM, generator=g)
            valid = torch.ones(2, 7, dtype=torch.bool)
            valid[0, : (r + s) % 5] = False
            per.append((x, valid))
        out.append(per)
    return out


def _global_lbl_rank(rank, world, E, k, steps):
    moe = _make(E, k, lbl_scope="global")
    moe.reset_lbl_stats()
    losses, grads = [], []
    for x, valid in _rank_batches(world, steps)[rank]:
        moe(x, valid)
        (g,) = torch.autograd.grad(moe.last_aux.lbl, moe.router.weight)
        losses.append(moe.last_aux.lbl.item())
        grads.append(g)
    return losses, grads, moe.lbl_counts.clone()


@pytest.mark.parametrize("world", [2, 4])
def test_global_lbl_equals_concatenated_batch(world):
    E, k = 6, 2
    results = spawn(_global_lbl_rank, world, E, k, 1)
    batches = _rank_batches(world)
    xs = torch.cat([x[v] for per in batches for x, v in per])[None]
    one = _make(E, k, lbl_scope="micro")
    one(xs)
    (g_one,) = torch.autograd.grad(one.last_aux.lbl, one.router.weight)
    mean_loss = sum(r[0][0] for r in results) / world
    assert mean_loss == pytest.approx(one.last_aux.lbl.item(), rel=1e-6)
    # data parallelism averages the ranks' gradients
    assert_fp32_close(sum(r[1][0] for r in results) / world, g_one, 1e-5, name="router grad")
    # the micro-batch losses differ from the global one (the test can tell the scopes apart)
    micro = [
        load_balancing_loss(
            one.router(x[v]).scores.sum(0),
            int(v.sum()),
            torch.bincount(one.router(x[v]).expert, minlength=E).double(),
            float(v.sum() * k),
        )
        for per in batches
        for x, v in per
    ]
    assert abs(sum(m.item() for m in micro) / world - mean_loss) > 1e-4


def test_global_lbl_accumulates_micro_batches():
    world, E, k, steps = 2, 6, 2, 3
    results = spawn(_global_lbl_rank, world, E, k, steps)
    batches = _rank_batches(world, steps)
    one = _make(E, k)
    counts = sum(torch.bincount(one.router(x[v]).expert, minlength=E) for per in batches for x, v in per)
    for r in results:
        assert torch.equal(r[2][:-1], counts) and r[2][-1].item() == sum(
            int(v.sum()) for per in batches for _, v in per
        )
    # the last micro-batch uses f of the whole global batch and P of its own (all-rank) micro-batch
    last = torch.cat([per[-1][0][per[-1][1]] for per in batches])
    p = one.router(last).scores.sum(0)
    want = load_balancing_loss(p, last.shape[0], counts, float(counts.sum()))
    assert sum(r[0][-1] for r in results) / world == pytest.approx(want.item(), rel=1e-6)


def _ep_inputs(lengths):
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(1, t, DIM, generator=g) for t in lengths]
    for x in xs:
        x[..., 0] = x[..., 0].abs() + 1.0
    return xs, [torch.randn(1, t, DIM, generator=g) for t in lengths]


def _ep_rank(rank, world, E, k, chunks, lengths, kw):
    full = _make(E, k, **kw)
    with torch.no_grad():
        full.router.weight[E - 1, 0] = -100.0  # expert E-1 receives no token (feature 0 is >= 1)
    ep = _make(E, k, ep_group=dist.group.WORLD, ep_chunks=chunks, **kw)
    L = E // world
    sd = {n: t for n, t in full.state_dict().items()}
    for name in ("experts.w_in", "experts.w_out"):
        sd[name] = sd[name][rank * L : (rank + 1) * L]
    ep.load_state_dict(sd)
    xs, gy = _ep_inputs(lengths)
    x = xs[rank].clone().requires_grad_(True)
    y = ep(x)
    (y * gy[rank]).sum().backward()
    router_grad = ep.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    return (
        y.detach(),
        x.grad,
        ep.experts.w_in.grad,
        ep.experts.w_out.grad,
        router_grad,
        ep.last_aux.tokens_per_expert,
        ep.last_aux.bytes_sent,
    )


@pytest.mark.parametrize(
    "world,E,k,chunks,lengths,kw",
    [
        (2, 4, 2, 1, [5, 9], {}),
        (2, 4, 2, 3, [0, 11], {"shared_experts": 1}),  # a rank without tokens; overlapped schedule
        (4, 8, 2, 1, [3, 6, 1, 8], {"router": "sigmoid"}),
        (4, 4, 1, 2, [7, 2, 5, 4], {}),  # overlapped
    ],
)
def test_expert_parallel_equals_single_process(world, E, k, chunks, lengths, kw):
    results = spawn(_ep_rank, world, E, k, chunks, lengths, kw)
    full = _make(E, k, **kw)
    with torch.no_grad():
        full.router.weight[E - 1, 0] = -100.0
    xs, gy = _ep_inputs(lengths)
    x = torch.cat(xs, 1).requires_grad_(True)
    y = full(x)
    (y * torch.cat(gy, 1)).sum().backward()
    assert full.last_aux.tokens_per_expert[E - 1] == 0
    L = E // world
    starts = [sum(lengths[:r]) for r in range(world)]
    for r, (yr, gx, gin, gout, grouter, *_) in enumerate(results):
        sl = slice(starts[r], starts[r] + lengths[r])
        assert_fp32_close(yr, y[:, sl].detach(), name=f"rank {r} output")
        assert_fp32_close(gx, x.grad[:, sl], 1e-4, name=f"rank {r} dx")
        assert_fp32_close(gin, full.experts.w_in.grad[r * L : (r + 1) * L], 1e-4, name="dw_in")
        assert_fp32_close(gout, full.experts.w_out.grad[r * L : (r + 1) * L], 1e-4, name="dw_out")
        assert_fp32_close(grouter, full.router.weight.grad, 1e-4, name="router grad")
    assert sum(r[5] for r in results).tolist() == full.last_aux.tokens_per_expert.tolist()
    assert sum(r[6] for r in results) > 0


def _ep_bad_group(rank, world):
    try:
        MoE(DIM, HIDDEN, 3, 1, ep_group=dist.group.WORLD)
    except ValueError as e:
        return str(e)
    return None


def test_mismatched_expert_group_errors():
    msgs = spawn(_ep_bad_group, 2)
    assert all(m is not None and "divisible by the expert-parallel group size (2)" in m for m in msgs)
