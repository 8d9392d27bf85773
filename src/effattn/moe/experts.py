"""Experts: a stack of ``E`` feed-forward networks evaluated on token slices sorted by expert.

SwiGLU expert ``e`` (Shazeer, "GLU Variants Improve Transformer", 2020)::

    y = (silu(x W_gate[e]) * (x W_up[e])) W_down[e]

The weights of all experts are stored stacked (``w_gate_up [E, dim, 2*hidden]``, ``w_down [E, hidden,
dim]``) so that the dropless dispatcher runs one grouped matmul over tokens that are contiguous per
expert (MegaBlocks, "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts", 2022). The grouped
matmul is ``torch._grouped_mm`` where this torch build has it for the dtype and alignment (float32 /
bfloat16 / float16 with rows of a multiple of 16 bytes; it exists on the CPU in torch 2.13), otherwise one
matmul per expert over its contiguous slice. ``gemm="loop"`` forces the second form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effattn._checks import check_positive_int

__all__ = ["SwiGLU", "Experts", "grouped_matmul", "EXPERT_KINDS", "GEMM_IMPLS"]

EXPERT_KINDS = ("swiglu", "gelu")
GEMM_IMPLS = ("auto", "grouped_mm", "loop")


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP ``W_down(silu(W_gate x) * W_up x)`` (the shape of ``effattn.nn`` LM blocks).

    >>> import torch
    >>> mlp = SwiGLU(8, 16)
    >>> tuple(mlp(torch.randn(2, 3, 8)).shape)
    (2, 3, 8)
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("hidden", hidden)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if w.dtype != x.dtype:
        return False
    align = 16 // x.element_size()
    return x.shape[1] % align == 0 and w.shape[2] % align == 0


def _contiguous_grad(g: torch.Tensor) -> torch.Tensor:
    # torch._grouped_mm's CPU backward rejects expanded (stride-0) gradients such as those of .sum()
    return g.contiguous()


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Rows of ``x [A, in]`` sorted by group, ``counts [E]`` rows per group: ``y[rows of e] = x[rows of e] @ w[e]``.

    ``impl``: ``"grouped_mm"`` (``torch._grouped_mm``), ``"loop"`` (one matmul per group over its
    contiguous slice) or ``"auto"`` (the first where the build, dtype and alignment allow).

    >>> import torch
    >>> x, w = torch.randn(5, 4), torch.randn(2, 4, 8)
    >>> y = grouped_matmul(x, w, torch.tensor([2, 3]))
    >>> torch.allclose(y[:2], x[:2] @ w[0], atol=1e-6) and torch.allclose(y[2:], x[2:] @ w[1], atol=1e-6)
    True
    """
    if impl not in GEMM_IMPLS:
        raise ValueError(f"impl must be one of {GEMM_IMPLS}, got {impl!r}")
    ok = _grouped_mm_ok(x, w)
    if impl == "grouped_mm" and not ok:
        raise ValueError(
            f"torch._grouped_mm cannot run here (dtype {x.dtype}, in {x.shape[1]}, out {w.shape[2]}: needs "
            "float32/bfloat16/float16 with rows of a multiple of 16 bytes); use impl='loop' or 'auto'"
        )
    if ok and impl != "loop":
        offs = torch.cumsum(counts, 0).to(torch.int32)
        y = torch._grouped_mm(x.contiguous(), w, offs=offs)
        if y.requires_grad:
            y.register_hook(_contiguous_grad)
        return y
    # unbind, not w[e]: the backward of one w[e] is a zero tensor of w's full size per expert (O(E^2) traffic)
    ws = w.unbind(0)
    parts = [xe @ ws[e] for e, xe in enumerate(torch.split(x, counts.tolist())) if xe.shape[0]]
    return torch.cat(parts) if parts else x.new_zeros(0, w.shape[2])


class Experts(nn.Module):
    """``num_experts`` feed-forward experts with stacked weights.

    ``kind="swiglu"``: ``(silu(x Wg) * x Wu) Wd``; ``kind="gelu"``: ``gelu(x W1) W2``.
    :meth:`forward` takes rows sorted by expert and the row count of each expert (dropless dispatch);
    :meth:`expert` evaluates one expert (the per-token reference).

    >>> import torch
    >>> ex = Experts(3, 8, 16)
    >>> x, counts = torch.randn(5, 8), torch.tensor([2, 0, 3])
    >>> y = ex(x, counts)
    >>> torch.allclose(y[2:], ex.expert(x[2:], 2), atol=1e-5)
    True
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, kind: str = "swiglu", gemm: str = "auto"):
        super().__init__()
        check_positive_int("num_experts", num_experts)
        check_positive_int("dim", dim)
        check_positive_int("hidden", hidden)
        if kind not in EXPERT_KINDS:
            raise ValueError(f"expert must be one of {EXPERT_KINDS}, got {kind!r}")
        if gemm not in GEMM_IMPLS:
            raise ValueError(f"gemm must be one of {GEMM_IMPLS}, got {gemm!r}")
        self.num_experts, self.dim, self.hidden, self.kind, self.gemm = num_experts, dim, hidden, kind, gemm
        width = 2 * hidden if kind == "swiglu" else hidden
        self.w_in = nn.Parameter(torch.randn(num_experts, dim, width) * dim**-0.5)
        self.w_out = nn.Parameter(torch.randn(num_experts, hidden, dim) * hidden**-0.5)

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            g, u = h.split(self.hidden, dim=-1)
            return F.silu(g) * u
        return F.gelu(h)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``x [A, dim]`` rows sorted by expert, ``counts [E]`` -> ``[A, dim]``."""
        h = self._act(grouped_matmul(x, self.w_in, counts, self.gemm))
        return grouped_matmul(h, self.w_out, counts, self.gemm)

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert ``e`` on ``x [..., dim]`` (plain matmuls; the reference)."""
        return self._act(x @ self.w_in[e]) @ self.w_out[e]

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, kind={self.kind!r}"
