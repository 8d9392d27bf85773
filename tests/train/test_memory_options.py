"""Each exact memory option of LMConfig gives the baseline's loss and gradients; Mesa's error is bounded."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from effattn.nn import LM, Int8SavedActivations, LMConfig, chunked_apply, reversible_stack
from tests.helpers import rel_rms

VOCAB = 41
BASE = dict(
    vocab_size=VOCAB,
    dim=32,
    n_layers=3,
    heads=4,
    mixers="attention,gla,sliding_window",
    mixer_kwargs={"sliding_window": {"window": 5}},
)


def _grads(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = LM(LMConfig(**BASE, **kw)).to(dtype)
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    logits, _ = model(ids[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "opt",
    [
        dict(checkpoint="block"),
        dict(checkpoint="mixer"),
        dict(checkpoint="mlp"),
        dict(chunked_mlp=5),
        dict(checkpoint="block", chunked_mlp=4),
    ],
)
def test_exact_options_equal_baseline(opt):
    loss0, g0 = _grads()
    loss, g = _grads(**opt)
    assert torch.equal(loss, loss0) or rel_rms(loss, loss0) < 1e-6
    for n in g0:
        assert rel_rms(g[n], g0[n]) < 1e-5, (opt, n, rel_rms(g[n], g0[n]))


def _two_stream_autograd(model, ids):
    """The reversible architecture run by plain autograd (every activation stored)."""
    x1 = x2 = model.embed(ids)
    for b in model.blocks:
        x1 = x1 + b.mixer(b.mixer_norm(x2), None, None)[0]
        x2 = x2 + b.mlp(b.mlp_norm(x1))
    return model.head(model.norm((x1 + x2) / 2))


@pytest.mark.parametrize("chunked_mlp", [0, 6])
def test_reversible_gradients_equal_autograd_float64(chunked_mlp):
    torch.manual_seed(0)
    model = LM(LMConfig(**BASE, reversible=True, chunked_mlp=chunked_mlp)).double()
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(2))
    logits, _ = model(ids)
    ref = _two_stream_autograd(model, ids)
    assert rel_rms(logits, ref) < 1e-12
    w = torch.randn(logits.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((logits * w).sum(), list(model.parameters()))
    refs = torch.autograd.grad((ref * w).sum(), list(model.parameters()))
    for (n, _), g, r in zip(model.named_parameters(), grads, refs):
        assert rel_rms(g, r) < 1e-10, (n, rel_rms(g, r))


def test_reversible_moe_aux_loss_gradient_flows_float64():
    """Reversible + MoE: the aux loss (LM.aux_loss) is an output of the reversible function and its gradient
    reaches the router through the recomputation, equal to plain autograd through the two streams."""
    torch.manual_seed(0)
    moe = dict(num_experts=4, top_k=2, aux_loss_coef=0.5, z_loss_coef=0.1)
    model = LM(LMConfig(**BASE, reversible=True, ffn="dense,moe", moe=moe)).double()
    ids = torch.randint(0, VOCAB, (2, 15), generator=torch.Generator().manual_seed(7))
    w = torch.randn(2, 15, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    logits, _ = model(ids)
    grads = torch.autograd.grad((logits * w).sum() + model.aux_loss(), list(model.parameters()))
    x1 = x2 = model.embed(ids)
    aux = []
    for b in model.blocks:
        x1 = x1 + b.mixer(b.mixer_norm(x2), None, None)[0]
        x2 = x2 + (b.mlp(b.mlp_norm(x1), None) if b.mlp.__class__.__name__ == "MoE" else b.mlp(b.mlp_norm(x1)))
        if b.mlp.__class__.__name__ == "MoE":
            aux.append(b.mlp.last_aux.loss)
    ref = model.head(model.norm((x1 + x2) / 2))
    assert rel_rms(logits, ref) < 1e-12
    refs = torch.autograd.grad((ref * w).sum() + sum(aux), list(model.parameters()))
    router = [n for n, _ in model.named_parameters() if "router" in n]
    assert router
    for (n, _), g, r in zip(model.named_parameters(), grads, refs):
        assert rel_rms(g, r) < 1e-10, (n, rel_rms(g, r))
    with pytest.raises(ValueError, match="lbl_scope"):
        bad = LM(LMConfig(**BASE, reversible=True, ffn="dense,moe", moe=dict(moe, lbl_scope="global")))
        bad(ids)


def test_reversible_decoding_equals_full_forward():
    torch.manual_seed(0)
    model = LM(LMConfig(**BASE, reversible=True)).double().eval()
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full, _ = model(ids)
        part, state = model(ids[:, :5])
        steps = [part]
        for t in range(5, 9):
            out, state = model(ids[:, t : t + 1], state)
            steps.append(out)
    assert rel_rms(torch.cat(steps, 1), full) < 1e-6  # recurrent states are float32 (DESIGN)
    assert model.generate(ids[:, :3], 4, temperature=0.0).shape == (1, 7)


def test_reversible_stack_with_frozen_and_shared_parameters():
    f, g = torch.nn.Linear(6, 6).double(), torch.nn.Linear(6, 6).double()
    f.bias.requires_grad_(False)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    fns, params = (
        [(f, g), (g, f)],
        [(list(f.parameters()), list(g.parameters()))] * 0
        + [(list(f.parameters()), list(g.parameters())), (list(g.parameters()), list(f.parameters()))],
    )
    y = reversible_stack(x, fns, params)
    gx, gw, gg = torch.autograd.grad(y.square().sum(), (x, f.weight, g.weight))
    y1 = x + f(x)
    y2 = x + g(y1)
    z1 = y1 + g(y2)
    z2 = y2 + f(z1)  # noqa: E702
    rx, rw, rg = torch.autograd.grad(((z1 + z2) / 2).square().sum(), (x, f.weight, g.weight))
    for a, b in ((gx, rx), (gw, rw), (gg, rg)):
        assert rel_rms(a, b) < 1e-10


def test_chunked_apply_equals_plain_with_odd_chunks():
    mlp = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.SiLU(), torch.nn.Linear(12, 5))
    x = torch.randn(3, 13, 5, requires_grad=True)
    for chunk in (1, 4, 13, 50):
        y = chunked_apply(mlp, x, chunk)
        g = torch.autograd.grad(y.square().sum(), (x, *mlp.parameters()))
        r = torch.autograd.grad(mlp(x).square().sum(), (x, *mlp.parameters()))
        for a, b in zip(g, r):
            assert rel_rms(a, b) < 1e-6
    with pytest.raises(ValueError, match="chunk"):
        chunked_apply(mlp, x, 0)


def test_mesa_storage_error_and_gradient_bound():
    # each restored element is within s/254 of the original (s = per-channel scale >= max |x|)
    x = torch.randn(64, 48) * torch.linspace(0.1, 10, 48)
    with Int8SavedActivations(min_numel=1) as mesa:
        packed = mesa._pack(x)
    restored = mesa._unpack(packed)
    scale = packed[1]
    assert ((restored - x).abs() <= scale / 254 + 1e-6).all()
    assert packed[0].dtype == torch.int8
    # the LM with mesa: loss exact (forward untouched), gradients within a stated 5% relative RMS
    loss0, g0 = _grads()
    loss, g = _grads(mesa=True)
    assert rel_rms(loss, loss0) < 1e-6
    errs = {n: rel_rms(g[n], g0[n]) for n in g0}
    assert max(errs.values()) < 5e-2, errs
    assert max(errs.values()) > 0  # something was quantized


def test_mesa_never_reuses_the_int8_copy_of_a_freed_tensor():
    """A tensor freed in the forward leaves its address to the next one of its shape; the one-copy-per-tensor
    cache must not hand the new tensor the old one's int8 copy (it did: w.grad came out 35 here, not 36)."""
    w = torch.ones(256, 256, requires_grad=True)
    total = torch.zeros(())
    with Int8SavedActivations(min_numel=1):
        for i in range(8):
            a = torch.full((256, 256), float(i + 1))
            total = total + (w * a).sum()
            del a
    total.backward()
    assert torch.equal(w.grad, torch.full_like(w, 36.0))


