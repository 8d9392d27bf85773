"""Online spherical k-means for the Routing Transformer (Roy, Saffar, Vaswani and Grangier 2021,
"Efficient Content-Based Sparse Attention with Routing Transformers"): ``K`` centroids per head,
shared by queries and keys, moved by an exponential moving average, never by gradients.

``mu_c <- decay * mu_c + (1 - decay) * mean{x_hat : argmax_c' x_hat . mu_c' = c}`` over the normalized
tokens ``x_hat = x / |x|`` assigned to ``c`` (nearest centroid by cosine similarity).
"""

from __future__ import annotations

import torch
from torch import nn

from effattn._checks import check_float, check_positive_int

__all__ = ["KMeansRouter", "centroid_cosine", "nearest_centroid", "random_centroids"]


class KMeansRouter(nn.Module):
    """Online spherical k-means with ``num_clusters`` centroids per head, shared by queries and keys.

    ``centroids [num_heads, num_clusters, head_dim]`` is a buffer (saved in the state dict, moved by
    ``.to()``, never a parameter: it gets no gradient); :meth:`update` applies the exponential moving
    average, and :func:`routing_attention` calls it when the router is in training mode.

    Example::

        >>> router = KMeansRouter(2, 16, 4, seed=0)
        >>> q = k = torch.randn(1, 32, 2, 16)
        >>> router.assign(q).shape
        torch.Size([1, 2, 32])
    """

    def __init__(self, num_heads: int, head_dim: int, num_clusters: int, decay: float = 0.999, seed: int | None = None):
        super().__init__()
        for name, val in (("num_heads", num_heads), ("head_dim", head_dim), ("num_clusters", num_clusters)):
            check_positive_int(name, val)
        check_float("decay", decay, 0.0, 1.0, hi_open=True)
        self.num_heads, self.head_dim, self.num_clusters, self.decay = num_heads, head_dim, num_clusters, float(decay)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        init = torch.randn(num_heads, num_clusters, head_dim, generator=gen)
        self.register_buffer("centroids", nn.functional.normalize(init, dim=-1))

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, num_clusters={self.num_clusters}, "
            f"decay={self.decay}"
        )

    def _check(self, x: torch.Tensor, name: str) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[2:]) != (self.num_heads, self.head_dim):
            raise ValueError(
                f"{name} must be [batch, seq, {self.num_heads}, {self.head_dim}] for this router, "
                f"got {tuple(getattr(x, 'shape', ()))}"
            )

    def similarity(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of ``x [B, T, H, D]`` to every centroid: ``[B, H, T, K]`` (float32, no grad)."""
        self._check(x, "x")
        with torch.no_grad():
            return centroid_cosine(x, self.centroids)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest centroid of every token: ``[B, H, T]``."""
        return self.similarity(x).argmax(-1)

    @torch.no_grad()
    def update(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """One EMA step towards the means of the normalized ``q`` and ``k`` assigned to each centroid.

        Centroids with no assigned token stay where they are.
        """
        self._check(q, "q")
        self._check(k, "k")
        x = torch.cat([q, k], 1).detach().float()
        x = nn.functional.normalize(x, dim=-1)
        c = centroid_cosine(x, self.centroids).argmax(-1)  # [B, H, 2T]
        H, K, D = self.centroids.shape
        flat = (torch.arange(H, device=x.device).view(1, H, 1) * K + c).reshape(-1)
        xs = x.transpose(1, 2).reshape(-1, D)
        sums = torch.zeros(H * K, D, device=x.device).index_add_(0, flat, xs)
        counts = torch.zeros(H * K, device=x.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
        means = (sums / counts.clamp_min(1)[:, None]).view(H, K, D)
        hit = (counts > 0).view(H, K, 1)
        new = self.decay * self.centroids + (1 - self.decay) * means.to(self.centroids.dtype)
        self.centroids.copy_(torch.where(hit, new, self.centroids))


def centroid_cosine(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of ``x [B, T, H, D]`` to ``centroids [H, K, D]``: ``[B, H, T, K]`` float32.

    Example::

        >>> centroid_cosine(torch.ones(1, 3, 2, 4), torch.ones(2, 5, 4)).shape
        torch.Size([1, 2, 3, 5])
    """
    xn = nn.functional.normalize(x.detach().float(), dim=-1)
    cn = nn.functional.normalize(centroids.detach().float().to(x.device), dim=-1)
    return torch.einsum("bthd,hkd->bhtk", xn, cn)


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (largest cosine similarity) of every token: ``[B, H, T]``.

    Example::

        >>> c = random_centroids(2, 4, 3, seed=0)
        >>> bool((nearest_centroid(c.transpose(0, 1)[None], c) == torch.arange(3)).all())
        True
    """
    return centroid_cosine(x, centroids).argmax(-1)


def random_centroids(num_heads: int, head_dim: int, num_clusters: int, seed: int = 0) -> torch.Tensor:
    """Data-independent unit centroids ``[num_heads, num_clusters, head_dim]`` from ``seed``.

    Example::

        >>> random_centroids(2, 8, 4, seed=0).norm(dim=-1).allclose(torch.ones(2, 4))
        True
    """
    gen = torch.Generator().manual_seed(seed)
    return nn.functional.normalize(torch.randn(num_heads, num_clusters, head_dim, generator=gen), dim=-1)
