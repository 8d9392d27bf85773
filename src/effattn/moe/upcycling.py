"""Sparse upcycling (Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints", 2023): an MoE layer whose experts all start as copies of a trained dense SwiGLU MLP.

With renormalized top-k weights (``sum_j w_j = 1``) and identical experts, the first forward equals the
dense layer for any router weights::

    sum_j w_j * mlp(x) = mlp(x)

so the router keeps its ordinary random initialisation (which lets tokens reach different experts and
the copies drift apart as they train). Dropless dispatch is required for the equality: a dropped
assignment would remove its share of ``mlp(x)``.
"""

from __future__ import annotations

import torch
from torch import nn

from effattn.moe.layer import MoE

__all__ = ["upcycle"]

# attribute names of (gate, up, down) projections in common SwiGLU modules
_NAMES = (("gate", "up", "down"), ("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def _swiglu_weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    for g, u, d in _NAMES:
        mods = [getattr(mlp, n, None) for n in (g, u, d)]
        if all(isinstance(m, nn.Linear) for m in mods):
            if any(m.bias is not None for m in mods):
                raise ValueError("dense_mlp has biases; upcycle copies bias-free SwiGLU projections only")
            return mods[0].weight, mods[1].weight, mods[2].weight
    raise TypeError(
        f"dense_mlp must be a SwiGLU with nn.Linear projections named {[n for n in _NAMES]}, got {type(mlp).__name__}"
    )


def upcycle(dense_mlp: nn.Module, num_experts: int, top_k: int, **moe_kwargs) -> MoE:
    """An :class:`MoE` whose ``num_experts`` experts are copies of ``dense_mlp`` (first forward == dense).

    ``dense_mlp``: a bias-free SwiGLU ``down(silu(gate x) * up x)`` whose projections are ``nn.Linear``
    named ``gate/up/down`` (effattn), ``gate_proj/up_proj/down_proj`` (LLaMA) or ``w1/w3/w2`` (Mixtral).
    Other keyword arguments go to :class:`MoE` (``normalize=False`` or a capacity factor are refused:
    they break the equality).

    >>> import torch
    >>> from effattn.moe import SwiGLU
    >>> dense = SwiGLU(8, 16)
    >>> moe = upcycle(dense, num_experts=4, top_k=2)
    >>> x = torch.randn(2, 5, 8)
    >>> torch.allclose(moe(x), dense(x), atol=1e-6)
    True
    """
    if moe_kwargs.get("normalize", True) is not True:
        raise ValueError("upcycle needs normalize=True: renormalized top-k weights make the first forward dense")
    if moe_kwargs.get("capacity_factor") is not None:
        raise ValueError("upcycle needs dropless dispatch (capacity_factor=None): drops change the first forward")
    if moe_kwargs.get("shared_experts", 0):
        raise ValueError("upcycle does not add shared experts (they would add to the dense output)")
    if moe_kwargs.get("routing", "token_choice") != "token_choice":
        raise ValueError("upcycle needs token_choice routing (expert choice gives tokens 0..E experts)")
    wg, wu, wd = _swiglu_weights(dense_mlp)
    hidden, dim = wg.shape
    moe = MoE(dim, hidden, num_experts, top_k, expert="swiglu", **moe_kwargs)
    moe.to(device=wg.device, dtype=wg.dtype)
    with torch.no_grad():
        moe.experts.w_in.copy_(torch.cat([wg.t(), wu.t()], dim=1).expand_as(moe.experts.w_in))
        moe.experts.w_out.copy_(wd.t().expand_as(moe.experts.w_out))
    return moe
