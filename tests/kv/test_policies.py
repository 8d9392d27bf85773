"""KV compression / eviction policies and CompressedKVCache (effattn.kv)."""

from __future__ import annotations

import doctest
import importlib
import math

import pytest
import torch

from effattn.kv import (
    POLICIES,
    CompressedKVCache,
    Policy,
    list_policies,
    make_policy,
)
from effattn.kv.policy import split_budget
from effattn.nn import LM, Attention, LMConfig, calibrate_duo_attention
from effattn.nn.duo_calibration import passkey_batch, streaming_mask
from tests.helpers import assert_fp32_close

# every registered policy (the registry imports the modules of effattn.kv); each is tested below
ALL = POLICIES.names()
EVICTS_ON_DECODE = {name for name, cls in POLICIES.items() if cls.evicts_on_decode}
MODULES = ["policy", "compressed", *sorted({POLICIES.get(n).__module__.rsplit(".", 1)[1] for n in ALL})]


def _kw(name: str, layers: int = 2, heads: int = 2) -> dict:
    """Settings that make each policy run on small inputs (windows below the budget)."""
    if name in ("snapkv", "pyramidkv", "cake"):
        return {"window": 3}
    if name == "duo_attention":
        mask = torch.zeros(layers, heads, dtype=torch.bool)
        mask[:, 0] = True
        return {"retrieval_heads": mask}
    if name == "streaming_llm":  # text positions: the rule these tests state (re-indexing: test_streaming_rerotation)
        return {"reindex": False}
    return {}


def _qkv(B=2, T=24, Hq=4, Hkv=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g)
    k = torch.randn(B, T, Hkv, D, generator=g)
    v = torch.randn(B, T, Hkv, D, generator=g)
    return q, k, v


