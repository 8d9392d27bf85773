"""Smoke test of ``bench attention --device cuda`` on the CPU: the GPU comparison's code (patterns, FLOP
counts, rows, report) runs at tiny sizes with stand-ins for the GPU-only implementations. GPU speed
is not measured here."""

import argparse

import torch

from effattn import attention
from effattn.bench import attention as bench


def test_sparse_pattern_density_and_pair_count():
    bm = bench.sparse_block_mask(2000, "cpu", block=64)
    assert abs(bm.density() - bench.SPARSE_DENSITY) < 0.01
    assert bench._allowed_pairs("block_sparse", 2000, bm) == bm.to_dense().sum().item()
    tiles = bench._tile_table(bm)
    assert tiles.sum().item() == bm.kv_counts.sum().item() and tiles.diagonal().all()


def test_gpu_comparison_runs_with_stand_ins(tmp_path):
    def tiled(pattern, q, k, v, bm):  # stands in for triton and Flex: same masks, the tiled engine
        kw = {"causal": True} if pattern == "causal" else {"block_mask": bm}
        return lambda: attention(q, k, v, backend="tiled", **kw)

    def sdpa_causal(pattern, q, k, v, bm):  # stands in for flash_attn_func (same [B, T, H, D] layout)
        if pattern != "causal":
            raise ValueError("skipped: FlashAttention-2 has no block-sparse mask")
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        return lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)

    args = argparse.Namespace(device="cpu", lengths="256,384", repeats=1, out=str(tmp_path), forward_only=False)
    rows = bench.run_gpu(
        args,
        dtype=torch.float32,
        runners={"triton": tiled, "flex": tiled, "fa2": sdpa_causal},
        heads=2,
        tokens=512,
        head_dims=(16,),
    )
    assert len(rows) == 2 * 2 * len(bench.GPU_IMPLS)
    ok = [r for r in rows if "error" not in r]
    assert {(r["pattern"], r["impl"]) for r in ok} == {
        ("causal", "triton"), ("causal", "fa2"), ("causal", "sdpa"), ("causal", "sdpa_flash"), ("causal", "flex"),
        ("block_sparse", "triton"), ("block_sparse", "flex"),
    }  # fmt: skip
    assert all(r["fwd_tflops"] > 0 and r["fwdbwd_tflops"] > 0 for r in ok)
    skipped = [r for r in rows if "error" in r]
    assert all("skipped" in r["error"] for r in skipped)
    assert all(r["fwd_min_ms"] <= r["fwd_ms"] <= r["fwd_max_ms"] for r in ok)
    report = (tmp_path / "attention_gpu.md").read_text()
    assert "causal D=16 T=384: triton / fa2 fwd+bwd" in report and "(target >= 0.8: " in report
    assert "triton / sdpa_flash" not in report  # FA2 (its stand-in here) measured: FA2 is the baseline
    assert "block_sparse D=16 T=256: triton / flex fwd+bwd" in report and "(target >= 1.0: " in report


def test_flex_may_recompile_for_every_shape(tmp_path):
    """The compiled FlexAttention meets a new shape and BlockMask at every row: run_gpu raises dynamo's
    recompile limit (default 8) so that it does not fall back to eager after the eighth."""
    import torch._dynamo

    old = torch._dynamo.config.recompile_limit
    try:
        args = argparse.Namespace(device="cpu", lengths="64,96,128", repeats=1, out=str(tmp_path), forward_only=True)
        fail = lambda *a: (_ for _ in ()).throw(ValueError("skipped: stand-in"))  # noqa: E731
        bench.run_gpu(args, runners=dict.fromkeys(bench.GPU_IMPLS, fail), heads=1, tokens=128, head_dims=(16, 32))
        assert torch._dynamo.config.recompile_limit >= 4 * 3 * 2
    finally:
        torch._dynamo.config.recompile_limit = old


def test_the_gpu_command_line_reaches_run_gpu(monkeypatch, tmp_path):
    """``python -m effattn bench attention --device cuda ...`` as scripts/gpu_check.sh writes it: parsed by the
    real command line and handed to run_gpu, whose stand-in run then takes exactly these arguments."""
    from effattn.__main__ import main

    seen = []
    monkeypatch.setattr(bench, "run_gpu", lambda args: seen.append(args))
    main(["bench", "attention", "--device", "cuda", "--lengths", "256", "--repeats", "1", "--out", str(tmp_path)])
    monkeypatch.undo()
    (args,) = seen
    assert (args.device, args.lengths, args.repeats, args.forward_only) == ("cuda", "256", 1, False)
    args.device, args.forward_only = "cpu", True

    def tiled(pattern, q, k, v, bm):  # every impl's stand-in: the tiled engine on the same mask
        kw = {"causal": True} if pattern == "causal" else {"block_mask": bm}
        return lambda: attention(q, k, v, backend="tiled", **kw)

    rows = bench.run_gpu(args, dtype=torch.float32, runners=dict.fromkeys(bench.GPU_IMPLS, tiled), heads=1,
                         tokens=256, head_dims=(16,))  # fmt: skip
    assert len(rows) == 2 * len(bench.GPU_IMPLS) and all(r["fwd_tflops"] > 0 for r in rows)
    assert (tmp_path / "attention_gpu.json").exists()
