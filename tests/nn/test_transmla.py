"""TransMLA compression (RoRoPE + joint K/V PCA): exact at full rank, error falls with rank, cache
bytes, the RoRoPE principal component, decode, argument errors, and the Hugging Face Llama path."""

from __future__ import annotations

import pytest
import torch

from effattn.nn import Attention, transmla_cache_bytes, transmla_from_gqa, transmla_latent_width
from effattn.nn.transmla import attention_from_llama
from tests.helpers import assert_fp32_close, rel_rms

DIM = 48


def _x(B: int = 2, T: int = 37, seed: int = 1, dim: int = DIM) -> torch.Tensor:
    return torch.randn(B, T, dim, generator=torch.Generator().manual_seed(seed))


def _gqa(seed: int = 0, **kw) -> Attention:
    torch.manual_seed(seed)
    kw.setdefault("kv_heads", 2)
    return Attention(DIM, kw.pop("heads", 4), **kw)


CASES = [
    dict(),  # GQA, full RoPE
    dict(bias=True),
    dict(rope_fraction=0.5),  # partial RoPE: the unrotated channels go to the latent
    dict(rope=False),
    dict(kv_heads=4),  # MHA
    dict(kv_heads=1),  # MQA
    dict(heads=6, kv_heads=3, head_dim=10),  # odd head count, head_dim 10 (5 frequencies)
    dict(window=7),
]


@pytest.mark.parametrize("kw", CASES, ids=[str(c) for c in CASES])
def test_full_rank_with_every_rope_component_is_exact(kw):
    gqa = _gqa(**kw)
    mla = transmla_from_gqa(gqa, _x(seed=2), rope_heads=gqa.kv_heads)  # rank = latent width
    x = _x(T=29)
    assert_fp32_close(mla(x)[0], gqa(x)[0])


def test_decode_equals_full_forward_and_gqa():
    """Token by token (the absorbed form) equals the GQA layer at full rank, and the compressed layer's
    own full forward at low rank."""
    gqa = _gqa()
    calib, x = _x(seed=2), _x(B=1, T=9)
    for rank, ref in ((None, gqa(x)[0]), (10, None)):
        mla = transmla_from_gqa(gqa, calib, rank=rank, rope_heads=2 if rank is None else 1)
        ref = mla(x)[0] if ref is None else ref
        state, ys = None, []
        for t in range(x.shape[1]):
            y, state = mla(x[:, t : t + 1], state)
            ys.append(y)
        assert_fp32_close(torch.cat(ys, 1), ref, tol=1e-5)


