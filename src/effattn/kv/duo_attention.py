"""DuoAttention: full cache for retrieval heads, sinks + recent window for streaming heads.

Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and
Streaming Heads" (ICLR 2025). Only a fraction of heads ("retrieval heads") must see the whole
context; the others ("streaming heads") behave the same with the attention sinks and a recent
window. Scoring rule, per kv head ``h`` of layer ``l`` (``R`` = the set of retrieval heads)::

    budget_{l,h} = unbounded                 if (l, h) in R      (the head keeps every token)
                 = k (sinks + recent)        otherwise
    score(j)     = +inf if pos(j) < sinks, else pos(j)          (StreamingLLM inside a head)

so storage is ragged per head and really smaller. Applied after the prefill and at every step.

Finding ``R`` trains or probes gates on a model, so it lives with the model:
:func:`effattn.nn.calibrate_duo_attention` (module :mod:`effattn.nn.duo_calibration`, also the
method ``LM.calibrate_duo_attention``) returns the bool ``[num_layers, H_kv]`` mask this policy takes
as ``retrieval_heads``. The older name :func:`calibrate_duo_attention` here forwards to the model's
method (so :mod:`effattn.kv` never imports :mod:`effattn.nn`).
"""

from __future__ import annotations

import sys

import torch

from effattn._checks import check_int
from effattn.kv.policy import Policy, ScoreContext, register_policy

__all__ = ["DuoAttentionPolicy", "calibrate_duo_attention"]

UNBOUNDED = sys.maxsize


@register_policy("duo_attention")
class DuoAttentionPolicy(Policy):
    """Retrieval heads keep every token; streaming heads keep ``sinks`` + the most recent.

    ``retrieval_heads``: bool ``[num_layers, H_kv]`` (True = retrieval), e.g. from
    :func:`effattn.nn.calibrate_duo_attention`; ``None`` makes every head streaming (StreamingLLM). The
    budget (or ratio) is the streaming heads' cache.

    Example::

        >>> import torch
        >>> from effattn.kv import make_policy
        >>> p = make_policy("duo_attention", budget=16, retrieval_heads=torch.tensor([[True, False]]))
        >>> p.budgets(0, 1, 2, 100)[1]
        16
    """

    per_head = True
    evicts_on_decode = True

    def __init__(
        self,
        *,
        budget: int | None = None,
        ratio: float | None = None,
        retrieval_heads: torch.Tensor | None = None,
        sinks: int = 4,
    ):
        super().__init__(budget=budget, ratio=ratio)
        self.sinks = check_int("sinks", sinks, 0)
        if retrieval_heads is not None:
            retrieval_heads = torch.as_tensor(retrieval_heads)
            if retrieval_heads.dtype != torch.bool or retrieval_heads.dim() != 2:
                raise ValueError(
                    f"retrieval_heads must be a bool tensor [num_layers, heads_kv], got "
                    f"{retrieval_heads.dtype} of shape {tuple(retrieval_heads.shape)}"
                )
            retrieval_heads = retrieval_heads.cpu()
        self.retrieval_heads = retrieval_heads

    def extra_args(self) -> dict:
        n = None if self.retrieval_heads is None else int(self.retrieval_heads.sum())
        return {"sinks": self.sinks, "retrieval_heads": n}

    def budgets(self, layer_idx: int, num_layers: int, num_heads: int, context_len: int) -> list[int]:
        keep = self.keep_count(context_len)
        if self.retrieval_heads is None:
            return [keep] * num_heads
        if tuple(self.retrieval_heads.shape) != (num_layers, num_heads):
            raise ValueError(
                f"retrieval_heads has shape {tuple(self.retrieval_heads.shape)}, the cache has "
                f"[num_layers, heads_kv] = [{num_layers}, {num_heads}]"
            )
        return [UNBOUNDED if r else keep for r in self.retrieval_heads[layer_idx].tolist()]

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.positions.float().masked_fill(ctx.first(self.sinks), float("inf"))


def calibrate_duo_attention(model, **kwargs):
    """The retrieval heads of ``model``: forwards to ``model.calibrate_duo_attention(**kwargs)``
    (:meth:`effattn.nn.LM.calibrate_duo_attention`, that is :func:`effattn.nn.calibrate_duo_attention`,
    which documents the arguments). Kept where it used to live; new code imports it from
    :mod:`effattn.nn`."""
    calibrate = getattr(model, "calibrate_duo_attention", None)
    if not callable(calibrate):
        raise TypeError(f"model must be an effattn.nn.LM (it calibrates itself), got {type(model).__name__}")
    return calibrate(**kwargs)
