"""StreamingLLM: attention sinks plus a window of recent tokens.

Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024). The
first ``sinks`` tokens of the sequence collect a large share of attention whatever their content
("attention sinks"); keeping them next to the ``budget - sinks`` most recent tokens keeps a model
stable at any length. Scoring rule (the same for every head)::

    score(j) = +inf            if pos(j) < sinks
             = pos(j)          otherwise      (keep the most recent)

Applied after the prefill and at every decoding step (the cache never exceeds ``budget``).
Keys are stored RoPE'd at their original positions (the paper re-indexes positions inside the
cache; here a token keeps the position it was encoded with).
"""

from __future__ import annotations

import torch

from effattn._checks import check_int
from effattn.kv.policy import Policy, ScoreContext, register_policy

__all__ = ["StreamingLLMPolicy"]


@register_policy("streaming_llm")
class StreamingLLMPolicy(Policy):
    """Keep the first ``sinks`` tokens and the most recent ones (``budget`` in all).

    Example::

        >>> from effattn.kv import make_policy
        >>> make_policy("streaming_llm", budget=32, sinks=4)
        StreamingLLMPolicy(budget=32, sinks=4)
    """

    per_head = False
    evicts_on_decode = True

    def __init__(self, *, budget: int | None = None, ratio: float | None = None, sinks: int = 4, head_budgets=None):
        super().__init__(budget=budget, ratio=ratio, head_budgets=head_budgets)
        self.sinks = check_int("sinks", sinks, 0)

    def extra_args(self) -> dict:
        return {"sinks": self.sinks}

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        s = ctx.positions.float()
        return s.masked_fill(ctx.first(self.sinks), float("inf"))
