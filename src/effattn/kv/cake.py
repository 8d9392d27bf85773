"""CAKE: cascading, adaptive layer budgets from attention dispersion and shift.

Qin et al. 2025, "CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences" (ICLR
2025). Layers differ in how widely attention spreads (spatial dispersion) and how much it moves
from query to query (temporal shift); a layer that needs many tokens gets a larger slice of one
total budget. With ``A[i, j]`` the attention of the ``w`` window queries ``i`` to the keys ``j``
before the window (query heads of a GQA group averaged)::

    H_l = -sum_{h,i,j} A log A                      dispersion (entropy)
    V_l = sum_{h,j} Var_i A[i, j]                   shift (variance over the window queries)
    P_l = H_l^(1/tau1) * V_l^(1/tau2)               layer preference
    budget_l = w + P_l / sum_m P_m * L (k - w)      k: average budget per layer; the window is kept

Cascading: while the prompt runs through the model, layer ``l`` cannot know later preferences, so
after each layer the budgets of layers ``0..l`` are recomputed from the preferences seen so far
(the same total), and earlier layers evict down to their new, smaller budget. Memory never exceeds
the total, and after the last layer the allocation equals the one computed with every preference.
Eviction indicator, per kv head (then 1-D average pooling, kernel 5, and per-head top-k)::

    I_h(j) = Mean_i A_h[i, j] + gamma * Var_i A_h[i, j]

Variances are population variances (``w = 1`` gives 0, not NaN). Applied after the prefill only.
"""

from __future__ import annotations

import torch

from effattn._checks import check_float
from effattn.kv.policy import ScoreContext, pool_scores, register_policy, split_budget
from effattn.kv.snapkv import SnapKVPolicy

__all__ = ["CAKEPolicy"]

_PREF_KEY = "cake_preferences"


@register_policy("cake")
class CAKEPolicy(SnapKVPolicy):
    """Preference-weighted layer budgets (cascading) and the mean + ``gamma`` x variance indicator.

    Args: ``window`` (observation window, kept), ``kernel`` (average pooling width),
    ``tau1``/``tau2`` (temperatures of dispersion and shift), ``gamma`` (weight of the variance).

    Example::

        >>> from effattn.kv import make_policy
        >>> make_policy("cake", budget=128, window=16)
        CAKEPolicy(budget=128, window=16, kernel=5, pooling='avg', tau1=1.0, tau2=1.0, gamma=200.0)
    """

    def __init__(
        self,
        *,
        budget: int | None = None,
        ratio: float | None = None,
        window: int = 32,
        kernel: int = 5,
        tau1: float = 1.0,
        tau2: float = 1.0,
        gamma: float = 200.0,
    ):
        super().__init__(budget=budget, ratio=ratio, window=window, kernel=kernel, pooling="avg")
        self.tau1 = check_float("tau1", tau1, 0.0, float("inf"), lo_open=True, hi_open=True)
        self.tau2 = check_float("tau2", tau2, 0.0, float("inf"), lo_open=True, hi_open=True)
        self.gamma = check_float("gamma", gamma, 0.0, float("inf"), hi_open=True)

    def extra_args(self) -> dict:
        return {**super().extra_args(), "tau1": self.tau1, "tau2": self.tau2, "gamma": self.gamma}

    def preference(self, a: torch.Tensor, before_window: torch.Tensor) -> float:
        """``P_l`` from the window attention ``a [B, H, w, T]`` restricted to ``before_window``."""
        a = a * before_window[:, :, None]
        dispersion = -(a * torch.log(a + 1e-10)).sum()
        shift = a.var(dim=2, correction=0).sum()
        return float(dispersion.clamp(min=0) ** (1 / self.tau1) * shift ** (1 / self.tau2))

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        a, in_window = self.window_attention(ctx)
        before = ctx.key_mask & ~in_window
        prefs = ctx.shared.setdefault(_PREF_KEY, {})
        prefs[ctx.layer_idx] = self.preference(a, before)
        indicator = a.mean(dim=2) + self.gamma * a.var(dim=2, correction=0)
        indicator = pool_scores(indicator, self.kernel, "avg", valid=before)
        return indicator.masked_fill(~before, float("-inf")).masked_fill(in_window, float("inf"))

    def allocate(self, ctx: ScoreContext, budgets: list[int]) -> dict[int, list[int]]:
        prefs = ctx.shared.get(_PREF_KEY, {})
        layers = sorted(prefs)
        keep = self.keep_count(ctx.seen)
        w = min(self.observation_window(ctx), keep)
        parts = split_budget((keep - w) * ctx.num_layers, [prefs[i] for i in layers], cap=ctx.seen - w)
        return {layer: [w + part] * ctx.num_heads for layer, part in zip(layers, parts)}

    def layer_budgets(self, preferences: list[float], context_len: int) -> list[int]:
        """The final allocation for the given per-layer preferences (what cascading converges to)."""
        keep = self.keep_count(context_len)
        w = min(self.window, keep)
        return [w + p for p in split_budget((keep - w) * len(preferences), preferences, cap=context_len - w)]
