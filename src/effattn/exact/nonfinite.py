"""Non-finite keys and values: masked ones never matter, visible ones poison only the rows that see them.

A masked score is removed by arithmetic in the fast paths (``exp(S - m) * keep``, ``P @ V`` over a tile
that holds masked keys), and ``nan * 0 = nan``: one NaN key or value in an unused cache slot, a padded
token or a masked position would otherwise reach every query of its tile. Garbage in unused slots is
normal in serving, so every attention path applies this rule first:

    bad_j = any(~isfinite(k_j)) or any(~isfinite(v_j))        (per batch, key position and kv head)
    k_j, v_j <- 0 where bad_j                                   (their gradients are 0)
    o_i, lse_i <- NaN where query i may see a bad key            (visibility from the mask alone)

Rows whose mask hides every bad key are exactly the rows of a clean run (forward and backward). A row
that may see a bad key gives NaN (SDPA gives NaN or +-inf there, depending on the values); the mask
decides visibility, a ``score_mod`` does not (a row whose score_mod would hide the key is still NaN).
The gradient treats bad entries as zeros and poisoned rows as constants. When ``k`` and ``v`` are finite
all of this costs one sum over each (a non-finite sum sends the call to the exact per-key test).
"""

from __future__ import annotations

import torch

from effattn.exact.reference import compute_dtype

__all__ = ["nonfinite_keys", "zero_keys", "poison_rows"]


def nonfinite_keys(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """``[B, T_k, H_kv]`` bool, True where the key or value vector holds a NaN or inf; ``None`` when none does.

    Example::

        >>> k = torch.zeros(1, 3, 1, 2); v = torch.zeros(1, 3, 1, 2); v[0, 1, 0, 1] = float("inf")
        >>> nonfinite_keys(k, v).flatten().tolist()
        [False, True, False]
        >>> nonfinite_keys(k, k) is None
        True
    """
    # fast path: one reduction per tensor (a NaN or inf makes the sum non-finite; a finite sum proves every
    # entry finite); only a non-finite sum (or an overflow of huge finite values) pays the exact test. The sum
    # is in the compute dtype (float32, float64 for float64 input): no float32 copy of a float64 cache
    cd = compute_dtype(k.dtype)
    if bool(torch.isfinite(k.sum(dtype=cd) + v.sum(dtype=cd))):
        return None
    bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))
    return bad if bool(bad.any()) else None


def zero_keys(k: torch.Tensor, v: torch.Tensor, bad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``k``, ``v`` with the ``bad`` ``[B, T_k, H_kv]`` positions set to 0 (differentiable; 0 gradient there)."""
    b = bad[..., None]
    return k.masked_fill(b, 0.0), v.masked_fill(b, 0.0)


def poison_rows(
    o: torch.Tensor, lse: torch.Tensor | None, sees: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``o [B, T_q, H_q, D_v]`` and ``lse [B, H_q, T_q]`` set to NaN where ``sees [B, T_q, H_q]`` is True."""
    nan = float("nan")
    o = o.masked_fill(sees[..., None], nan)
    if lse is not None:
        lse = lse.masked_fill(sees.transpose(1, 2), nan)
    return o, lse
