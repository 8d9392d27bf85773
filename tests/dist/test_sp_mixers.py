"""Every registered mixer under sequence parallelism: it either runs on sequence shards with the
single-process loss and gradients, or it declares why it cannot and the LM raises that on every rank.

The test enumerates ``effattn.nn.MIXERS``: a new mixer must either set ``supports_sequence_parallel``
(and pass the equality test here) or give ``sequence_parallel_unsupported`` (listed in docs/dist.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from effattn.dist import count_bytes, sequence_parallel, shard_sequence, spawn
from effattn.nn import LM, LMConfig, list_mixers

T, VOCAB, DIM, HEADS = 24, 37, 32, 4
# small settings where a default would be large for T=24 (windows shorter than the sequence, so the
# halo matters; Based's Taylor feature map on 4 dims)
KWARGS = {
    "sliding_window": {"window": 5},
    "based": {"window": 5, "feature_dim": 4},
    "mamba2": {"d_state": 8},
}
DOCS = Path(__file__).resolve().parents[2] / "docs" / "dist.md"


def _declaration(name: str):
    lm = _model(name)
    m = lm.blocks[0].mixer
    return bool(getattr(m, "supports_sequence_parallel", False)), getattr(m, "sequence_parallel_unsupported", None)


def _model(name: str, checkpoint: str = "none", n_layers: int = 1) -> LM:
    torch.manual_seed(0)
    cfg = LMConfig(
        vocab_size=VOCAB,
        dim=DIM,
        n_layers=n_layers,
        heads=HEADS,
        mixers=name,
        mixer_kwargs={name: KWARGS.get(name, {})} if isinstance(name, str) else KWARGS,
        max_seq_len=64,
        checkpoint=checkpoint,
    )
    return LM(cfg)


def _data():
    ids = torch.randint(0, VOCAB, (2, T + 1), generator=torch.Generator().manual_seed(1))
    return ids[:, :-1], ids[:, 1:]


SUPPORTED = [n for n in list_mixers() if _declaration(n)[0]]
UNSUPPORTED = [n for n in list_mixers() if not _declaration(n)[0]]


def _sp_loss_and_grads(lm, inp, tgt, attention="ring"):
    with sequence_parallel(attention=attention):
        logits, _ = lm(shard_sequence(inp))
    # each rank's share of the global mean; the sum over ranks is the single-process loss
    loss = F.cross_entropy(logits.flatten(0, 1), shard_sequence(tgt).flatten(), reduction="sum") / tgt.numel()
    loss.backward()
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    grads = {}
    for name, p in lm.named_parameters():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        torch.distributed.all_reduce(g)
        grads[name] = g
    return total, grads


def _single_loss_and_grads(lm, inp, tgt):
    logits, _ = lm(inp)
    loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
    loss.backward()
    return loss.detach(), {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in lm.named_parameters()}


def _rel(x, ref):
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item() if ref.norm() > 0 else x.norm().item()


def _check(got, ref, what):
    (loss, grads), (ref_loss, ref_grads) = got, ref
    assert _rel(loss, ref_loss) < 1e-5, (what, loss, ref_loss)
    for name, g in ref_grads.items():
        assert _rel(grads[name], g) < 1e-4, (what, name, _rel(grads[name], g))


def _worker(rank, world, names):
    inp, tgt = _data()
    return {name: _sp_loss_and_grads(_model(name), inp, tgt) for name in names}


def test_every_mixer_declares_whether_it_runs_on_sequence_shards():
    text = DOCS.read_text()
    for name in list_mixers():
        supported, reason = _declaration(name)
        assert supported != bool(reason), f"mixer {name!r}: set supports_sequence_parallel or give a reason, not both"
        if not supported:
            assert f"`{name}`" in text, f"docs/dist.md must list the mixer {name!r} that cannot run on sequence shards"
    assert SUPPORTED and UNSUPPORTED


@pytest.mark.parametrize("world,names", [(2, SUPPORTED), (4, ["mamba", "gated_deltanet", "based", "mla", "moh"])])
def test_supported_mixers_match_single_process(world, names):
    results = spawn(_worker, world, names, timeout=120)
    inp, tgt = _data()
    for name in names:
        _check(results[0][name], _single_loss_and_grads(_model(name), inp, tgt), name)


def _unsupported(rank, world, names):
    inp, _ = _data()
    out = {}
    for name in names:
        try:
            with sequence_parallel():
                _model(name)(shard_sequence(inp))
            out[name] = "no error"
        except ValueError as e:
            out[name] = str(e)
    return out


def test_unsupported_mixers_raise_on_every_rank_naming_mixer_and_reason():
    msgs = spawn(_unsupported, 2, UNSUPPORTED, timeout=60)
    for name in UNSUPPORTED:
        reason = _declaration(name)[1]
        for per_rank in msgs:
            assert repr(name) in per_rank[name] and reason in per_rank[name], per_rank[name]


# ------------------------------------------------------------------------------------------------
# activation checkpointing
# ------------------------------------------------------------------------------------------------

HYBRID = ["attention", "mamba", "sliding_window", "gated_deltanet"]


def _ckpt_worker(rank, world, cases):
    inp, tgt = _data()
    out = {}
    for attention, checkpoint in cases:
        lm = _model(HYBRID, checkpoint=checkpoint, n_layers=4)
        with count_bytes() as counter:
            got = _sp_loss_and_grads(lm, inp, tgt, attention)
        kv = sum(s for s, _ in counter.by_tag("kv"))  # ring K/V hops (forward and backward)
        q = sum(s for s, _ in counter.by_tag("q"))  # TokenRing query hops
        out[(attention, checkpoint)] = (got, kv, q)
    return out


def test_checkpointing_keeps_loss_and_grads_and_does_not_rerun_the_ring():
    # every method with block checkpoints; the mixer-level region with the ring (the same code path)
    cases = [(a, c) for a in ("ring", "token_ring", "ulysses") for c in ("none", "block")] + [("ring", "mixer")]
    results = spawn(_ckpt_worker, 2, cases, timeout=120)
    inp, tgt = _data()
    ref = _single_loss_and_grads(_model(HYBRID, n_layers=4), inp, tgt)
    for case in cases:
        for per_rank in results:
            _check(per_rank[case][0], ref, case)
        # the recompute reuses the ring's kept (o, lse): no more K/V (or query) traffic than without checkpoints
        for attention in ("ring", "token_ring"):
            if case[0] == attention:
                for per_rank in results:
                    assert per_rank[case][1:] == per_rank[(attention, "none")][1:], (case, per_rank[case][1:])


def _recompute_options(rank, world):
    inp, _ = _data()
    out = []
    for opts in ({"reversible": True}, {"streambp": 8}):
        torch.manual_seed(0)
        lm = LM(LMConfig(vocab_size=VOCAB, dim=DIM, n_layers=1, heads=HEADS, mixers="attention", **opts))
        try:
            with sequence_parallel():
                lm(shard_sequence(inp))
            out.append("no error")
        except ValueError as e:
            out.append(str(e))
    return out


def test_options_that_rebuild_blocks_outside_the_context_raise():
    for msgs in spawn(_recompute_options, 2, timeout=60):
        assert "reversible" in msgs[0] and "sequence parallelism" in msgs[0], msgs[0]
        assert "streambp" in msgs[1] and "sequence parallelism" in msgs[1], msgs[1]


def _twice_worker(rank, world):
    inp, tgt = _data()
    lm = _model("attention", checkpoint="block")
    with sequence_parallel(attention="ring"):
        logits, _ = lm(shard_sequence(inp))
    loss = F.cross_entropy(logits.flatten(0, 1), shard_sequence(tgt).flatten(), reduction="sum") / tgt.numel()
    loss.backward(retain_graph=True)  # the second backward recomputes the block again: the ring runs again
    loss.backward()
    grads = {}
    for name, p in lm.named_parameters():
        torch.distributed.all_reduce(p.grad)
        grads[name] = p.grad / 2
    return grads


def test_checkpointed_region_recomputed_twice():
    inp, tgt = _data()
    ref_loss, ref = _single_loss_and_grads(_model("attention"), inp, tgt)
    for grads in spawn(_twice_worker, 2, timeout=60):
        _check((ref_loss, grads), (ref_loss, ref), "retain_graph")
