"""Cross-entropy of a linear head computed in row chunks: the ``[N, vocab]`` logits never exist.

For hidden rows ``h_i`` (``[N, d]``), head ``W`` (``[V, d]``), logits ``z_i = W h_i`` and targets
``t_i``, with label smoothing ``eps`` and z-loss weight ``zeta``::

    l_i = lse(z_i) - (1 - eps) z_{i, t_i} - eps mean_v(z_{i, v}) + zeta lse(z_i)^2
    L   = sum_{i: t_i != ignore_index} l_i / #{i: t_i != ignore_index}        (reduction="mean")
    dl_i/dz_i = softmax(z_i) (1 + 2 zeta lse(z_i)) - (1 - eps) onehot(t_i) - eps / V

The forward pass walks the rows ``chunk`` at a time: it forms one chunk's logits, its loss and
``dz``, and accumulates ``dh = dz W`` and ``dW += dz^T h`` at once, so only ``[chunk, V]`` logits exist
at any time and the backward merely scales the stored gradients by the incoming one (the fused
linear cross-entropy of Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training", 2024;
the loss chunking of Luo et al., "Mini-Sequence Transformer", 2024). Without z-loss the loss equals
``F.cross_entropy(h @ W.T, t, ignore_index=..., label_smoothing=...)``; the z-loss term is the
PaLM auxiliary loss (Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways", 2022).
"""

from __future__ import annotations

import torch

from effattn._checks import check_float, check_int

__all__ = ["chunked_cross_entropy"]


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, ignore_index, label_smoothing, z_loss, reduction):
        n, vocab = hidden.shape[0], weight.shape[0]
        valid = targets != ignore_index
        count = int(valid.sum()) if reduction == "mean" else 1
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # float32 for bf16/fp16, float64 stays
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        w = weight
        for s in range(0, n, chunk):
            h = hidden[s : s + chunk]
            t = targets[s : s + chunk]
            keep = valid[s : s + chunk]
            z = (h @ w.t()).to(acc)
            lse = torch.logsumexp(z, dim=-1)
            tz = z.gather(1, t.clamp(0, vocab - 1)[:, None]).squeeze(1)
            loss = lse - (1 - label_smoothing) * tz
            if label_smoothing:
                loss = loss - label_smoothing * z.mean(dim=-1)
            if z_loss:
                loss = loss + z_loss * lse.square()
            total += torch.where(keep, loss, torch.zeros_like(loss)).sum()
            if need_h or need_w:
                p = torch.softmax(z, dim=-1)
                if z_loss:
                    p = p * (1 + 2 * z_loss * lse)[:, None]
                if label_smoothing:
                    p = p - label_smoothing / vocab
                p.scatter_add_(1, t.clamp(0, vocab - 1)[:, None], torch.full_like(tz, -(1 - label_smoothing))[:, None])
                dz = torch.where(keep[:, None], p, torch.zeros_like(p)) / max(count, 1)
                if need_h:
                    grad_h[s : s + chunk] = (dz.to(w.dtype) @ w).to(hidden.dtype)
                if need_w:  # ignored rows: zero, not 0 * h (h may hold inf/NaN there)
                    zero = torch.zeros((), dtype=acc, device=h.device)
                    grad_w += dz.t() @ torch.where(keep[:, None], h.to(acc), zero)
        ctx.save_for_backward(grad_h if need_h else None, grad_w.to(weight.dtype) if need_w else None)
        return (total / max(count, 1)).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (
            None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
            None if grad_w is None else grad_w * grad_out.to(grad_w.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
        )


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk: int = 1024,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of ``logits = hidden @ weight.T`` (see the module docstring for the formula),
    computed ``chunk`` rows at a time with the gradients of ``hidden`` and ``weight`` formed in the
    forward: peak extra memory ``[chunk, vocab]`` instead of ``[N, vocab]`` (twice, with its gradient).

    ``hidden [..., d]`` (flattened to rows), ``weight [vocab, d]``, ``targets [...]`` int64 (rows with
    ``ignore_index`` contribute nothing, whatever their hidden values). ``reduction``: ``"mean"``
    (over the non-ignored rows; 0 when there is none) or ``"sum"``.

    >>> import torch, torch.nn.functional as F
    >>> h, w = torch.randn(10, 8), torch.randn(20, 8)
    >>> t = torch.randint(0, 20, (10,), generator=torch.Generator().manual_seed(0))
    >>> torch.allclose(chunked_cross_entropy(h, w, t, chunk=3), F.cross_entropy(h @ w.T, t), atol=1e-5)
    True
    """
    check_int("chunk", chunk, minimum=1)
    check_float("label_smoothing", label_smoothing, 0.0, 1.0)
    check_float("z_loss", z_loss, 0.0, float("inf"))
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("hidden and weight must be torch.Tensors")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [..., d] and weight [vocab, d] with the same d, got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 or int32, got {targets.dtype}")
    t = targets.reshape(-1).long()
    keep = t != ignore_index
    if keep.any() and (t[keep].min() < 0 or t[keep].max() >= weight.shape[0]):
        raise ValueError(f"targets must lie in [0, {weight.shape[0]}) or equal ignore_index ({ignore_index})")
    h = hidden.reshape(-1, hidden.shape[-1])
    return _ChunkedCE.apply(h, weight, t, chunk, ignore_index, float(label_smoothing), float(z_loss), reduction)
