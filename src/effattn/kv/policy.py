"""KV compression / eviction policies: the :class:`Policy` base, budget resolution and the registry.

A policy decides which cached tokens each ``(layer, kv head)`` keeps. It is told how many
(:meth:`Policy.budgets`) and ranks the candidates with a score (:meth:`Policy.score`, higher =
keep); :class:`~effattn.kv.compressed.CompressedKVCache` keeps the top-``budget`` tokens of
every head and stores them ragged. Tokens a policy promises to keep (attention sinks, the recent
window, SnapKV's observation window) get the score ``+inf``.

Budget: ``budget`` is the number of tokens kept per ``(layer, kv head)`` (an int > 0), ``ratio``
the fraction of the context removed (kvpress's ``compression_ratio``, a float in ``[0, 1)``): a
head that has seen ``T`` tokens keeps ``max(1, int(T * (1 - ratio)))``. Pass at most one of them;
with neither, ``ratio = 0.5``. Methods with layer or head budgets (PyramidKV, CAKE, DuoAttention)
spread the same total differently. The per-token methods (StreamingLLM, H2O, A2SF, TOVA, K-norm,
SnapKV) also take explicit ``head_budgets`` (ints ``[num_layers, heads_kv]``) instead: heads
then keep different numbers of tokens and the storage is ragged.

Example::

    >>> from effattn.kv import make_policy, list_policies
    >>> p = make_policy("streaming_llm", budget=64, sinks=4)
    >>> p.budget, p.keep_count(1000), "streaming_llm" in list_policies()
    (64, 64, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from effattn._checks import check_float, check_positive_int
from effattn._registry import Registry

__all__ = [
    "Policy",
    "ScoreContext",
    "POLICIES",
    "register_policy",
    "make_policy",
    "list_policies",
    "resolve_budget",
    "DEFAULT_RATIO",
    "split_budget",
    "check_head_budgets",
    "pool_scores",
]

DEFAULT_RATIO = 0.5
# name -> Policy subclass; the policy modules of effattn.kv register themselves on import
POLICIES: Registry[type] = Registry("KV policy", package="effattn.kv")

# queries scored together when accumulating attention (bounds the transient [B, H, chunk, T] tensor)
_QUERY_CHUNK = 256


def resolve_budget(budget, ratio) -> tuple[int | None, float | None]:
    """Validate ``budget``/``ratio`` (exactly one, or neither: ``ratio = 0.5``)."""
    if budget is not None and ratio is not None:
        raise ValueError(f"pass either budget or ratio, not both (got budget={budget!r}, ratio={ratio!r})")
    if budget is not None:
        check_positive_int("budget (tokens kept per layer and kv head)", budget)
        return budget, None
    if ratio is None:
        return None, DEFAULT_RATIO
    return None, check_float("ratio (fraction of the context removed)", ratio, 0.0, 1.0, hi_open=True)


@dataclass
class ScoreContext:
    """What a policy sees when it scores one layer's candidates (built by the cache).

    Candidates are the tokens kept so far followed by the new ones, left-padded per head to a
    common length ``T``: ``keys``/``values`` ``[B, T, H_kv, D]``, ``key_mask`` bool ``[B, H_kv, T]``
    (False at padding), ``positions`` long ``[B, H_kv, T]`` (original token index, ``-1`` at
    padding). ``queries [B, t, H_q, D]`` are the new tokens' queries at ``query_positions [t]``.
    ``state`` holds per-token float tensors ``[B, H_kv, T]`` a policy saved earlier (0 for new
    tokens); a policy writes the updated ones into ``new_state``. ``budgets`` are the tokens each
    head will keep; ``shared`` is one dict per cache for cross-layer bookkeeping (CAKE).
    """

    layer_idx: int
    num_layers: int
    keys: torch.Tensor
    values: torch.Tensor
    key_mask: torch.Tensor
    positions: torch.Tensor
    queries: torch.Tensor
    query_positions: torch.Tensor
    prefill: bool
    scale: float
    seen: int
    budgets: list[int] = field(default_factory=list)
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    new_state: dict[str, torch.Tensor] = field(default_factory=dict)
    shared: dict = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        return self.keys.shape[2]

    @property
    def num_new(self) -> int:
        return self.queries.shape[1]

    def attention(self, queries: torch.Tensor | None = None, query_positions: torch.Tensor | None = None):
        """Causal softmax attention probabilities of ``queries`` (default: all new ones) over the
        candidates, averaged over the query heads of each kv head: float32 ``[B, H_kv, t, T]``
        (zeros at padding and at keys after the query)."""
        q = self.queries if queries is None else queries
        qpos = self.query_positions if query_positions is None else query_positions
        B, t, Hq, D = q.shape
        H = self.num_heads
        G = Hq // H
        qf = q.float().view(B, t, H, G, D)
        s = torch.einsum("bthgd,bshd->bhgts", qf, self.keys.float()) * self.scale
        allowed = self.key_mask[:, :, None, :] & (self.positions[:, :, None, :] <= qpos.view(1, 1, t, 1))
        s = s.masked_fill(~allowed[:, :, None], float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a query with no visible key gives zeros
        return p.mean(dim=2)

    def accumulated_attention(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_i w_i A[i, j]`` over the new queries ``i`` (``w = 1`` by default): float32
        ``[B, H_kv, T]``, computed ``256`` queries at a time (no ``t x T`` matrix at once)."""
        t = self.num_new
        out = self.keys.new_zeros(self.keys.shape[0], self.num_heads, self.keys.shape[1], dtype=torch.float32)
        for i0 in range(0, t, _QUERY_CHUNK):
            i1 = min(t, i0 + _QUERY_CHUNK)
            p = self.attention(self.queries[:, i0:i1], self.query_positions[i0:i1])
            if weights is not None:
                p = p * weights[i0:i1].view(1, 1, -1, 1).to(p)
            out += p.sum(dim=2)
        return out

    def recent(self, n: int) -> torch.Tensor:
        """bool ``[B, H_kv, T]``: the ``n`` most recent candidates (by position) of each head."""
        newest = self.positions.amax(dim=-1, keepdim=True)
        return self.key_mask & (self.positions > newest - n)

    def first(self, n: int) -> torch.Tensor:
        """bool ``[B, H_kv, T]``: tokens at positions ``< n`` (attention sinks)."""
        return self.key_mask & (self.positions < n)


