"""Scale-out: sequence and context parallelism on ``torch.distributed`` (gloo on CPUs, NCCL on GPUs).

Every op works on local sequence shards in the ``[B, T/P, H, D]`` layout, takes ``group=None``
(the default process group) and equals the single-process op, forward and gradients, up to float32
rounding for any world size.
"""

from effattn.dist.launch import RankError, free_port, spawn

__all__ = [
    "RankError",
    "free_port",
    "spawn",
]
