"""TOVA: Token Omission Via Attention.

Oren et al. 2024, "Transformers are Multi-State RNNs" (EMNLP 2024). Viewing a decoder as an RNN
whose state is the KV cache, TOVA keeps the state at a fixed size by dropping, at every step, the
token the *current* query attends to least. Scoring rule (no window, no accumulation)::

    score(j) = mean_h A_h[n, j],   A_h[n] = softmax_j(q_n k_j^T / sqrt(D)),   n = newest query

averaged over the heads of the layer (the paper's choice: one set of tokens per layer); with
``per_head=True`` each kv head ranks by its own attention instead. After a prefill the last prompt
query scores the prompt. Applied after the prefill and at every decoding step.
"""

from __future__ import annotations

import torch

from effattn.kv.policy import Policy, ScoreContext, register_policy

__all__ = ["TOVAPolicy"]


@register_policy("tova")
class TOVAPolicy(Policy):
    """Keep the tokens the newest query attends to most (head-averaged, or ``per_head``).

    Example::

        >>> from effattn.kv import make_policy
        >>> make_policy("tova", budget=128)
        TOVAPolicy(budget=128, per_head=False)
    """

    per_head = False
    evicts_on_decode = True

    def __init__(
        self, *, budget: int | None = None, ratio: float | None = None, per_head: bool = False, head_budgets=None
    ):
        super().__init__(budget=budget, ratio=ratio, head_budgets=head_budgets)
        if not isinstance(per_head, bool):
            raise TypeError(f"per_head must be a bool, got {per_head!r}")
        hb = self.head_budgets
        if not per_head and hb is not None and bool((hb != hb[:, :1]).any()):
            raise ValueError("head_budgets must be equal across the heads of a layer unless per_head=True")
        self.per_head = per_head

    def extra_args(self) -> dict:
        return {"per_head": self.per_head}

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        a = ctx.attention(ctx.queries[:, -1:], ctx.query_positions[-1:])[:, :, 0]  # [B, H_kv, T]
        if self.per_head or ctx.num_heads == 1:
            return a
        if not bool(ctx.key_mask.all()):
            raise ValueError("TOVA averages heads over one shared set of tokens; the heads hold different tokens")
        return a.mean(dim=1, keepdim=True).expand_as(a)