def pool_scores(
    scores: torch.Tensor, kernel: int, kind: str = "max", valid: torch.Tensor | None = None
) -> torch.Tensor:
    """1-D pooling of ``scores [B, H, T]`` along ``T`` (odd ``kernel``, stride 1, same length; SnapKV),
    over the ``valid`` positions only (bool ``[B, H, T]``; others neither pool nor count)."""
    if kernel <= 1:
        return scores
    B, H, T = scores.shape
    pad = kernel // 2
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    if kind == "max":
        x = scores.masked_fill(~valid, float("-inf")).reshape(B * H, 1, T)
        return F.max_pool1d(x, kernel, stride=1, padding=pad).reshape(B, H, T)
    x = scores.masked_fill(~valid, 0.0).reshape(B * H, 1, T)
    n = valid.to(scores.dtype).reshape(B * H, 1, T)
    total = F.avg_pool1d(x, kernel, stride=1, padding=pad, count_include_pad=True)
    count = F.avg_pool1d(n, kernel, stride=1, padding=pad, count_include_pad=True)
    return (total / count.clamp(min=1e-12)).reshape(B, H, T)


def check_head_budgets(head_budgets) -> torch.Tensor:
    """``head_budgets``: ints ``>= 1`` of shape ``[num_layers, heads_kv]`` (a tensor or nested list)."""
    try:
        t = torch.as_tensor(head_budgets)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"head_budgets must be ints [num_layers, heads_kv], got {head_budgets!r:.80}") from e
    if t.dim() != 2 or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.numel() == 0:
        raise ValueError(f"head_budgets must be ints [num_layers, heads_kv], got {t.dtype} of shape {tuple(t.shape)}")
    if bool((t < 1).any()):
        raise ValueError(f"head_budgets must all be >= 1, got minimum {int(t.min())}")
    return t.long().cpu()


