"""K-norm: keep the keys with the smallest L2 norm.

Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
(EMNLP 2024). Keys with a low L2 norm are the ones that later receive high attention, so the norm
alone (no attention computed) ranks the tokens. Scoring rule, per kv head ``h``::

    score_h(j) = -|| k_{h,j} ||_2

Applied after the prefill only (as kvpress's ``KnormPress``); decoded tokens accumulate.
"""

from __future__ import annotations

import torch

from effattn.kv.policy import Policy, ScoreContext, register_policy

__all__ = ["KNormPolicy"]


@register_policy("knorm")
class KNormPolicy(Policy):
    """Keep the keys of smallest L2 norm, per kv head.

    Example::

        >>> from effattn.kv import make_policy
        >>> make_policy("knorm", ratio=0.75)
        KNormPolicy(ratio=0.75)
    """

    per_head = True
    evicts_on_decode = False

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return -ctx.keys.float().norm(dim=-1).transpose(1, 2)
