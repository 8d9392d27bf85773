"""StreamingLLM in ring buffers (effattn.hf._streaming): the same kept tokens, keys and logits as the
general re-rotating path (``CompressedCache(..., ring=False)``), at O(new token + sinks) work per step.

Tiny random models built from configs (nothing downloaded), float32.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import effattn.hf as ehf  # noqa: E402
import effattn.hf._streaming as ring_mod  # noqa: E402
from effattn.hf._streaming import StreamingRingCache, ring_eligible  # noqa: E402
from effattn.kv import CompressedKVCache, make_policy, rotate_rope  # noqa: E402
from tests.helpers import assert_fp32_close  # noqa: E402
from tests.hf.test_hf_structured import _ids, _padded, _pair  # noqa: E402

ehf.register()

INV_FREQ = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)


def _schedule(total, first, chunks):
    """Call sizes: a first call of ``first`` tokens, then ``chunks`` repeated up to ``total``."""
    sizes, n, i = [first], first, 0
    while n < total:
        sizes.append(min(chunks[i % len(chunks)], total - n))
        n, i = n + sizes[-1], i + 1
    return sizes


@pytest.mark.parametrize("reindex", [True, False])
@pytest.mark.parametrize(
    "budget, sinks, first, chunks",
    [(7, 3, 13, (1,)), (7, 3, 2, (1,)), (5, 0, 9, (1, 3, 1)), (4, 3, 1, (1, 2)), (9, 2, 11, (2, 1, 1, 4))],
)
def test_ring_keeps_and_returns_what_the_general_path_does(reindex, budget, sinks, first, chunks):
    """Against CompressedKVCache with the same policy: at every call the same kept positions and keys,
    and what the new queries attend to is the same set of (position, re-indexed key, value)."""
    g = torch.Generator().manual_seed(budget * 10 + sinks)
    B, H, D, total = 2, 3, 8, 31
    k = torch.randn(B, H, total, D, generator=g)
    v = torch.randn(B, H, total, 6, generator=g)
    policy = make_policy("streaming_llm", budget=budget, sinks=sinks, reindex=reindex)
    ring, ref = StreamingRingCache(policy, 1), CompressedKVCache(policy, 1)
    n = 0
    for t in _schedule(total, first, chunks):
        kk, vv = k[:, :, n : n + t], v[:, :, n : n + t]
        prev = ref.positions(0)[0, 0] if n else torch.zeros(0, dtype=torch.long)
        k_all, v_all, _ = ref.update(0, kk.transpose(1, 2), vv.transpose(1, 2), torch.randn(B, t, H, D))
        n += t
        pos_ref = torch.cat([prev, torch.arange(n - t, n)])
        if reindex:  # the general path's rule (CompressedCache._reindex_keys): slot j at j + seen - L
            L = pos_ref.numel()
            k_all = rotate_rope(k_all, (torch.arange(L) + n - L - pos_ref)[:, None], INV_FREQ)
        kr, vr, pos = ring.update(0, kk, vv, INV_FREQ, need_positions=True)
        assert sorted(pos.tolist()) == pos_ref.tolist(), f"attended positions after {n}"
        order = torch.argsort(pos)  # the ring gives a decode step's keys in ring order
        assert torch.equal(kr.transpose(1, 2)[:, order], k_all), f"keys after {n}"
        assert torch.equal(vr.transpose(1, 2)[:, order], v_all), f"values after {n}"
        assert torch.equal(ring.positions(0), ref.positions(0)), f"kept after {n}"
        assert torch.equal(ring.lengths(0), ref.lengths(0)) and ring.seen(0) == ref.seen(0) == n
        assert ring.nbytes == ref.nbytes
        for h in range(H):
            for a, b in zip(ring.kept(0, h), ref.kept(0, h)):
                assert torch.equal(a, b)


def _stream(model, ids, cache, steps, chunk=None):
    """Prefill ``ids``, ``steps`` greedy steps (then a chunk of 3 given tokens and 3 more steps when
    ``chunk`` is given): the last-position logits of every call and the tokens chosen."""
    logits, toks = [], []
    with torch.no_grad():
        out = model(ids, cache=cache, use_cache=True).logits[:, -1]
        logits.append(out)
        for i in range(steps + (4 if chunk is not None else 0)):
            nxt = chunk if (chunk is not None and i == steps) else out.argmax(-1, keepdim=True)
            toks.append(nxt)
            out = model(nxt, cache=cache, use_cache=True).logits[:, -1]
            logits.append(out)
    return logits, torch.cat(toks, 1)


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gpt_oss"])
@pytest.mark.parametrize("reindex", [True, False])
def test_ring_generation_equals_the_general_path(kind, reindex):
    """Llama (GQA 4/2), Gemma 2 (alternating sliding/global, softcap) and gpt-oss (sinks, sliding/full):
    logits and greedy tokens of the ring equal the re-rotating general path, 12 steps past a budget of 6,
    with a 3-token chunk in between."""
    _, ours = _pair(kind)
    ids = _ids(B=2, T=11, seed=3)
    chunk = _ids(B=2, T=3, seed=4)
    got, want = [], []
    for ring, out in ((True, got), (False, want)):
        policy = make_policy("streaming_llm", budget=6, sinks=2, reindex=reindex)
        cache = ehf.CompressedCache(policy, model=ours, ring=ring)
        out.extend(_stream(ours, ids, cache, 12, chunk))
        full = [
            i
            for i, t in enumerate(getattr(ours.config, "layer_types", None) or ["full_attention"] * 2)
            if t == "full_attention"
        ]
        assert isinstance(cache.kv, StreamingRingCache if ring else CompressedKVCache)
        out.append([cache.kv.positions(i).tolist() for i in full])
    assert torch.equal(got[1], want[1]), "greedy tokens"
    assert got[2] == want[2], "kept positions"
    for i, (a, b) in enumerate(zip(got[0], want[0])):
        assert_fp32_close(a, b, 1e-5, f"logits of call {i}")


def test_ring_step_equals_a_fresh_forward_at_cache_positions():
    """The paper's rule holds through the ring too (one layer: a key depends on its token only)."""
    import copy

    _, two = _pair("llama")
    cfg = copy.deepcopy(two.config)
    cfg.num_hidden_layers = 1
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="effattn").eval()
    ids = _ids(B=2, T=12, seed=6)
    cache = ehf.CompressedCache(make_policy("streaming_llm", budget=6, sinks=2), model=model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        seq = ids
        for _ in range(5):
            kept = cache.kv.positions(0)[0, 0].tolist()
            nxt = torch.randint(1, 128, (2, 1), generator=g)
            seq = torch.cat([seq, nxt], 1)
            logits = model(nxt, cache=cache, use_cache=True).logits[:, -1]
            toks = kept + [seq.shape[1] - 1]
            fresh = model(seq[:, toks], position_ids=torch.arange(len(toks))[None].expand(2, -1)).logits[:, -1]
            assert_fp32_close(logits, fresh, 1e-5, "HF step")
    assert isinstance(cache.kv, StreamingRingCache)


def test_decode_steps_touch_only_the_new_token_and_the_sinks(monkeypatch):
    """Per step: no policy scoring, rotations of the sinks only, and the buffers stay where they are
    (no per-step copy of the kept set)."""
    _, ours = _pair("llama")
    cache = ehf.CompressedCache(make_policy("streaming_llm", budget=6, sinks=2), model=ours)
    rotated = []
    rotate = ring_mod.rotate_rope
    monkeypatch.setattr(ring_mod, "rotate_rope", lambda x, *a: rotated.append(x.shape[1]) or rotate(x, *a))
    monkeypatch.setattr(type(cache.policy), "score", lambda *a: pytest.fail("policy scored"))
    ids = _ids(B=1, T=10, seed=8)
    with torch.no_grad():
        out = ours(ids, cache=cache, use_cache=True).logits[:, -1:]
        rotated.clear()
        ptrs = [(r.k.data_ptr(), r.v.data_ptr()) for r in cache.kv._layers]
        for _ in range(6):
            out = ours(out.argmax(-1), cache=cache, use_cache=True).logits[:, -1:]
    assert rotated == [2] * 12  # 2 sinks per layer and step, nothing else
    assert ptrs == [(r.k.data_ptr(), r.v.data_ptr()) for r in cache.kv._layers]
    assert cache.get_seq_length() == 16 and cache.kv.positions(1)[0, 0].tolist() == [0, 1, 12, 13, 14, 15]


def test_mask_mod_sees_the_same_positions_through_the_ring():
    """A registered mask_mod sees the same original positions through the ring (slots in ring order)."""
    _, base = _pair("llama")
    import copy

    name = ehf.register("effattn_test_ring_hide3", mask_mod=lambda b, h, q, kv: (kv != 3) | (q <= 3))
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(base.config), attn_implementation=name).eval()
    ours.load_state_dict(base.state_dict())
    ids = _ids(B=1, T=9, seed=9)
    res = []
    for ring in (True, False):
        res.append(_stream(ours, ids, ehf.CompressedCache("streaming_llm", budget=6, sinks=2, ring=ring), 5))
    assert torch.equal(res[0][1], res[1][1])
    for a, b in zip(res[0][0], res[1][0]):
        assert_fp32_close(a, b)


