"""The analytic model's formulas on hand-computed cases."""

from __future__ import annotations

import doctest
import math

import pytest

import effattn.dist.model as model_module
from effattn.dist.model import (
    H100_CLUSTER,
    METHODS,
    Hardware,
    Workload,
    estimate,
    markdown_table,
    ring_min_block,
    sweep,
)

# 1 TFLOP/s, 1 GB/s inside nodes of 4, 0.1 GB/s across; T=1024, 2 heads of 8, bf16, non-causal
HW = Hardware("toy", flops=1e12, intra_bw=1e9, inter_bw=1e8, devices_per_node=4, efficiency=1.0)
W = Workload(seq_len=1024, heads=2, kv_heads=2, head_dim=8, causal=False)


def test_ring_hand_computed():
    e = estimate("ring", 4, W, HW)
    # F = 4 * 1024^2 * 2 * 8 = 67,108,864 FLOPs; per device / 4 at 1e12 FLOP/s
    assert e.compute_s == pytest.approx(67_108_864 / 4 / 1e12)
    # block c = 256: K+V = 2 * 256 * 2 * 8 * 2 bytes = 16,384 per step, 3 steps at 1e9 B/s
    assert e.comm_s == pytest.approx(3 * 16_384 / 1e9)
    step_compute = 67_108_864 / 4 / 1e12 / 4
    assert e.exposed_comm_s == pytest.approx(3 * (16_384 / 1e9 - step_compute))
    assert e.total_s == pytest.approx(e.compute_s + e.exposed_comm_s)
    assert e.bytes_sent == 3 * 16_384


def test_ring_overlap_condition():
    # c_min = R / W = 1e12 / 1e9 = 1000 tokens: a block of 1024 hides, 256 does not
    assert ring_min_block(HW, W, 4) == pytest.approx(1000.0)
    w_long = Workload(seq_len=4096, heads=2, kv_heads=2, head_dim=8, causal=False)
    assert estimate("ring", 4, w_long, HW).exposed_comm_s == 0.0  # c = 1024 >= 1000
    assert estimate("ring", 4, W, HW).exposed_comm_s > 0  # c = 256 < 1000
    # causal halves the compute per block: the block must be twice as long; GQA 2 -> 1 kv head halves it
    assert ring_min_block(HW, Workload(seq_len=1, heads=2, kv_heads=2, head_dim=8, causal=True), 4) == 2000.0
    assert ring_min_block(HW, Workload(seq_len=1, heads=2, kv_heads=1, head_dim=8, causal=False), 4) == 500.0
    # across nodes the ring is paced by the 10x slower link
    assert ring_min_block(HW, W, 8) == pytest.approx(10_000.0)


def test_token_ring_hand_computed():
    e = estimate("token_ring", 4, W, HW)
    q = 256 * 2 * 8 * 2  # 8,192 bytes forward per step
    o = 256 * 2 * (8 * 2 + 4)  # 10,240 bytes (o in bf16 + float32 lse) backward per step
    assert e.comm_s == pytest.approx(3 * o / 1e9)
    assert e.bytes_sent == 3 * (q + o)
    # both directions at once: less per-step time than the ring's K+V when H_kv = H
    assert e.comm_s < estimate("ring", 4, W, HW).comm_s


def test_ulysses_hand_computed():
    e = estimate("ulysses", 2, W, HW)
    data = 512 * (2 * 2 + 2 * 2) * 8 * 2  # q, k, v in and o out: 65,536 bytes per device
    assert e.bytes_sent == pytest.approx(data / 2)
    assert e.comm_s == pytest.approx(data / 2 / 1e9)
    assert e.total_s == pytest.approx(e.compute_s + e.comm_s)  # not overlapped
    bad = estimate("ulysses", 4, W, HW)  # more devices than heads
    assert not bad.feasible and math.isnan(bad.total_s) and "USP" in bad.note


def test_lasp_hand_computed():
    e = estimate("lasp2", 4, W, HW)
    flops = 1024 * 2 * (4 * 64 * 8 + 4 * 8 * 8)  # 2,621,440
    assert e.compute_s == pytest.approx(flops / 4 / 1e12)
    state = 4 * 2 * 8 * 8  # float32 [B, H, D, D]: 512 bytes
    assert e.comm_s == pytest.approx(3 * state / 1e9)
    # independent of the sequence length
    assert estimate("lasp2", 4, Workload(seq_len=10**6, heads=2, kv_heads=2, head_dim=8), HW).comm_s == e.comm_s
    seq = estimate("lasp1", 4, W, HW)
    assert seq.compute_s == pytest.approx(flops / 1e12)  # no speed-up


def test_h100_sweep_shape_and_crossovers():
    w = Workload(seq_len=2**20)
    rows = sweep(w)
    assert len(rows) == 8 * len(METHODS)
    by = {(e.method, e.devices): e for e in rows}
    assert by[("ring", 8)].exposed_comm_s == 0.0  # NVLink, 131k-token blocks
    assert by[("ring", 1024)].exposed_comm_s > 0  # 1k-token blocks over InfiniBand
    assert not by[("ulysses", 64)].feasible and by[("ulysses", 32)].feasible
    assert by[("lasp2", 1024)].total_s < by[("ring", 1024)].total_s
    assert H100_CLUSTER.rate == pytest.approx(989e12 * 0.75)
    table = markdown_table(rows, w)
    assert table.count("\n") == len(rows) + 1 and "needs devices <= heads" in table


def test_bad_input():
    with pytest.raises(ValueError, match="method"):
        estimate("nope", 4, W, HW)
    with pytest.raises(ValueError, match="devices"):
        estimate("ring", 0, W, HW)


def test_docstring_examples():
    assert doctest.testmod(model_module).failed == 0
