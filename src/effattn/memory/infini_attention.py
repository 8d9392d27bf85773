"""Infini-attention (Munkhdalai, Faruqui, Gopal, "Leave No Context Behind: Efficient Infinite Context
Transformers with Infini-attention", 2024).

The stream is cut into segments of ``N`` tokens (counted from the sequence start). Inside a segment,
causal softmax attention; across segments, a compressive linear memory with ``sigma = elu + 1``::

    A_dot = softmax(Q_s K_s^T * scale + causal) V_s                      (local, within segment s)
    A_mem = sigma(Q_s) M_{s-1} / (sigma(Q_s) z_{s-1})                     (retrieval, 0 while z = 0)
    M_s = M_{s-1} + sigma(K_s)^T V_s                                       (linear update), or
    M_s = M_{s-1} + sigma(K_s)^T (V_s - sigma(K_s) M_{s-1} / (sigma(K_s) z_{s-1}))   (delta update)
    z_s = z_{s-1} + sum_t sigma(K_{s,t})
    out = sigmoid(beta_h) A_mem + (1 - sigmoid(beta_h)) A_dot             (learned per-head gate)

The memory is written when a segment completes. :func:`infini_attention_reference` runs token by
token with the current segment's keys and values in a buffer of ``N`` slots and a per-row fill count
(so rows may sit at different positions of their segments: left padding, decoding);
:func:`infini_attention` is the segment-parallel form (local attention by
:func:`effattn.exact.attention` on all segments at once, memory reads and writes as a scan over
segments), used when the call starts at a segment boundary with no padding, the reference otherwise.
State (bounded): ``M [B, H, D, V]``, ``z [B, H, D]``, buffers ``k [B, N, H, D]``, ``v [B, N, H, V]``,
``count [B]``.

Positions: ``rope`` (an :class:`effattn.exact.RotaryEmbedding`; None: none, as in the formulas above)
rotates ``Q_s`` and ``K_s`` of the local attention by the position inside the segment (``0 .. N-1``; the
local attention never leaves a segment, so these relative positions are the sequence's), the paper's
local attention being a standard transformer attention with its positional encoding. The memory reads and
writes the unrotated ``sigma(Q)``, ``sigma(K)`` and the buffers hold unrotated keys, so the state is the
same with or without ``rope``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from effattn._checks import check_positive_int, check_tensor
from effattn.exact import attention

__all__ = ["infini_attention", "infini_attention_reference"]

_EPS = 1e-6


def _sigma(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


def _check(q, k, v, gate, segment, scale):
    check_tensor("q", q, 4, "[batch, seq, heads, head_dim]")
    check_tensor("k", k, 4, "[batch, seq, heads, head_dim]")
    check_tensor("v", v, 4, "[batch, seq, heads, value_dim]")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"k must be q's shape {tuple(q.shape)} and v [batch, seq, heads, value_dim] with "
            f"the same leading dims, got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    H = q.shape[2]
    if not isinstance(gate, torch.Tensor) or tuple(gate.shape) != (H,):
        raise ValueError(
            f"gate must be a [heads={H}] tensor of logits, got "
            f"{tuple(gate.shape) if isinstance(gate, torch.Tensor) else type(gate).__name__}"
        )
    check_positive_int("segment", segment)
    return 1 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _wd(x: torch.Tensor) -> torch.dtype:
    """The working dtype: float32, or float64 for float64 inputs (gradchecks)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _empty_state(q, v, segment):
    B, _, H, D = q.shape
    V = v.shape[-1]
    z, wd = q.new_zeros, _wd(q)
    return dict(
        M=z(B, H, D, V, dtype=wd),
        z=z(B, H, D, dtype=wd),
        k=z(B, segment, H, D, dtype=wd),
        v=z(B, segment, H, V, dtype=wd),
        count=torch.zeros(B, dtype=torch.long, device=q.device),
    )


def _read(sq, M, z):
    num = torch.einsum("...hd,...hdv->...hv", sq, M)
    den = torch.einsum("...hd,...hd->...h", sq, z)[..., None]
    return torch.where(den > _EPS, num / den.clamp_min(_EPS), torch.zeros_like(num))


def _write(sk, v, M, z, delta):
    """Memory update with one segment's sigma(K) ``[B, N, H, D]`` and V (padded slots zero in both)."""
    if delta:
        v = v - _read(sk.transpose(0, 1), M, z).transpose(0, 1) * (sk.sum(-1, keepdim=True) > 0)
    return M + torch.einsum("bnhd,bnhv->bhdv", sk, v), z + sk.sum(1)


