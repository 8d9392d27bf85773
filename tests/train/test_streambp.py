"""StreamBP (LMConfig(streambp=c)): the sequence-chunked backward equals the plain backward; other
layer stacks are refused by name."""

import pytest
import torch
import torch.nn.functional as F

from effattn.nn import LM, LMConfig
from effattn.nn.streambp import streambp_block, streambp_block_backward
from effattn.train import LossModel, TrainConfig, train
from tests.helpers import rel_rms

VOCAB = 37
BASE = dict(
    vocab_size=VOCAB,
    dim=40,
    n_layers=3,
    heads=4,
    kv_heads=2,
    mixers="attention,sliding_window",
    mixer_kwargs={"sliding_window": {"window": 6}},
)


def _loss_and_grads(T, **kw):
    torch.manual_seed(0)
    model = LM(LMConfig(**BASE, **kw))
    ids = torch.randint(0, VOCAB, (2, T + 1), generator=torch.Generator().manual_seed(T))
    logits, _ = model(ids[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(("T", "chunk"), [(1, 4), (19, 3), (63, 16), (40, 64)])
def test_streambp_gradients_equal_plain_backward(T, chunk):
    loss0, g0 = _loss_and_grads(T)
    loss, g = _loss_and_grads(T, streambp=chunk)
    # the forward runs the same blocks: the loss is bitwise the baseline's
    assert torch.equal(loss, loss0)
    # float32 (the baseline's window layer runs on the tiled engine, StreamBP's chunks on SDPA): about 3e-7
    for n in g0:
        assert rel_rms(g[n], g0[n]) < 1e-5, (n, rel_rms(g[n], g0[n]))


@pytest.mark.parametrize("chunk", [1, 6, 50])
def test_streambp_gradients_equal_plain_backward_float64(chunk):
    """Causal attention with GQA in float64: both paths run SDPA in float64, so the regrouped sum
    equals autograd's to float64 rounding."""
    cfg = dict(vocab_size=VOCAB, dim=40, n_layers=2, heads=4, kv_heads=2)
    ids = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(5))
    out = []
    for kw in ({}, {"streambp": chunk}):
        torch.manual_seed(0)
        model = LM(LMConfig(**cfg, **kw)).double()
        logits, _ = model(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        out.append({n: p.grad for n, p in model.named_parameters()})
    for n in out[0]:
        assert rel_rms(out[1][n], out[0][n]) < 1e-12, (n, rel_rms(out[1][n], out[0][n]))


def test_streambp_block_backward_every_input_float32():
    """One block, the gradient of h and of each parameter, against autograd through block(h); with
    qk-norm, sinks and softcap on so each path of the chunked recomputation is exercised."""
    cfg = LMConfig(
        vocab_size=11,
        dim=24,
        n_layers=1,
        heads=3,
        mixer_kwargs={"attention": dict(qk_norm=True, sinks=True, softcap=5.0)},
    )
    torch.manual_seed(0)
    block = LM(cfg).blocks[0]
    with torch.no_grad():
        block.mixer.sinks.normal_()
    h = torch.randn(2, 29, 24, generator=torch.Generator().manual_seed(1), requires_grad=True)
    g = torch.randn(2, 29, 24, generator=torch.Generator().manual_seed(2))
    params = list(block.parameters())
    ref = torch.autograd.grad(block(h)[0], (h, *params), g)
    dh, grads = streambp_block_backward(block, h.detach(), g, 5, params)
    assert rel_rms(dh, ref[0]) < 1e-5
    for p, a, b in zip(params, grads, ref[1:]):
        assert rel_rms(a, b) < 1e-5, (p.shape, rel_rms(a, b))
    out = streambp_block(block, h, 5)
    assert torch.equal(out, block(h)[0])


def test_streambp_training_steps_equal_baseline(tmp_path):
    """Three optimizer steps through effattn.train: StreamBP (its loss in chunks too) tracks the baseline."""
    text = tmp_path / "text.txt"
    text.write_text("StreamBP regroups the backward by query chunk. " * 40)
    common = dict(data=[str(text)], steps=3, batch_size=2, seq_len=24, progress=False, plot=False, lr=3e-3)
    byte = dict(BASE, vocab_size=256)
    h0 = train(LMConfig(**byte), TrainConfig(**common))
    h1 = train(LMConfig(**byte, streambp=8), TrainConfig(**common))
    for a, b in zip(h0["loss"], h1["loss"]):
        assert abs(a - b) < 1e-5 * abs(a), (h0["loss"], h1["loss"])


def test_streambp_model_decodes_like_baseline():
    torch.manual_seed(0)
    a = LM(LMConfig(**BASE))
    torch.manual_seed(0)
    b = LM(LMConfig(**BASE, streambp=4))
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.generate(ids, 5, temperature=0.0), b.generate(ids, 5, temperature=0.0))


def test_streambp_loss_model_uses_chunked_loss():
    torch.manual_seed(0)
    model = LossModel(LM(LMConfig(**BASE, streambp=5)))
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(4))
    loss = model(ids[:, :-1], ids[:, 1:], ids[:, 1:].numel())
    logits, _ = model.lm(ids[:, :-1])
    ref = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).detach()
    assert abs(float(loss.detach()) - float(ref)) < 1e-5


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(mixers="attention,gla"), "gla"),
        (dict(mixers="mamba2"), "mamba2"),
        (dict(ffn="moe", moe=dict(num_experts=4, top_k=2)), "ffn"),
        (dict(checkpoint="block"), "checkpoint"),
        (dict(reversible=True), "reversible"),
        (dict(mesa=True), "mesa"),
        (dict(chunked_mlp=8), "chunked_mlp"),
    ],
)
def test_streambp_refuses_what_it_does_not_apply_to(kw, match):
    cfg = dict(BASE, **kw)
    with pytest.raises(ValueError, match=match):
        LMConfig(**cfg, streambp=8)


