"""Synthetic tasks: MQAR (recall), ListOps (reasoning) and passkey retrieval (long-context KV benchmark)."""

from effattn.bench.tasks.listops import make_listops
from effattn.bench.tasks.mqar import make_mqar
from effattn.bench.tasks.passkey import make_passkey

__all__ = ["make_listops", "make_mqar", "make_passkey"]
