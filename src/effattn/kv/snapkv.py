"""SnapKV: the last queries of the prompt vote for the keys to keep.

Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation" (NeurIPS 2024).
The attention that the final ``window`` prompt queries (the "observation window", usually where
the question sits) pay to earlier keys predicts which keys generation will need. Scoring rule,
per kv head ``h`` (query heads of a GQA group averaged)::

    votes_h(j) = sum_{i in window} A_h[i, j]            for keys j before the window
    score_h(j) = pool_k(votes_h)(j)                     1-D max (or avg) pool over the keys before
                                                        the window, kernel k, stride 1
    score_h(j) = +inf                                   for keys j in the window (always kept)

then the top ``budget`` per head. Pooling keeps the neighbours of a selected key, so whole spans
survive. Applied after the prefill only; decoded tokens accumulate (as kvpress's ``SnapKVPress``).
"""

from __future__ import annotations

import torch

from effattn._checks import check_int
from effattn.kv.policy import Policy, ScoreContext, pool_scores, register_policy

__all__ = ["SnapKVPolicy"]


def check_pooling(pooling: str) -> str:
    if pooling not in ("max", "avg"):
        raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
    return pooling


@register_policy("snapkv")
class SnapKVPolicy(Policy):
    """Observation-window voting with pooling, per kv head; the window is always kept.

    Args: ``window`` queries that vote (and keys always kept; default 32, at most the budget),
    ``kernel`` pooling width (odd, default 5), ``pooling`` ``"max"`` or ``"avg"``.

    Example::

        >>> from effattn.kv import make_policy
        >>> make_policy("snapkv", budget=256, window=16)
        SnapKVPolicy(budget=256, window=16, kernel=5, pooling='max')
    """

    per_head = True
    evicts_on_decode = False

    def __init__(
        self,
        *,
        budget: int | None = None,
        ratio: float | None = None,
        window: int = 32,
        kernel: int = 5,
        pooling: str = "max",
        head_budgets=None,
    ):
        super().__init__(budget=budget, ratio=ratio, head_budgets=head_budgets)
        self.window = check_int("window", window, 1)
        self.kernel = check_int("kernel", kernel, 1)
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (a centred pooling window), got {kernel!r}")
        self.pooling = check_pooling(pooling)

    def extra_args(self) -> dict:
        return {"window": self.window, "kernel": self.kernel, "pooling": self.pooling}

    def observation_window(self, ctx: ScoreContext) -> int:
        """Queries in the observation window: ``window``, at most the new tokens."""
        return max(1, min(self.window, ctx.num_new))

    def window_attention(self, ctx: ScoreContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of the window queries ``[B, H_kv, w, T]`` and the window keys kept ``[B, H_kv, T]``
        (the ``min(w, budget)`` newest of each head)."""
        w = self.observation_window(ctx)
        a = ctx.attention(ctx.queries[:, -w:], ctx.query_positions[-w:])
        if not ctx.budgets or min(ctx.budgets) >= w:
            return a, ctx.recent(w)
        kept = [ctx.recent(min(w, b))[:, h] for h, b in enumerate(ctx.budgets)]
        return a, torch.stack(kept, dim=1)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        a, in_window = self.window_attention(ctx)
        before = ctx.key_mask & ~in_window
        votes = pool_scores(a.sum(dim=2), self.kernel, self.pooling, valid=before)
        return votes.masked_fill(~before, float("-inf")).masked_fill(in_window, float("inf"))
