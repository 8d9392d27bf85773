"""StreamingLLM's positions inside the cache: keys cached before RoPE, rotated by their slot at each call.

The defining property (Xiao et al. 2023, Section 3.2): a step over a streaming cache equals a fresh
forward over the cache's tokens placed at positions 0 .. n-1. ``reindex=False`` keeps text positions.
"""

import copy

import pytest
import torch

from effattn.kv import CompressedKVCache, make_policy, rotate_rope
from effattn.nn import LM, Attention, LMConfig
from tests.helpers import assert_fp32_close


def _stream(layer, x, policy, prefill, chunks=(1,)):
    """Prefill ``prefill`` tokens, then feed the rest in chunks; return per step (outputs, kept positions
    per kv head before the step, first new index)."""
    cache = CompressedKVCache(policy, 1)
    state = cache.layer(0)
    steps = []
    with torch.no_grad():
        _, state = layer.attend(x[:, :prefill], state)
        t, i = prefill, 0
        while t < x.shape[1]:
            n = min(chunks[i % len(chunks)], x.shape[1] - t)
            kept = [cache.kept(0, h)[2][0].tolist() for h in range(layer.kv_heads)]
            o, state = layer.attend(x[:, t : t + n], state)
            steps.append((o, kept, t, n))
            t, i = t + n, i + 1
    return steps


@pytest.mark.parametrize(
    "kw", [dict(), dict(kv_heads=1, rope_fraction=0.5), dict(kv_heads=2, qk_norm=True, sinks=True, softcap=5.0)]
)
@pytest.mark.parametrize("chunks", [(1,), (3, 1, 2)])
def test_layer_step_equals_fresh_forward_at_cache_positions(kw, chunks):
    torch.manual_seed(0)
    layer = Attention(40, 4, head_dim=10, **kw)
    x = torch.randn(2, 37, 40)
    for o, kept, t, n in _stream(layer, x, make_policy("streaming_llm", budget=7, sinks=3), 13, chunks):
        assert all(k == kept[0] for k in kept)
        toks = kept[0] + list(range(t, t + n))
        with torch.no_grad():
            fresh, _ = layer.attend(x[:, toks])  # a fresh cache: positions 0 .. len(toks) - 1
        assert_fp32_close(o, fresh[:, -n:], 1e-5, f"step at {t}")


def test_ragged_heads_each_see_their_own_cache_positions():
    """head_budgets: kv head h keeps its own tokens; its query heads equal a fresh forward over them."""
    torch.manual_seed(1)
    layer = Attention(32, 4, kv_heads=2)
    x = torch.randn(1, 30, 32)
    policy = make_policy("streaming_llm", head_budgets=[[4, 9]], sinks=2)
    for o, kept, t, _ in _stream(layer, x, policy, 12):
        assert len(kept[0]) == 4 and len(kept[1]) == 9
        for h in range(2):
            with torch.no_grad():
                fresh, _ = layer.attend(x[:, kept[h] + [t]])
            assert_fp32_close(o[:, :, 2 * h : 2 * h + 2], fresh[:, -1:, 2 * h : 2 * h + 2], 1e-5, f"head {h}")


def test_without_reindex_tokens_keep_their_text_positions(monkeypatch):
    torch.manual_seed(2)
    layer = Attention(32, 4, kv_heads=2)
    x = torch.randn(2, 25, 32)
    steps = _stream(layer, x, make_policy("streaming_llm", budget=6, sinks=2, reindex=False), 10)
    for o, kept, t, _ in steps:
        seen = torch.zeros(t + 1, dtype=torch.bool)
        seen[kept[0] + [t]] = True
        monkeypatch.setattr(layer, "mask_mod", lambda b, h, q, kv, seen=seen: seen[kv])
        with torch.no_grad():
            ref, _ = layer.attend(x[:, : t + 1])  # full sequence, text positions, evicted keys hidden
        monkeypatch.setattr(layer, "mask_mod", None)
        assert_fp32_close(o, ref[:, -1:], 1e-5, f"step at {t}")
    # and the default (re-indexed) result differs from it once tokens were evicted
    o_new = _stream(layer, x, make_policy("streaming_llm", budget=6, sinks=2), 10)[-1][0]
    assert (o_new - steps[-1][0]).abs().max() > 1e-3


