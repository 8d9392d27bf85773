"""RecurrentMemoryLM (RMT with memory tokens through the whole stack, issue #18): decoding and split calls equal
one call, the memory is the only path between segments, causality, truncated backprop, bounded state,
generate, bad input."""

from __future__ import annotations

import pytest
import torch

from effattn.nn import LMConfig, RecurrentMemoryLM


def model(mixers="attention", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = LMConfig(vocab_size=32, dim=16, n_layers=2, heads=2, mixers=mixers)
    return RecurrentMemoryLM(cfg, **{"num_memory": 3, "segment": 5, **kw})


@pytest.mark.parametrize("mixers", ["attention", "gated_deltanet"])
def test_tokens_and_split_calls_equal_one_call(mixers):
    m = model(mixers).eval()
    ids = torch.randint(0, 32, (2, 23))
    full, st = m(ids)
    for step in (1, 3, 7):
        s, outs = None, []
        for t in range(0, 23, step):
            o, s = m(ids[:, t : t + step], s)
            outs.append(o)
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s["mem"], st["mem"], rtol=1e-5, atol=1e-5)
        assert s["count"] == st["count"] == 23 % 5


def test_memory_is_the_only_path_between_segments():
    m = model().eval()
    a = torch.randint(0, 32, (1, 10))
    b = a.clone()
    b[:, :5] = (a[:, :5] + 1) % 32  # segment 0 differs, segment 1 is the same
    la, sa = m(a[:, :5])
    lb, sb = m(b[:, :5])
    assert sa["blocks"] is None and sb["blocks"] is None  # a full segment leaves only the memory
    assert not torch.allclose(m(a[:, 5:], sa)[0], m(b[:, 5:], sb)[0], atol=1e-4)  # it carries segment 0
    swapped = dict(sb, mem=sa["mem"])
    torch.testing.assert_close(m(b[:, 5:], swapped)[0], m(a[:, 5:], sa)[0])  # and nothing else does


def test_causal_within_and_across_segments():
    m = model().eval()
    ids = torch.randint(0, 32, (1, 17))
    base, _ = m(ids)
    for t in (2, 4, 5, 12):
        other = ids.clone()
        other[:, t] = (ids[:, t] + 7) % 32
        changed, _ = m(other)
        torch.testing.assert_close(changed[:, :t], base[:, :t])
        assert (changed[:, t:] - base[:, t:]).abs().max() > 1e-5


def test_truncated_backprop_and_learned_memory():
    """The memory is detached after every ``bptt_segments``-th write: a segment's loss reaches the segments
    before it back to the last cut, and the learned start memory and write embedding only through writes."""
    ids = torch.randint(0, 32, (1, 15))
    # (bptt_segments, the loss's segment) -> which segments' embeddings it reaches
    cases = {(None, 2): [0, 1, 2], (2, 1): [0, 1], (2, 2): [2], (1, 1): [1]}
    for (bptt, seg), reached in cases.items():
        m = model(bptt_segments=bptt).train()
        emb = []

        def keep(module, inputs, out, emb=emb):
            out.retain_grad()
            emb.append(out)

        m.embed.register_forward_hook(keep)
        m(ids)[0][:, 5 * seg : 5 * seg + 5].sum().backward()
        grads = [emb[s].grad for s in range(3)]  # one embedding call per segment
        assert [s for s in range(3) if grads[s] is not None and grads[s].abs().sum() > 0] == reached
        assert (m.memory_init.grad.abs().sum() > 0) == (reached[0] == 0)
        assert (m.write_pos.grad is not None and m.write_pos.grad.abs().sum() > 0) == (len(reached) > 1)