@pytest.mark.parametrize("kind", ["llama", "gpt_oss"])
def test_left_padded_rows_in_rings_equal_the_general_path(kind):
    """Left padding: one ring per row, rows left-padded to one length while they differ; logits and
    tokens equal the general per-row path, and each row decodes as if alone."""
    _, ours = _pair(kind)
    ids, am = _padded(B=2, T=10, pads=(3, 0), seed=10)
    kw = dict(attention_mask=am, max_new_tokens=9, do_sample=False, return_dict_in_generate=True, output_logits=True)
    res = []
    for ring in (True, False):
        cache = ehf.CompressedCache("streaming_llm", budget=5, sinks=2, model=ours, ring=ring)
        with torch.no_grad():
            res.append(ours.generate(ids, cache=cache, **kw))
        assert cache.kv is None and isinstance(cache.rows[0], StreamingRingCache if ring else CompressedKVCache)
    assert torch.equal(res[0].sequences, res[1].sequences)
    for a, b in zip(res[0].logits, res[1].logits):
        assert_fp32_close(a, b)
    alone = ours.generate(
        ids[:1, 3:],
        cache=ehf.CompressedCache("streaming_llm", budget=5, sinks=2, model=ours),
        **kw | dict(attention_mask=None),
    )
    assert torch.equal(alone.sequences[0, 7:], res[0].sequences[0, 10:])