class Policy:
    """Base of the KV policies.

    Subclasses set ``name`` and override :meth:`score` (higher = keep; ``+inf`` = always keep),
    and where the method spreads the budget over layers or heads :meth:`budgets` (or
    :meth:`allocate` for budgets that depend on what earlier layers saw). Class flags:
    ``evicts_on_decode`` (apply at every decoding step, not only after a prefill) and
    ``per_head`` (heads keep different tokens).
    """

    name: str = ""
    per_head: bool = True
    evicts_on_decode: bool = False

    def __init__(self, *, budget: int | None = None, ratio: float | None = None, head_budgets=None):
        self.head_budgets = None
        if head_budgets is not None:
            if budget is not None or ratio is not None:
                raise ValueError("pass head_budgets or budget/ratio, not both")
            self.head_budgets = check_head_budgets(head_budgets)
            self.budget, self.ratio = int(self.head_budgets.max()), None
        else:
            self.budget, self.ratio = resolve_budget(budget, ratio)

    def __repr__(self) -> str:
        amount = f"budget={self.budget}" if self.budget is not None else f"ratio={self.ratio}"
        if self.head_budgets is not None:
            amount = f"head_budgets={self.head_budgets.tolist()}"
        extra = "".join(f", {k}={v!r}" for k, v in self.extra_args().items())
        return f"{type(self).__name__}({amount}{extra})"

    def extra_args(self) -> dict:
        """Method-specific settings (for ``repr`` and reports)."""
        return {}

    def keep_count(self, context_len: int) -> int:
        """Tokens kept per ``(layer, kv head)`` at ``context_len`` tokens seen (uniform split)."""
        if self.budget is not None:
            return self.budget
        return max(1, int(context_len * (1.0 - self.ratio)))

    def total_budget(self, context_len: int, num_layers: int) -> int:
        """Tokens kept per kv head summed over layers (what layer-budget methods redistribute)."""
        return self.keep_count(context_len) * num_layers

    def budgets(self, layer_idx: int, num_layers: int, num_heads: int, context_len: int) -> list[int]:
        """Tokens to keep in each kv head of ``layer_idx``, at ``context_len`` tokens seen
        (``head_budgets[layer_idx]`` when given, else :meth:`keep_count` for every head)."""
        if self.head_budgets is None:
            return [self.keep_count(context_len)] * num_heads
        if tuple(self.head_budgets.shape) != (num_layers, num_heads):
            raise ValueError(
                f"head_budgets has shape {tuple(self.head_budgets.shape)}, the cache has "
                f"[num_layers, heads_kv] = [{num_layers}, {num_heads}]"
            )
        return self.head_budgets[layer_idx].tolist()

    def allocate(self, ctx: ScoreContext, budgets: list[int]) -> dict[int, list[int]]:
        """Budgets to enforce once ``ctx.layer_idx`` is scored: ``{layer: per-head budgets}``.
        The default touches only this layer; CAKE also shrinks earlier layers (cascading)."""
        return {ctx.layer_idx: budgets}

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """``[B, H_kv, T]`` scores of the candidates (padding is ignored by the cache)."""
        raise NotImplementedError


def register_policy(name: str) -> Callable[[type], type]:
    """Class decorator: register a :class:`Policy` subclass as ``name`` (in :data:`POLICIES`)."""

    def decorate(cls: type) -> type:
        POLICIES.register(name, cls)
        cls.name = name
        return cls

    return decorate


def list_policies() -> list[str]:
    """The registered policy names, sorted."""
    return POLICIES.names()


def make_policy(name: str, *, budget: int | None = None, ratio: float | None = None, **kw) -> Policy:
    """Build the policy registered as ``name`` (see :func:`list_policies`) with a ``budget``
    (tokens per layer and kv head) or a ``ratio`` (fraction removed); ``kw`` are its settings."""
    if not isinstance(name, str) or name not in POLICIES:
        raise ValueError(f"unknown policy name {name!r}; registered policies: {POLICIES.names()}")
    return POLICIES.get(name)(budget=budget, ratio=ratio, **kw)


def split_budget(total: int, weights: list[float], cap: int | None = None) -> list[int]:
    """Split the int ``total`` in proportion to ``weights`` (>= 0), rounding by largest remainder so
    the parts sum to ``total`` exactly (equal parts when every weight is 0). With ``cap``, no part
    exceeds it: the excess of a capped part goes to the others in proportion to their weights (so the
    sum stays ``total`` while ``total <= cap * len(weights)``)."""
    w = [max(float(x), 0.0) for x in weights]
    parts = _proportional(total, w)
    while cap is not None and any(p > cap for p in parts):
        excess = sum(p - cap for p in parts if p > cap)
        parts = [min(p, cap) for p in parts]
        free = [i for i, p in enumerate(parts) if p < cap]
        if not free:
            break
        for i, extra in zip(free, _proportional(excess, [w[i] for i in free])):
            parts[i] += extra
    return parts


def _proportional(total: int, w: list[float]) -> list[int]:
    s = sum(w)
    if not math.isfinite(s) or s <= 0:
        w, s = [1.0] * len(w), float(len(w))
    raw = [total * x / s for x in w]
    parts = [math.floor(r) for r in raw]
    order = sorted(range(len(w)), key=lambda i: raw[i] - parts[i], reverse=True)
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts
