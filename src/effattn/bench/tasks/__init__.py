"""Synthetic tasks: MQAR (recall), ListOps (reasoning), Pathfinder and document retrieval (Long Range Arena)
and passkey retrieval (long-context KV benchmark)."""

from effattn.bench.tasks.listops import make_listops
from effattn.bench.tasks.mqar import make_mqar
from effattn.bench.tasks.passkey import make_passkey
from effattn.bench.tasks.pathfinder import make_pathfinder
from effattn.bench.tasks.retrieval import make_retrieval

__all__ = ["make_listops", "make_mqar", "make_passkey", "make_pathfinder", "make_retrieval"]
