"""Comparison rules shared by all tests (DESIGN.md, 'Testing rules')."""

from __future__ import annotations

import torch


def rel_rms(x: torch.Tensor, ref: torch.Tensor, floor: float = 1e-2) -> float:
    """Relative RMS error ||x - ref|| / ||ref|| in float64; the reference's RMS is floored at
    ``floor`` so an exactly-zero reference (e.g. dk of a one-token sequence) compares absolutely."""
    x, ref = x.double(), ref.double()
    assert x.shape == ref.shape, f"shape {tuple(x.shape)} != reference {tuple(ref.shape)}"
    denom = max(ref.norm().item(), floor * ref.numel() ** 0.5)
    return ((x - ref).norm().item() / denom) if ref.numel() else 0.0


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item()


def assert_fp32_close(x, ref, tol: float = 1e-5, name: str = "output") -> None:
    """float32 rule: relative RMS error below ``tol`` (1e-5 forward, 1e-4 gradients)."""
    assert torch.isfinite(x).all(), f"{name}: non-finite values"
    err = rel_rms(x, ref)
    assert err < tol, f"{name}: relative RMS error {err:.3g} >= {tol:.1g}"


def assert_lowp_close(fast, ref_lowp, ref_fp32, atol: float = 1e-3, name: str = "output") -> None:
    """FlashAttention rule: max error of the fast form is at most 2x the max error of the
    reference run in the same low precision, plus ``atol``."""
    assert torch.isfinite(fast).all(), f"{name}: non-finite values"
    e_fast = max_err(fast, ref_fp32)
    e_ref = max_err(ref_lowp, ref_fp32)
    assert e_fast <= 2 * e_ref + atol, f"{name}: error {e_fast:.3g} > 2 x reference error {e_ref:.3g} + {atol}"
