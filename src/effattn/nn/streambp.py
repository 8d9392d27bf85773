"""StreamBP: exact backpropagation of a decoder block stack, chunked along the sequence.

Luo et al., "StreamBP: Memory-Efficient Exact Backpropagation for Long Sequence Training of LLMs",
2025. The forward runs every block without recording a graph and keeps only each block's input
``h_l`` (as layer-wise recomputation does). The backward of block ``l`` receives ``g = dL/dh_{l+1}``
for all ``T`` positions and walks the sequence in chunks ``S_j`` of ``c`` tokens. A pre-norm causal
block is

    a_t = h_t + W_o softmax_{s <= t}(q_t k_s^T / sqrt(d)) v_s,   q_t, k_t, v_t from RMSNorm(h_t)
    out_t = a_t + MLP(RMSNorm(a_t))

and only the keys and values mix positions. So with ``K = k(h)``, ``V = v(h)`` computed once for the
whole sequence (and held as leaves), the chunk ``S_j``'s outputs depend on ``h_{S_j}`` (its queries,
residual and MLP) and on ``K, V`` of the prefix ``t <= max S_j`` only. By the chain rule

    dL/dh_{S_j} (direct part) = grad of <g_{S_j}, out_{S_j}> w.r.t. h_{S_j} with K, V fixed
    dL/dK = sum_j grad of <g_{S_j}, out_{S_j}> w.r.t. K_{prefix_j}     (the same for V)
    dL/dh  += (dk/dh)^T dL/dK + (dv/dh)^T dL/dV,                       parameter grads summed likewise

which is the same sum autograd forms for the whole sequence, regrouped by query chunk: the gradient
is exact (float rounding aside). Peak memory of a block's backward is that of one chunk (its MLP
intermediate ``[c, hidden]``, its ``[c, prefix]`` attention tile) plus ``K, V, dK, dV`` of the whole
sequence, instead of all ``[T, hidden]`` intermediates at once. The loss is formed per chunk too
(:func:`effattn.train.chunked_cross_entropy`).

Attention statistics (the fast path). For plain causal attention (no window, sinks, softcap, named
backend) on CPU tensors in float32/float64, the forward also keeps each block's attention output ``o``
and log-sum-exp ``L`` (``[T, dim]`` and ``[heads, T]`` more per block; the placement of LightSeq's
rematerialization-aware checkpointing, Li et al., "LightSeq: Sequence Level Parallelism for Distributed
Training of Long Context Transformers", 2023). A chunk's backward then recomputes only its queries, the
output projection and the MLP, and runs attention's *backward* from the saved statistics (FlashAttention's
identities ``P = exp(q k^T / sqrt(d) - L)``, ``dS = P (dP - rowsum(dO o))``) in two calls of ATen's CPU
flash kernels: the prefix keys ``t < s`` without a mask and the chunk's own keys causally. Attention's
forward never runs twice, so the step costs one forward more of the token-wise layers only.

Where it applies: blocks whose mixer is causal softmax attention (``"attention"``, ``"sliding_window"``:
:class:`effattn.nn.Attention` without mask/score mods or head gates) and whose MLP is token-wise
(the dense SwiGLU). Recurrent and linear mixers carry a state across chunks and MoE layers route
over the whole batch, so :func:`check_streambp` refuses them by name.

Example::

    >>> import torch
    >>> from effattn.nn import LM, LMConfig
    >>> cfg = dict(vocab_size=50, dim=32, n_layers=2, heads=2, mixers="attention,sliding_window")
    >>> _ = torch.manual_seed(0); a = LM(LMConfig(**cfg))
    >>> _ = torch.manual_seed(0); b = LM(LMConfig(**cfg, streambp=8))
    >>> ids = torch.randint(0, 50, (2, 21))
    >>> a(ids)[0].square().mean().backward(); b(ids)[0].square().mean().backward()
    >>> torch.allclose(a.embed.weight.grad, b.embed.weight.grad, atol=1e-6)
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from effattn._checks import check_int
from effattn.exact import attention, window_bounds
from effattn.moe import MoE
from effattn.nn.attention import Attention

__all__ = [
    "STREAMBP_MIXERS",
    "check_streambp",
    "streambp_block",
    "streambp_block_backward",
    "uses_attention_stats",
]

STREAMBP_MIXERS = ("attention", "sliding_window")


def check_streambp(chunk: int, mixers: Sequence[str], ffn: Sequence[str]) -> None:
    """Refuse ``LMConfig(streambp=chunk)`` for a layer stack StreamBP does not apply to (names the layers)."""
    check_int("streambp", chunk, minimum=0)
    if not chunk:
        return
    bad = sorted({m for m in mixers if m not in STREAMBP_MIXERS})
    if bad:
        raise ValueError(
            f"streambp applies to causal softmax-attention mixers {STREAMBP_MIXERS}; mixers {bad} carry state "
            "across the sequence (use checkpoint='block' or reversible=True for them)"
        )
    if any(f != "dense" for f in ffn):
        raise ValueError(
            f"streambp needs a token-wise MLP on every layer (ffn='dense'), got ffn={list(ffn)}: MoE layers route "
            "over the whole batch"
        )


def _check_block(block: nn.Module) -> Attention:
    m = block.mixer
    if not isinstance(m, Attention) or not m.causal:
        raise ValueError(f"streambp: layer mixer {type(m).__name__} is not causal effattn.nn.Attention")
    if m.mask_mod is not None or m.score_mod is not None or m.head_gates is not None:
        raise ValueError("streambp: attention layers with mask_mod, score_mod or head gates are not supported")
    if isinstance(block.mlp, MoE):
        raise ValueError("streambp: an MoE layer routes over the whole batch, not token by token")
    return m


def _heads(x: torch.Tensor, proj: nn.Linear, heads: int, head_dim: int) -> torch.Tensor:
    return proj(x).view(*x.shape[:2], heads, head_dim)


def _keys_values(m: Attention, n: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = _heads(n, m.k_proj, m.kv_heads, m.head_dim)
    v = _heads(n, m.v_proj, m.kv_heads, m.head_dim)
    if m.k_norm is not None:
        k = m.k_norm(k)
    if m.rope is not None:
        k = m.rope.apply(k, pos)
    return k, v


def _chunk_attention(m: Attention, q, k, v, left: int | None) -> torch.Tensor:
    """Causal attention of the chunk's queries (the last ``T_q`` positions) over the keys ``k`` that end
    with them (bottom-right aligned, window ``left``). Plain calls go to SDPA with the chunk's
    ``[T_q, T_k]`` boolean mask (bounded by ``chunk x T``; SDPA's own causal flag aligns top-left);
    sinks, softcap or a named backend go to :func:`effattn.attention`."""
    if m.sinks is not None or m.softcap is not None or m.backend != "auto":
        sinks = None if m.sinks is None else m.sinks.to(q.dtype)
        return attention(q, k, v, causal=True, window=m.window, softcap=m.softcap, sinks=sinks, backend=m.backend)
    Tq, Tk = q.shape[1], k.shape[1]
    qi = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
    kj = torch.arange(Tk, device=q.device)[None]
    mask = kj <= qi
    if left is not None:
        mask &= qi - kj <= left
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=m.heads != m.kv_heads
    )
    return o.transpose(1, 2)


def _queries(m: Attention, n: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    q = _heads(n, m.q_proj, m.heads, m.head_dim)
    if m.q_norm is not None:
        q = m.q_norm(q)
    if m.rope is not None:
        q = m.rope.apply(q, pos)
    return q


def _chunk_output(block, m: Attention, x, k, v, pos, left: int | None) -> torch.Tensor:
    """The block's output for the query chunk ``x`` against the keys/values ``k, v`` of its prefix."""
    q = _queries(m, block.mixer_norm(x), pos)
    o = _chunk_attention(m, q, k, v, left)
    a = x + m.o_proj(o.flatten(2))
    return a + block.mlp(block.mlp_norm(a))


def uses_attention_stats(block: nn.Module, h: torch.Tensor) -> bool:
    """Whether :func:`streambp_block` keeps the block's attention output and LSE (the fast path of the
    module docstring): plain causal attention on a CPU float32/float64 tensor, outside autocast."""
    m = _check_block(block)
    plain = m.window is None and m.sinks is None and m.softcap is None and m.backend == "auto"
    cpu = h.device.type == "cpu" and h.dtype in (torch.float32, torch.float64)
    return plain and cpu and not torch.is_autocast_enabled("cpu")


def _expand_kv(m: Attention, x: torch.Tensor) -> torch.Tensor:
    """``[B, T, kv_heads, D] -> [B, heads, T, D]`` (query head ``h`` reads key head ``h // group``)."""
    return x.transpose(1, 2).repeat_interleave(m.heads // m.kv_heads, dim=1)


def _stats_forward(block, m: Attention, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``block(h)[0]`` through ATen's CPU flash kernel, with the attention output ``o [B, T, H, D]`` and
    its LSE ``[B, H, T]``."""
    pos = torch.arange(h.shape[1], device=h.device)
    n = block.mixer_norm(h)
    q = _queries(m, n, pos)
    k, v = _keys_values(m, n, pos)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), _expand_kv(m, k), _expand_kv(m, v), 0.0, True
    )
    o = o.transpose(1, 2)
    a = h + m.o_proj(o.flatten(2))
    return a + block.mlp(block.mlp_norm(a)), o, lse


def _stats_backward(block, m: Attention, h, o, lse, grad_out, chunk, params, add) -> torch.Tensor:
    """``dL/dh`` of the fast path (parameter gradients go to ``add``): per chunk, the gradient of the
    output projection, residual and MLP, then attention's backward from the saved ``o, lse``."""
    B, T = h.shape[:2]
    pos = torch.arange(T, device=h.device)
    flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    with torch.enable_grad():
        x_all = h.detach().requires_grad_()
        k, v = _keys_values(m, block.mixer_norm(x_all), pos)
    kx, vx = _expand_kv(m, k.detach()), _expand_kv(m, v.detach())  # [B, H, T, D]
    dkx, dvx = torch.zeros_like(kx), torch.zeros_like(vx)
    dh = torch.empty_like(h)
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        with torch.enable_grad():
            x = h[:, s:e].detach().requires_grad_()
            oc = o[:, s:e].detach().requires_grad_()
            a = x + m.o_proj(oc.flatten(2))
            out = a + block.mlp(block.mlp_norm(a))
            q = _queries(m, block.mixer_norm(x), pos[s:e])
        d = torch.autograd.grad(out, (x, oc, *params), grad_out[:, s:e], allow_unused=True)
        add(d[2:])
        do_t, o_t, q_t, lse_c = (
            d[1].transpose(1, 2),
            o[:, s:e].transpose(1, 2),
            q.detach().transpose(1, 2),
            lse[:, :, s:e],
        )
        # keys of the chunk itself, causally (a square block: top-left and bottom-right alignment agree)
        dq, dk, dv = flash_backward(do_t, q_t, kx[:, :, s:e], vx[:, :, s:e], o_t, lse_c, 0.0, True)
        dkx[:, :, s:e] += dk
        dvx[:, :, s:e] += dv
        if s:  # the prefix: every key visible to every query of the chunk
            dq_p, dk, dv = flash_backward(do_t, q_t, kx[:, :, :s], vx[:, :, :s], o_t, lse_c, 0.0, False)
            dq = dq + dq_p
            dkx[:, :, :s] += dk
            dvx[:, :, :s] += dv
        dq_grads = torch.autograd.grad(q, (x, *params), dq.transpose(1, 2), allow_unused=True)
        dh[:, s:e] = d[0] + dq_grads[0]
        add(dq_grads[1:])
        del out, d, q, dq_grads
    group = (B, m.kv_heads, m.heads // m.kv_heads, T, m.head_dim)
    dk_kv, dv_kv = (g.view(group).sum(2).transpose(1, 2) for g in (dkx, dvx))
    d = torch.autograd.grad((k, v), (x_all, *params), (dk_kv, dv_kv), allow_unused=True)
    dh += d[0]
    add(d[1:])
    return dh


def streambp_block_backward(
    block: nn.Module,
    h: torch.Tensor,
    grad_out: torch.Tensor,
    chunk: int,
    params: Sequence[nn.Parameter],
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """``(dL/dh, [dL/dp for p in params])`` of one pre-norm attention block (``block(h)`` of a fresh
    sequence) from ``grad_out = dL/dblock(h)``, computed ``chunk`` query tokens at a time (see the
    module docstring for the decomposition). ``h [B, T, dim]``. ``stats``: the attention output and LSE
    the fast path's forward kept (then attention's forward is not recomputed)."""
    m = _check_block(block)
    B, T = h.shape[:2]
    pos = torch.arange(T, device=h.device)
    left = window_bounds(m.window, True)[0] if m.window is not None else None
    grads: list[torch.Tensor | None] = [None] * len(params)

    def add(new: Sequence[torch.Tensor | None]) -> None:
        for i, g in enumerate(new):
            if g is not None:
                grads[i] = g if grads[i] is None else grads[i] + g

    if stats is not None:
        return _stats_backward(block, m, h, *stats, grad_out, chunk, params, add), grads
    with torch.enable_grad():
        x_all = h.detach().requires_grad_()
        k, v = _keys_values(m, block.mixer_norm(x_all), pos)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    dh = torch.empty_like(h)
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        lo = 0 if left is None else max(0, s - left)
        with torch.enable_grad():
            x = h[:, s:e].detach().requires_grad_()
            kc = k[:, lo:e].detach().requires_grad_()
            vc = v[:, lo:e].detach().requires_grad_()
            out = _chunk_output(block, m, x, kc, vc, pos[s:e], left)
        d = torch.autograd.grad(out, (x, kc, vc, *params), grad_out[:, s:e], allow_unused=True)
        dh[:, s:e] = d[0]
        dk[:, lo:e] += d[1]
        dv[:, lo:e] += d[2]
        add(d[3:])
        del out, d
    d = torch.autograd.grad((k, v), (x_all, *params), (dk, dv), allow_unused=True)
    dh += d[0]
    add(d[1:])
    return dh, grads


class _StreamBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, block, chunk, *params):
        ctx.stats = None
        with torch.no_grad():
            if uses_attention_stats(block, h):
                out, o, lse = _stats_forward(block, block.mixer, h)
                ctx.stats = (o, lse)
            else:
                out, _ = block(h)
        # plain attributes: the block input (and the attention statistics) are the whole saved state (no
        # saved-tensor hook may alter them)
        ctx.h, ctx.block, ctx.chunk = h.detach(), block, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        params = [p for p in ctx.block.parameters() if p.requires_grad]
        dh, grads = streambp_block_backward(ctx.block, ctx.h, grad_out, ctx.chunk, params, ctx.stats)
        ctx.h = ctx.stats = None
        return (dh, None, None, *grads)


def streambp_block(block: nn.Module, h: torch.Tensor, chunk: int) -> torch.Tensor:
    """``block(h)[0]`` for a fresh sequence, recording nothing but ``h`` for the backward, which
    :func:`streambp_block_backward` forms ``chunk`` tokens at a time (exact)."""
    check_int("chunk", chunk, minimum=1)
    _check_block(block)
    params = [p for p in block.parameters() if p.requires_grad]
    if not torch.is_grad_enabled() or not (h.requires_grad or params):
        return block(h)[0]
    return _StreamBlock.apply(h, block, chunk, *params)