def _attn_probs(q, k, scale=None):
    """Brute-force causal attention ``[B, Hkv, Tq, Tk]`` (query heads of a group averaged),
    queries being the last ``Tq`` positions."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = scale or 1 / math.sqrt(D)
    kk = k.repeat_interleave(G, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk.double()) * scale
    qpos = torch.arange(Tk - Tq, Tk)[:, None]
    s = s.masked_fill(torch.arange(Tk)[None, :] > qpos, float("-inf"))
    return s.softmax(-1).view(B, Hkv, G, Tq, Tk).mean(2)


def _kept(cache, layer=0, head=0, row=0):
    return set(cache.kept(layer, head)[2][row].tolist())


# ---------------------------------------------------------------------------------- registry


def test_registry_lists_every_policy():
    assert list_policies() == sorted(ALL)
    # the nine methods of the docs are registered (a new one only adds to the list)
    known = {"streaming_llm", "h2o", "a2sf", "tova", "knorm", "snapkv", "pyramidkv", "cake", "duo_attention"}
    assert known <= set(ALL)
    assert EVICTS_ON_DECODE & known == {"streaming_llm", "h2o", "a2sf", "tova", "duo_attention"}
    for name in ALL:
        p = make_policy(name, budget=8, **_kw(name))
        assert isinstance(p, Policy) and p.name == name and isinstance(p, POLICIES[name])
        assert repr(p).startswith(type(p).__name__)


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    mod = importlib.import_module(f"effattn.kv.{module}")
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert res.failed == 0 and res.attempted > 0


def test_budget_resolution():
    assert make_policy("h2o").ratio == 0.5  # the documented default
    p = make_policy("h2o", ratio=0.75)
    assert p.keep_count(100) == 25 and p.keep_count(2) == 1
    assert make_policy("h2o", ratio=0.0).keep_count(37) == 37
    assert make_policy("h2o", budget=7).keep_count(1000) == 7


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"budget": 0}, "budget"),
        ({"budget": -3}, "budget"),
        ({"budget": 2.5}, "budget"),
        ({"budget": True}, "budget"),
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": "half"}, "ratio"),
        ({"budget": 4, "ratio": 0.5}, "budget or ratio"),
    ],
)
def test_bad_budget(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_policy("snapkv", **kwargs)


def test_bad_policy_settings():
    with pytest.raises(ValueError, match="unknown policy name"):
        make_policy("lru", budget=4)
    with pytest.raises(ValueError, match="sinks"):
        make_policy("streaming_llm", budget=4, sinks=-1)
    with pytest.raises(ValueError, match="kernel"):
        make_policy("snapkv", budget=4, kernel=4)
    with pytest.raises(ValueError, match="pooling"):
        make_policy("snapkv", budget=4, pooling="min")
    with pytest.raises(ValueError, match="forgetting"):
        make_policy("a2sf", budget=4, forgetting=0.0)
    with pytest.raises(ValueError, match="beta"):
        make_policy("pyramidkv", budget=4, beta=0.5)
    with pytest.raises(ValueError, match="recent_fraction"):
        make_policy("h2o", budget=4, recent_fraction=1.5)
    with pytest.raises(ValueError, match="retrieval_heads"):
        make_policy("duo_attention", budget=4, retrieval_heads=torch.ones(3))
    with pytest.raises(TypeError, match="per_head"):
        make_policy("tova", budget=4, per_head=1)
    with pytest.raises(TypeError):
        make_policy("h2o", budget=4, window=3)  # not a setting of H2O


def test_split_budget_sums_exactly():
    for total, w in [(10, [1, 1, 1]), (7, [0.2, 0.5, 0.3]), (100, [3, 0, 1e-9, 5]), (5, [0, 0])]:
        parts = split_budget(total, w)
        assert sum(parts) == total and min(parts) >= 0


# ---------------------------------------------------------------------------------- cache input


def test_cache_bad_input():
    p = make_policy("streaming_llm", budget=4)
    q, k, v = _qkv(T=5)
    with pytest.raises(TypeError, match="policy"):
        CompressedKVCache("h2o", 2)
    with pytest.raises(ValueError, match="num_layers"):
        CompressedKVCache(p, 0)
    c = CompressedKVCache(p, 2)
    with pytest.raises(ValueError, match="layer_idx"):
        c.update(2, k, v, q)
    with pytest.raises(ValueError, match="k must have rank 4"):
        c.update(0, k[0], v, q)
    with pytest.raises(ValueError, match="heads_q"):
        c.update(0, k, v, q[:, :, :3])
    with pytest.raises(ValueError, match="q must be"):
        c.update(0, k, v, q[:, :4])
    with pytest.raises(ValueError, match="v must match k"):
        c.update(0, k, v[:, :4], q)
    with pytest.raises(TypeError, match="dtype"):
        c.update(0, k, v.double(), q)
    c.update(0, k, v, q)
    with pytest.raises(ValueError, match="do not fit the cache"):
        c.update(0, k[:1], v[:1], q[:1])
    with pytest.raises(ValueError, match="retrieval_heads has shape"):
        CompressedKVCache(make_policy("duo_attention", budget=4, retrieval_heads=torch.ones(3, 2).bool()), 2).update(
            0, k, v, q
        )


# ---------------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("name", ALL)
def test_keeps_exactly_its_budget(name):
    L, T, budget = 2, 24, 8
    cache = CompressedKVCache(make_policy(name, budget=budget, **_kw(name, L)), L)
    q, k, v = _qkv(T=T)
    for layer in range(L):
        k_all, v_all, mask = cache.update(layer, k, v, q)
        assert k_all.shape == (2, T, 2, 8) and mask is None  # the prefill attends to everything
    for layer in range(L):
        want = cache.budgets(layer)
        got = cache.lengths(layer)
        assert got.tolist() == [[min(b, T) for b in want]] * 2
        if name in ("pyramidkv", "cake"):
            assert sum(cache.budgets(i)[0] for i in range(L)) == L * budget
        elif name == "duo_attention":
            assert got[0].tolist() == [T, budget]
        else:
            assert want == [budget, budget]
        pos = cache.positions(layer)
        assert (pos[pos >= 0].view(-1) < T).all()
        real = (pos[..., 1:] >= 0) & (pos[..., :-1] >= 0)  # both neighbours kept (-1: left padding)
        assert real.any() and (pos.diff(dim=-1)[real] > 0).all()  # ascending, no repeats
    before = [cache.lengths(i)[0].tolist() for i in range(L)]
    for step in range(3):
        qd, kd, vd = _qkv(T=1, seed=10 + step)
        for layer in range(L):
            cache.update(layer, kd, vd, qd)
    after = [cache.lengths(i)[0].tolist() for i in range(L)]
    for b, a, layer in zip(before, after, range(L)):
        if name in EVICTS_ON_DECODE:
            assert a == [min(x, bb) for x, bb in zip([n + 3 for n in b], cache.budgets(layer))]
        else:
            assert a == [n + 3 for n in b]  # prefill-only: decoded tokens accumulate
    assert cache.seen(0) == T + 3


@pytest.mark.parametrize("name", ALL)
def test_budget_above_context_is_the_full_cache(name):
    q, k, v = _qkv(T=20)
    cache = CompressedKVCache(make_policy(name, budget=1000, **_kw(name, 1)), 1)
    k1, v1, m1 = cache.update(0, k[:, :15], v[:, :15], q[:, :15])
    assert m1 is None and torch.equal(k1, k[:, :15]) and torch.equal(v1, v[:, :15])
    for t in range(15, 20):
        kt, vt, mt = cache.update(0, k[:, t : t + 1], v[:, t : t + 1], q[:, t : t + 1])
        assert mt is None and torch.equal(kt, k[:, : t + 1]) and torch.equal(vt, v[:, : t + 1])
    assert torch.equal(cache.positions(0), torch.arange(20).expand(2, 2, 20))
    assert cache.nbytes == k.numel() * 4 * 2


def test_ratio_resolves_from_the_prefill_length():
    q, k, v = _qkv(T=40)
    cache = CompressedKVCache(make_policy("streaming_llm", ratio=0.75, sinks=2), 1)
    cache.update(0, k, v, q)
    assert cache.lengths(0)[0].tolist() == [10, 10]
    qd, kd, vd = _qkv(T=1, seed=3)
    cache.update(0, kd, vd, qd)
    assert cache.lengths(0)[0].tolist() == [10, 10]  # fixed at the prefill, not re-resolved per step


# ---------------------------------------------------------------------------------- scoring rules


def test_streaming_llm_keeps_sinks_and_recent():
    q, k, v = _qkv(T=30)
    cache = CompressedKVCache(make_policy("streaming_llm", budget=10, sinks=3), 1)
    cache.update(0, k[:, :25], v[:, :25], q[:, :25])
    assert _kept(cache) == {0, 1, 2, *range(18, 25)}
    for t in range(25, 30):
        cache.update(0, k[:, t : t + 1], v[:, t : t + 1], q[:, t : t + 1])
        assert _kept(cache, head=1, row=1) == {0, 1, 2, *range(t - 6, t + 1)}
    kk, vv, pos = cache.kept(0, 1)
    assert torch.equal(kk, k[:, pos[0], 1]) and torch.equal(vv, v[:, pos[0], 1])  # the stored rows


def _h2o_reference(q, k, budget, recent, lam=1.0, steps=3):
    """Brute force of H2O / A2SF on one row and one kv head (all query heads in the group):
    prefill ``T0`` tokens then ``steps`` single-token steps, greedy eviction."""
    T = k.shape[1]
    T0 = T - steps
    a = _attn_probs(q[:, :T0], k[:, :T0])[0, 0]  # [T0, T0]
    w = torch.tensor([lam ** (T0 - 1 - i) for i in range(T0)], dtype=torch.float64)
    acc = dict(enumerate((a * w[:, None]).sum(0).tolist()))
    kept = _select(acc, budget, recent)
    history = [set(kept)]
    for t in range(T0, T):
        idx = sorted(kept) + [t]
        a = _attn_probs(q[:, t : t + 1], k[:, idx])[0, 0, 0]
        acc = {j: acc.get(j, 0.0) * lam + a[n].item() for n, j in enumerate(idx)}
        kept = _select(acc, budget, recent)
        acc = {j: acc[j] for j in kept}
        history.append(set(kept))
    return history


def _select(acc: dict, budget: int, recent: int) -> set:
    order = sorted(acc)
    keep = set(order[-recent:]) if recent else set()
    rest = sorted((j for j in order if j not in keep), key=lambda j: -acc[j])
    return keep | set(rest[: budget - len(keep)])


@pytest.mark.parametrize("name, lam", [("h2o", 1.0), ("a2sf", 0.7)])
def test_h2o_and_a2sf_keep_largest_accumulated_attention(name, lam):
    q, k, v = _qkv(B=1, T=23, Hq=2, Hkv=1, D=8, seed=5)
    kw = {"forgetting": lam} if name == "a2sf" else {}
    cache = CompressedKVCache(make_policy(name, budget=8, recent_fraction=0.25, **kw), 1)
    want = _h2o_reference(q, k, budget=8, recent=2, lam=lam, steps=3)
    cache.update(0, k[:, :20], v[:, :20], q[:, :20])
    assert _kept(cache) == want[0]
    for i, t in enumerate(range(20, 23)):
        cache.update(0, k[:, t : t + 1], v[:, t : t + 1], q[:, t : t + 1])
        assert _kept(cache) == want[i + 1]


def test_a2sf_forgetting_one_is_h2o():
    q, k, v = _qkv(T=30, seed=2)
    a = CompressedKVCache(make_policy("a2sf", budget=9, forgetting=1.0), 1)
    h = CompressedKVCache(make_policy("h2o", budget=9), 1)
    for c in (a, h):
        c.update(0, k[:, :26], v[:, :26], q[:, :26])
        for t in range(26, 30):
            c.update(0, k[:, t : t + 1], v[:, t : t + 1], q[:, t : t + 1])
    assert torch.equal(a.positions(0), h.positions(0))


@pytest.mark.parametrize("per_head", [False, True])
def test_tova_keeps_what_the_last_query_attends_to(per_head):
    q, k, v = _qkv(B=1, T=20, seed=7)
    cache = CompressedKVCache(make_policy("tova", budget=6, per_head=per_head), 1)
    cache.update(0, k, v, q)
    a = _attn_probs(q[:, -1:], k)[0, :, 0]  # [Hkv, T]
    if not per_head:
        a = a.mean(0, keepdim=True).expand(2, -1)
    for h in range(2):
        assert _kept(cache, head=h) == set(a[h].topk(6).indices.tolist())
    # decoding: the new query scores the kept tokens plus itself, and one of the 7 goes
    qd, kd, vd = _qkv(B=1, T=1, seed=8)
    kept0 = sorted(_kept(cache, head=0))
    cache.update(0, kd, vd, qd)
    kk = torch.cat([k[:, kept0], kd], 1)
    a = _attn_probs(qd, kk)[0, :, 0]
    a = a if per_head else a.mean(0, keepdim=True).expand(2, -1)
    cand = [*kept0, 20]
    assert _kept(cache, head=0) == {cand[i] for i in a[0].topk(6).indices.tolist()}


def test_knorm_keeps_smallest_key_norms():
    q, k, v = _qkv(T=30, seed=4)
    cache = CompressedKVCache(make_policy("knorm", ratio=0.6), 1)
    cache.update(0, k, v, q)
    for b in range(2):
        for h in range(2):
            want = set(k[b, :, h].norm(dim=-1).topk(12, largest=False).indices.tolist())
            assert _kept(cache, head=h, row=b) == want


@pytest.mark.parametrize("kernel, pooling", [(1, "max"), (3, "max"), (3, "avg")])
def test_snapkv_window_votes(kernel, pooling):
    T, w, budget = 26, 4, 10
    q, k, v = _qkv(B=1, T=T, seed=9)
    cache = CompressedKVCache(make_policy("snapkv", budget=budget, window=w, kernel=kernel, pooling=pooling), 1)
    cache.update(0, k, v, q)
    votes = _attn_probs(q[:, -w:], k)[0].sum(1)[:, : T - w]  # [Hkv, T - w]
    pool = torch.nn.functional.max_pool1d if pooling == "max" else torch.nn.functional.avg_pool1d
    kw = {} if pooling == "max" else {"count_include_pad": True}  # the authors' zero-padded average
    pooled = pool(votes[:, None], kernel, 1, kernel // 2, **kw)[:, 0] if kernel > 1 else votes
    for h in range(2):
        kept = _kept(cache, head=h)
        assert set(range(T - w, T)) <= kept  # the window is always kept
        assert kept - set(range(T - w, T)) == set(pooled[h].topk(budget - w).indices.tolist())


def test_snapkv_defaults_to_the_authors_average_pooling():
    assert make_policy("snapkv", budget=4).pooling == "avg"
    assert make_policy("snapkv", budget=4, pooling="max").pooling == "max"  # max stays an option


def test_snapkv_pooling_hand_computed():
    from effattn.kv.snapkv import snapkv_pool

    votes = torch.tensor([[[4.0, 1.0, 0.0, 2.0, 8.0, 5.0, 7.0]]])
    valid = torch.tensor([[[True, True, True, True, True, False, False]]])  # last two: the window
    # kernel 3, padding 1, divisor 3 everywhere; the window counts as 0 (the authors pool only the prefix)
    avg = snapkv_pool(votes, 3, "avg", valid=valid)[0, 0, :5]
    want = torch.tensor([(0 + 4 + 1) / 3, (4 + 1 + 0) / 3, (1 + 0 + 2) / 3, (0 + 2 + 8) / 3, (2 + 8 + 0) / 3])
    torch.testing.assert_close(avg, want)
    mx = snapkv_pool(votes, 3, "max", valid=valid)[0, 0, :5]
    assert mx.tolist() == [4.0, 4.0, 2.0, 8.0, 8.0]
    # kernel 5, padding 2: position 0 sums votes 0..2 over 5
    torch.testing.assert_close(snapkv_pool(votes, 5, "avg", valid=valid)[0, 0, 0], torch.tensor(5.0 / 5))
    # in the policy: the last 2 queries (window) favour key 2, then key 0, and most the window's key 5;
    # avg pooling (kernel 3) ranks key 1 first (it sees keys 0 and 2), max pooling would tie 1..3, and a
    # pool that let the window's votes spill onto key 4 would pick key 4
    T, w = 7, 2
    k = torch.zeros(1, T, 1, 4)
    k[0, 0, 0, 0], k[0, 2, 0, 0], k[0, 5, 0, 0] = 2.0, 4.0, 12.0
    q = torch.zeros(1, T, 1, 4)
    q[0, -w:, 0, 0] = 1.0
    v = torch.randn(1, T, 1, 4, generator=torch.Generator().manual_seed(0))
    cache = CompressedKVCache(make_policy("snapkv", budget=3, window=w, kernel=3), 1)
    cache.update(0, k, v, q)
    assert _kept(cache, head=0) == {1, 5, 6}
    with pytest.raises(ValueError, match="kernel"):
        snapkv_pool(votes, 2)


def test_layer_budgets_capped_at_the_context_pass_their_excess_on():
    # 2 layers at ratio 0.25 of 1000 tokens: the pyramid's bottom share (> 1000) is capped at the
    # context and the rest goes to the top layer, so the total stays 2 * 750 tokens
    p = make_policy("pyramidkv", ratio=0.25, window=8, beta=20)
    b = p.layer_budgets(1000, 2)
    assert max(b) <= 1000 and sum(b) == 2 * 750, b
    c = make_policy("cake", ratio=0.25, window=8)
    b = c.layer_budgets([10.0, 0.1], 1000)
    assert max(b) <= 1000 and sum(b) == 2 * 750, b
    from effattn.kv.policy import split_budget

    assert split_budget(10, [1, 1, 8], cap=4) == [3, 3, 4]
    assert split_budget(20, [1, 1], cap=4) == [4, 4]  # more than the caps hold: capped, not exceeded


def test_pyramidkv_budgets_decrease_with_depth():
    p = make_policy("pyramidkv", budget=50, window=5, beta=10)
    for L in (1, 2, 5, 8):
        b = p.layer_budgets(1000, L)
        assert sum(b) == 50 * L and min(b) >= 5
        assert all(x >= y for x, y in zip(b, b[1:]))
        if L > 1:
            assert b[0] > b[-1]
    L = 4
    q, k, v = _qkv(T=120)
    cache = CompressedKVCache(p, L)
    for layer in range(L):
        cache.update(layer, k, v, q)
    lens = [cache.lengths(i)[0, 0].item() for i in range(L)]
    assert lens == p.layer_budgets(120, L) and lens[0] > lens[-1]


def test_cake_cascading_budgets():
    L, budget, T, w = 4, 10, 40, 3
    p = make_policy("cake", budget=budget, window=w, gamma=50.0)
    cache = CompressedKVCache(p, L)
    prefs = []
    for layer in range(L):
        q, k, v = _qkv(T=T, seed=20 + layer)
        q = q * (1 + 2 * layer)  # sharper attention higher up: different preferences
        cache.update(layer, k, v, q)
        held = sum(cache.lengths(i)[0, 0].item() for i in range(layer + 1))
        # cascading: the layers seen so far never hold more than the total (once the total binds)
        assert held <= max(L * budget, T)
        a = _attn_probs(q[:, -w:], k)  # [B, Hkv, w, T], brute-force preference and indicator
        ap = a[..., : T - w]
        disp = -(ap * torch.log(ap + 1e-10)).sum()
        prefs.append((disp * ap.var(dim=2, correction=0).sum()).item())
        if layer == 0:
            ind = a.mean(2) + 50.0 * a.var(2, correction=0)
    assert [cache.budgets(i)[0] for i in range(L)] == p.layer_budgets(prefs, T)
    assert sum(cache.budgets(i)[0] for i in range(L)) == L * budget
    assert len({cache.budgets(i)[0] for i in range(L)}) > 1  # adaptive: the layers differ
    # layer 0's kept set: window + top of the pooled indicator (avg pool, kernel 5)
    ind = torch.nn.functional.avg_pool1d(ind[..., : T - w], 5, 1, 2, count_include_pad=False)
    b0 = cache.budgets(0)[0]
    for h in range(2):
        want = set(ind[0, h].topk(b0 - w).indices.tolist()) | set(range(T - w, T))
        assert _kept(cache, 0, h) == want


def test_cake_preference_brute_force_matches_layer_budgets():
    p = make_policy("cake", budget=20, window=4)
    assert sum(p.layer_budgets([1.0, 3.0, 0.0, 2.0], 500)) == 80
    assert p.layer_budgets([1.0, 1.0], 500) == [20, 20]


# ---------------------------------------------------------------------------------- ragged storage


def test_duo_ragged_storage_uses_fewer_bytes():
    T, budget, D = 40, 6, 8
    q, k, v = _qkv(T=T, D=D)
    mask = torch.tensor([[True, False], [False, False]])
    cache = CompressedKVCache(make_policy("duo_attention", budget=budget, sinks=2, retrieval_heads=mask), 2)
    for layer in range(2):
        cache.update(layer, k, v, q)
    assert cache.lengths(0)[0].tolist() == [T, budget] and cache.lengths(1)[0].tolist() == [budget, budget]
    B, el = 2, 4
    assert cache.nbytes == B * (T + 3 * budget) * D * 2 * el  # really ragged, not masked
    full = B * T * 2 * D * 2 * el * 2
    assert cache.nbytes < full / 2
    assert _kept(cache, 0, 1) == {0, 1, *range(T - budget + 2, T)}
    # the next step returns heads padded to the longest, with the mask hiding the padding
    qd, kd, vd = _qkv(T=1, D=D, seed=11)
    k_all, v_all, key_mask = cache.update(0, kd, vd, qd)
    assert k_all.shape == (2, T + 1, 2, D) and key_mask.shape == (2, 2, T + 1)
    assert key_mask[:, 0].all() and key_mask[:, 1].sum(-1).tolist() == [budget + 1] * 2
    assert torch.equal(k_all[:, -1], kd[:, 0]) and (k_all[:, : T - budget, 1] == 0).all()
    assert cache.lengths(0)[0].tolist() == [T + 1, budget]


@pytest.mark.parametrize("name", ["streaming_llm", "h2o", "a2sf", "tova", "knorm", "snapkv"])
def test_head_budgets_give_ragged_storage(name, tiny_lm):
    hb = [[3, 9], [5, 1]]
    kw = {"per_head": True} if name == "tova" else _kw(name)
    q, k, v = _qkv(T=20)
    cache = CompressedKVCache(make_policy(name, head_budgets=hb, **kw), 2)
    for layer in range(2):
        cache.update(layer, k, v, q)
    assert [cache.lengths(i)[0].tolist() for i in range(2)] == hb
    assert cache.nbytes == 2 * sum(map(sum, hb)) * 8 * 2 * 4  # B * tokens * D * (k, v) * float32
    if name == "h2o":  # the LM decodes through ragged heads
        model, ids, _ = tiny_lm
        out = model.generate(ids, 3, temperature=0.0, kv_policy=make_policy(name, head_budgets=hb))
        assert out.shape == (2, 27)


def test_head_budgets_errors():
    with pytest.raises(ValueError, match="head_budgets or budget"):
        make_policy("h2o", budget=4, head_budgets=[[1, 2]])
    with pytest.raises(ValueError, match="head_budgets must all be >= 1"):
        make_policy("h2o", head_budgets=[[0, 2]])
    with pytest.raises(ValueError, match="head_budgets must be ints"):
        make_policy("knorm", head_budgets=[[1.5, 2.0]])
    with pytest.raises(ValueError, match="equal across the heads"):
        make_policy("tova", head_budgets=[[1, 2]])
    with pytest.raises(TypeError):
        make_policy("pyramidkv", head_budgets=[[1, 2]])  # layer budgets are the method's own
    q, k, v = _qkv(T=6)
    with pytest.raises(ValueError, match="head_budgets has shape"):
        CompressedKVCache(make_policy("h2o", head_budgets=[[1, 2, 3]]), 1).update(0, k, v, q)


def test_attention_layer_on_ragged_heads_matches_reference():
    torch.manual_seed(0)
    layer = Attention(32, 4, kv_heads=2)
    x = torch.randn(2, 21, 32)
    mask = torch.tensor([[False, True]])
    cache = CompressedKVCache(make_policy("duo_attention", budget=5, sinks=1, retrieval_heads=mask), 1)
    state = cache.layer(0)
    with torch.no_grad():
        y_full, full = layer(x)  # full cache, for the keys and values
        y0, state = layer(x[:, :20], state)
        assert torch.allclose(y0, y_full[:, :20], atol=1e-5)  # the prefill sees every token
        before = [cache.kept(0, h)[2][0].tolist() + [20] for h in range(2)]
        y1, state = layer(x[:, 20:], state)
        # reference: each kv head attends to the tokens it held, plus the new one (evicted after)
        q = layer.rope.apply(layer.q_proj(x[:, 20:]).view(2, 1, 4, 8), torch.tensor([20]))
        o = []
        for h in range(2):
            pos = before[h]
            kk, vv = full.k[:, pos, h : h + 1], full.v[:, pos, h : h + 1]
            s = torch.einsum("bqhd,bkd->bhqk", q[:, :, 2 * h : 2 * h + 2].double(), kk[:, :, 0].double())
            p = (s / math.sqrt(8)).softmax(-1)
            o.append(torch.einsum("bhqk,bkd->bqhd", p, vv[:, :, 0].double()))
        ref = layer.o_proj(torch.cat(o, 2).float().flatten(2))
    assert cache.lengths(0)[0].tolist() == [5, 21]
    assert torch.allclose(y1, ref, atol=1e-5)


def test_decode_after_eviction_uses_the_kept_keys_with_their_positions():
    torch.manual_seed(1)
    layer = Attention(32, 4, kv_heads=2)
    x = torch.randn(1, 16, 32)
    cache = CompressedKVCache(make_policy("streaming_llm", budget=6, sinks=2, reindex=False), 1)
    with torch.no_grad():
        _, full = layer(x)
        _, state = layer(x[:, :15], cache.layer(0))
        y, state = layer(x[:, 15:], state)
        keep = [0, 1, 11, 12, 13, 14, 15]  # what attention sees before the step's eviction
        q = layer.rope.apply(layer.q_proj(x[:, 15:]).view(1, 1, 4, 8), torch.tensor([15]))
        kk = full.k[:, keep].repeat_interleave(2, dim=2)
        vv = full.v[:, keep].repeat_interleave(2, dim=2)
        p = (torch.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(8)).softmax(-1)
        ref = layer.o_proj(torch.einsum("bhqk,bkhd->bqhd", p, vv).flatten(2))
    assert torch.allclose(y, ref, atol=1e-5)
    assert _kept(cache) == {0, 1, 12, 13, 14, 15}


# ---------------------------------------------------------------------------------- LM integration


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    model = LM(LMConfig(vocab_size=40, dim=32, n_layers=2, heads=4, kv_heads=2)).eval()
    ids = torch.randint(0, 40, (2, 24))
    return model, ids, model.generate(ids, 4, temperature=0.0)


def _decode_recording_kept(model, ids, policy, steps):
    """Greedy prefill + ``steps`` decode steps on ``model.compressed_state(policy)``: the last-row logits
    of every call and, before each decode step, the positions each policy layer's cache holds."""
    state = model.compressed_state(policy)
    layers = model.policy_layers()
    cache = state[layers[0]].cache
    logits, state = model(ids, state)
    rows, kept, fed = [logits[:, -1]], [], ids
    for _ in range(steps):
        nxt = rows[-1].argmax(-1)[:, None]
        kept.append([cache.positions(n) for n in range(len(layers))])  # [B, H_kv, n], -1 = padding
        fed = torch.cat([fed, nxt], 1)
        logits, state = model(nxt, state)
        rows.append(logits[:, -1])
    return fed, torch.stack(rows, 1), kept, cache


