"""The sequence-parallel LM (attention + sliding window + a linear mixer) equals the single-process one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effattn.dist import sequence_parallel, shard_sequence, spawn
from effattn.nn import LM, LMConfig

T, VOCAB = 24, 37
# window 9 is longer than a shard at P=4 (6 tokens): the halo comes from two ranks
CFG = dict(
    vocab_size=VOCAB,
    dim=32,
    n_layers=3,
    heads=4,
    mixers=["attention", "sliding_window", "gla"],
    mixer_kwargs={"sliding_window": {"window": 9}},
    max_seq_len=64,
)


def _model_and_data():
    torch.manual_seed(0)
    lm = LM(LMConfig(**CFG))
    ids = torch.randint(0, VOCAB, (2, T + 1), generator=torch.Generator().manual_seed(1))
    return lm, ids[:, :-1], ids[:, 1:]


def _worker(rank, world, methods):
    out = {}
    for attention in methods:
        lm, inp, tgt = _model_and_data()
        with sequence_parallel(attention=attention):
            logits, _ = lm(shard_sequence(inp))
        # each rank's share of the global mean
        loss = F.cross_entropy(logits.flatten(0, 1), shard_sequence(tgt).flatten(), reduction="sum") / tgt.numel()
        loss.backward()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        grads = {}
        for name, p in lm.named_parameters():
            g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            torch.distributed.all_reduce(g)
            grads[name] = g
        out[attention] = (total, grads)
    return out


def _rel(x, ref):
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("world,methods", [(2, ["ring", "ulysses"]), (4, ["ring", "token_ring", "ulysses"])])
def test_sp_lm_matches_single_process(world, methods):
    results = spawn(_worker, world, methods, timeout=120)
    lm, inp, tgt = _model_and_data()
    logits, _ = lm(inp)
    loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
    loss.backward()
    for attention in methods:
        total, grads = results[0][attention]
        assert _rel(total, loss.detach()) < 1e-5, (attention, total, loss)
        for name, p in lm.named_parameters():
            assert _rel(grads[name], p.grad) < 1e-4, (attention, name, _rel(grads[name], p.grad))


def _unsupported(rank, world):
    torch.manual_seed(0)
    lm = LM(LMConfig(vocab_size=VOCAB, dim=32, n_layers=1, heads=4, mixers=["routing"]))
    ids = torch.randint(0, VOCAB, (1, 8))
    try:
        with sequence_parallel():
            lm(shard_sequence(ids))
    except ValueError as e:
        return str(e)
    return "no error"


def test_unsupported_mixer_raises_on_every_rank():
    msgs = spawn(_unsupported, 2, timeout=60)
    assert all("sequence" in m and "routing" in m and "k-means" in m for m in msgs), msgs


def test_context_needs_a_process_group():
    with pytest.raises(RuntimeError, match="not initialized"):
        with sequence_parallel():
            pass
    with pytest.raises(ValueError, match="attention must be one of"):
        with sequence_parallel(attention="nope"):
            pass


def test_sequence_parallel_names_the_function_not_a_module():
    import importlib

    import effattn.dist

    assert (
        callable(effattn.dist.sequence_parallel)
        and effattn.dist.sequence_parallel.__module__ == "effattn.dist.sp_context"
    )
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("effattn.dist.sequence_parallel")
