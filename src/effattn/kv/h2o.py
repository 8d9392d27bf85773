"""H2O: Heavy-Hitter Oracle, accumulated attention plus a recent window.

Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models" (NeurIPS 2023). A few tokens ("heavy hitters") receive most of the attention mass over the
whole generation; H2O keeps those with the largest accumulated attention, and the most recent
tokens, evicting greedily one token per decoding step. Scoring rule, per kv head ``h`` (the query
heads of a GQA group averaged)::

    acc_h(j) = sum_{i seen so far, i >= j} A_h[i, j],   A_h[i] = softmax_j(q_i k_j^T / sqrt(D))
    score_h(j) = +inf if j is among the ``recent`` newest tokens, else acc_h(j)

``A`` is computed over the tokens in the cache when query ``i`` arrived (evicted keys no longer
receive attention, as in the paper's greedy algorithm). ``recent`` defaults to half the budget
(the paper's equal heavy-hitter / recent split). Applied after the prefill and at every step.
"""

from __future__ import annotations

import torch

from effattn._checks import check_float
from effattn.kv.policy import Policy, ScoreContext, register_policy

__all__ = ["H2OPolicy"]


def recent_count(budget: int, recent_fraction: float) -> int:
    """Tokens of the recent window inside a head's ``budget``."""
    return min(budget, int(round(budget * recent_fraction)))


@register_policy("h2o")
class H2OPolicy(Policy):
    """Keep heavy hitters (largest accumulated attention) and a recent window, per kv head.

    ``recent_fraction``: share of each head's budget given to the recent window (default 0.5).

    Example::

        >>> from effattn.kv import make_policy
        >>> make_policy("h2o", budget=64, recent_fraction=0.25)
        H2OPolicy(budget=64, recent_fraction=0.25)
    """

    per_head = True
    evicts_on_decode = True

    def __init__(
        self,
        *,
        budget: int | None = None,
        ratio: float | None = None,
        recent_fraction: float = 0.5,
        head_budgets=None,
    ):
        super().__init__(budget=budget, ratio=ratio, head_budgets=head_budgets)
        self.recent_fraction = check_float("recent_fraction", recent_fraction, 0.0, 1.0)

    def extra_args(self) -> dict:
        return {"recent_fraction": self.recent_fraction}

    def accumulate(self, ctx: ScoreContext) -> torch.Tensor:
        """Accumulated attention ``[B, H_kv, T]`` after the new queries."""
        return ctx.state.get("acc", torch.zeros_like(ctx.key_mask, dtype=torch.float32)) + ctx.accumulated_attention()

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        acc = self.accumulate(ctx)
        ctx.new_state["acc"] = acc
        scores = acc.clone()
        for h, b in enumerate(ctx.budgets):
            keep_recent = ctx.recent(recent_count(b, self.recent_fraction))[:, h]
            scores[:, h] = scores[:, h].masked_fill(keep_recent, float("inf"))
        return scores