def _visible_table(kept, B, Hq, Hkv, T_prompt, steps, layer):
    """``[B, Hq, N, N]``: prompt rows causal (the prefill attends to everything); the row of decode step
    ``i`` (position ``T_prompt + i``) sees the positions its kv head kept before the step, and itself."""
    N = T_prompt + steps
    table = torch.ones(N, N, dtype=torch.bool).tril().repeat(B, Hq, 1, 1)
    G = Hq // Hkv
    for i in range(steps):
        t = T_prompt + i
        table[:, :, t] = False
        for b in range(B):
            for h in range(Hq):
                pos = kept[i][layer][b, h // G]
                table[b, h, t, pos[pos >= 0]] = True
        table[:, :, t, t] = True
    return table


@pytest.mark.parametrize("name", ALL)
def test_generate_with_policy(tiny_lm, name, monkeypatch):
    model, ids, full = tiny_lm
    big = model.generate(ids, 4, temperature=0.0, kv_policy=make_policy(name, budget=1000, **_kw(name)))
    assert torch.equal(big, full)  # budget >= context: exactly the full cache
    small = make_policy(name, budget=6, **_kw(name))
    out = model.generate(ids, 4, temperature=0.0, kv_policy=small)
    assert out.shape == (2, 28) and torch.equal(out[:, :24], ids)
    # the rule on real values: each decoded token's logits are those of a full forward in which that
    # token's query, in every layer and head, sees exactly the keys its cache kept before its step
    # (plus itself), and earlier rows see what they saw when they were computed
    steps = 3
    policy = make_policy(name, budget=6, **_kw(name))
    fed, rows, kept, cache = _decode_recording_kept(model, ids, policy, steps)
    assert torch.equal(torch.cat([fed, rows[:, -1].argmax(-1)[:, None]], 1), out)  # generate() is this loop
    B, T = ids.shape
    layers = model.policy_layers()
    tables = []
    for n, i in enumerate(layers):
        mixer = model.blocks[i].mixer
        table = _visible_table(kept, B, mixer.heads, mixer.kv_heads, T, steps, n)
        tables.append(table)
        monkeypatch.setattr(mixer, "mask_mod", lambda b, h, q, kv, table=table: table[b, h, q, kv])
    with torch.no_grad():
        ref = model(fed)[0][:, T - 1 :]
    assert_fp32_close(rows, ref, 1e-5, "decode logits")
    decode_rows = torch.stack([t[:, :, T:] for t in tables])
    assert (decode_rows.sum(-1) < torch.arange(T, T + steps).view(1, 1, 1, -1) + 1).any()  # something evicted
    for i in range(steps):  # the budget rule: what each head holds before decode step i
        for n in range(len(layers)):
            held = (kept[i][n] >= 0).sum(-1)
            want = [min(b, T + i) if name in EVICTS_ON_DECODE else min(b, T) + i for b in cache.budgets(n)]
            assert held.tolist() == [want] * B, (i, n)
            if name == "streaming_llm":  # sinks + the most recent
                rule = list(range(policy.sinks)) + list(range(T + i - (6 - policy.sinks), T + i))
                assert all(kept[i][n][b, h].tolist() == rule for b in range(B) for h in (0, 1))


def test_generate_with_policy_errors(tiny_lm):
    model, ids, _ = tiny_lm
    with pytest.raises(TypeError, match="kv_policy"):
        model.generate(ids, 2, kv_policy="h2o")
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[0, 0] = False
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, 2, valid=valid, kv_policy=make_policy("h2o", budget=4))
    mamba = LM(LMConfig(vocab_size=40, dim=32, n_layers=1, heads=2, mixers="mamba2"))
    with pytest.raises(ValueError, match="no causal attention layer"):
        mamba.generate(ids, 2, kv_policy=make_policy("h2o", budget=4))


