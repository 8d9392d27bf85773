"""Rotary position embedding (Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position
Embedding").

A pair of channels ``(x_a, x_b)`` of a query or key at position ``m`` is rotated by the angle
``m * theta_i`` with ``theta_i = base^(-2i / d_rot)``:

    x_a' = x_a cos(m theta_i) - x_b sin(m theta_i)
    x_b' = x_b cos(m theta_i) + x_a sin(m theta_i)

so that ``<R_m q, R_n k>`` depends only on ``q``, ``k`` and ``m - n``. Channels are paired as the
two halves of the rotated slice (``i`` with ``i + d_rot / 2``, the GPT-NeoX / LLaMA convention).
Partial RoPE (GPT-NeoX ``rotary_pct``, ChatGLM) rotates only the first ``d_rot = fraction * head_dim``
channels (rounded down to an even number) and passes the rest through unchanged.
"""

from __future__ import annotations

import torch

from effattn._checks import check_positive_int


class RotaryEmbedding:
    """RoPE on the first ``fraction * head_dim`` channels of ``[B, T, H, D]`` tensors.

    ``cos``/``sin`` tables are built lazily in float32 for the largest position seen (grown by
    doubling) on the device of the input. A plain object, not an ``nn.Module``: it has no
    parameters, and ``nn.Module.apply(fn)`` (weight init) must not collide with :meth:`apply`.

    Example::

        >>> rope = RotaryEmbedding(16, fraction=0.5)
        >>> x = torch.randn(2, 5, 3, 16)
        >>> y = rope.apply(x, torch.arange(5))
        >>> bool((y[..., 8:] == x[..., 8:]).all())
        True
    """

    def __init__(self, head_dim: int, base: float = 10000.0, fraction: float = 1.0):
        check_positive_int("head_dim", head_dim)
        if not (0.0 < float(fraction) <= 1.0):
            raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
        if not float(base) > 1.0:
            raise ValueError(f"base must be > 1, got {base!r}")
        self.head_dim = head_dim
        self.base = float(base)
        self.fraction = float(fraction)
        self.rot_dim = (int(head_dim * self.fraction) // 2) * 2
        if self.rot_dim == 0:
            raise ValueError(f"fraction={fraction} of head_dim={head_dim} leaves no channel pair to rotate")
        inv_freq = self.base ** (-torch.arange(0, self.rot_dim, 2, dtype=torch.float64) / self.rot_dim)
        self.inv_freq = inv_freq  # float64; the angles are formed in float64, stored in float32
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"RotaryEmbedding(head_dim={self.head_dim}, rot_dim={self.rot_dim}, base={self.base:g})"

    def _tables(self, max_pos: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[0] <= max_pos or self._cos.device != device:
            n = max(64, 1 << max_pos.bit_length())  # next power of two above max_pos
            ang = torch.arange(n, device=device, dtype=torch.float64)[:, None] * self.inv_freq.to(device)
            self._cos, self._sin = ang.cos().float(), ang.sin().float()
        return self._cos, self._sin

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``/``sin`` of ``positions`` (any shape, int), shape ``positions.shape + [rot_dim / 2]``."""
        if not isinstance(positions, torch.Tensor) or positions.dtype.is_floating_point:
            raise TypeError(f"positions must be an int tensor, got {positions!r:.60}")
        if positions.numel() and int(positions.min()) < 0:
            raise ValueError(f"positions must be >= 0, got min {int(positions.min())}")
        cos, sin = self._tables(int(positions.max()) if positions.numel() else 0, positions.device)
        return cos[positions], sin[positions]

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [B, T, H, D]`` at ``positions`` ``[T]`` (shared by the batch) or ``[B, T]``
        (per row, e.g. left-padded batches where each row counts only its real tokens)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must have shape [batch, seq, heads, head_dim], got {getattr(x, 'shape', x)!r}")
        B, T, _, D = x.shape
        if D != self.head_dim:
            raise ValueError(f"x head_dim is {D}, this RotaryEmbedding was built for head_dim={self.head_dim}")
        if not isinstance(positions, torch.Tensor) or tuple(positions.shape) not in ((T,), (B, T)):
            raise ValueError(
                f"positions must have shape [seq] = [{T}] or [batch, seq] = [{B}, {T}], "
                f"got {getattr(positions, 'shape', positions)!r}"
            )
        cos, sin = self.cos_sin(positions.to(x.device))
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
        half = self.rot_dim // 2
        # float32 for half/bf16/float32 input; float64 input stays float64 (with the float32 tables), so a float64
        # model is differentiable to float64 precision (gradcheck) as effattn.exact.compute_dtype does for attention
        cd = torch.promote_types(x.dtype, torch.float32)
        xr = x[..., : self.rot_dim].to(cd)
        cos, sin = cos.to(cd), sin.to(cd)
        a, b = xr[..., :half], xr[..., half:]
        rot = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)
        if self.rot_dim == D:
            return rot
        return torch.cat([rot, x[..., self.rot_dim :]], dim=-1)

    __call__ = apply
