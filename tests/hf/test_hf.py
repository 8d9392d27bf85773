"""effattn.hf: effattn as a transformers attn_implementation, and CompressedCache.

Tiny random models built from configs (nothing downloaded), float32.
"""

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import effattn  # noqa: E402
import effattn.hf as ehf  # noqa: E402
from effattn.hf import CompressedInputs  # noqa: E402
from effattn.hf.attention import HFMask, attend_compressed  # noqa: E402
from effattn.kv import CompressedKVCache, make_policy  # noqa: E402
from tests.helpers import assert_fp32_close  # noqa: E402

ehf.register()

VOCAB = 128
SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    initializer_range=0.2,  # sharper attention than the default 0.02: differences show
    pad_token_id=0,
    eos_token_id=None,
    bos_token_id=None,
)


def _config(kind: str):
    if kind == "llama":
        return transformers.LlamaConfig(**SMALL)
    if kind == "qwen2":
        return transformers.Qwen2Config(**SMALL)
    if kind == "mistral":  # a window shorter than the prompt: the dense-mask fallback
        return transformers.MistralConfig(**SMALL, sliding_window=5)
    raise ValueError(kind)


def _pair(kind: str, seed: int = 0):
    """The same random weights under SDPA and under effattn (separate configs: from_config
    writes the implementation into the config object)."""
    cfg = _config(kind)
    torch.manual_seed(seed)
    ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="effattn").eval()
    ours.load_state_dict(ref.state_dict())
    assert ref.config._attn_implementation == "sdpa" and ours.config._attn_implementation == "effattn"
    return ref, ours


@pytest.fixture(scope="module")
def llama():
    return _pair("llama")


def _ids(B=2, T=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (B, T), generator=g)


def _left_padded(ids, pads):
    am = torch.ones_like(ids)
    for b, p in enumerate(pads):
        am[b, :p] = 0
        ids[b, :p] = 0
    return ids, am


