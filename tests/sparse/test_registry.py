"""Generic checks over every method in ``effattn.sparse.REGISTRY`` with its ``make_params(T)``:
shape and finiteness, engine == reference on the method's dense selection (forward and gradients),
the engine's count of visible scores == the dense selection's pairs, no look-ahead in causal mode,
determinism, and no ``T x T`` buffer (peak memory at T = 4096)."""

import pytest
import torch

import effattn.sparse as sparse
from effattn import attention
from effattn.bench.harness import measure_peak_memory
from effattn.exact import tiled
from tests.helpers import assert_fp32_close

CASES = [(name, causal) for name, m in sorted(sparse.REGISTRY.items()) for causal in m.causal_modes]
T_SMALL = 128


def _inputs(B=2, T=T_SMALL, H=2, D=16, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=g).requires_grad_(grad) for _ in range(3)]


def test_registry_is_populated():
    assert {"routing", "lsh", "hyper_attention"} <= set(sparse.REGISTRY)
    for name, m in sparse.REGISTRY.items():
        assert m.name == name and set(m.causal_modes) <= {False, True} and m.causal_modes


@pytest.mark.parametrize("name,causal", CASES)
def test_output_shape_finite_deterministic(name, causal):
    m = sparse.REGISTRY[name]
    q, k, v = _inputs()
    params = m.make_params(T_SMALL)
    o = m.attend(q, k, v, causal=causal, **params)
    assert o.shape == v.shape and o.dtype == q.dtype
    assert torch.isfinite(o).all()
    o.square().sum().backward()
    for x, n in ((q, "q"), (k, "k"), (v, "v")):
        assert x.grad is not None and torch.isfinite(x.grad).all(), f"d{n}"
    assert torch.equal(o, m.attend(q, k, v, causal=causal, **params))


@pytest.mark.parametrize("kept", [True, False], ids=["kept_probs", "recomputed"])
@pytest.mark.parametrize("name,causal", CASES)
def test_matches_reference_on_dense_selection(name, causal, kept, monkeypatch):
    """Both backward paths of the engine: kept probability tiles, and tiles recomputed with the masks."""
    monkeypatch.setattr(tiled, "KEPT_PROBS_PER_Q_ELEMENT", 10**6 if kept else 0)
    m = sparse.REGISTRY[name]
    q, k, v = _inputs()
    params = m.make_params(T_SMALL)
    mask = m.dense_mask(q, k, causal=causal, **params) if m.dense_mask is not None else None
    if mask is None:
        pytest.skip(f"{name} has no plain dense selection (tested against its own reference)")
    assert mask.dtype == torch.bool and mask.shape[-2:] == (T_SMALL, T_SMALL)
    if causal:
        assert not bool(mask.triu(1).any()), "a causal selection lists a later key"
    o = m.attend(q, k, v, causal=causal, **params)
    ref = attention(
        q, k, v, mask_mod=lambda b, h, i, j: mask[b % mask.shape[0], h % mask.shape[1], i, j], backend="reference"
    )
    assert_fp32_close(o, ref)
    do = torch.randn_like(o)
    for g, gr, n in zip(torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do), "qkv"):
        assert_fp32_close(g, gr, 1e-4, "d" + n)


def _dense_selection(name, q, k, causal, params):
    """The method's dense selection ``[B|1, H|1, T, T]``, or ``None``: the registry's ``dense_mask``;
    HyperAttention's pairs come from :func:`hyper_attention_dense` (its sampled scores also carry
    log-weights, which do not change which pairs are scored)."""
    m = sparse.REGISTRY[name]
    if name == "hyper_attention":
        return sparse.hyper_attention_dense(q, k, causal=causal, **params)[0]
    return m.dense_mask(q, k, causal=causal, **params) if m.dense_mask is not None else None


@pytest.mark.parametrize("name,causal", CASES)
def test_visible_count_equals_dense_selection(name, causal):
    """The engine's count of visible score entries (:func:`effattn.exact.count_scores`) equals the number
    of (batch, head, query, key) pairs of the dense selection: every selected pair is scored once and
    nothing else is (LSH with several rounds: the union of the rounds, each pair once)."""
    from effattn.exact import count_scores

    m = sparse.REGISTRY[name]
    B, H, T = 2, 2, 97  # odd T: ragged last blocks
    q, k, v = _inputs(B=B, T=T, H=H, grad=False)
    params = m.make_params(T)
    mask = _dense_selection(name, q, k, causal, params)
    if mask is None:
        pytest.skip(f"{name} has no dense pair set (factorised, pooled or summarised keys)")
    with torch.no_grad(), count_scores() as n:
        m.attend(q, k, v, causal=causal, **params)
    pairs = int(mask.expand(B, H, T, T).sum())
    assert pairs > 0
    assert n.visible == pairs, f"{name}: engine scores {n.visible} visible entries, dense selection has {pairs}"


