"""Mixture-of-Depths (Raposo et al., "Mixture-of-Depths: Dynamically allocating compute in
transformer-based language models", 2024): a block wrapper that sends only some tokens through the block.

A scalar router ``r_t = w . x_t + b`` scores each token. In training (``causal=False``) the
``C = ceil(capacity * T)`` tokens of highest ``r`` in each sequence go through the block, in their
original order, as a shorter sequence; the others skip it::

    x'_t = x_t + sigmoid(r_t) * (block(x~)_t - x_t)    t among the top-C      (x~: the chosen tokens)
    x'_t = x_t                                         otherwise

(the router's gate on the block's residual branch gives the router its gradient; the paper multiplies by
``r`` itself, a sigmoid keeps the scale bounded). The top-C choice looks at the whole sequence, so it is
not causal. The paper's auxiliary predictor fixes decoding: a small MLP ``p`` reads ``x_t`` (gradient
stopped) and is trained with binary cross-entropy to say whether ``t`` is in the top-C
(``last_aux_loss``; add it to the training loss). With ``causal=True``, or when a ``state`` is passed
(decoding), token ``t`` goes through the block iff ``p(x_t) > 0``: a decision from ``x_t`` alone.

What "decode == full forward" means here: with predictor routing the chosen set is causal, so the
chosen tokens form the same sub-sequence whether the sequence comes at once (``causal=True``) or token by
token with the carried ``state``; both give the same outputs up to float32 rounding. The training-time
top-C forward is a different function: it equals both exactly on sequences where the predictor's
choice agrees with the top-C (``last_agreement`` reports the share of tokens where they agree).

``block(h [B, t, D], state) -> (h_out, state)`` is a causal residual block (``h_out = h + f(h)``) that
can continue from its state (a mixer block with its KV cache or recurrent state).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from effattn._checks import check_float, check_int, check_positive_int, check_tensor

__all__ = ["MixtureOfDepths"]


class MixtureOfDepths(nn.Module):
    """Route the top ``capacity`` fraction of tokens through ``block``, the rest around it.

    ``predictor_hidden=0`` makes the predictor a single linear layer. ``forward(x, state=None,
    causal=False) -> (y, state)``: ``state`` is a list with one block state per batch row (decoding
    rows choose independently).

    >>> import torch
    >>> class Block(torch.nn.Module):  # causal running mean, a stand-in for a transformer block
    ...     def forward(self, h, state=None):
    ...         s, n = state if state is not None else (h.new_zeros(h.shape[0], h.shape[2]), 0)
    ...         c = s[:, None] + h.cumsum(1)
    ...         out = h + c / (n + torch.arange(1, h.shape[1] + 1))[:, None]
    ...         return out, (c[:, -1], n + h.shape[1])
    >>> mod = MixtureOfDepths(Block(), dim=8, capacity=0.25)
    >>> y, _ = mod(torch.randn(2, 16, 8))
    >>> int(mod.last_selected.sum())
    8
    """

    def __init__(self, block: nn.Module, dim: int, capacity: float = 0.125, predictor_hidden: int | None = None):
        super().__init__()
        check_positive_int("dim", dim)
        check_float("capacity", capacity, 0.0, 1.0, lo_open=True)
        check_int("predictor_hidden", predictor_hidden, minimum=0, allow_none=True)
        self.block, self.dim, self.capacity = block, dim, float(capacity)
        self.router = nn.Linear(dim, 1)
        hidden = dim if predictor_hidden is None else predictor_hidden
        self.predictor = (
            nn.Linear(dim, 1) if hidden == 0 else nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        )
        self.last_aux_loss: torch.Tensor | None = None
        self.last_selected: torch.Tensor | None = None
        self.last_agreement: float | None = None

    def forward(self, x: torch.Tensor, state: list | None = None, causal: bool = False):
        check_tensor("x", x, 3, "[batch, seq, dim]")
        B, T, D = x.shape
        if D != self.dim:
            raise ValueError(f"x must have last dim {self.dim} [batch, seq, dim], got shape {tuple(x.shape)}")
        if state is not None and (not isinstance(state, list) or len(state) != B):
            raise ValueError(f"state must be a list of {B} per-row block states, got {type(state).__name__}")
        r = self.router(x).squeeze(-1)  # [B, T]
        pred = self.predictor(x.detach()).squeeze(-1)
        if causal or state is not None:
            return self._predicted(x, r, pred, state)
        C = math.ceil(self.capacity * T)
        idx = r.topk(C, dim=1).indices.sort(dim=1).values  # [B, C] in temporal order
        chosen = torch.zeros(B, T, dtype=torch.bool, device=x.device).scatter(1, idx, True)
        self.last_aux_loss = F.binary_cross_entropy_with_logits(pred, chosen.to(pred.dtype))
        self.last_selected = chosen
        self.last_agreement = float(((pred > 0) == chosen).float().mean()) if T else 1.0
        gi = idx[..., None].expand(B, C, D)
        xs = x.gather(1, gi)
        out, _ = self.block(xs, None)
        gate = torch.sigmoid(r.gather(1, idx))[..., None].to(x.dtype)
        return x.scatter(1, gi, xs + gate * (out - xs)), None

    def _predicted(self, x, r, pred, state):
        B = x.shape[0]
        chosen = pred > 0
        self.last_selected = chosen
        self.last_aux_loss, self.last_agreement = None, None
        states = list(state) if state is not None else [None] * B
        rows = []
        for b in range(B):
            idx = chosen[b].nonzero().squeeze(1)
            row = x[b]
            if idx.numel():
                xs = row[idx][None]
                out, states[b] = self.block(xs, states[b])
                gate = torch.sigmoid(r[b, idx])[:, None].to(x.dtype)
                row = row.index_copy(0, idx, xs[0] + gate * (out[0] - xs[0]))
            rows.append(row)
        return torch.stack(rows), states
