"""ATLAS (Behrouz et al., "ATLAS: Learning to Optimally Memorize the Context at Test Time", 2025).

The Omega rule optimises the memory over a sliding window of the last ``c`` tokens rather than the
current one, with per-token weights ``gamma_i`` in [0, 1]; keys and queries pass through a polynomial
feature map ``phi``; the update is plain momentum or Muon-style (Newton-Schulz orthogonalised)::

    g_t = sum_{i = t-c+1}^{t} gamma_i grad_W ||M_{t-1}(phi(k_i)) - v_i||^2
    S_t = eta_t S_{t-1} - theta_t g_t,           M_t = (1 - alpha_t) M_{t-1} + S_t        (default)
    S_t = eta_t S_{t-1} + g_t,                   M_t = (1 - alpha_t) M_{t-1} - theta_t NS5(S_t)   (muon)
    y_t = M_t(phi(q_t))

``c = 1`` is Titans. :func:`atlas_memory` runs the token-by-token reference (``chunk_size=None``) or the
chunked form (all window gradients of a chunk at the chunk-start memory; the window reaches back into
the previous chunk through the state's buffer of the last ``c - 1`` keys, values and gammas).
"""

from __future__ import annotations

import math

import torch

from effattn._checks import check_positive_int
from effattn.memory._chunked import chunk_neural_memory
from effattn.memory._neural import reference_neural_memory

__all__ = ["atlas_memory", "polynomial_features"]


def polynomial_features(x: torch.Tensor, degree: int = 2) -> torch.Tensor:
    """``phi(x) = [x, x^2 / sqrt(2!), ..., x^p / sqrt(p!)]`` (elementwise powers, concatenated on the
    last dim; the Taylor-style scaling of the exponential kernel's terms), ``degree`` p >= 1.

    Example::

        >>> polynomial_features(torch.tensor([2.0]), 2).tolist()
        [2.0, 2.8284270763397217]
    """
    check_positive_int("degree", degree)
    return torch.cat([x.pow(i) / math.sqrt(math.factorial(i)) for i in range(1, degree + 1)], -1)


def atlas_memory(
    q,
    k,
    v,
    theta,
    eta,
    alpha,
    weights,
    *,
    window: int = 4,
    gamma=None,
    muon: bool = False,
    chunk_size: int | None = None,
    initial_state=None,
    output_final_state=False,
    valid=None,
    max_grad_norm: float | None = None,
):
    """The Omega rule (module docstring) on already-featurised ``q, k [B, T, H, F]``; ``weights[0]`` is
    ``[H, F, ...]``. ``gamma [B, T, H]`` (None: all ones). ``chunk_size=None``: reference.

    Example::

        >>> x = polynomial_features(torch.nn.functional.normalize(torch.randn(1, 6, 1, 3), dim=-1))
        >>> v = torch.randn(1, 6, 1, 3); g = torch.full((1, 6, 1), 0.2)
        >>> w = [torch.zeros(1, 6, 3)]
        >>> a, _ = atlas_memory(x, x, v, g, g, g, w, window=3, chunk_size=1)
        >>> torch.allclose(a, atlas_memory(x, x, v, g, g, g, w, window=3)[0], atol=1e-6)
        True
    """
    kw = dict(gamma=gamma, window=window, muon=muon, initial_state=initial_state, output_final_state=output_final_state)
    kw.update(max_grad_norm=max_grad_norm)
    if chunk_size is None:
        return reference_neural_memory(q, k, v, theta, eta, alpha, weights, valid=valid, **kw)
    if valid is not None:
        raise ValueError("valid is supported by the reference form only (chunk_size=None)")
    return chunk_neural_memory(q, k, v, theta, eta, alpha, weights, chunk_size=chunk_size, **kw)