@pytest.mark.parametrize("mesa", [False, True])
def test_mesa_frees_the_float_activations(mesa):
    """Under Mesa the graph holds int8 copies only: the float activations of a block die with the forward
    (what lowers the peak); without it the graph keeps them."""
    torch.manual_seed(0)
    model = LM(LMConfig(vocab_size=VOCAB, dim=64, n_layers=2, heads=4, mesa=mesa))
    seen = []
    hook = model.blocks[0].mlp.gate.register_forward_hook(lambda mod, inp, out: seen.append(weakref.ref(out)))
    ids = torch.randint(0, VOCAB, (2, 70), generator=torch.Generator().manual_seed(6))
    logits, _ = model(ids)
    hook.remove()
    gc.collect()
    assert (seen[0]() is None) == mesa
    logits.sum().backward()


def test_mesa_keeps_parameters_and_running_scales():
    torch.manual_seed(0)
    model = LM(LMConfig(**BASE, mesa=True))
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(5))
    for _ in range(2):
        model(ids)[0].sum().backward()
    mesa = model.blocks.int8_saved_activations
    assert mesa.running and mesa.stats["saved_bytes"] < 0.3 * mesa.stats["float_bytes"]


def test_bad_memory_options():
    with pytest.raises(ValueError, match="checkpoint"):
        LMConfig(checkpoint="everything")
    with pytest.raises(ValueError, match="reversible"):
        LMConfig(reversible=True, checkpoint="block")
    with pytest.raises(ValueError, match="chunked_mlp"):
        LMConfig(chunked_mlp=-1)
    with pytest.raises(TypeError, match="mesa"):
        LMConfig(mesa="yes")


def test_checkpoint_with_moe_layers_equals_baseline():
    moe = dict(ffn="dense,moe", moe={"num_experts": 4, "top_k": 2})
    g0 = _grads(**moe)[1]
    g = _grads(checkpoint="mlp", **moe)[1]
    for n in g0:
        assert rel_rms(g[n], g0[n]) < 1e-5, n