def infini_attention_reference(
    q,
    k,
    v,
    gate,
    *,
    segment: int,
    delta: bool = False,
    scale: float | None = None,
    initial_state=None,
    output_final_state: bool = False,
    valid=None,
    rope=None,
):
    """Token-by-token Infini-attention (module docstring), float32; invalid (``valid`` False) tokens
    leave the state as it was and output zeros; ``rope`` RoPE on the local attention (module docstring).
    Returns ``(out [B, T, H, V], state or None)``.

    Example::

        >>> q = k = v = torch.randn(1, 7, 2, 4)
        >>> o, st = infini_attention_reference(q, k, v, torch.zeros(2), segment=3, output_final_state=True)
        >>> tuple(o.shape), st["count"].tolist()
        ((1, 7, 2, 4), [1])
    """
    scale = _check(q, k, v, gate, segment, scale)
    B, T, H, D = q.shape
    st = _empty_state(q, v, segment) if initial_state is None else dict(initial_state)
    M, z, kb, vb, cnt = st["M"], st["z"], st["k"], st["v"], st["count"]
    wd = _wd(q)
    g = torch.sigmoid(gate.to(wd))[:, None]
    slots = torch.arange(segment, device=q.device)
    outs = []
    for t in range(T):
        ok = torch.ones(B, dtype=torch.bool, device=q.device) if valid is None else valid[:, t]
        here = (slots[None] == cnt[:, None]) & ok[:, None]  # [B, N]
        kb = torch.where(here[..., None, None], k[:, t, None].to(wd), kb)
        vb = torch.where(here[..., None, None], v[:, t, None].to(wd), vb)
        seen = slots[None] <= cnt[:, None]  # [B, N]
        if rope is None:
            s = torch.einsum("bhd,bnhd->bhn", q[:, t].to(wd), kb) * scale
        else:  # slot n holds the key at segment position n, the query sits at the fill count
            qr = rope.apply(q[:, t, None].to(wd), cnt[:, None])[:, 0]
            s = torch.einsum("bhd,bnhd->bhn", qr, rope.apply(kb, slots)) * scale
        s = s.masked_fill(~seen[:, None], float("-inf"))
        a_dot = torch.einsum("bhn,bnhv->bhv", torch.softmax(s, -1), vb)
        a_mem = _read(_sigma(q[:, t].to(wd)), M, z)
        outs.append(torch.where(ok[:, None, None], g * a_mem + (1 - g) * a_dot, torch.zeros_like(a_dot)))
        full = ok & (cnt == segment - 1)
        if bool(full.any()):
            M2, z2 = _write(_sigma(kb), vb, M, z, delta)
            M = torch.where(full[:, None, None, None], M2, M)
            z = torch.where(full[:, None, None], z2, z)
        cnt = torch.where(ok, (cnt + 1) % segment, cnt)
    o = torch.stack(outs, 1) if outs else v.new_zeros(B, 0, H, v.shape[-1], dtype=wd)
    state = dict(M=M, z=z, k=kb, v=vb, count=cnt) if output_final_state else None
    return o.to(q.dtype), state


def infini_attention(
    q,
    k,
    v,
    gate,
    *,
    segment: int,
    delta: bool = False,
    scale: float | None = None,
    initial_state=None,
    output_final_state: bool = False,
    valid=None,
    rope=None,
):
    """Segment-parallel Infini-attention: equal to :func:`infini_attention_reference`, which it calls
    when ``valid`` is given or the state sits inside a segment.

    Example::

        >>> q, k, v = torch.randn(3, 1, 10, 2, 4).unbind(0)
        >>> a, _ = infini_attention(q, k, v, torch.zeros(2), segment=4, delta=True)
        >>> b, _ = infini_attention_reference(q, k, v, torch.zeros(2), segment=4, delta=True)
        >>> torch.allclose(a, b, atol=1e-5)
        True
    """
    scale = _check(q, k, v, gate, segment, scale)
    kw = dict(segment=segment, delta=delta, scale=scale, output_final_state=output_final_state)
    if valid is not None or (initial_state is not None and bool((initial_state["count"] != 0).any())):
        return infini_attention_reference(q, k, v, gate, initial_state=initial_state, valid=valid, rope=rope, **kw)
    B, T, H, D = q.shape
    V = v.shape[-1]
    st = _empty_state(q, v, segment) if initial_state is None else initial_state
    M, z = st["M"], st["z"]
    n_seg = -(-T // segment)
    pad = n_seg * segment - T
    wd = _wd(q)
    qf, kf, vf = (F.pad(x.to(wd), (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    qs, ks, vs = (x.reshape(B * n_seg, segment, H, -1) for x in (qf, kf, vf))
    if rope is not None:
        pos = torch.arange(segment, device=q.device)
        qs, ks = rope.apply(qs, pos), rope.apply(ks, pos)
    a_dot = attention(qs, ks, vs, causal=True, scale=scale).reshape(B, n_seg, segment, H, V)
    sk = _sigma(kf) * (torch.arange(n_seg * segment, device=q.device) < T)[None, :, None, None]
    sk, sq = sk.reshape(B, n_seg, segment, H, D), _sigma(qf).reshape(B, n_seg, segment, H, D)
    vseg = vf.reshape(B, n_seg, segment, H, V)
    g = torch.sigmoid(gate.to(wd))[:, None]
    outs = []
    for s in range(n_seg):
        outs.append(g * _read(sq[:, s], M[:, None], z[:, None]) + (1 - g) * a_dot[:, s])
        if s < n_seg - 1 or pad == 0:
            M, z = _write(sk[:, s], vseg[:, s], M, z, delta)
    o = torch.cat(outs, 1)[:, :T]
    state = None
    if output_final_state:
        n_left = T - (n_seg - 1) * segment if pad else 0
        kb = torch.zeros(B, segment, H, D, device=q.device, dtype=wd)
        vb = torch.zeros(B, segment, H, V, device=q.device, dtype=wd)
        if n_left:
            kb[:, :n_left], vb[:, :n_left] = kf[:, T - n_left : T], vf[:, T - n_left : T]
        state = dict(M=M, z=z, k=kb, v=vb, count=torch.full((B,), n_left, dtype=torch.long, device=q.device))
    return o.to(q.dtype), state
