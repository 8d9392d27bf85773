"""``effattn bench dist`` end to end at tiny sizes (rows, files, byte counts), and its byte counter."""

from __future__ import annotations

import json

import torch

from effattn.__main__ import main
from effattn.bench import dist as dist_bench
from effattn.dist import spawn


def test_tiny_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    main(["bench", "dist", "--lengths", "64", "--world-sizes", "1,2", "--repeats", "1", "--out", str(out)])
    payload = json.loads((out / "dist.json").read_text())
    rows = payload["rows"]
    assert {(r["method"], r["world"]) for r in rows} == {(m, p) for m in dist_bench.METHODS for p in (1, 2)}
    assert not [r for r in rows if "error" in r]
    by = {(r["method"], r["world"]): r for r in rows}
    for m in dist_bench.METHODS:
        assert by[(m, 1)]["mb_sent_per_rank"] == 0  # one rank sends nothing
        assert by[(m, 2)]["mb_sent_per_rank"] > 0
    # ring, P=2, T=64: forward passes K and V (32 x 8 x 64 float32 each) once, the backward K, V, dK, dV
    kv = 32 * dist_bench.HEADS * dist_bench.HEAD_DIM * 4
    assert by[("ring", 2)]["mb_sent_per_rank"] * 2**20 >= 2 * kv
    assert (out / "dist.png").stat().st_size > 1000
    assert (out / "dist_model.png").stat().st_size > 1000
    model = (out / "dist_model.md").read_text()
    assert "| 1024 |" in model and "ring c_min" in model


def _count(rank, world):
    with dist_bench.counting_bytes(world) as c:
        torch.distributed.all_gather([torch.zeros(10) for _ in range(world)], torch.ones(10))
        torch.distributed.all_reduce(torch.ones(8))
        if rank == 0:
            torch.distributed.send(torch.ones(3), 1)
        else:
            torch.distributed.recv(torch.zeros(3), 0)
    return c.sent


def test_byte_counter():
    sent = spawn(_count, 2, timeout=30)
    # all-gather: (P-1) * 40 bytes; all-reduce: 2 (P-1)/P * 32 bytes; send: 12 bytes on rank 0
    assert sent == [40 + 32 + 12, 40 + 32]