# ------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_logits_match_sdpa(kind):
    ref, ours = _pair(kind)
    ids = _ids(B=3, T=11)
    ids, am = _left_padded(ids, [0, 4, 1])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mistral's window: the dense-mask fallback warns once
        assert_fp32_close(ours(ids).logits, ref(ids).logits, name=f"{kind} no padding")
        a, b = ours(ids, attention_mask=am).logits, ref(ids, attention_mask=am).logits
    real = am.bool()
    assert_fp32_close(a[real], b[real], name=f"{kind} left padding")
    assert torch.isfinite(a).all()  # fully masked (padded) query rows give zeros, not NaN


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_generate_matches_sdpa_with_left_padding(llama, cache_implementation):
    """Dynamic cache (queries at the end of the keys) and static cache (keys padded to the
    maximum length, the mask built ahead by generate and handed back through the mask builder)."""
    ref, ours = llama
    ids, am = _left_padded(_ids(B=2, T=9), [3, 0])
    kw = dict(
        attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation=cache_implementation
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


def test_bfloat16_follows_the_flash_attention_rule(llama):
    """bfloat16: effattn's error against the float32 model is at most 2x SDPA's in bfloat16 (+ atol),
    with left padding (tiled backend) and without (SDPA backend)."""
    from tests.helpers import assert_lowp_close

    ref, ours = llama
    ref16, ours16 = (copy.deepcopy(m).to(torch.bfloat16) for m in (ref, ours))
    ids, am = _left_padded(_ids(B=2, T=11), [3, 0])
    real = am.bool()
    with torch.no_grad():
        for mask in (None, am):
            sel = real if mask is not None else torch.ones_like(real)
            fp32 = ref(ids, attention_mask=mask).logits[sel]
            low_ref = ref16(ids, attention_mask=mask).logits[sel].float()
            low = ours16(ids, attention_mask=mask).logits[sel].float()
            assert_lowp_close(low, low_ref, fp32)  # atol 1e-3 (was 2e-2): measured e_fast == e_ref (0.17)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_decode_steps_match_sdpa_logits(kind, llama):
    """Prefill then one-token steps through a DynamicCache: every step's logits as SDPA's
    (Mistral: a window of 5 < 11 tokens, so its sliding cache layer drops keys: kv_offset > 0)."""
    ref, ours = llama if kind == "llama" else _pair(kind)
    ids, am = _left_padded(_ids(B=2, T=8), [2, 0])
    nxt = _ids(B=2, T=3, seed=5)
    outs = []
    for model in (ref, ours):
        cache = transformers.DynamicCache(config=model.config)
        mask, logits = am, []
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logits.append(model(ids, attention_mask=mask, cache=cache).logits)
            for i in range(3):
                mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
                pos = (mask.cumsum(-1) - 1)[:, -1:]
                logits.append(model(nxt[:, i : i + 1], attention_mask=mask, position_ids=pos, cache=cache).logits)
        outs.append(logits)
    real = am.bool()
    assert_fp32_close(outs[1][0][real], outs[0][0][real], name="prefill")
    for step in range(1, 4):
        assert_fp32_close(outs[1][step], outs[0][step], name=f"decode step {step}")


def test_custom_4d_masks_match_sdpa(llama):
    ref, ours = llama
    ids = _ids(B=2, T=7)
    allowed = torch.tril(torch.ones(7, 7, dtype=torch.bool)).expand(2, 1, 7, 7).clone()
    allowed[1, 0, 4:, :2] = False  # row-specific holes
    additive = torch.zeros(2, 1, 7, 7).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        for mask in (allowed, additive):
            assert_fp32_close(ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits)


def test_mask_builder_is_compact_for_causal():
    from transformers.masking_utils import causal_mask_function, or_masks, sliding_window_causal_mask_function

    pad = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    m = ehf.effattn_mask(2, 5, 5, mask_function=causal_mask_function, attention_mask=pad)
    assert isinstance(m, HFMask) and m.causal and m.bottom_right and m.shape == (2, 1, 5, 5)
    assert torch.equal(m.key_valid, pad)
    m = ehf.effattn_mask(2, 5, 5, mask_function=causal_mask_function, attention_mask=torch.ones(2, 5, dtype=torch.bool))
    assert m.key_valid is None  # nothing padded: no tensor at all
    # a sliding window is structured now (issue 23): an HFMask with the window, no dense tensor
    s = ehf.effattn_mask(2, 5, 5, mask_function=sliding_window_causal_mask_function(2), attention_mask=pad)
    assert isinstance(s, HFMask) and s.window_left == 1 and torch.equal(s.key_valid, pad)
    # a part with no known structure (an overlay) is still materialized densely
    overlay = or_masks(sliding_window_causal_mask_function(2), lambda b, h, q, kv: kv == 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = ehf.effattn_mask(2, 5, 5, mask_function=overlay, attention_mask=pad)
    assert isinstance(d, torch.Tensor) and d.dtype == torch.bool and d.shape == (2, 1, 5, 5)


def test_register_backends_and_user_mask_mod(llama):
    """Another name with the tiled backend and a mask_mod (absolute positions) that hides key 1
    from queries 3 on: equals SDPA with the same hole in a dense mask."""
    name = ehf.register("effattn_test_tiled", backend="tiled", mask_mod=lambda b, h, q, kv: (kv != 1) | (q < 3))
    assert ehf.registered()[name]["backend"] == "tiled"
    ref, _ = llama
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(ref.config), attn_implementation=name).eval()
    ours.load_state_dict(ref.state_dict())
    ids = _ids(B=1, T=6)
    allowed = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    allowed[3:, 1] = False
    with torch.no_grad():
        a = ours(ids).logits
        b = ref(ids, attention_mask=allowed.expand(1, 1, 6, 6)).logits
    assert_fp32_close(a, b)


def test_register_rejects_bad_input():
    with pytest.raises(ValueError, match="transformers' own"):
        ehf.register("sdpa")
    with pytest.raises(ValueError, match="backend"):
        ehf.register("effattn_bad", backend="flash")
    with pytest.raises(ValueError, match="name"):
        ehf.register("")
    with pytest.raises(TypeError, match="mask_mod"):
        ehf.register("effattn_bad", mask_mod=lambda b, h: True)


def test_attention_rejects_training_dropout():
    cfg = transformers.LlamaConfig(**{**SMALL, "attention_dropout": 0.1})
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="effattn").train()
    with pytest.raises(NotImplementedError, match="dropout"):
        model(_ids(B=1, T=4))