def test_zero_start_memory():
    """``start_memory="zeros"``: no learned ``Mem_0`` (the first segment reads zero tokens), the rest drawn as with
    the learned one; decoding token by token still equals one call, and the written memory is learned."""
    learned, zeros = model(), model(start_memory="zeros")
    assert "memory_init" not in dict(zeros.named_parameters()) and not zeros.memory_init.any()
    assert "memory_init" not in zeros.state_dict()
    torch.testing.assert_close(zeros.write_pos, learned.write_pos)
    zeros.eval()
    ids = torch.randint(0, 32, (1, 12))
    full, state = zeros(ids)[0], None
    for t in range(12):
        step, state = zeros(ids[:, t : t + 1], state)
        torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
    zeros.train()
    zeros(ids)[0][:, 5:].sum().backward()
    assert zeros.write_pos.grad.abs().sum() > 0
    from effattn.nn.mixers.rmt import RMTMixer

    layer = RMTMixer(16, 2).layer  # the per-layer mixer starts from zeros by default, the whole stack learns Mem_0
    assert layer.start_memory == "zeros" and RecurrentMemoryLM(LMConfig(32, 16, 1, 2)).start_memory == "learned"
    assert "memory_init" not in dict(layer.named_parameters()) and not layer.memory_init.any()
    assert "memory_init" in dict(RMTMixer(16, 2, start_memory="learned").layer.named_parameters())
    with pytest.raises(ValueError, match="start_memory"):
        model(start_memory="random")
    with pytest.raises(ValueError, match="start_memory"):
        RMTMixer(16, 2, start_memory="none")


def test_bounded_state_and_generate():
    m = model().eval()
    assert m.state_size(10_000) == m.state_size(100) > 0
    ids = torch.randint(0, 32, (2, 7))
    out = m.generate(ids, 9, temperature=0)
    seq = ids
    for _ in range(9):  # greedy, every step from the full forward
        seq = torch.cat([seq, m(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_bad_input(monkeypatch):
    m = model()
    with pytest.raises(ValueError, match="num_memory"):
        model(num_memory=0)
    with pytest.raises(ValueError, match="segment"):
        model(segment=0)
    with pytest.raises(ValueError, match="padding"):
        m(torch.zeros(1, 4, dtype=torch.long), valid=torch.tensor([[False, True, True, True]]))
    with pytest.raises(ValueError, match="state must be"):
        m(torch.zeros(1, 4, dtype=torch.long), [None, None])
    with pytest.raises(ValueError, match=r"state\['mem'\]"):
        m(torch.zeros(2, 4, dtype=torch.long), m(torch.zeros(1, 4, dtype=torch.long))[1])
    with pytest.raises(ValueError, match="ids must lie"):
        m(torch.full((1, 4), 40))
    import effattn.nn.recurrent_memory as module

    monkeypatch.setattr(module, "current_sequence_parallel", lambda: object())  # as inside sequence_parallel()
    with pytest.raises(ValueError, match="sequence shards"):
        m(torch.zeros(1, 4, dtype=torch.long))


def test_save_and_load_keep_the_options(tmp_path):
    pytest.importorskip("safetensors")
    from effattn.nn import LM

    m = model(num_memory=2, segment=3, bptt_segments=2).eval()
    m.save(tmp_path)
    back = RecurrentMemoryLM.load(tmp_path).eval()
    assert (back.num_memory, back.segment, back.bptt_segments, back.start_memory) == (2, 3, 2, "learned")
    ids = torch.randint(0, 32, (1, 11))
    torch.testing.assert_close(back(ids)[0], m(ids)[0])
    z = model(start_memory="zeros").eval()
    z.save(tmp_path / "zeros")
    back = RecurrentMemoryLM.load(tmp_path / "zeros").eval()
    assert back.start_memory == "zeros"
    torch.testing.assert_close(back(ids)[0], z(ids)[0])
    with pytest.raises(ValueError, match="unexpected"):
        LM.load(tmp_path)  # the plain LM has no memory weights
    LM(m.config).save(tmp_path / "plain")
    with pytest.raises(ValueError, match="recurrent_memory.json"):
        RecurrentMemoryLM.load(tmp_path / "plain")
