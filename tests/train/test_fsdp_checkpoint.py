"""FSDP2 checkpoints (gloo, world size 2): saved in the single-process format by rank 0, resumed by
broadcast from rank 0. Resume == uninterrupted bit for bit, FSDP2 -> one process and one process ->
FSDP2 portability, and a mismatched or corrupt checkpoint raises on every rank and loads nothing."""

import importlib
import json
import re
import shutil
from pathlib import Path

import torch

from effattn.dist import spawn
from effattn.nn import LM, LMConfig
from effattn.train import CheckpointError, TrainConfig, train
from tests.train.test_loop import MODEL

# MODEL ties the embedding and the head (the default): the gathered state dict holds that tensor
# twice, the checkpoint once. Step 3 starts from the step-2 checkpoint and uses its AdamW moments.
STEPS = dict(steps=3, save_every=2)


def _text(path: Path) -> str:
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(", ")", ":", "\n", "    "]
    path.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (3000,), generator=g).tolist()))
    return str(path)


def _cfg(data: str, **kw) -> TrainConfig:
    base = dict(data=[data], batch_size=4, seq_len=16, warmup=1, progress=False, plot=False, lr=3e-3)
    return TrainConfig(**dict(base, **kw))


def _params(lm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lm.named_parameters()}


def _gathered(lm) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in lm.named_parameters()}


def _fsdp_run(rank, world, data, out, kw):
    start = _latest(out)
    h = train(LMConfig(**MODEL), _cfg(data, parallel="fsdp", out_dir=out, **kw))
    assert kw.get("resume", False) == (start == "ckpt-000002")  # a resumed run found its checkpoint
    return h["loss"], _gathered(h["model"])


def _latest(out: str) -> str | None:
    p = Path(out) / "latest"
    return p.read_text().strip() if p.is_file() else None


def _fsdp_refused(rank, world, data, cases):
    """Each case resumes from a checkpoint that must be refused; returns (message, weights untouched)."""
    results = []
    for out, model_kw, kw in cases:
        torch.manual_seed(5)
        lm = LM(LMConfig(**model_kw))
        before = _params(lm)
        try:
            train(LMConfig(**model_kw), _cfg(data, parallel="fsdp", out_dir=out, resume=True, **kw), model=lm)
            results.append((None, False))
        except CheckpointError as e:
            after = _gathered(lm)  # sharded in place by fully_shard: gather to compare
            results.append((str(e), all(torch.equal(before[n], after[n]) for n in before)))
    return results


def _spawn(fn, *args):
    # FSDP2 imports these lazily (torch._dynamo on first sharding): import them once here, in the
    # parent, so each forked rank does not spend seconds (tens of seconds on a busy machine) on them
    for module in ("torch._dynamo", "torch.distributed.fsdp", "torch.distributed.checkpoint.state_dict"):
        importlib.import_module(module)
    return spawn(fn, 2, *args, timeout=60, deadline=240)


def _copy_checkpoint(src: Path, name: str, dst: Path) -> str:
    shutil.copytree(src / name, dst / name)
    (dst / "latest").write_text(name)
    return str(dst)


def test_fsdp_resume_equals_uninterrupted_and_resumes_in_one_process(tmp_path):
    data = _text(tmp_path / "t.txt")
    full = _spawn(_fsdp_run, data, str(tmp_path / "full"), STEPS)
    meta = json.loads((tmp_path / "full" / "ckpt-000002" / "meta.json").read_text())
    assert meta["aliases"] == {"lm.head.weight": "lm.embed.weight"}  # the tied head stored once, as in one process
    # a run killed after its step-2 checkpoint: the checkpoint alone in a fresh directory
    b = _copy_checkpoint(tmp_path / "full", "ckpt-000002", tmp_path / "b")
    resumed = _spawn(_fsdp_run, data, b, dict(STEPS, resume=True))
    for rank in range(2):
        assert resumed[rank][0] == full[rank][0]  # bit for bit, float32 on the CPU (steps 1-2 from the history)
        for n, t in full[rank][1].items():
            assert torch.equal(resumed[rank][1][n], t), n
    # FSDP2 -> one process: training goes on as the FSDP2 run did, to rounding (the two sum the
    # gradients in a different order)
    one_dir = _copy_checkpoint(tmp_path / "full", "ckpt-000002", tmp_path / "one")
    one = train(LMConfig(**MODEL), _cfg(data, out_dir=one_dir, resume=True, **STEPS))
    assert one["loss"][:2] == full[0][0][:2] and abs(one["loss"][2] - full[0][0][2]) <= 1e-5 * full[0][0][2]
    ref = _params(one["model"])
    for n, t in full[0][1].items():  # the last step used the checkpoint's AdamW moments as well
        assert (t - ref[n]).norm() <= 1e-4 * ref[n].norm(), n


def test_one_process_checkpoint_resumes_under_fsdp(tmp_path):
    data = _text(tmp_path / "t.txt")
    single = train(LMConfig(**MODEL), _cfg(data, out_dir=str(tmp_path / "full"), **STEPS))
    part = _copy_checkpoint(tmp_path / "full", "ckpt-000002", tmp_path / "part")
    ref = _params(single["model"])
    for losses, state in _spawn(_fsdp_run, data, part, dict(STEPS, resume=True)):
        assert losses[:2] == single["loss"][:2] and abs(losses[2] - single["loss"][2]) <= 1e-5 * single["loss"][2]
        for n in ref:
            assert (state[n] - ref[n]).norm() <= 1e-4 * ref[n].norm(), n


def test_fsdp_mismatched_or_corrupt_checkpoint_raises_on_every_rank_and_loads_nothing(tmp_path):
    data = _text(tmp_path / "t.txt")
    good = str(tmp_path / "run")
    train(LMConfig(**MODEL), _cfg(data, out_dir=good, steps=2, save_every=2))
    bad = Path(_copy_checkpoint(Path(good), "ckpt-000002", tmp_path / "corrupt"))
    raw = bytearray((bad / "ckpt-000002" / "optimizer.safetensors").read_bytes())
    raw[-3] ^= 0xFF  # one flipped byte
    (bad / "ckpt-000002" / "optimizer.safetensors").write_bytes(bytes(raw))
    cases = [
        (good, dict(MODEL, dim=32), dict(steps=4), "model config differs.*dim"),
        (good, MODEL, dict(steps=4, seq_len=8), "options differ.*seq_len"),
        (str(bad), MODEL, dict(steps=4), "corrupt"),
    ]
    results = _spawn(_fsdp_refused, data, [c[:3] for c in cases])
    for per_rank in results:
        for (msg, unchanged), case in zip(per_rank, cases):
            assert msg is not None and re.search(case[3], msg), (case[3], msg)
            assert unchanged, case[3]