def test_lm_generate_one_layer_equals_fresh_forward_over_kept_tokens():
    torch.manual_seed(3)
    model = LM(LMConfig(vocab_size=50, dim=32, n_layers=1, heads=4, kv_heads=2)).eval()
    ids = torch.randint(0, 50, (2, 11))
    policy = make_policy("streaming_llm", budget=5, sinks=2)
    state = model.compressed_state(policy)
    with torch.no_grad():
        _, state = model(ids, state)
        seq = ids
        for _ in range(6):
            kept = state[0].cache.kept(0, 0)[2][0].tolist()
            nxt = torch.randint(0, 50, (2, 1))
            logits, state = model(nxt, state)
            seq = torch.cat([seq, nxt], 1)
            fresh = model(seq[:, kept + [seq.shape[1] - 1]])[0][:, -1:]
            assert_fp32_close(logits, fresh, 1e-5, "LM step")
    out = model.generate(ids, 8, temperature=0.0, kv_policy=policy)
    assert out.shape == (2, 19)


def test_rotate_rope_composes_and_matches_the_layer_rope():
    torch.manual_seed(4)
    layer = Attention(24, 2, head_dim=12, rope_fraction=0.5)
    x = torch.randn(2, 5, 2, 12)
    pos = torch.tensor([3, 0, 7, 11, 2])
    inv = layer.rope.inv_freq
    assert torch.allclose(rotate_rope(x, pos[:, None], inv), layer.rope.apply(x, pos), atol=1e-6)
    back = rotate_rope(rotate_rope(x, pos[:, None], inv), -pos[:, None], inv)
    assert torch.allclose(back, x, atol=1e-6) and torch.equal(back[..., 6:], x[..., 6:])
    with pytest.raises(ValueError, match="inv_freq"):
        rotate_rope(x, pos[:, None], torch.ones(7))
    with pytest.raises(TypeError, match="reindex"):
        make_policy("streaming_llm", budget=4, reindex="yes")


# ---------------------------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def hf_llama():
    transformers = pytest.importorskip("transformers")
    import effattn.hf as ehf

    ehf.register()
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,  # one layer: a key depends on its token only, so a fresh forward is comparable
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        initializer_range=0.2,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    torch.manual_seed(5)
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="effattn").eval()
    return model, ehf


@pytest.mark.parametrize("reindex", [True, False])
@pytest.mark.parametrize("with_model", [True, False])
def test_hf_step_equals_fresh_forward_at_cache_positions(hf_llama, reindex, with_model):
    model, ehf = hf_llama
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(1, 128, (2, 12), generator=g)
    policy = make_policy("streaming_llm", budget=6, sinks=2, reindex=reindex)
    cache = ehf.CompressedCache(policy, model=model if with_model else None)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        seq = ids
        for _ in range(5):
            kept = cache.kv.positions(0)[0, 0].tolist()
            nxt = torch.randint(1, 128, (2, 1), generator=g)
            seq = torch.cat([seq, nxt], 1)
            logits = model(nxt, cache=cache, use_cache=True).logits[:, -1]
            toks = kept + [seq.shape[1] - 1]
            pos = torch.arange(len(toks)) if reindex else torch.tensor(toks)
            fresh = model(seq[:, toks], position_ids=pos[None].expand(2, -1)).logits[:, -1]
            assert_fp32_close(logits, fresh, 1e-5, "HF step")


def test_hf_left_padded_rows_stream_as_alone(hf_llama):
    model, ehf = hf_llama
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 128, (2, 12), generator=g)
    am = torch.ones_like(ids)
    ids[0, :4], am[0, :4] = 0, 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    policy = make_policy("streaming_llm", budget=5, sinks=2)
    batch = model.generate(ids, attention_mask=am, cache=ehf.CompressedCache(policy), **kw)
    for b, p in enumerate([4, 0]):
        alone = model.generate(ids[b : b + 1, p:], cache=ehf.CompressedCache(policy), **kw)
        assert torch.equal(batch[b : b + 1, p:], alone)


def test_hf_rope_frequencies(hf_llama):
    model, ehf = hf_llama
    from effattn.hf.cache import rope_frequencies

    assert torch.allclose(rope_frequencies(model.config), rope_frequencies(model), rtol=1e-6)
    cfg = copy.deepcopy(model.config)
    cfg.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="dynamic"):
        rope_frequencies(cfg)