def test_ring_under_autograd_keeps_earlier_steps_differentiable():
    policy = make_policy("streaming_llm", budget=3, sinks=1)
    ring = StreamingRingCache(policy, 1)
    k = torch.randn(1, 2, 8, 8, requires_grad=True)
    outs = [ring.update(0, k[:, :, :4], k[:, :, :4], INV_FREQ)[0].sum()]
    for i in range(4, 8):  # each step overwrites a slot an earlier step attended to
        outs.append(ring.update(0, k[:, :, i : i + 1], k[:, :, i : i + 1], INV_FREQ)[0].pow(2).sum())
    sum(outs).backward()
    assert torch.isfinite(k.grad).all() and bool((k.grad[:, :, 4:] != 0).all())


def test_which_policies_take_the_ring_and_bad_input():
    assert ring_eligible(make_policy("streaming_llm", budget=8, sinks=2))
    for p in (
        make_policy("streaming_llm", ratio=0.5),
        make_policy("streaming_llm", budget=2, sinks=2),
        make_policy("streaming_llm", head_budgets=[[4, 6]]),
        make_policy("h2o", budget=8),
    ):
        assert not ring_eligible(p)
        assert not ehf.CompressedCache(p).ring
        with pytest.raises(ValueError, match="int budget > sinks"):
            StreamingRingCache(p, 1)
    assert not ehf.CompressedCache("streaming_llm", budget=8, ring=False).ring
    with pytest.raises(TypeError, match="ring must be a bool"):
        ehf.CompressedCache("streaming_llm", budget=8, ring="yes")
    ring = StreamingRingCache(make_policy("streaming_llm", budget=4, sinks=1), 2)
    with pytest.raises(ValueError, match="inv_freq"):
        ring.update(0, torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), None)
    ring.update(0, torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), INV_FREQ)
    with pytest.raises(ValueError, match="do not fit the cache"):
        ring.update(0, torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8), INV_FREQ)
    with pytest.raises(TypeError, match="dtype"):
        ring.update(0, torch.randn(1, 2, 1, 8).double(), torch.randn(1, 2, 1, 8).double(), INV_FREQ)
    with pytest.raises(ValueError, match="layer_idx"):
        ring.update(2, torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), INV_FREQ)
