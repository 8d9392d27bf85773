"""effattn.hf structured masks (issue 23): sliding windows, alternating layers, sinks, chunked
attention and packed sequences reach effattn as a small HFMask / BlockMask, never as a dense
``[B, 1, T_q, T_k]`` tensor, and give HF eager's logits and greedy tokens.

Tiny random models built from configs (nothing downloaded), float32.
"""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import effattn.hf as ehf  # noqa: E402
from effattn.hf import HFMask  # noqa: E402
from effattn.hf._structure import parse_mask_function, structured_block_mask  # noqa: E402
from tests.helpers import assert_fp32_close  # noqa: E402

mu = pytest.importorskip("transformers.masking_utils")

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
    initializer_range=0.2,
    pad_token_id=0,
    eos_token_id=None,
    bos_token_id=None,
)
KINDS = ["llama", "mistral", "gemma2", "gpt_oss", "llama4"]


def _config(kind: str):
    """Windows / chunks shorter than the prompts, so every structure bites."""
    if kind == "llama":  # plain causal
        return transformers.LlamaConfig(**SMALL)
    if kind == "mistral":  # sliding window on every layer
        return transformers.MistralConfig(**SMALL, sliding_window=5)
    if kind == "gemma2":  # alternating sliding / global, attention softcap
        return transformers.Gemma2Config(
            **SMALL, head_dim=16, sliding_window=5, attn_logit_softcapping=20.0, query_pre_attn_scalar=16
        )
    if kind == "gpt_oss":  # learned sinks + sliding / full
        cfg = dict(SMALL, intermediate_size=32)
        return transformers.GptOssConfig(
            **cfg,
            head_dim=16,
            sliding_window=5,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["sliding_attention", "full_attention"],
        )
    if kind == "llama4":  # chunked attention (chunk 4) / full
        return transformers.Llama4TextConfig(
            **SMALL,
            head_dim=16,
            attention_chunk_size=4,
            num_local_experts=1,
            interleave_moe_layer_step=1,
            intermediate_size_mlp=128,
            no_rope_layers=[1, 0],
        )
    raise ValueError(kind)


_PAIRS: dict = {}


def _pair(kind: str):
    """HF eager and effattn with the same random weights (cached per module run)."""
    if kind not in _PAIRS:
        cfg = _config(kind)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager")
            ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="effattn")
        ours.load_state_dict(ref.state_dict())
        _PAIRS[kind] = (ref.eval(), ours.eval())
    return _PAIRS[kind]


def _ids(B=2, T=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (B, T), generator=g)


def _padded(B=2, T=13, pads=(3, 0), seed=1):
    ids = _ids(B, T, seed)
    am = torch.ones_like(ids)
    for b, p in enumerate(pads):
        am[b, :p] = 0
        ids[b, :p] = 0
    return ids, am


def _no_dense(monkeypatch):
    """Make HF's dense mask builders raise: effattn must not call them."""

    def refuse(*args, **kwargs):
        raise AssertionError("a dense [B, 1, T_q, T_k] mask was built")

    monkeypatch.setattr(mu, "sdpa_mask", refuse)
    monkeypatch.setattr(mu, "eager_mask", refuse)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("padded", [False, True])
