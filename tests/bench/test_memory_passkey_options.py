"""``effattn bench memory`` passkey training options: the context curriculum, the neural memories' step size
and forgetting-gate initialisation, heads, and weight decay on matrices only."""

from __future__ import annotations

import argparse

import torch

from effattn.bench.memory import add_arguments, build_model, optimizer, set_forget_bias, train_shape
from effattn.memory import NeuralMemory


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_curriculum_grows_the_longest_context():
    lo, hi, steps = 48, 192, 200
    plain = [train_shape(s, lo, hi, 768, 0) for s in range(steps)]
    assert plain == [train_shape(s, lo, hi, 768, 0, steps, 0.0) for s in range(steps)]  # 0: as before
    grown = [train_shape(s, lo, hi, 768, 0, steps, 0.5)[0] for s in range(steps)]
    assert grown[0] == lo
    for s, T in enumerate(grown):  # never past the linear ramp lo -> hi over the first 100 steps
        assert lo <= T <= min(hi, round(lo + (hi - lo) * s / 100))
    assert max(grown[:25]) < 90 < max(grown[100:])  # short early, the whole range after the ramp
    assert [T for T, _ in plain[100:]] == grown[100:]  # after the ramp: the same draws as without it
    assert all(bs == 768 // T for T, bs in (train_shape(s, lo, hi, 768, 0, steps, 0.5) for s in range(steps)))


def test_memory_gate_options_reach_every_neural_memory():
    args = _args("--window", "8", "--heads", "1", "--theta-max", "0.5", "--forget-bias", "-6", "--conv-size", "0")
    for name in ("titans_mal", "titans_mag", "titans_mac", "atlas"):
        mems = [m for m in build_model(name, args, 32).modules() if isinstance(m, NeuralMemory)]
        assert len(mems) == 2  # one per layer
        for m in mems:
            assert m.heads == 1 and m.theta_max == 0.5 and m.conv_size == 0
            alpha = torch.sigmoid(m.gate_proj.bias.view(-1, m.heads))
            assert torch.allclose(alpha[2], torch.sigmoid(torch.tensor(-6.0)))  # the forgetting gate
            assert torch.allclose(alpha[0], torch.sigmoid(torch.tensor(-1.0)))  # the step-size gate untouched
    default = [
        m for m in build_model("titans_mal", _args("--window", "8"), 32).modules() if isinstance(m, NeuralMemory)
    ]
    assert default[0].heads == 2 and default[0].theta_max == 1.0 and default[0].conv_size == 4
    assert not default[0].conv_values
    qkv = _args("--window", "8", "--conv-values")
    for name in ("titans_mal", "titans_mag", "titans_mac", "atlas"):
        mems = [m for m in build_model(name, qkv, 32).modules() if isinstance(m, NeuralMemory)]
        assert mems and all(m.conv_values and len(m.conv_weight) == 3 for m in mems)
    assert torch.allclose(default[0].gate_proj.bias.view(-1, 2)[2], torch.tensor(-3.0))
    assert set_forget_bias(build_model("swa", _args("--window", "8"), 32), -6.0) == 0  # no memory: untouched
    gdn = build_model("gated_deltanet", args, 32)
    assert gdn.config.heads == 1


def test_max_grad_norm_option_defaults_to_the_memory_default_and_none_turns_it_off():
    def clips(*argv):
        mems = [m for m in build_model("titans_mal", _args("--window", "8", *argv), 32).modules()]
        return {m.opts["max_grad_norm"] for m in mems if isinstance(m, NeuralMemory)}

    assert clips() == {1.0} == {NeuralMemory(8, 2).opts["max_grad_norm"]}
    assert clips("--max-grad-norm", "none") == {None}
    assert clips("--max-grad-norm", "0.25") == {0.25}


def test_weight_decay_on_matrices_only():
    model = build_model("titans_mal", _args("--window", "8"), 32)
    opt = optimizer(model, 1e-3, 0.1)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters()) and len(seen) == len(set(seen))
    for g in opt.param_groups:
        assert g["weight_decay"] == (0.1 if g["params"][0].dim() >= 2 else 0.0)
        assert len({p.dim() >= 2 for p in g["params"]}) == 1
    # a bias with zero gradient keeps its value; a matrix with zero gradient decays
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    mem = next(m for m in model.modules() if isinstance(m, NeuralMemory))
    b0, w0 = mem.gate_proj.bias.detach().clone(), mem.k_proj.weight.detach().clone()
    opt.step()
    assert torch.equal(mem.gate_proj.bias, b0)
    assert torch.allclose(mem.k_proj.weight, w0 * (1 - 1e-3 * 0.1))


class _Answers(torch.nn.Module):
    """Right answers (read from the prompt); the first ``bad`` rows put an inf logit on them."""

    def __init__(self, context: int, digits: int, bad: int):
        super().__init__()
        self.context, self.digits, self.bad = context, digits, bad

    def forward(self, ids):
        from effattn.bench.tasks.passkey import DEFAULT_VOCAB_SIZE, KEY

        logits = torch.zeros(*ids.shape, DEFAULT_VOCAB_SIZE)
        for b in range(ids.shape[0]):
            at = int((ids[b, : self.context] == KEY).nonzero()[0])
            for j in range(self.digits):  # the first ``bad`` rows: inf at the right digit (argmax still hits)
                logits[b, self.context - 1 + j, ids[b, at + 1 + j]] = float("inf") if b < self.bad else 1.0
        return (logits,)


def test_nonfinite_answers_are_counted_and_wrong():
    from effattn.bench.memory import passkey_accuracy

    args = _args("--window", "8", "--digits", "3")
    clean = passkey_accuracy(_Answers(40, 3, 0), 40, args, examples=8, seed=1)
    assert clean["digit_acc"] == 1.0 and clean["nonfinite"] == 0.0
    # 2 of 8 prompts with non-finite logits: counted, and wrong although their argmax is the right digit
    bad = passkey_accuracy(_Answers(40, 3, 2), 40, args, examples=8, seed=1)
    assert bad["nonfinite"] == 2 / 8 and bad["digit_acc"] == 6 / 8 and bad["key_acc"] == 6 / 8


def test_extra_models_build_what_they_name():
    """``infini_attention_conv``, ``rmt`` and ``rmt_stack`` (not in the default list): segments of ``--window``;
    the Miras memories with the passkey's memory options."""
    from effattn.bench.memory import EXTRA_MODELS, MEMORY_MODELS
    from effattn.nn import RecurrentMemoryLM

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert not set(EXTRA_MODELS) & set(p.parse_args([]).models.split(","))
    args = _args("--window", "8")
    infini = build_model("infini_attention_conv", args, 32)
    assert [b.mixer.conv_size for b in infini.blocks] == [4, 4] and infini.blocks[0].mixer.segment == 8
    assert build_model("infini_attention", args, 32).blocks[0].mixer.conv_size == 0
    assert build_model("rmt", args, 32).blocks[0].mixer.layer.segment == 8
    stack = build_model("rmt_stack", args, 32)
    assert isinstance(stack, RecurrentMemoryLM) and (stack.segment, stack.num_memory) == (8, 4)
    for rule in ("moneta", "yaad", "memora"):
        mem = build_model(rule, args, 32).blocks[0].mixer.memory
        assert mem.opts["retention"] == {"moneta": "lq", "yaad": "linear", "memora": "softmax"}[rule]
        assert (len(mem.weights), mem.chunk_size) == (args.depth, args.chunk_size)
    assert "infini_attention" in MEMORY_MODELS
