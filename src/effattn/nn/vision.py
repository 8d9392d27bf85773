"""Memory-efficient attention for vision backbones: cascaded group attention and single-head
attention on a channel slice. Non-causal; tokens are a sequence ``[B, N, C]`` or a grid
``[B, H, W, C]`` (flattened row-major for attention).

Cascaded group attention (Liu et al. 2023, "EfficientViT: Memory Efficient Vision Transformer with
Cascaded Group Attention"): the channels are split into ``h`` chunks ``x_1 .. x_h`` and head ``i``
sees its own chunk plus the previous head's output,

    x~_i = x_i + o_{i-1}   (x~_1 = x_1),   q_i, k_i, v_i = x~_i W^Q_i, x~_i W^K_i, x~_i W^V_i
    o_i = softmax(q_i k_i^T / sqrt(d_k)) v_i ,   y = act(concat_i o_i) W_P

so each head works on a different split (more diverse attention maps) and the heads refine each
other; per-head projections are ``C/h x C/h``-sized instead of ``C x C``. EfficientViT's depthwise
convolution on ``q`` is optional (``dw_kernel``, grids only); its learned relative position biases
are not included.

Single-head self-attention (Yun & Ro 2024, "SHViT: Single-Head Vision Transformer with Memory
Efficient Macro Design"): one head on the first ``p`` channels, the rest passed through,

    x = [x_a | x_b],  o = softmax(q k^T / sqrt(d_qk)) v  with q, k, v from norm(x_a)
    y = act([o | x_b]) W_P

which removes the redundancy of many heads and the memory traffic of reshaping them.
"""

from __future__ import annotations

import torch
from torch import nn

from effattn._checks import check_positive_int
from effattn.exact import attention


def _tokens(x, dim: int, grid) -> tuple[torch.Tensor, tuple[int, int] | None, tuple[int, ...]]:
    """Flatten ``[B, H, W, C]`` to ``[B, H*W, C]``; check ``[B, N, C]`` against ``grid``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [batch, tokens, dim] or [batch, H, W, dim], got {type(x).__name__}")
    if x.dim() not in (3, 4) or x.shape[-1] != dim:
        raise ValueError(f"x must have shape [batch, tokens, {dim}] or [batch, H, W, {dim}], got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    shape = tuple(x.shape)
    if x.dim() == 4:
        if grid is not None and tuple(grid) != shape[1:3]:
            raise ValueError(f"grid {tuple(grid)} does not match x of shape {shape}")
        return x.flatten(1, 2), shape[1:3], shape
    if grid is not None:
        if len(grid) != 2 or grid[0] * grid[1] != shape[1]:
            raise ValueError(f"grid must be (H, W) with H * W = tokens = {shape[1]}, got {grid!r}")
        grid = (int(grid[0]), int(grid[1]))
    return x, grid, shape


class CascadedGroupAttention(nn.Module):
    """EfficientViT cascaded group attention over tokens ``[B, N, dim]`` or a grid ``[B, H, W, dim]``.

    Args:
        dim: channels (divisible by ``heads``); heads: number of cascaded heads.
        key_dim: query/key width per head (default ``dim // heads``); values have ``dim // heads``.
        dw_kernel: odd kernel size of a depthwise conv on each head's queries (needs a grid).
        activation: ReLU before the output projection (as EfficientViT).

    ``forward(x, grid=None) -> y`` with the shape of ``x``.

    Example::

        >>> cga = CascadedGroupAttention(32, 4, dw_kernel=3)
        >>> cga(torch.randn(2, 5, 6, 32)).shape
        torch.Size([2, 5, 6, 32])
    """

    def __init__(
        self, dim: int, heads: int, key_dim: int | None = None, dw_kernel: int | None = None, activation: bool = True
    ):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("heads", heads)
        check_positive_int("key_dim", key_dim, allow_none=True)
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if dw_kernel is not None:
            check_positive_int("dw_kernel", dw_kernel)
            if dw_kernel % 2 == 0:
                raise ValueError(f"dw_kernel must be odd, got {dw_kernel}")
        self.dim, self.heads = dim, heads
        self.split = dim // heads
        self.key_dim = key_dim or self.split
        self.qkv = nn.ModuleList(nn.Linear(self.split, 2 * self.key_dim + self.split) for _ in range(heads))
        self.dw = (
            nn.ModuleList(
                nn.Conv2d(self.key_dim, self.key_dim, dw_kernel, padding=dw_kernel // 2, groups=self.key_dim)
                for _ in range(heads)
            )
            if dw_kernel
            else None
        )
        self.act = nn.ReLU() if activation else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def head_outputs(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """The per-head outputs ``o_i [B, N, dim // heads]`` (before the projection)."""
        t, grid, _ = _tokens(x, self.dim, grid)
        if self.dw is not None and grid is None:
            raise ValueError("dw_kernel needs a 2-D grid: pass x as [batch, H, W, dim] or grid=(H, W)")
        B, N, _ = t.shape
        chunks = t.split(self.split, dim=-1)
        outs: list[torch.Tensor] = []
        for i in range(self.heads):
            inp = chunks[i] if i == 0 else chunks[i] + outs[-1]
            q, k, v = self.qkv[i](inp).split([self.key_dim, self.key_dim, self.split], dim=-1)
            if self.dw is not None:
                H, W = grid
                q = self.dw[i](q.transpose(1, 2).reshape(B, self.key_dim, H, W)).flatten(2).transpose(1, 2)
            o = attention(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), causal=False)
            outs.append(o.squeeze(2))
        return outs

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        y = self.proj(self.act(torch.cat(self.head_outputs(x, grid), dim=-1)))
        return y.view(x.shape)


class SingleHeadAttention(nn.Module):
    """SHViT single-head attention on the first ``partial`` channels; the rest pass through.

    Args:
        dim: channels; partial: channels that attend (default ``dim // 4``; SHViT uses ~1/4.67).
        qk_dim: query/key width (SHViT: 16).
        pre_norm: SHViT's GroupNorm with one group (statistics over all tokens and the ``partial``
            channels of a sample) before the q/k/v projection.
        activation: ReLU before the output projection.

    ``forward(x, grid=None) -> y`` with the shape of ``x`` (``[B, N, dim]`` or ``[B, H, W, dim]``).

    Example::

        >>> shsa = SingleHeadAttention(32, partial=8)
        >>> shsa(torch.randn(2, 10, 32)).shape
        torch.Size([2, 10, 32])
    """

    def __init__(
        self, dim: int, partial: int | None = None, qk_dim: int = 16, pre_norm: bool = True, activation: bool = True
    ):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("qk_dim", qk_dim)
        partial = max(1, dim // 4) if partial is None else partial
        check_positive_int("partial", partial)
        if partial > dim:
            raise ValueError(f"partial ({partial}) must be <= dim ({dim})")
        self.dim, self.partial, self.qk_dim = dim, partial, qk_dim
        self.norm = nn.GroupNorm(1, partial) if pre_norm else None
        self.qkv = nn.Linear(partial, 2 * qk_dim + partial)
        self.act = nn.ReLU() if activation else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        t, _, _ = _tokens(x, self.dim, grid)
        xa, xb = t[..., : self.partial], t[..., self.partial :]
        if self.norm is not None:
            xa = self.norm(xa.transpose(1, 2)).transpose(1, 2)
        q, k, v = self.qkv(xa).split([self.qk_dim, self.qk_dim, self.partial], dim=-1)
        o = attention(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), causal=False).squeeze(2)
        y = self.proj(self.act(torch.cat([o, xb], dim=-1)))
        return y.view(x.shape)
