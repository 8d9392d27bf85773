"""What every mixer of :mod:`effattn.nn.mixers` shares: the base class (``state_size``), the input
checks, the head reshapes, the padding mask and the short causal convolution."""

from __future__ import annotations

import math

import torch
from torch import nn

from effattn._checks import check_int, check_positive_int, check_tensor
from effattn.dist import current_sequence_parallel
from effattn.linear import causal_conv1d

__all__ = [
    "MixerBase",
    "ShortConv",
    "check_heads",
    "check_state_size_args",
    "check_x_and_valid",
    "merge_heads",
    "split_heads",
    "state_nbytes",
    "zero_invalid",
]


def state_nbytes(state) -> int:
    """Bytes held by a (nested tuple/list/dict of) state tensor(s); objects with ``nbytes`` count too.

    Example::

        >>> state_nbytes((torch.zeros(2, 3), [torch.zeros(4, dtype=torch.int64)], None))
        56
    """
    if state is None:
        return 0
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(s) for s in state.values())
    if isinstance(state, (tuple, list)):
        return sum(state_nbytes(s) for s in state)
    nbytes = getattr(state, "nbytes", None)
    if nbytes is not None:
        return int(nbytes() if callable(nbytes) else nbytes)
    raise TypeError(f"cannot size a state of type {type(state).__name__}")


def check_heads(dim: int, heads: int) -> int:
    """``dim`` and ``heads`` positive ints with ``dim`` divisible by ``heads``; returns the head dim.

    Example::

        >>> check_heads(64, 4)
        16
    """
    check_positive_int("dim", dim)
    check_positive_int("heads", heads)
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
    return dim // heads


def check_x_and_valid(x: torch.Tensor, dim: int, valid: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` a floating ``[B, T, dim]`` tensor and ``valid`` None or a bool ``[B, T]``; returns ``valid``.

    Example::

        >>> check_x_and_valid(torch.zeros(2, 3, 8), 8, None) is None
        True
    """
    check_tensor("x", x, 3, "[batch, seq, dim]")
    if x.shape[-1] != dim:
        raise ValueError(f"x must be [batch, seq, dim] with dim = {dim}, got shape {tuple(x.shape)}")
    if valid is None:
        return None
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor [batch, seq], got {getattr(valid, 'dtype', type(valid))}")
    if tuple(valid.shape) != tuple(x.shape[:2]):
        raise ValueError(f"valid must be [batch, seq] = {tuple(x.shape[:2])}, got {tuple(valid.shape)}")
    return valid


def check_state_size_args(batch: int, seq_len: int) -> None:
    """The arguments of ``state_size``: ``batch >= 1`` sequences at context ``seq_len >= 0``.

    Example::

        >>> check_state_size_args(0, 10)
        Traceback (most recent call last):
        ...
        ValueError: batch must be an int >= 1, got 0
    """
    check_positive_int("batch", batch)
    check_int("seq_len", seq_len, 0)


def zero_invalid(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``x [B, T, ...]`` with zeros at the positions where ``valid [B, T]`` is False (``x`` if None).

    Example::

        >>> zero_invalid(torch.ones(1, 3, 2), torch.tensor([[False, True, True]]))[0, :, 0].tolist()
        [0.0, 1.0, 1.0]
    """
    if valid is None:
        return x
    return x * valid.reshape(valid.shape + (1,) * (x.dim() - 2)).to(x.dtype)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, T, heads * D] -> [B, T, heads, D]``.

    Example::

        >>> tuple(split_heads(torch.zeros(2, 5, 12), 3).shape)
        (2, 5, 3, 4)
    """
    return x.reshape(x.shape[0], x.shape[1], heads, -1)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, H, D] -> [B, T, H * D]``.

    Example::

        >>> tuple(merge_heads(torch.zeros(2, 5, 3, 4)).shape)
        (2, 5, 12)
    """
    return x.reshape(x.shape[0], x.shape[1], -1)


class ShortConv(nn.Module):
    """Causal depthwise convolution over time (kernel ``kernel_size``, default 4) with SiLU, as a layer
    around :func:`effattn.linear.causal_conv1d`.

    ``y_t = silu(b + sum_{i<K} w_i * x_{t-K+1+i})``; the state is the last ``K - 1`` inputs
    ``[B, K - 1, C]`` (zeros for a fresh sequence), so decoding one token continues exactly.
    Inputs at invalid (padded) positions are zeroed first, as if the sequence began later.
    On sequence shards (inside :func:`effattn.dist.sequence_parallel`, no ``state``) the ``K - 1`` inputs
    before the shard come from the previous rank(s) (:meth:`effattn.dist.SequenceParallel.previous_tokens`),
    so each rank's rows equal the single-process convolution's.

    Example::

        >>> conv = ShortConv(8)
        >>> x = torch.randn(1, 6, 8)
        >>> y, state = conv(x[:, :5])
        >>> y_last, _ = conv(x[:, 5:], state)             # continues from the last 3 inputs
        >>> torch.allclose(y_last, conv(x)[0][:, 5:], atol=1e-6)
        True
    """

    def __init__(self, channels: int, kernel_size: int = 4, activation: bool = True):
        super().__init__()
        check_positive_int("kernel_size", kernel_size)
        self.kernel_size, self.activation = kernel_size, activation
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.uniform_(self.weight, -1 / math.sqrt(kernel_size), 1 / math.sqrt(kernel_size))

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, valid: torch.Tensor | None = None):
        x = zero_invalid(x, valid)
        sp = current_sequence_parallel() if state is None else None
        if sp is not None:  # sequence shards: the inputs before this shard, from the previous rank(s)
            state = sp.previous_tokens(x, self.kernel_size - 1)
        return causal_conv1d(x, self.weight, self.bias, state, self.activation)


class MixerBase(nn.Module):
    """Base of the mixers here: ``state_size`` is the bytes of the state a real call leaves behind
    (measured on a zeros input of ``_probe_len(seq_len)`` tokens; 1 for a recurrent state).

    Example::

        >>> class Cumulative(MixerBase):                    # a running sum: a [B, dim] state
        ...     def __init__(self, dim, heads):
        ...         super().__init__()
        ...         self.dim, self.proj = dim, torch.nn.Linear(dim, dim)
        ...     def forward(self, x, state=None, valid=None):
        ...         y = self.proj(x).cumsum(1) + (0 if state is None else state[:, None])
        ...         return y, y[:, -1]
        >>> Cumulative(16, 2).state_size(batch=3, seq_len=1000)   # 3 x 16 float32
        192
    """

    # sequence parallelism (effattn.dist.sequence_parallel): a mixer that runs on sequence shards sets
    # supports_sequence_parallel = True; one that cannot says why in sequence_parallel_unsupported
    supports_sequence_parallel = False
    sequence_parallel_unsupported: str | None = None

    def _probe_len(self, seq_len: int) -> int:
        return 1  # recurrent: the state does not grow with the context

    def state_size(self, batch: int, seq_len: int) -> int:
        """Bytes of state held for ``batch`` sequences at context ``seq_len``."""
        check_state_size_args(batch, seq_len)
        p = next(self.parameters())
        with torch.no_grad():
            x = torch.zeros(batch, max(1, self._probe_len(seq_len)), self.dim, device=p.device, dtype=p.dtype)
            _, state = self(x)
        return state_nbytes(state)
