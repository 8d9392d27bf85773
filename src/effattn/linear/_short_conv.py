"""Short causal depthwise convolution over time, the token-mixing front end of modern recurrent layers.

Mamba (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023), GLA, DeltaNet
and the learned memories (Titans, Behrouz et al. 2024, section 4.4; Miras; ATLAS) put one after the q, k, v
projections, so a token's key can carry the tokens just before it. With kernel ``K`` and channels ``C``::

    y_t[c] = act(b[c] + sum_{i<K} w[c, i] * x_{t-K+1+i}[c])        (x_s = state for s < 0)

The state is the last ``K - 1`` inputs ``[B, K - 1, C]`` (zeros for a fresh sequence), so one call on
``x[:, :s]`` followed by one on ``x[:, s:]`` with the carried state equals one call on ``x``. With ``valid``
the tokens where it is False are skipped, as if removed from the sequence: they enter neither a window nor
the state, and their outputs are zeros (whatever they hold, NaN included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effattn._checks import check_tensor

__all__ = ["causal_conv1d"]


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
    activation: bool = True,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution of ``x [B, T, C]`` with ``weight [C, K]`` and ``bias [C]`` (or None),
    then SiLU when ``activation`` (module docstring). ``state [B, K - 1, C]``: the inputs before ``x``
    (None: zeros). ``valid`` (bool ``[B, T]`` or None): skip the tokens where it is False (module docstring).
    Returns ``(y [B, T, C], new_state [B, K - 1, C])``, the last ``K - 1`` (valid) inputs.

    Example::

        >>> x, w = torch.randn(1, 6, 8), torch.randn(8, 4)
        >>> y, state = causal_conv1d(x[:, :5], w)
        >>> y_last, _ = causal_conv1d(x[:, 5:], w, state=state)   # continues from the last 3 inputs
        >>> torch.allclose(y_last, causal_conv1d(x, w)[0][:, 5:], atol=1e-6)
        True
        >>> y, _ = causal_conv1d(x, torch.ones(8, 2), activation=False)   # x_t + x_{t-1}
        >>> torch.allclose(y[:, 1:], x[:, 1:] + x[:, :-1])
        True
        >>> valid = torch.tensor([[True, True, False, True, True, True]])   # token 2 skipped
        >>> y_skip = causal_conv1d(x, w, valid=valid)[0]
        >>> torch.allclose(y_skip[:, 3:], causal_conv1d(x[:, [0, 1, 3, 4, 5]], w)[0][:, 2:])
        True
    """
    check_tensor("x", x, 3, "[batch, seq, channels]")
    check_tensor("weight", weight, 2, "[channels, kernel]")
    B, T, C = x.shape
    K = weight.shape[1]
    if weight.shape[0] != C or K < 1:
        raise ValueError(f"weight must be [channels={C}, kernel >= 1], got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"bias must be [channels={C}], got shape {tuple(bias.shape)}")
    if state is None:
        state = x.new_zeros(B, K - 1, C)
    elif tuple(state.shape) != (B, K - 1, C):
        raise ValueError(f"state must be [batch, kernel - 1, channels] = {(B, K - 1, C)}, got {tuple(state.shape)}")
    xs = torch.cat([state.to(x.dtype), x], dim=1)
    if valid is not None:
        return _skip_invalid(xs, weight, bias, activation, valid)
    y = F.conv1d(xs.transpose(1, 2), weight.unsqueeze(1), bias, groups=C).transpose(1, 2)
    new_state = xs[:, xs.shape[1] - (K - 1) :]
    return (F.silu(y) if activation else y), new_state


def _skip_invalid(xs, weight, bias, activation, valid):
    """The convolution of each row's valid inputs only: ``xs = [state | x]`` is compacted (the valid
    entries first, in order), convolved, and each valid token's output gathered back to its position."""
    B, L, C = xs.shape
    K = weight.shape[1]
    T = L - (K - 1)
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (B, T):
        raise ValueError(f"valid must be a bool tensor [batch, seq] = {(B, T)}, got {getattr(valid, 'shape', valid)}")
    ext = torch.cat([valid.new_ones(B, K - 1), valid], 1)  # the state's entries are valid inputs
    order = torch.sort((~ext).to(torch.int8), dim=1, stable=True).indices  # valid entries first, in order
    xs = torch.where(ext[..., None], xs, torch.zeros_like(xs))  # a skipped NaN reaches no output
    xc = xs.gather(1, order[..., None].expand(B, L, C))
    yc = F.conv1d(xc.transpose(1, 2), weight.unsqueeze(1), bias, groups=C).transpose(1, 2)
    yc = F.silu(yc) if activation else yc
    rank = ext.long().cumsum(1)[:, K - 1 :] - K  # output index of each token (its window's end - (K - 1))
    y = yc.gather(1, rank.clamp(min=0)[..., None].expand(B, T, C))
    y = torch.where(valid[..., None], y, torch.zeros_like(y))
    last = ext.long().sum(1, keepdim=True) - (K - 1) + torch.arange(K - 1, device=xs.device)  # last K - 1 valid
    return y, xc.gather(1, last[..., None].expand(B, K - 1, C))
