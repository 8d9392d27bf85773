"""The training loop: resume == uninterrupted (bit for bit), DDP / FSDP2 / sequence parallel == one
process with the same global batch, checkpoint errors never load partially, the CLI's errors."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from effattn.__main__ import main as cli_main
from effattn.dist import spawn
from effattn.nn import LM, LMConfig
from effattn.train import CheckpointError, TrainConfig, load_checkpoint, train
from tests.helpers import rel_rms

MODEL = dict(
    vocab_size=256,
    dim=24,
    n_layers=2,
    heads=2,
    mixers="attention,sliding_window",
    mixer_kwargs={"sliding_window": {"window": 5}},
)


def _text(path: Path) -> str:
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(", ")", ":", "\n", "    "]
    idx = torch.randint(0, len(words), (3000,), generator=g).tolist()
    path.write_text(" ".join(words[i] for i in idx))
    return str(path)


def _cfg(data, **kw):
    base = dict(data=[data], steps=4, batch_size=4, seq_len=16, warmup=1, progress=False, plot=False, lr=3e-3)
    base.update(kw)
    return TrainConfig(**base)


def _params(lm):
    return {n: p.detach().clone() for n, p in lm.named_parameters()}


def test_resume_equals_uninterrupted(tmp_path):
    data = _text(tmp_path / "t.txt")
    full = train(LMConfig(**MODEL), _cfg(data, steps=4, grad_accum=2, out_dir=str(tmp_path / "a"), save_every=2))
    part = train(
        LMConfig(**MODEL), _cfg(data, steps=4, grad_accum=2, out_dir=str(tmp_path / "b"), save_every=2, stop_after=3)
    )  # "killed" after step 3: the step-2 checkpoint survives
    assert (tmp_path / "b" / "latest").read_text().strip() == "ckpt-000002"
    assert part["loss"][:3] == full["loss"][:3]
    resumed = train(
        LMConfig(**MODEL), _cfg(data, steps=4, grad_accum=2, out_dir=str(tmp_path / "b"), save_every=2, resume=True)
    )
    assert resumed["loss"] == full["loss"]  # bit for bit, float32 on the CPU
    a, b = _params(full["model"]), _params(resumed["model"])
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_corrupt_and_mismatched_checkpoints_load_nothing(tmp_path):
    data = _text(tmp_path / "t.txt")
    out = tmp_path / "run"
    run = train(LMConfig(**MODEL), _cfg(data, steps=2, out_dir=str(out), save_every=2))
    ckpt = out / "ckpt-000002"
    names = [n for n, p in run["model"].named_parameters()]
    torch.manual_seed(1)
    fresh = LM(LMConfig(**MODEL))
    before = _params(fresh)
    # mismatched config
    with pytest.raises(CheckpointError, match="model config differs.*dim"):
        load_checkpoint(out, fresh, None, names, LMConfig(**dict(MODEL, dim=32)).to_dict())
    # mismatched train options on --resume
    with pytest.raises(CheckpointError, match="seq_len"):
        train(LMConfig(**MODEL), _cfg(data, steps=4, seq_len=8, out_dir=str(out), resume=True))
    # corrupt weights: one flipped byte
    raw = bytearray((ckpt / "model.safetensors").read_bytes())
    raw[-5] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(out, fresh, None, names, LMConfig(**MODEL).to_dict())
    after = _params(fresh)
    assert all(torch.equal(before[n], after[n]) for n in before)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nothing", fresh, None, names, LMConfig(**MODEL).to_dict())


@pytest.mark.parametrize("opt", [dict(chunked_loss=7), dict(checkpoint="block", chunked_mlp=5)])
def test_exact_memory_options_train_like_baseline(tmp_path, opt):
    data = _text(tmp_path / "t.txt")
    base = train(LMConfig(**MODEL), _cfg(data, steps=3))
    other = train(LMConfig(**MODEL, **opt), _cfg(data, steps=3))
    for a, b in zip(other["loss"], base["loss"]):
        assert abs(a - b) <= 1e-5 * abs(b)


def test_bf16_run_and_mesa_loss_close(tmp_path):
    data = _text(tmp_path / "t.txt")
    base = train(LMConfig(**MODEL), _cfg(data, steps=2))
    bf16 = train(LMConfig(**MODEL), _cfg(data, steps=2, dtype="bfloat16"))
    mesa = train(LMConfig(**MODEL, mesa=True), _cfg(data, steps=2))
    for a, b, c in zip(bf16["loss"], mesa["loss"], base["loss"]):
        assert abs(a - c) < 0.05 * c and abs(b - c) < 0.01 * c


def _dist_worker(rank, world, data, parallel, sp):
    torch.manual_seed(0)
    cfg = _cfg(data, steps=3, parallel=parallel, sequence_parallel=sp, grad_accum=1)
    h = train(LMConfig(**MODEL), cfg)
    lm = h["model"]
    # FSDP2 parameters are DTensor shards: gather the full tensors
    state = {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in lm.named_parameters()
    }
    return h["loss"], state


@pytest.mark.parametrize("parallel,sp", [("ddp", None), ("fsdp", None), ("none", "ring")])
def test_two_process_runs_equal_one_process(tmp_path, parallel, sp):
    data = _text(tmp_path / "t.txt")
    results = spawn(_dist_worker, 2, data, parallel, sp, timeout=120)
    single = train(LMConfig(**MODEL), _cfg(data, steps=3))
    ref = _params(single["model"])
    for losses, state in results:
        for a, b in zip(losses, single["loss"]):
            assert abs(a - b) <= 1e-5 * abs(b), (parallel, losses, single["loss"])
        for n in ref:
            assert rel_rms(state[n], ref[n]) < 1e-4, (parallel, n, rel_rms(state[n], ref[n]))


def test_bad_options_and_paths(tmp_path):
    data = _text(tmp_path / "t.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train(LMConfig(**MODEL), _cfg(str(tmp_path / "missing.txt")))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        train(LMConfig(**MODEL), _cfg(data, seq_len=40000))
    with pytest.raises(ValueError, match="vocab_size=50"):
        train(LMConfig(**dict(MODEL, vocab_size=50)), _cfg(data))
    with pytest.raises(ValueError, match="need a process group"):
        train(LMConfig(**MODEL), _cfg(data, parallel="ddp"))
    with pytest.raises(ValueError, match="save_every needs out_dir"):
        _cfg(data, save_every=2)
    with pytest.raises(ValueError, match="dtype"):
        _cfg(data, dtype="float8")
    with pytest.raises(SystemExit, match="not a file"):
        cli_main(["train", "--data", str(tmp_path / "nope.txt"), "--steps", "1", "--no-progress"])
    with pytest.raises(SystemExit, match="no checkpoint to resume"):
        cli_main(["train", "--data", data, "--out", str(tmp_path / "empty"), "--resume", "--no-progress"])
    with pytest.raises(SystemExit):
        cli_main(["train", "--checkpoint", "sometimes"])
    with pytest.raises(SystemExit, match="steps"):
        cli_main(["train", "--data", data, "--steps", "0"])


def test_cli_trains_plots_and_bin_data(tmp_path):
    ids = torch.randint(0, 300, (4000,), generator=torch.Generator().manual_seed(0)).to(torch.int32)
    ids.numpy().tofile(tmp_path / "ids.bin")
    out = tmp_path / "run"
    cli_main(
        [
            "train",
            "--data",
            str(tmp_path / "ids.bin"),
            "--bin-dtype",
            "int32",
            "--vocab-size",
            "300",
            "--layers",
            "1",
            "--dim",
            "16",
            "--heads",
            "2",
            "--mixers",
            "gla",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "8",
            "--out",
            str(out),
            "--no-progress",
            "--reversible",
            "--chunked-loss",
            "5",
        ]
    )
    hist = json.loads((out / "history.json").read_text())
    assert len(hist["loss"]) == 2 and hist["val"]
    assert (out / "loss.png").stat().st_size > 1000


def test_loop_runs_moe_balancing_hooks(tmp_path):
    """The loop resets the global load-balancing counts before each step (so they hold one global batch of
    grad_accum micro-batches) and takes the sigmoid routers' bias step after each optimizer step."""
    text = tmp_path / "t.txt"
    text.write_text("mixture of experts balance their load. " * 40)
    moe = dict(num_experts=4, top_k=2, router="sigmoid", lbl_scope="global")
    cfg = TrainConfig(data=[str(text)], steps=2, batch_size=2, grad_accum=2, seq_len=12, progress=False, plot=False)
    h = train(LMConfig(vocab_size=256, dim=16, n_layers=2, heads=2, ffn="dense,moe", moe=moe), cfg)
    layer = h["model"].blocks[1].mlp
    assert int(layer.lbl_counts[-1]) == 2 * 2 * 12  # tokens of the last step's two micro-batches only
    assert layer.router.bias.abs().sum() > 0  # the bias step ran
    off = train(
        LMConfig(vocab_size=256, dim=16, n_layers=2, heads=2, ffn="dense,moe", moe=moe),
        dataclasses.replace(cfg, moe_bias_rate=0.0),
    )
    assert off["model"].blocks[1].mlp.router.bias.abs().sum() == 0