@pytest.mark.parametrize("rope_heads", [0, 1, 2])
def test_output_error_falls_with_rank(rope_heads):
    """Held-out error of the layer output at ranks W, 3W/4, W/2, W/4, 2: non-increasing as the rank
    grows (PCA's nested subspaces), strictly between the smallest and the full rank."""
    gqa = _gqa()
    calib, x = _x(B=4, T=64, seed=3), _x(seed=4)
    ref = gqa(x)[0]
    W = transmla_latent_width(gqa, rope_heads)
    errs = [
        rel_rms(transmla_from_gqa(gqa, calib, rank=r, rope_heads=rope_heads)(x)[0], ref)
        for r in (2, W // 4, W // 2, 3 * W // 4, W)
    ]
    assert all(a >= b - 1e-6 for a, b in zip(errs, errs[1:])), errs
    assert errs[0] > errs[-1] + 0.1, errs
    if rope_heads == 2:
        assert errs[-1] < 1e-5


def test_rorope_concentrates_rope_energy():
    """The kept RoPE channels hold at least as much key energy, per frequency, as any single kv head
    (the first principal component over heads), and the decoupled key has ``rope_heads * d_rot`` channels."""
    gqa = _gqa(heads=6, kv_heads=3, head_dim=16)
    calib = _x(B=4, T=50, seed=5)
    with torch.no_grad():  # make the heads unequal so the top component is not head 0
        gqa.k_proj.weight.view(3, 16, DIM)[2] *= 4
        mla = transmla_from_gqa(gqa, calib, rope_heads=1)
        r, dr, half = mla.kv_lora_rank, mla.qk_rope_head_dim, 8
        assert dr == 16
        kpe = mla.kv_down(calib)[..., r:]  # unrotated decoupled key: [a (8) | b (8)]
        e_pe = kpe[..., :half].pow(2).sum((0, 1)) + kpe[..., half:].pow(2).sum((0, 1))
        k = gqa.k_proj(calib).view(*calib.shape[:2], 3, 16)
        e_heads = k[..., :half].pow(2).sum((0, 1)) + k[..., half:].pow(2).sum((0, 1))  # [3, 8]
        assert (e_pe >= e_heads.max(0).values * (1 - 1e-5)).all()
        assert (e_pe > e_heads[0] * 1.5).all()  # a head-0 stand-in would not do


def test_balanced_pca_helps_when_keys_dominate():
    """With keys 30x larger than values, the balanced PCA (BKV) keeps the values and gives a smaller
    output error than the plain joint PCA at the same rank."""
    gqa = _gqa()
    with torch.no_grad():
        gqa.k_proj.weight *= 30
        gqa.q_proj.weight /= 30
    calib, x = _x(B=4, T=64, seed=3), _x(seed=4)
    ref = gqa(x)[0]
    W = transmla_latent_width(gqa, 1)
    e_bal = rel_rms(transmla_from_gqa(gqa, calib, rank=W // 2, balance=True)(x)[0], ref)
    e_plain = rel_rms(transmla_from_gqa(gqa, calib, rank=W // 2, balance=False)(x)[0], ref)
    assert e_bal < e_plain, (e_bal, e_plain)


@pytest.mark.parametrize("rank,rope_heads", [(5, 0), (12, 1), (20, 2)])
def test_cache_bytes_formula(rank, rope_heads):
    gqa = _gqa()
    mla = transmla_from_gqa(gqa, _x(seed=2), rank=rank, rope_heads=rope_heads)
    rot = gqa.rope.rot_dim
    assert (
        mla.state_size(3, 17)
        == transmla_cache_bytes(rank, rope_heads, rot, tokens=51)
        == 51 * (rank + rope_heads * rot) * 4
    )
    _, cache = mla(_x(B=3, T=17))
    assert cache.nbytes == mla.state_size(3, 17)
    assert gqa.state_size(3, 17) == 51 * 2 * 2 * 12 * 4
    assert transmla_latent_width(gqa, rope_heads) == (2 - rope_heads) * 12 + 2 * 12


def test_errors():
    gqa = _gqa()
    x = _x()
    W = transmla_latent_width(gqa, 1)
    with pytest.raises(ValueError, match="rank must be <= the latent width"):
        transmla_from_gqa(gqa, x, rank=W + 1)
    with pytest.raises(ValueError, match="rank"):
        transmla_from_gqa(gqa, x, rank=0)
    with pytest.raises(ValueError, match="rope_heads must lie in"):
        transmla_from_gqa(gqa, x, rope_heads=3)
    with pytest.raises(ValueError, match=r"calib must have shape \[..., dim=48\]"):
        transmla_from_gqa(gqa, torch.randn(4, 10))
    with pytest.raises(ValueError, match="calib must be finite"):
        transmla_from_gqa(gqa, torch.full((2, 3, DIM), float("nan")))
    with pytest.raises(ValueError, match="qk_norm"):
        transmla_from_gqa(Attention(DIM, 4, qk_norm=True), x)
    with pytest.raises(TypeError, match="effattn.nn.Attention"):
        transmla_from_gqa(torch.nn.Linear(2, 2), x)
    with pytest.raises(TypeError, match="Llama-style"):
        attention_from_llama(torch.nn.Linear(2, 2))


def test_hf_llama_layer_converts():
    """A random-weight HF Llama (GQA): layer 1's attention read by attention_from_llama equals HF's
    output on the hidden states HF gives it; compressed by TransMLA the error falls with rank and is
    float rounding at full rank."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        initializer_range=0.2,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    seen = {}

    def hook(mod, args, kwargs, out):
        seen["x"], seen["y"] = kwargs.get("hidden_states", args[0] if args else None), out[0]

    h = model.model.layers[1].self_attn.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 33)))
    h.remove()
    x, y = seen["x"], seen["y"]
    attn = attention_from_llama(model.model.layers[1].self_attn)
    with torch.no_grad():
        assert_fp32_close(attn(x)[0], y)
        W = transmla_latent_width(attn, 1)
        errs = [rel_rms(transmla_from_gqa(attn, x, rank=r)(x)[0], y) for r in (W // 4, W // 2, W)]
        assert errs[0] > errs[1] > errs[2], errs
        assert_fp32_close(transmla_from_gqa(attn, x, rope_heads=2)(x)[0], y)