def test_compressed_state_shares_one_cache(tiny_lm):
    model, ids, _ = tiny_lm
    state = model.compressed_state(make_policy("snapkv", ratio=0.5, window=4))
    with torch.no_grad():
        _, state = model(ids, state)
    cache = state[0].cache
    assert state[1].cache is cache and cache.num_layers == 2
    assert cache.lengths(1).tolist() == [[12, 12]] * 2 and state[1].seen == 24


# ---------------------------------------------------------------------------------- DuoAttention calibration


@pytest.mark.parametrize("method", ["error", "gates"])
def test_duo_attention_calibration(tiny_lm, method):
    model = tiny_lm[0]
    mask, scores = calibrate_duo_attention(
        model, method=method, num_samples=2, seq_len=24, recent=4, steps=3, return_scores=True
    )
    assert mask.dtype == torch.bool and mask.shape == (2, 2) and int(mask.sum()) == 2
    assert scores.shape == (2, 2) and torch.isfinite(scores).all()
    assert scores[mask].min() >= scores[~mask].max()
    assert all(not hasattr(b.mixer, "forward") or "forward" not in vars(b.mixer) for b in model.blocks)
    assert all(b.mixer.mask_mod is None for b in model.blocks)
    out = model.generate(
        tiny_lm[1], 2, temperature=0.0, kv_policy=make_policy("duo_attention", budget=6, retrieval_heads=mask)
    )
    assert out.shape == (2, 26)
    # the scores on real values, recomputed outside the calibration's gate hook
    ids, tail = passkey_batch(40, 2, 24, 4, torch.Generator().manual_seed(0))  # the calibration's data (seed 0)
    with torch.no_grad():
        ref = model(ids)[0][:, -tail:]
    if method == "error":
        # score(l, h) = relative MSE of the answer logits when only kv head h of layer l is streaming
        # (sinks=4 + recent=4 keys, causal), written as a per-head mask on the layer
        t = torch.arange(24)
        stream = ((t[None, :] < 4) | (t[:, None] - t[None, :] < 4)) & (t[None, :] <= t[:, None])
        full = torch.ones(24, 24, dtype=torch.bool).tril()
        for li, i in enumerate(model.policy_layers()):
            mixer = model.blocks[i].mixer
            G = mixer.heads // mixer.kv_heads
            for h in range(mixer.kv_heads):
                table = torch.stack([stream if hq // G == h else full for hq in range(mixer.heads)])
                mixer.mask_mod = lambda b, hq, q, kv, table=table: table[hq, q, kv]
                try:
                    with torch.no_grad():
                        o = model(ids)[0][:, -tail:]
                finally:
                    mixer.mask_mod = None
                want = ((o - ref).pow(2).mean() / ref.pow(2).mean()).item()
                assert want > 0 and scores[li, h].item() == pytest.approx(want, rel=1e-4, abs=1e-9), (li, h)
    else:
        # the gates lower the distillation objective (relative logit MSE + l1 * mean gate) below the
        # starting point, all gates 1 (objective = l1 = 0.05)
        stream_mod = streaming_mask(4, 4)
        for li, i in enumerate(model.policy_layers()):
            model.blocks[i].mixer.set_head_gates(scores[li].clone(), stream_mod)
        try:
            with torch.no_grad():
                o = model(ids)[0][:, -tail:]
        finally:
            for i in model.policy_layers():
                model.blocks[i].mixer.set_head_gates(None)
        objective = ((o - ref).pow(2).mean() / ref.pow(2).mean()).item() + 0.05 * scores.mean().item()
        assert ((scores >= 0) & (scores <= 1)).all() and objective < 0.05


def test_duo_attention_calibration_errors(tiny_lm):
    with pytest.raises(TypeError, match="model"):
        calibrate_duo_attention(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="method"):
        calibrate_duo_attention(tiny_lm[0], method="magic")
    with pytest.raises(ValueError, match="retrieval_fraction"):
        calibrate_duo_attention(tiny_lm[0], retrieval_fraction=2.0)