def test_streambp_refuses_bad_chunk_padding_and_mods():
    with pytest.raises(ValueError, match="streambp"):
        LMConfig(**BASE, streambp=-1)
    model = LM(LMConfig(**BASE, streambp=4))
    ids = torch.randint(0, VOCAB, (2, 9))
    with pytest.raises(ValueError, match="padding"):
        model(ids, valid=torch.ones(2, 9, dtype=torch.bool))
    modded = LM(
        LMConfig(
            vocab_size=VOCAB,
            dim=16,
            n_layers=1,
            heads=2,
            streambp=4,
            mixer_kwargs={"attention": dict(mask_mod=lambda b, h, q, kv: kv >= 0)},
        )
    )
    with pytest.raises(ValueError, match="mask_mod"):
        modded(ids)


@pytest.mark.parametrize("chunk", [1, 4, 13])
def test_streambp_attention_stats_path_float64(chunk):
    """Plain causal GQA attention on CPU takes the fast path (the forward keeps o and LSE, the backward
    runs only attention's backward): its gradients equal autograd through block(h) to float64 rounding,
    and so do those of the recomputing path it replaces."""
    from effattn.nn.streambp import uses_attention_stats

    cfg = LMConfig(
        vocab_size=11, dim=24, n_layers=1, heads=6, kv_heads=2, mixer_kwargs={"attention": dict(qk_norm=True)}
    )
    torch.manual_seed(0)
    block = LM(cfg).blocks[0].double()
    h = torch.randn(2, 27, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    g = torch.randn(2, 27, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    params = list(block.parameters())
    assert uses_attention_stats(block, h) and not uses_attention_stats(block, h.float().to(torch.bfloat16))
    ref_out = block(h)[0]
    ref = torch.autograd.grad(ref_out, (h, *params), g)
    out = streambp_block(block, h, chunk)
    assert rel_rms(out, ref_out) < 1e-14
    got = torch.autograd.grad(out, (h, *params), g)
    for a, b in zip(got, ref):
        assert rel_rms(a, b) < 1e-12, (a.shape, rel_rms(a, b))
    dh, grads = streambp_block_backward(block, h.detach(), g, chunk, params)  # no stats: recomputation
    assert rel_rms(dh, ref[0]) < 1e-12