def test_only_effattn_hf_imports_transformers():
    """transformers stays optional: no module outside effattn/hf imports it (or effattn.hf)."""
    root = Path(effattn.__file__).parent
    for path in root.rglob("*.py"):
        if "hf" in path.relative_to(root).parts:
            continue
        text = path.read_text()
        # bench/hf.py (the `bench hf` suite) imports them inside its functions only: the suite is
        # listed without transformers and needs it only when run
        indent = "" if path.relative_to(root).parts == ("bench", "hf.py") else r"\s*"
        assert not re.search(rf"^{indent}(import|from)\s+(transformers|effattn\.hf)\b", text, re.M), path


# ------------------------------------------------------------------------------ CompressedCache
def _greedy(model, ids, cache, n=6):
    return model.generate(ids, max_new_tokens=n, do_sample=False, cache=cache, pad_token_id=0)


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])  # evicts at every step / after the prefill
def test_unlimited_budget_generate_equals_dynamic_cache(llama, policy):
    ref, ours = llama
    ids = _ids(B=2, T=10)
    full = _greedy(ref, ids, transformers.DynamicCache(config=ref.config))
    cache = ehf.CompressedCache(make_policy(policy, budget=64), model=ours)
    assert torch.equal(_greedy(ours, ids, cache), full)
    assert cache.get_seq_length() == 15 and cache.lengths(1).tolist() == [[15, 15]] * 2


def test_past_key_values_name_works(llama):
    ref, ours = llama
    ids = _ids(B=1, T=10)
    full = _greedy(ref, ids, transformers.DynamicCache(config=ref.config), n=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renamed it `cache`
        cache = ehf.CompressedCache("h2o", budget=64)
        out = ours.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, past_key_values=cache)
    assert torch.equal(out, full)


def _dynamic_nbytes(cache) -> int:
    return sum(x.numel() * x.element_size() for layer in cache.layers for x in (layer.keys, layer.values))


def test_budget_keeps_exactly_budget_and_shrinks_memory(llama):
    ref, ours = llama
    ids = _ids(B=2, T=20)
    dyn = transformers.DynamicCache(config=ref.config)
    _greedy(ref, ids, dyn)
    cache = ehf.CompressedCache(make_policy("streaming_llm", budget=8, sinks=2))
    out = _greedy(ours, ids, cache)
    assert out.shape == (2, 26)
    assert cache.get_seq_length() == 25  # positions continue over evicted tokens
    for layer in range(2):
        assert cache.lengths(layer).tolist() == [[8, 8], [8, 8]]
        pos = cache.kv.positions(layer)[0, 0].tolist()
        assert pos == [0, 1, 19, 20, 21, 22, 23, 24]  # sinks + most recent
    assert cache.nbytes == 8 * 2 * 2 * 16 * 4 * 2 * 2  # tokens x B x H_kv x D x 4 bytes x (k, v) x layers
    assert cache.nbytes < _dynamic_nbytes(dyn) / 3

    # prefill-only policy: exactly the budget after the prefill
    snap = ehf.CompressedCache("snapkv", budget=6, window=4)
    _greedy(ours, ids, snap, n=1)
    assert all(snap.lengths(layer).tolist() == [[6, 6], [6, 6]] for layer in range(2))


def test_left_padded_batch_is_compressed_row_by_row(llama):
    """A left-padded batch: at an unlimited budget it decodes as the full cache does; with a real
    budget every row decodes exactly as its prompt alone (the policy never sees padding) and keeps
    exactly the budget."""
    ref, ours = llama
    ids, am = _left_padded(_ids(B=2, T=12), [5, 0])
    kw = dict(attention_mask=am, max_new_tokens=5, do_sample=False, pad_token_id=0)
    full = ref.generate(ids, **kw)
    cache = ehf.CompressedCache("h2o", budget=64)
    assert torch.equal(ours.generate(ids, cache=cache, **kw), full)
    assert cache.kv is None and len(cache.rows) == 2 and cache.get_seq_length() == 16
    assert cache.lengths(0).tolist() == [[11, 11], [16, 16]]  # real tokens per row

    cache = ehf.CompressedCache("h2o", budget=6)
    batch = ours.generate(ids, cache=cache, **kw)
    assert cache.lengths(1).tolist() == [[6, 6], [6, 6]]
    for b, p in enumerate([5, 0]):
        alone = _greedy(ours, ids[b : b + 1, p:], ehf.CompressedCache("h2o", budget=6), n=5)
        assert torch.equal(batch[b, 12:], alone[0, 12 - p :]), f"row {b}"


