"""effattn.dist.spawn: results in rank order, a failing rank raises promptly in the parent."""

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist

import effattn.dist.launch as launch
from effattn.dist import RankError, free_port, spawn


def _sum_of_ranks(rank, world_size, scale):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return rank, world_size, t.item() * scale, torch.full((2,), float(rank))


def _rank1_raises_others_wait(rank, world_size):
    if rank == 1:
        raise ValueError("bad input on rank 1")
    if rank == 0:
        time.sleep(120)  # stuck outside any collective: only the parent can stop it
    dist.barrier()  # the others wait for rank 1 in a collective
    return rank


def _rank0_crashes(rank, world_size):
    if rank == 0:
        os._exit(3)
    dist.barrier()


@pytest.mark.parametrize("world_size", [2, 4])
def test_results_come_back_in_rank_order(world_size):
    out = spawn(_sum_of_ranks, world_size, 2.0)
    total = world_size * (world_size - 1) / 2
    assert [o[:3] for o in out] == [(r, world_size, 2 * total) for r in range(world_size)]
    for r, o in enumerate(out):
        assert torch.equal(o[3], torch.full((2,), float(r)))


def test_failing_rank_raises_promptly_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        spawn(_rank1_raises_others_wait, 4, timeout=datetime.timedelta(seconds=60), grace=1.0)
    assert time.monotonic() - start < 30  # far below the sleeping rank's 120 s and the group timeout
    err = info.value
    assert err.rank == 1 and err.exc_type == "ValueError"
    assert "bad input on rank 1" in str(err) and "_rank1_raises_others_wait" in str(err)
    assert isinstance(err.__cause__, ValueError)


def test_crashed_rank_is_reported():
    with pytest.raises(RankError, match=r"rank 0 of 2 (.|\n)*exited with code 3"):
        spawn(_rank0_crashes, 2, timeout=30, grace=1.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="world_size"):
        spawn(_sum_of_ranks, 0, 1.0)
    with pytest.raises(ValueError, match="start_method"):
        spawn(_sum_of_ranks, 2, 1.0, start_method="thread")
    assert 0 < free_port() < 65536


def _rank0_stuck(rank, world_size):
    if rank == 0:
        time.sleep(120)
    return rank


def test_deadline_stops_a_stuck_rank():
    start = time.monotonic()
    with pytest.raises(RankError, match=r"rank 0 of 2 raised Timeout(.|\n)*deadline of 1.0 s"):
        spawn(_rank0_stuck, 2, deadline=1.0)
    assert time.monotonic() - start < 30


def test_a_port_taken_before_the_store_binds_it_is_retried(monkeypatch):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = [busy.getsockname()[1]]  # the first attempt gets a port somebody else holds
        real = launch.free_port
        monkeypatch.setattr(launch, "free_port", lambda: ports.pop() if ports else real())
        assert [o[2] for o in spawn(_sum_of_ranks, 2, 1.0, timeout=20, grace=1.0)] == [1.0, 1.0]
        assert not ports
