"""A2SF: accumulated attention with a forgetting factor.

Jo & Shin 2024, "A2SF: Accumulative Attention Scoring with Forgetting Factor for Token Pruning in
Transformer Decoder". H2O's accumulated score favours old tokens simply because they were
attended to by more queries; A2SF discounts older contributions by a forgetting factor
``lambda`` so that tokens are compared fairly. Scoring rule, per kv head ``h``::

    S_h(j) <- lambda * S_h(j) + A_h[i, j]      for every new query i, in order
    (at once: S_h(j) = sum_i lambda^(n - 1 - i) A_h[i, j], n = queries seen so far)
    score_h(j) = +inf if j is among the ``recent`` newest tokens, else S_h(j)

``lambda = 1`` gives H2O. As in the authors' code a recent window is kept (``recent_fraction`` of
the budget). Applied after the prefill and at every decoding step.
"""

from __future__ import annotations

import torch

from effattn._checks import check_float
from effattn.kv.h2o import H2OPolicy
from effattn.kv.policy import ScoreContext, register_policy

__all__ = ["A2SFPolicy"]


@register_policy("a2sf")
class A2SFPolicy(H2OPolicy):
    """H2O with a forgetting factor ``forgetting`` in ``(0, 1]`` on the accumulated attention.

    Example::

        >>> from effattn.kv import make_policy
        >>> make_policy("a2sf", ratio=0.5, forgetting=0.9)
        A2SFPolicy(ratio=0.5, recent_fraction=0.5, forgetting=0.9)
    """

    def __init__(
        self,
        *,
        budget: int | None = None,
        ratio: float | None = None,
        recent_fraction: float = 0.5,
        forgetting: float = 0.9,
        head_budgets=None,
    ):
        super().__init__(budget=budget, ratio=ratio, recent_fraction=recent_fraction, head_budgets=head_budgets)
        self.forgetting = check_float("forgetting", forgetting, 0.0, 1.0, lo_open=True)

    def extra_args(self) -> dict:
        return {"recent_fraction": self.recent_fraction, "forgetting": self.forgetting}

    def accumulate(self, ctx: ScoreContext) -> torch.Tensor:
        t = ctx.num_new
        lam = torch.tensor(self.forgetting, dtype=torch.float64)
        weights = (lam ** torch.arange(t - 1, -1, -1, dtype=torch.float64)).float()
        prev = ctx.state.get("acc", torch.zeros_like(ctx.key_mask, dtype=torch.float32))
        return prev * float(lam**t) + ctx.accumulated_attention(weights.to(ctx.keys.device))
