"""Synthetic tasks for the quality side of the comparison: MQAR (recall) and ListOps (reasoning)."""

from effattn.bench.tasks.listops import make_listops
from effattn.bench.tasks.mqar import make_mqar

__all__ = ["make_listops", "make_mqar"]