def _ragged_policy():
    return make_policy("duo_attention", budget=5, sinks=1, retrieval_heads=torch.tensor([[True, False], [False, True]]))


def test_ragged_heads_padding_is_never_attended(llama, monkeypatch):
    """Heads with different lengths are left-padded; poisoning the padded slots with huge keys and
    values must not change a single generated token."""
    _, ours = llama
    ids = _ids(B=2, T=12)
    cache = ehf.CompressedCache(_ragged_policy(), model=ours)
    clean = _greedy(ours, ids, cache)
    assert cache.lengths(0).tolist() == [[17, 5]] * 2 and cache.lengths(1).tolist() == [[5, 17]] * 2

    seen_masks = []
    update = CompressedKVCache.update

    def poisoned(self, layer_idx, k, v, q):
        k_all, v_all, key_mask = update(self, layer_idx, k, v, q)
        if key_mask is not None:
            seen_masks.append(key_mask)
            hide = ~key_mask.transpose(1, 2)[..., None]  # [B, T, H_kv, 1]
            k_all, v_all = k_all.masked_fill(hide, 1e3), v_all.masked_fill(hide, 1e3)
        return k_all, v_all, key_mask

    monkeypatch.setattr(CompressedKVCache, "update", poisoned)
    assert torch.equal(_greedy(ours, ids, ehf.CompressedCache(_ragged_policy())), clean)
    assert seen_masks and not all(bool(m.all()) for m in seen_masks)


def test_user_mask_mod_sees_original_positions_through_compressed_cache(llama):
    """A registered mask_mod gets original token positions on the CompressedCache path too:
    hiding position 3 from later queries (prefill, then a decode step) equals SDPA with that hole."""
    ref, _ = llama
    name = ehf.register("effattn_test_hide3", mask_mod=lambda b, h, q, kv: (kv != 3) | (q <= 3))
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(ref.config), attn_implementation=name).eval()
    ours.load_state_dict(ref.state_dict())
    ids = _ids(B=1, T=9)
    allowed = torch.tril(torch.ones(9, 9, dtype=torch.bool))
    allowed[4:, 3] = False
    cache = ehf.CompressedCache("h2o", budget=64)
    with torch.no_grad():
        full = ref(ids, attention_mask=allowed.expand(1, 1, 9, 9)).logits
        prefill = ours(ids[:, :8], cache=cache).logits
        step = ours(ids[:, 8:], cache=cache).logits
    assert_fp32_close(prefill, full[:, :8], name="prefill")
    assert_fp32_close(step, full[:, 8:], name="decode step")


def test_attend_compressed_masks_per_head():
    """The compressed attention path against a per-head loop over the valid keys only."""
    torch.manual_seed(0)
    B, T, Hkv, G, D, t = 2, 9, 2, 2, 8, 3
    q = torch.randn(B, t, Hkv * G, D)
    k, v = torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    key_mask = torch.ones(B, Hkv, T, dtype=torch.bool)
    key_mask[0, 1, :4] = False
    key_mask[1, 0, :2] = False
    o = attend_compressed(q, CompressedInputs(k, v, key_mask), None, None, None, "auto", None, None)
    for b in range(B):
        for h in range(Hkv * G):
            kh = h // G
            for i in range(t):
                vis = key_mask[b, kh].clone()
                vis[T - t + i + 1 :] = False  # causal among the new tokens (last t slots)
                s = (q[b, i, h] @ k[b, vis, kh].T) / D**0.5
                ref = torch.softmax(s, -1) @ v[b, vis, kh]
                assert torch.allclose(o[b, i, h], ref, atol=1e-5)


