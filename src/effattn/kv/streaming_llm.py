"""StreamingLLM: attention sinks plus a window of recent tokens.

Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024). The
first ``sinks`` tokens of the sequence collect a large share of attention whatever their content
("attention sinks"); keeping them next to the ``budget - sinks`` most recent tokens keeps a model
stable at any length. Scoring rule (the same for every head)::

    score(j) = +inf            if pos(j) < sinks
             = pos(j)          otherwise      (keep the most recent)

Applied after the prefill and at every decoding step (the cache never exceeds ``budget``).

Positions inside the cache (``reindex=True``, the paper's rule, Section 3.2): a cached token is given
its slot in the cache, not its place in the text. The ``n`` tokens the new query attends to (sinks,
then the recent window, then the new tokens) sit at positions ``0 .. n-1``, so the model never sees a
distance larger than the cache, whatever the length of the stream. For RoPE this means caching keys
*before* rotation and rotating them by their slot at every step:

    k_j  stored unrotated,   attention uses  R(j) k_j,  j = 0 .. n-1;   new query i uses  R(n - t + i) q_i

A layer learns it from its cache (:attr:`effattn.kv.LayerCache.reindexes_positions`):
:class:`effattn.nn.Attention` then projects keys without RoPE and rotates at attention time. The
Hugging Face integration receives keys that the model already rotated at their original positions
``p_j``; it rotates each by ``j + s - n - p_j`` (``s``: tokens seen), which gives the same scores
as the rule above because rotations compose and RoPE scores depend only on position differences
(:func:`rotate_rope`). Heads that keep fewer tokens (``head_budgets``) are left-padded: their slots
count from the padded layout's start, which shifts every position of the head by one constant and so
changes no score. ``reindex=False`` keeps the original positions (the text's), as before.
"""

from __future__ import annotations

import torch

from effattn._checks import check_int
from effattn.kv.policy import Policy, ScoreContext, register_policy

__all__ = ["StreamingLLMPolicy", "rotate_rope"]


def rotate_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, H, D]`` by the RoPE angles ``positions * inv_freq`` (GPT-NeoX / LLaMA pairing:
    channel ``i`` with ``i + r/2`` of the first ``r = 2 len(inv_freq)`` channels; the rest pass through).

    ``positions`` (int or float, negative allowed) broadcasts to ``[B, T, H]`` (a per-slot ``[T]`` is
    passed as ``[T, 1]``). Rotations compose,
    ``R(a) R(b) = R(a + b)``, so rotating a key RoPE'd at ``p`` by ``p' - p`` gives it position ``p'``
    (Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding"). Angles are formed
    in float64.

    Example::

        >>> inv = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
        >>> x = torch.randn(1, 3, 2, 8)
        >>> y = rotate_rope(rotate_rope(x, torch.tensor(5), inv), torch.tensor(-5), inv)
        >>> torch.allclose(x, y, atol=1e-6)
        True
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must have shape [batch, seq, heads, head_dim], got {getattr(x, 'shape', x)!r}")
    half = inv_freq.numel()
    if 2 * half > x.shape[-1] or half == 0:
        raise ValueError(f"inv_freq has {half} frequencies; x has head_dim {x.shape[-1]} (need 1 .. head_dim / 2)")
    ang = positions.to(x.device, torch.float64)[..., None] * inv_freq.to(x.device, torch.float64)
    ang = torch.broadcast_to(ang, (*x.shape[:3], half))
    cos, sin = ang.cos().float(), ang.sin().float()
    xr = x[..., : 2 * half].float()
    a, b = xr[..., :half], xr[..., half:]
    rot = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)
    return rot if 2 * half == x.shape[-1] else torch.cat([rot, x[..., 2 * half :]], dim=-1)


@register_policy("streaming_llm")
class StreamingLLMPolicy(Policy):
    """Keep the first ``sinks`` tokens and the most recent ones (``budget`` in all); with ``reindex``
    (default, the paper's rule) attention places the cached tokens at positions ``0 .. n-1`` inside the
    cache (module docstring); ``reindex=False`` keeps each token at the position it was encoded with.

    Example::

        >>> from effattn.kv import make_policy
        >>> make_policy("streaming_llm", budget=32, sinks=4)
        StreamingLLMPolicy(budget=32, sinks=4)
        >>> make_policy("streaming_llm", budget=32, sinks=4, reindex=False).reindex
        False
    """

    per_head = False
    evicts_on_decode = True

    def __init__(
        self,
        *,
        budget: int | None = None,
        ratio: float | None = None,
        sinks: int = 4,
        head_budgets=None,
        reindex: bool = True,
    ):
        super().__init__(budget=budget, ratio=ratio, head_budgets=head_budgets)
        self.sinks = check_int("sinks", sinks, 0)
        if not isinstance(reindex, bool):
            raise TypeError(f"reindex must be a bool (positions inside the cache, the paper's rule), got {reindex!r}")
        self.reindex = reindex

    def extra_args(self) -> dict:
        return {"sinks": self.sinks} if self.reindex else {"sinks": self.sinks, "reindex": False}

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        s = ctx.positions.float()
        return s.masked_fill(ctx.first(self.sinks), float("inf"))