@pytest.mark.parametrize("name", [n for n, c in CASES if c])
def test_causal_no_look_ahead(name):
    m = sparse.REGISTRY[name]
    q, k, v = _inputs(grad=False)
    params = m.make_params(T_SMALL)
    t = 70
    o = m.attend(q, k, v, causal=True, **params)
    g = torch.Generator().manual_seed(1)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, t + 1 :] = 3 * torch.randn(x[:, t + 1 :].shape, generator=g)
    o2 = m.attend(q2, k2, v2, causal=True, **params)
    assert not torch.allclose(o[:, t + 1 :], o2[:, t + 1 :])  # the perturbation reaches the later outputs
    torch.testing.assert_close(o[:, : t + 1], o2[:, : t + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,causal", CASES)
def test_no_quadratic_buffer(name, causal):
    """The forward's peak memory rise at T = 4096 stays well below one T x T float32 matrix (64 MiB)."""
    m = sparse.REGISTRY[name]
    T = 4096
    q, k, v = _inputs(B=1, T=T, H=1, D=16, grad=False)
    params = m.make_params(T)
    with torch.no_grad():
        m.attend(q, k, v, causal=causal, **params)  # warm-up: one-time allocations
        peak = measure_peak_memory(lambda: m.attend(q, k, v, causal=causal, **params))
    if peak is None:
        pytest.skip("peak memory is not measurable on this platform")
    assert peak < 0.5 * T * T * 4, f"{name}: forward peak rise {peak / 2**20:.1f} MiB at T={T}"


@pytest.mark.parametrize("cyclic", [False, True])
def test_visible_float_equals_the_bool_interval_test(cyclic):
    """The engine's float keep_mod form of the interval test is exactly the bool one (every slot, start
    and length of a small order, wrapped intervals included when cyclic)."""
    from effattn.sparse._buckets import visible, visible_float

    T = 37
    k = torch.arange(T, dtype=torch.int32).view(1, 1, T)
    lo = torch.arange(T, dtype=torch.int32).view(T, 1, 1)
    length = torch.arange(T + 1, dtype=torch.int32).view(1, T + 1, 1)
    if not cyclic:  # non-cyclic intervals do not wrap: lo + length <= T
        lo, length = lo.expand(T, T + 1, 1), length.expand(T, T + 1, 1)
        ok = (lo + length) <= T
        lo, length = lo[ok].view(-1, 1), length[ok].view(-1, 1)
        k = k.view(1, T)
    want = visible(k, lo, length, T, cyclic)
    got = visible_float(k, lo, length, T, cyclic)
    assert got.dtype == torch.float32 and torch.equal(got, want.float())


def test_keep_mod_alone_gives_the_bool_mask_mod():
    """A BlockMask built from a float keep_mod derives its bool mask_mod (dense paths use it) and the
    tiled engine's result equals the reference on the same rule."""
    from effattn.exact.block_mask import BlockMask

    T, blk = 64, 16
    idx = torch.arange(T // blk).expand(1, 1, T // blk, T // blk)

    def keep(b, h, q, kv):
        return ((q - kv) % 3 == 0).float() * (kv <= q).float()

    bm = BlockMask.from_kv_indices(idx, T, T, q_block=blk, kv_block=blk, keep_mod=keep)
    assert bm.keep_mod is keep and bm.mask_mod is not None
    dense = bm.to_dense()[0, 0]
    qi, ki = torch.arange(T)[:, None], torch.arange(T)[None, :]
    assert torch.equal(dense, ((qi - ki) % 3 == 0) & (ki <= qi))
    q, k, v = _inputs(B=1, T=T)
    o = attention(q, k, v, block_mask=bm, backend="tiled")
    o_ref = attention(q, k, v, block_mask=bm, backend="reference")
    assert_fp32_close(o, o_ref, 1e-5)


def test_registry_is_the_generic_registry_and_reads_as_a_mapping():
    from effattn._registry import Registry
    from effattn.sparse._common import register

    assert isinstance(sparse.REGISTRY, Registry) and sparse.REGISTRY.package == "effattn.sparse"
    names = sparse.REGISTRY.names()
    assert names == sorted(sparse.REGISTRY) == [n for n, _ in sparse.REGISTRY.items()] == sorted(dict(sparse.REGISTRY))
    assert all(n in sparse.REGISTRY and sparse.REGISTRY[n].name == n for n in names)
    with pytest.raises(ValueError, match="unknown sparse method 'nope'"):
        sparse.REGISTRY["nope"]
    routing = sparse.REGISTRY["routing"]
    assert register(routing) is routing  # re-registering the same entry (a module reload) is allowed
    with pytest.raises(ValueError, match="already registered"):
        register(sparse.SparseMethod("routing", routing.attend, None, routing.make_params, True))
