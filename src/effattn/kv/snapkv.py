"""SnapKV: the last queries of the prompt vote for the keys to keep.

Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation" (NeurIPS 2024).
The attention that the final ``window`` prompt queries (the "observation window", usually where
the question sits) pay to earlier keys predicts which keys generation will need. Scoring rule,
per kv head ``h`` (query heads of a GQA group averaged)::

    votes_h(j) = sum_{i in window} A_h[i, j]            for keys j before the window
    score_h(j) = pool_k(votes_h)(j)                     1-D average (or max) pool over the keys
                                                        before the window, odd kernel k, stride 1
    score_h(j) = +inf                                   for keys j in the window (always kept)

Pooling as the authors' code does it (``avg_pool1d(votes, k, stride=1, padding=k // 2)``, whose
``count_include_pad`` is on): the average is ``(1/k) * sum_{|j' - j| <= k//2} votes_h(j')`` where
keys outside the pooled range (the sequence edges, the window, masked or evicted slots) count as 0
and the divisor stays ``k`` at the edges; ``"max"`` is ``max_{|j' - j| <= k//2} votes_h(j')`` over
the pooled keys only. The paper's text does not fix the pooling kind; the released code defaults to
average, and so does effattn (it defaulted to max before).

then the top ``budget`` per head. Pooling keeps the neighbours of a selected key, so whole spans
survive. Applied after the prefill only; decoded tokens accumulate (as kvpress's ``SnapKVPress``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effattn._checks import check_int
from effattn.kv.policy import Policy, ScoreContext, pool_scores, register_policy

__all__ = ["SnapKVPolicy", "snapkv_pool"]


def check_pooling(pooling: str) -> str:
    if pooling not in ("max", "avg"):
        raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
    return pooling


def snapkv_pool(
    votes: torch.Tensor, kernel: int, pooling: str = "avg", valid: torch.Tensor | None = None
) -> torch.Tensor:
    """SnapKV's 1-D pooling of ``votes [B, H, T]`` along ``T`` (odd ``kernel``, stride 1, same length).

    ``"avg"``: ``sum_{|j' - j| <= kernel//2, valid} votes[j'] / kernel`` (the edges and the invalid
    positions count as zeros, the divisor is always ``kernel``, as the authors' zero-padded
    ``avg_pool1d``); ``"max"``: the maximum over the valid positions of the same span. Li et al. 2024,
    "SnapKV: LLM Knows What You are Looking for Before Generation".

    Example::

        >>> snapkv_pool(torch.tensor([[[3.0, 0.0, 6.0, 0.0]]]), 3).tolist()
        [[[1.0, 3.0, 2.0, 2.0]]]
    """
    pooling = check_pooling(pooling)
    check_int("kernel", kernel, 1)
    if kernel % 2 == 0:
        raise ValueError(f"kernel must be odd (a centred pooling window), got {kernel!r}")
    if votes.dim() != 3:
        raise ValueError(f"votes must be [B, H, T], got shape {tuple(votes.shape)}")
    if valid is None:
        valid = torch.ones_like(votes, dtype=torch.bool)
    if pooling == "max" or kernel == 1:
        return pool_scores(votes, kernel, "max", valid=valid) if kernel > 1 else votes
    B, H, T = votes.shape
    x = votes.masked_fill(~valid, 0.0).reshape(B * H, 1, T)
    return F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=True).reshape(B, H, T)


@register_policy("snapkv")
class SnapKVPolicy(Policy):
    """Observation-window voting with pooling, per kv head; the window is always kept.

    Args: ``window`` queries that vote (and keys always kept; default 32, at most the budget),
    ``kernel`` pooling width (odd, default 5), ``pooling`` ``"avg"`` (default, the authors' code)
    or ``"max"`` (see :func:`snapkv_pool`).

    Example::

        >>> from effattn.kv import make_policy
        >>> make_policy("snapkv", budget=256, window=16)
        SnapKVPolicy(budget=256, window=16, kernel=5, pooling='avg')
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
        pooling: str = "avg",
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
        votes = snapkv_pool(a.sum(dim=2), self.kernel, self.pooling, valid=before)
        return votes.masked_fill(~before, float("-inf")).masked_fill(in_window, float("inf"))
