"""PyramidKV: layer budgets that shrink with depth, SnapKV selection inside each layer.

Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling". Attention is spread wide in the lower layers and concentrates on a few tokens higher
up, so lower layers get more cache. With ``k`` the average budget per layer, ``w`` the SnapKV
window (kept in every layer) and ``S = k - w`` the selectable part, the selectable budgets form an
arithmetic sequence over the ``L`` layers::

    S_{L-1} = S / beta,   S_0 = 2 S - S_{L-1},   S_l = S_0 - l (S_0 - S_{L-1}) / (L - 1)
    budget_l = w + S_l        (rounded so that sum_l budget_l = L k exactly; a layer's budget is
                               capped at the context and its excess goes to the other layers)

Inside each layer the tokens are chosen as in SnapKV (window votes, pooled, per-head top-k).
"""

from __future__ import annotations

from effattn._checks import check_float
from effattn.kv.policy import register_policy, split_budget
from effattn.kv.snapkv import SnapKVPolicy

__all__ = ["PyramidKVPolicy"]


@register_policy("pyramidkv")
class PyramidKVPolicy(SnapKVPolicy):
    """SnapKV with pyramidal layer budgets (``beta`` > 1: ratio of the bottom to the top share).

    Example::

        >>> from effattn.kv import make_policy
        >>> p = make_policy("pyramidkv", budget=40, window=8, beta=4)
        >>> p.layer_budgets(context_len=1000, num_layers=4)      # sums to 4 * 40
        [64, 48, 32, 16]
    """

    def __init__(
        self,
        *,
        budget: int | None = None,
        ratio: float | None = None,
        window: int = 32,
        kernel: int = 5,
        pooling: str = "max",
        beta: float = 20.0,
    ):
        super().__init__(budget=budget, ratio=ratio, window=window, kernel=kernel, pooling=pooling)
        self.beta = check_float("beta", beta, 1.0, float("inf"), hi_open=True)

    def extra_args(self) -> dict:
        return {**super().extra_args(), "beta": self.beta}

    def layer_budgets(self, context_len: int, num_layers: int) -> list[int]:
        """Tokens kept per kv head in each layer (non-increasing with depth, sum ``L * k``)."""
        keep = self.keep_count(context_len)
        w = min(self.window, keep)
        sel = keep - w
        if num_layers == 1 or sel == 0:
            return [keep] * num_layers
        lo = sel / self.beta
        hi = 2 * sel - lo
        weights = [hi - (hi - lo) * i / (num_layers - 1) for i in range(num_layers)]
        return [w + s for s in split_budget(sel * num_layers, weights, cap=context_len - w)]

    def budgets(self, layer_idx: int, num_layers: int, num_heads: int, context_len: int) -> list[int]:
        return [self.layer_budgets(context_len, num_layers)[layer_idx]] * num_heads