def test_prefill_logits_match_eager_without_a_dense_mask(kind, padded, monkeypatch):
    ref, ours = _pair(kind)
    ids, am = _padded() if padded else (_ids(), None)
    with torch.no_grad():
        want = ref(ids, attention_mask=am).logits
        _no_dense(monkeypatch)
        got = ours(ids, attention_mask=am).logits
    keep = am.bool() if am is not None else torch.ones(ids.shape, dtype=torch.bool)
    assert_fp32_close(got[keep], want[keep])


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_and_decode_logits_match_eager(kind, monkeypatch):
    """Left-padded batch, DynamicCache (sliding-window layers for the sliding/chunked models): 9 new
    tokens cross the window (5) and several chunks (4); no dense mask at any step."""
    ref, ours = _pair(kind)
    ids, am = _padded(T=9, pads=(2, 0), seed=3)
    kw = dict(max_new_tokens=9, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=am, **kw)
        _no_dense(monkeypatch)
        got = ours.generate(ids, attention_mask=am, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        assert_fp32_close(a, b)


def _packed_positions(lengths, B=1):
    pos = torch.cat([torch.arange(n) for n in lengths])
    return pos.unsqueeze(0).expand(B, -1).clone()


@pytest.mark.parametrize("kind", KINDS)
def test_packed_batch_matches_eager_and_separate_sequences(kind, monkeypatch):
    """Position ids that restart (three sequences of 6, 9 and 5 tokens in one row; a second row
    packed 11 + 9): HF's packed-sequence mask, given to effattn as segment ids."""
    ref, ours = _pair(kind)
    ids = _ids(2, 20, seed=5)
    pos = torch.stack([_packed_positions([6, 9, 5])[0], _packed_positions([11, 9])[0]])
    with torch.no_grad():
        want = ref(ids, position_ids=pos, use_cache=False).logits
        _no_dense(monkeypatch)
        got = ours(ids, position_ids=pos, use_cache=False).logits
        alone = ours(ids[:1, 6:15], use_cache=False).logits  # the middle sequence of row 0 by itself
    assert_fp32_close(got, want)
    if kind != "gpt_oss":  # HF's gpt-oss builds its masks without position_ids: no packing detected
        assert_fp32_close(got[:1, 6:15], alone)


def test_mask_builder_returns_structure_for_hf_factories():
    """Sliding, chunked (with left padding), bidirectional sliding and packed functions give an
    HFMask whose tensors are all O(B * T): nothing T_q x T_k."""
    B, T = 2, 4096
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[0, :7] = False
    lp = torch.tensor([7, 0])
    seq = torch.cat([torch.zeros(1000), torch.ones(T - 1000)]).long().expand(B, T)
    pos = torch.cat([torch.arange(1000), torch.arange(T - 1000)]).expand(B, T)
    cases = {
        "sliding": dict(mask_function=mu.sliding_window_causal_mask_function(256), attention_mask=pad),
        "chunked": dict(mask_function=mu.chunked_causal_mask_function(512, lp), attention_mask=pad),
        "bidirectional sliding": dict(mask_function=mu.sliding_window_bidirectional_mask_function(64)),
        "packed": dict(
            mask_function=mu.and_masks(
                mu.remap_positions_for_packed_sequence(mu.chunked_causal_mask_function(128, lp * 0), pos),
                mu.packed_sequence_mask_function(seq),
            )
        ),
    }
    for name, kw in cases.items():
        m = ehf.effattn_mask(B, T, T, **kw)
        assert isinstance(m, HFMask), name
        assert m.structured, name
        for t in (m.key_valid, m.q_segment, m.kv_segment):
            assert t is None or t.numel() <= B * T, name
        bm = structured_block_mask(m)
        assert bm.kv_indices.numel() <= B * (T // 64) ** 2, name
        assert bm.density() < 0.6, name
    assert ehf.effattn_mask(B, T, T, **cases["sliding"]).window_left == 255


def _hf_dense(mask_function, B, Tq, Tk, q_offset=0, kv_offset=0, attention_mask=None):
    return mu.sdpa_mask(
        batch_size=B,
        q_length=Tq,
        kv_length=Tk,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
    )


@pytest.mark.parametrize(
    "Tq, Tk, q_offset, kv_offset", [(131, 131, 0, 0), (1, 70, 69, 0), (3, 68, 130, 65), (67, 200, 133, 0)]
)
def test_block_mask_equals_hf_dense_mask(Tq, Tk, q_offset, kv_offset):
    """The tiles effattn computes, with the rule inside partial tiles, allow exactly HF's pairs, for
    prefill and for decode offsets (a sliding cache's kv_offset), with left padding."""
    B = 3
    g = torch.Generator().manual_seed(7)
    total = kv_offset + Tk
    am = torch.ones(B, total, dtype=torch.bool)
    lpad = torch.tensor([0, 5, 40])
    for b, p in enumerate(lpad.tolist()):
        am[b, :p] = False
    am[2, 50] = bool(torch.randint(0, 2, (1,), generator=g))  # a hole: not a contiguous range
    fns = {
        "causal": mu.causal_mask_function,
        "sliding": mu.sliding_window_causal_mask_function(37),
        "chunked": mu.chunked_causal_mask_function(48, lpad),
        "bi-sliding": mu.sliding_window_bidirectional_mask_function(20),
        "bidirectional": mu.bidirectional_mask_function,
    }
    for name, fn in fns.items():
        for mask in (None, am):
            want = _hf_dense(fn, B, Tq, Tk, q_offset, kv_offset, mask)
            m = ehf.effattn_mask(B, Tq, Tk, q_offset, kv_offset, mask_function=fn, attention_mask=mask)
            assert isinstance(m, HFMask), name
            got = structured_block_mask(m).to_dense()
            assert torch.equal(got.expand(B, 1, Tq, Tk), want.expand(B, 1, Tq, Tk)), (name, mask is None)


def test_structured_attention_matches_dense_attention_per_backend():
    """One attention call on an HFMask (block mask on auto/tiled, the same rule as a mask_mod on the
    reference backend) equals the call on HF's dense mask; fully masked rows are zeros."""
    B, T, H, D = 2, 150, 4, 16
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    am = torch.ones(B, T, dtype=torch.bool)
    am[1, :9] = False
    fn = mu.chunked_causal_mask_function(40, torch.tensor([0, 9]))
    dense = _hf_dense(fn, B, T, T, attention_mask=am)
    m = ehf.effattn_mask(B, T, T, mask_function=fn, attention_mask=am)
    module = torch.nn.Module().eval()
    want, _ = ehf.make_attention_function("reference")(module, q, k, v, dense)
    for backend in ("auto", "tiled", "reference"):
        got, _ = ehf.make_attention_function(backend)(module, q, k, v, m)
        assert_fp32_close(got, want)
    assert torch.equal(want[1, :9], torch.zeros_like(want[1, :9]))


def test_unknown_structure_falls_back_to_dense_with_warning():
    overlay = mu.or_masks(mu.causal_mask_function, lambda b, h, q, kv: kv == 0)
    assert parse_mask_function(overlay) is None
    assert parse_mask_function(mu.and_masks(mu.causal_mask_function, lambda b, h, q, kv: kv >= 0)) is None
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        d = ehf.effattn_mask(1, 6, 6, mask_function=overlay)
    assert isinstance(d, torch.Tensor) and d.shape == (1, 1, 6, 6)


def test_bad_combinations_raise():
    # a packed-sequence function for other lengths than the call (HF packs only without a cache)
    seq = torch.zeros(1, 8, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = ehf.effattn_mask(1, 1, 8, 7, 0, mask_function=mu.packed_sequence_mask_function(seq))
    assert isinstance(d, torch.Tensor)  # no structure claimed for a layout HF never builds
    # a structured mask for other sizes than the attention call
    m = ehf.effattn_mask(1, 10, 10, mask_function=mu.sliding_window_causal_mask_function(3))
    x = torch.randn(1, 2, 12, 8)
    with pytest.raises(ValueError, match=r"mask is for \(T_q, T_k\) = \(10, 10\)"):
        ehf.make_attention_function()(torch.nn.Module().eval(), x, x, x, m)
    # a CompressedCache keeps full-attention layers only: a sliding model is refused by name
    _, ours = _pair("mistral")
    with pytest.raises(ValueError, match="sliding"):
        ehf.check_model(ours)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_flash_style_cu_seq_lens_kwargs_pack_sequences(kind):
    """``cu_seq_lens_q/k`` (DataCollatorWithFlattening's kwargs) become effattn's ``cu_seqlens``: with
    a cache present HF finds no packing in the mask, so the kwargs alone keep the sequences apart."""
    ref, ours = _pair(kind)
    ids = _ids(1, 20, seed=9)
    pos = _packed_positions([6, 9, 5])
    cu = torch.tensor([0, 6, 15, 20], dtype=torch.int32)
    with torch.no_grad():
        want = ref(ids, position_ids=pos, use_cache=False).logits
        got = ours(
            ids, position_ids=pos, use_cache=True, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9
        ).logits
    assert_fp32_close(got, want)
    with torch.no_grad(), pytest.raises(ValueError, match="must both be given and equal"):
        ours(ids, position_ids=pos, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu + 0 * cu - (cu > 6).int())
    with torch.no_grad(), pytest.raises(ValueError, match="pack one row"):
        ours(ids.expand(2, -1), use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu)


@pytest.mark.parametrize("kind", ["mistral", "gemma2", "llama4"])
def test_static_sliding_caches_match_eager(kind, monkeypatch):
    """``cache_implementation="static"`` (StaticSlidingWindowLayer for sliding and chunked layers: the
    cache's own kv_offset / kv_length) gives eager's tokens and per-step logits, no dense mask."""
    ref, ours = _pair(kind)
    ids, am = _padded(T=9, pads=(2, 0), seed=3)
    kw = dict(
        max_new_tokens=9,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        cache_implementation="static",
    )
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=am, **kw)
        _no_dense(monkeypatch)
        got = ours.generate(ids, attention_mask=am, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        assert_fp32_close(a, b)


# ---------------------------------------------------------------- decode steps (issue 23, second part)


class _Module(torch.nn.Module):
    is_causal = True
    training = False


def _decode_inputs(B=2, Hq=4, Hkv=2, T=37, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=g)
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    return q, k, v


@pytest.mark.parametrize("left", [None, 6, 36])
@pytest.mark.parametrize("extra", ["none", "softcap", "sinks"])
def test_decode_step_fast_path_equals_general_attention(left, extra):
    """One query over a cache (GQA, odd length, a window that bounds it or not; softcap or sinks): the
    decode step equals effattn.attention's bottom-right causal (+ window) on the same tensors."""
    import effattn

    q, k, v = _decode_inputs()
    T = k.shape[2]
    mask = HFMask(True, None, T - 1, 0, 1, T, 2, window_left=left)
    kw = {"softcap": 0.7} if extra == "softcap" else {}
    if extra == "sinks":
        kw["sinks"] = torch.tensor([0.5, -1.0, 2.0, 0.0])
    fn = ehf.make_attention_function()
    got, _ = fn(_Module(), q, k, v, mask, scaling=0.3, softcap=kw.get("softcap"), s_aux=kw.get("sinks"))
    window = None if left is None else (left, 0)
    want = effattn.attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, window=window, scale=0.3, **kw
    )
    assert_fp32_close(got, want)


def test_decode_step_takes_the_fast_path_and_keeps_the_nonfinite_rule(monkeypatch):
    """The step does not reach the general attention call; a NaN key outside the window changes nothing,
    a NaN key or an inf value inside makes that row (only) NaN."""
    import effattn.hf.attention as hfa

    def general(*args, **kwargs):
        raise AssertionError("the general attention path ran for a plain decode step")

    q, k, v = _decode_inputs()
    T = k.shape[2]
    mask = HFMask(True, None, T - 1, 0, 1, T, 2, window_left=6)
    fn = ehf.make_attention_function()
    clean, _ = fn(_Module(), q, k, v, mask)
    monkeypatch.setattr(hfa, "attention", general)
    k2, v2 = k.clone(), v.clone()
    k2[0, 1, 3] = float("nan")  # outside the window (the last 7 keys)
    out, _ = fn(_Module(), q, k2, v2, mask)
    assert torch.equal(out, clean)
    k2[0, 1, T - 2] = float("nan")  # kv head 1 of row 0: query heads 2, 3
    v2[1, 0, T - 1, 0] = float("inf")  # kv head 0 of row 1: query heads 0, 1
    out, _ = fn(_Module(), q, k2, v2, mask)
    nan = torch.isnan(out).all(-1)[:, 0]  # [B, H_q]
    assert nan.tolist() == [[False, False, True, True], [True, True, False, False]]
    assert torch.equal(out[0, :, :2], clean[0, :, :2]) and torch.equal(out[1, :, 2:], clean[1, :, 2:])


@pytest.mark.parametrize("kind", ["gemma2", "gpt_oss"])
@pytest.mark.parametrize("padded", [False, True])
def test_compressed_cache_on_sliding_models_matches_eager_below_budget(kind, padded, monkeypatch):
    """Alternating sliding / full models: a CompressedCache whose budget is not reached gives HF eager's
    greedy tokens and logits (the sliding layers keep HF's sliding cache, window 5 < 16 tokens)."""
    ref, ours = _pair(kind)
    ids, am = _padded(T=9, pads=(2, 0) if padded else (0, 0), seed=4)
    kw = dict(max_new_tokens=7, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=am, **kw)
        _no_dense(monkeypatch)
        got = ours.generate(ids, attention_mask=am, cache=ehf.CompressedCache("h2o", budget=64), **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        assert_fp32_close(a, b)


def test_compressed_cache_on_sliding_models_compresses_full_layers_only():
    """Gemma 2 (layer 0 sliding, layer 1 full), budget 8 over 16 tokens: the sliding layer holds exactly
    DynamicCache's window (same keys), the full layer the policy's budget."""
    _, ours = _pair("gemma2")
    ids = _ids(B=1, T=16, seed=5)
    cache = ehf.CompressedCache("streaming_llm", budget=8, sinks=2)
    dyn = transformers.DynamicCache(config=ours.config)
    with torch.no_grad():
        for c in (cache, dyn):
            ours(ids[:, :10], cache=c)
            for t in range(10, 16):
                ours(ids[:, t : t + 1], cache=c)
    assert cache.get_seq_length() == 16
    assert cache.lengths(0).tolist() == [[4, 4]]  # window 5: the last 4 tokens are kept
    assert cache.lengths(1).tolist() == [[8, 8]]
    assert torch.equal(cache.layers[0].keys, dyn.layers[0].keys)
    assert cache.nbytes < 2 * dyn.layers[1].keys.nbytes + 2 * dyn.layers[0].keys.nbytes


def test_compressed_cache_refuses_models_with_nothing_or_something_else_to_compress():
    with pytest.raises(ValueError, match="every layer of .* is sliding-window"):
        ehf.check_model(transformers.Qwen2Config(**SMALL, layer_types=["sliding_attention"] * 2, sliding_window=4))
    with pytest.raises(ValueError, match="full-attention layers only.*chunked_attention"):
        ehf.check_model(_config("llama4"))