def test_compressed_cache_errors(llama):
    ref, ours = llama
    with pytest.raises(ValueError, match="unknown policy"):
        ehf.CompressedCache("no_such_policy", budget=8)
    with pytest.raises(ValueError, match="budget"):
        ehf.CompressedCache("h2o", budget=0)
    with pytest.raises(ValueError, match="budget"):
        ehf.CompressedCache(make_policy("snapkv", budget=-3))
    with pytest.raises(TypeError, match="Policy"):
        ehf.CompressedCache(object())
    # an SDPA model: refused up front with model=, and at the first cache access without it
    with pytest.raises(ValueError, match="effattn attn_implementation"):
        ehf.CompressedCache("h2o", budget=8, model=ref)
    with pytest.raises(RuntimeError, match="not consumed by an effattn attention"):
        _greedy(ref, _ids(B=1, T=5), ehf.CompressedCache("h2o", budget=8), n=2)
    # padding that appears after an unpadded prefill
    cache = ehf.CompressedCache("h2o", budget=8)
    ids = _ids(B=2, T=6)
    with torch.no_grad():
        ours(ids, cache=cache)
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[0, 6] = 0
        with pytest.raises(ValueError, match="padding appeared after an unpadded prefill"):
            ours(_ids(B=2, T=2), attention_mask=mask, cache=cache)
    # beam search reorders rows
    with pytest.raises(NotImplementedError, match="reorder_cache"):
        ours.generate(_ids(B=1, T=5), num_beams=2, max_new_tokens=3, cache=ehf.CompressedCache("h2o", budget=8))


def test_unsupported_layouts_are_refused():
    bart = transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
    )  # fmt: skip
    with pytest.raises(ValueError, match="encoder-decoder"):
        ehf.check_model(bart)
    with pytest.raises(ValueError, match="encoder-decoder"):
        ehf.CompressedCache("h2o", budget=8, model=transformers.BartForConditionalGeneration(bart))
    mamba = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=4, num_hidden_layers=2)
    with pytest.raises(ValueError, match="full-attention layers only.*linear_attention"):
        ehf.check_model(transformers.MambaForCausalLM(mamba))
    llama = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**SMALL), attn_implementation="effattn"
    )
    llama.model.layers[1].self_attn = torch.nn.Identity()  # a decoder layer without an attention module
    with pytest.raises(ValueError, match=r"attention module .* for layers \[0\] of 2"):
        ehf.check_model(llama)
    with pytest.raises(ValueError, match="full-attention"):
        ehf.check_model(transformers.MistralConfig(**SMALL, sliding_window=16))


@pytest.mark.parametrize("module", ["effattn.hf.attention", "effattn.hf.cache", "effattn.hf._structure"])
def test_docstring_examples(module):
    import doctest
    import importlib

    res = doctest.testmod(importlib.import_module(module), extraglobs={"torch": torch})
    assert res.attempted > 0 and res.failed == 0


def test_unsupported_transformers_version_is_refused(monkeypatch):
    from effattn.hf import _compat

    monkeypatch.setattr(transformers, "__version__", "4.46.0")
    with pytest.raises(ImportError, match=r"transformers >= 5.0, < 6 .*major version 5 \(found 4.46.0\)"):
        _compat.check_transformers()


def test_cache_and_attention_meet_through_one_public_object():
    """hf/cache.py and hf/attention.py share only the handshake's public names: no underscore name
    imported across modules, no attribute of another module written."""
    import ast

    from effattn.hf._handshake import HANDSHAKE, PendingUpdate

    root = Path(ehf.__file__).parent
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not [a.name for a in node.names if a.name.startswith("_")], f"{path.name}: {ast.dump(node)}"
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:  # writes like other_module._private.x = ...
                    base = t
                    while isinstance(base, ast.Attribute):
                        base = base.value
                    other = isinstance(base, ast.Name) and base.id in ("_attn", "attention", "cache", "effattn")
                    assert not (t is not base and other), f"{path.name} writes {ast.unparse(t)}"
    k = torch.zeros(1)
    item = PendingUpdate(0, k, k, lambda *a: None)
    HANDSHAKE.post(item)
    assert HANDSHAKE.take(torch.zeros(1)) is None  # another tensor: not this update's keys
    assert HANDSHAKE.take(k) is item and HANDSHAKE.take(k) is None  # taken once
    HANDSHAKE.post(item)
    HANDSHAKE.discard(PendingUpdate(1, k, k, lambda *a: None))  # someone else's: kept
    assert HANDSHAKE.take(k) is item
