"""Smoke test of ``bench linear --device cuda`` on the CPU: the GPU comparison's code (inputs, the three
implementations, FLOP counts, rows, ratio notes, the report) runs at tiny sizes. effattn's ``torch`` and
``triton`` rows are the real calls (Triton in its interpreter, ``TRITON_INTERPRET=1`` set before triton is
imported); fla's chunk kernels need CUDA, so a stand-in (effattn's PyTorch form) takes their place.
GPU speed is not measured here."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402

from effattn.bench import linear_gpu  # noqa: E402
from effattn.bench.linear_flops import flops_delta_chunk  # noqa: E402
from effattn.linear import REGISTRY  # noqa: E402
from effattn.linear._triton import triton_linear_status  # noqa: E402

RUNS = triton_linear_status(torch.device("cpu"))


def test_flop_formulas():
    # one chunk of C=64, K=V=64: 4C^2K + C^2(K+V) + 2CK^2 + 6CKV + 2K^2V + 2C^2V = 18 * 64^3
    assert linear_gpu.gpu_flops("gated_delta_rule", 1, 64, 1, 64) == 18 * 64**3
    assert linear_gpu.gpu_flops("gated_delta_rule", 2, 100, 3, 64) == 2 * 3 * 2 * 18 * 64**3  # 2 chunks, padded
    assert linear_gpu.gpu_flops("simple_gla", 1, 64, 1, 128) == 2 * 64**2 * 128 * 2 + 4 * 64 * 128**2
    assert flops_delta_chunk(64, 1, 1, 64, 64, 64) == 18 * 64**3
    with pytest.raises(KeyError, match="no GPU benchmark"):
        linear_gpu.gpu_flops("mamba", 1, 64, 1, 64)


def test_fla_is_skipped_with_a_reason_off_cuda():
    x = {}
    reason = "not installed" if importlib.util.find_spec("fla") is None else "CUDA tensors only"
    with pytest.raises(RuntimeError, match=f"skipped: .*{reason}"):
        linear_gpu.fla_runner("gated_delta_rule", x, "cpu")


def _cli_args(monkeypatch, argv: list[str]) -> argparse.Namespace:
    """The namespace ``python -m effattn <argv>`` hands to the GPU comparison (which is replaced by a recorder)."""
    from effattn.__main__ import main

    seen = []
    monkeypatch.setattr(linear_gpu, "run_gpu", lambda args: seen.append(args))
    main(argv)
    monkeypatch.undo()
    assert len(seen) == 1, "bench linear --device cuda did not dispatch to linear_gpu.run_gpu"
    return seen[0]


def test_cuda_device_dispatches_to_the_gpu_comparison(monkeypatch):
    args = _cli_args(monkeypatch, ["bench", "linear", "--device", "cuda", "--repeats", "5", "--out", "x"])
    assert (args.device, args.lengths, args.repeats, args.out, args.forward_only) == ("cuda", None, 5, "x", False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    args = argparse.Namespace(device="cuda", lengths="64", repeats=1, out=str(tmp_path), forward_only=False)
    with pytest.raises(SystemExit, match="bench linear --device cuda: no CUDA device is visible"):
        linear_gpu.run_gpu(args)


@pytest.mark.skipif(not RUNS[0], reason=f"triton cannot run here: {RUNS[1]}")
def test_gpu_comparison_runs_with_a_stand_in_for_fla(tmp_path, monkeypatch):
    def fla_stand_in(op_name, x, device):  # same inputs, same output shape as fla's chunk kernel
        op = REGISTRY[op_name]
        return lambda: op.chunk(*x.values(), chunk_size=16, backend="torch")[0]

    # the arguments of the GPU run's command line (scripts/gpu_check.sh), on the CPU
    argv = ["bench", "linear", "--device", "cuda", "--lengths", "20", "--repeats", "1", "--out", str(tmp_path)]
    args = _cli_args(monkeypatch, argv)
    args.device = "cpu"
    rows = linear_gpu.run_gpu(
        args, dtype=torch.float32, runners={"fla": fla_stand_in}, heads=1, tokens=40, head_dims=(16,), warmup=1
    )
    assert len(rows) == len(linear_gpu.GPU_OPS) * len(linear_gpu.GPU_IMPLS)
    assert [r for r in rows if "error" in r] == []
    assert {(r["op"], r["impl"]) for r in rows} == {
        (op, impl) for op in linear_gpu.GPU_OPS for impl in linear_gpu.GPU_IMPLS
    }
    for r in rows:
        assert (r["T"], r["B"], r["D"]) == (20, 2, 16)
        assert r["fwd_tflops"] > 0 and r["fwdbwd_tflops"] > 0
        assert r["fwd_min_ms"] <= r["fwd_ms"] <= r["fwd_max_ms"]
        flops = linear_gpu.gpu_flops(r["op"], r["B"], r["T"], 1, 16)
        assert r["fwdbwd_tflops"] == pytest.approx(3 * flops / (r["fwdbwd_ms"] / 1e3) / 1e12)
    saved = json.loads((tmp_path / "linear_gpu.json").read_text())
    assert len(saved["rows"]) == len(rows)
    report = (tmp_path / "linear_gpu.md").read_text()
    assert "gated_delta_rule D=16 T=20: triton / fla fwdbwd_tflops" in report and "target >= 0.8" in report
    assert "simple_gla D=16 T=20: triton / torch fwdbwd_tflops" in report
    assert "backend='auto' at D=16: torch (auto: cpu tensors run the PyTorch chunk form" in report


def test_a_kernel_that_fails_to_compile_is_a_row_not_the_end_of_the_run(tmp_path, capsys):
    """Triton's CompilationError / OutOfResources are no RuntimeErrors: the row records the failure (the
    traceback goes to the log) and the run measures the next rows."""

    class OutOfResources(Exception):  # stands in for triton.runtime.errors.OutOfResources
        pass

    def failing(op_name, x, device):
        raise OutOfResources("out of resource: shared memory, Required: 262144, Hardware limit: 232448")

    def torch_form(op_name, x, device):
        return lambda: REGISTRY[op_name].chunk(*x.values(), chunk_size=16, backend="torch")[0]

    args = argparse.Namespace(device="cpu", lengths="20", repeats=1, out=str(tmp_path), forward_only=True)
    runners = {"triton": failing, "torch": torch_form, "fla": torch_form}
    rows = linear_gpu.run_gpu(args, dtype=torch.float32, runners=runners, heads=1, tokens=20, head_dims=(8,))
    assert len(rows) == len(linear_gpu.GPU_OPS) * len(linear_gpu.GPU_IMPLS)
    failed = [r for r in rows if "error" in r]
    assert {r["impl"] for r in failed} == {"triton"}
    assert failed[0]["error"].startswith("OutOfResources: out of resource: shared memory")
    assert all(r["fwd_tflops"] > 0 for r in rows if r["impl"] != "triton")
    assert "Traceback" in capsys.readouterr().out
