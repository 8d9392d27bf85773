"""Landmark attention: grouped softmax over blocks with one landmark key per block, top-k block
retrieval at inference (Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context
Length for Transformers", 2023).

The keys are cut into blocks of ``block`` tokens; complete block ``b`` has a landmark key ``l_b``
(``landmarks [B, T // block, H_kv, D]``: in the paper the hidden state of a landmark token appended
after the block; how a layer makes it is the caller's, see :class:`effattn.nn.mixers.landmark`).
Query ``t`` in block ``c = t // block`` (scores ``s_tj = scale * q_t . k_j``, ``g_tb = scale * q_t . l_b``):

    Z_t  = sum_{j in c, j <= t} exp(s_tj) + sum_{b in R_t} exp(g_tb)
    w_tj = exp(s_tj) / Z_t                                          j in the current block, j <= t
    w_tj = exp(g_tb) / Z_t  *  exp(s_tj) / sum_{j' in b} exp(s_tj')  j in an earlier block b in R_t
    o_t  = sum_j w_tj v_j

The current block is "handled as in the paper": each of its visible tokens is its own group and
competes directly with the landmarks (the block's own landmark lies in the future). The landmark of
block ``b`` takes its share of the softmax for the whole block, which the within-block softmax hands
to the block's tokens; a landmark's value is never read. ``R_t``, the blocks the query reads:

- training (``top_k=None``): every earlier block, ``R_t = {b < c}`` (the grouped softmax of the paper's
  training, which teaches the landmarks to stand for their blocks);
- inference (``top_k=k``): the ``k`` earlier blocks with the largest landmark scores ``g_tb``, per
  query and head (all of them while ``c <= k``); the grouped softmax then runs over the retrieved
  blocks and the current block (the local context). With ``k >= c`` this is the training form
  exactly. Choice stated: the paper leaves open whether retrieved blocks keep their landmark
  weighting; we keep it, so one function covers training and inference and retrieval is a pure
  restriction of the training form.

Causal self-attention only (``seq_q == seq_k``; query ``t`` never reads a key after ``t``, a landmark
of a block not yet complete, nor is influenced by either). GQA: query head ``h`` reads key head
``h // (H_q / H_kv)``. The full form runs one query block at a time: ``O(block x T)`` scores per step
(training) or ``O(block x k x block)`` gathered keys (inference), never a ``T x T`` matrix; for
training, autograd keeps each step's scores (``O(T^2 / 2)`` floats per head in all).
The one-token (or chunk) form :func:`step_landmark_attention` continues a
:class:`LandmarkDecodeState` and equals the full form's rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effattn._checks import check_positive_int, check_qkv, check_scale, check_tensor

__all__ = ["LandmarkDecodeState", "landmark_attention", "landmark_decode_state", "step_landmark_attention"]


def _block_rows(q, t0, k, v, lms, block, top_k, scale, bias=None):
    """Rows ``t0 .. t0 + n - 1`` (one query block ``c``) of landmark attention: ``q [B, n, H_q, D]``,
    keys/values from position 0 (at least ``t0 + n``), landmarks of blocks ``0 .. c - 1`` (at least)."""
    B, n, Hq, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    G = Hq // Hkv
    c, t1 = t0 // block, t0 + n
    lo = c * block
    ct = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(ct).mul(scale).view(B, n, Hkv, G, D)
    # the current block: each visible token its own group
    s_own = torch.einsum("bqhgd,bkhd->bhgqk", qg, k[:, lo:t1].to(ct))
    future = torch.arange(lo, t1, device=q.device)[None] > torch.arange(t0, t1, device=q.device)[:, None]
    s_own = s_own.masked_fill(future, float("-inf"))
    v_own = v[:, lo:t1].to(ct)
    if c == 0:
        p = torch.softmax(s_own, -1)
        o = torch.einsum("bhgqk,bkhd->bqhgd", p, v_own)
        return o.reshape(B, n, Hq, Dv).to(q.dtype)
    g = torch.einsum("bqhgd,brhd->bhgqr", qg, lms[:, :c].to(ct))  # landmark scores [B, Hkv, G, n, c]
    if bias is not None:  # one offset per query head: the ranking of the blocks is unchanged
        g = g + bias.to(ct).view(1, Hkv, G, 1, 1)
    if top_k is None or top_k >= c:  # every earlier block (the training form)
        kb = k[:, :lo].to(ct).view(B, c, block, Hkv, D)
        vb = v[:, :lo].to(ct).view(B, c, block, Hkv, Dv)
        p_in = torch.softmax(torch.einsum("bqhgd,brjhd->bhgqrj", qg, kb), -1)
        a = torch.einsum("bhgqrj,brjhd->bhgqrd", p_in, vb)  # each block's own softmax read
    else:  # retrieval: the top_k landmarks per query and head, their blocks gathered
        with torch.no_grad():
            sel = g.detach().topk(top_k, dim=-1).indices  # [B, Hkv, G, n, k]
        g = g.gather(-1, sel)
        pos = sel[..., None] * block + torch.arange(block, device=q.device)  # [B, Hkv, G, n, k, block]
        head = torch.arange(Hkv, device=q.device).view(1, Hkv, 1, 1, 1, 1)
        flat = (pos * Hkv + head).reshape(B, -1)  # into the flattened (position, head) axis
        kb = k.reshape(B, -1, D).gather(1, flat[..., None].expand(-1, -1, D)).to(ct)
        vb = v.reshape(B, -1, Dv).gather(1, flat[..., None].expand(-1, -1, Dv)).to(ct)
        kb, vb = kb.view(*pos.shape, D), vb.view(*pos.shape, Dv)
        p_in = torch.softmax(torch.einsum("bqhgd,bhgqrjd->bhgqrj", qg, kb), -1)
        a = torch.einsum("bhgqrj,bhgqrjd->bhgqrd", p_in, vb)
    w = torch.softmax(torch.cat([s_own, g], -1), -1)  # one softmax: own tokens and landmarks
    m = t1 - lo
    o = torch.einsum("bhgqk,bkhd->bqhgd", w[..., :m], v_own) + torch.einsum("bhgqr,bhgqrd->bqhgd", w[..., m:], a)
    return o.reshape(B, n, Hq, Dv).to(q.dtype)


def _check_landmarks(name, lms, B, Hkv, D, count):
    check_tensor(name, lms, 4, "[batch, blocks, heads_kv, head_dim]")
    want = (B, count, Hkv, D)
    if tuple(lms.shape) != want:
        raise ValueError(f"{name} must be [batch, blocks, heads_kv, head_dim] = {want}, got {tuple(lms.shape)}")


def _check_top_k(top_k):
    if top_k is not None:
        check_positive_int("top_k", top_k)


def _landmark_bias(bias, Hq: int, like: torch.Tensor) -> torch.Tensor | None:
    """``None``, a number or a tensor of ``[]`` / ``[H_q]`` -> ``None`` or an ``[H_q]`` tensor."""
    if bias is None:
        return None
    b = bias if isinstance(bias, torch.Tensor) else torch.tensor(float(bias), device=like.device)
    if b.dim() > 1 or (b.dim() == 1 and b.shape[0] != Hq) or not b.is_floating_point():
        raise ValueError(f"landmark_bias must be a number or a float tensor [heads_q] = [{Hq}], got {bias!r}")
    return b.expand(Hq)


def landmark_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    landmarks: torch.Tensor,
    *,
    block: int,
    top_k: int | None = None,
    scale: float | None = None,
    landmark_bias: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal landmark attention (module docstring): ``q [B, T, H_q, D]``, ``k, v [B, T, H_kv, *]``,
    ``landmarks [B, T // block, H_kv, D]`` (the landmark key of each complete block) -> ``[B, T, H_q, D_v]``.

    ``top_k=None`` is the training form (grouped softmax over every earlier block); an int retrieves
    that many blocks per query and head by landmark score. ``landmark_bias`` (a number or ``[H_q]``): an
    offset added to every landmark logit ``g_tb`` of a head (not in the paper, whose offset is 0; it
    moves weight between the own block and the earlier blocks without changing which blocks are
    retrieved; the ``landmark`` mixer learns one). Differentiable in q, k, v, landmarks and the bias
    (the retrieval itself is not).

    Example::

        >>> q, k, v = torch.randn(3, 1, 20, 2, 8).unbind(0)
        >>> lm = torch.randn(1, 20 // 4, 2, 8)
        >>> o = landmark_attention(q, k, v, lm, block=4)            # training form
        >>> torch.allclose(landmark_attention(q, k, v, lm, block=4, top_k=4), o, atol=1e-6)  # k >= blocks
        True
        >>> landmark_attention(q, k, v, lm, block=4, top_k=1).shape  # retrieval
        torch.Size([1, 20, 2, 8])
    """
    B, T, Tk, Hq, Hkv, D, _ = check_qkv(q, k, v)
    if T != Tk:
        raise ValueError(f"landmark attention is causal self-attention: seq_q ({T}) must equal seq_k ({Tk})")
    check_positive_int("block", block)
    _check_top_k(top_k)
    _check_landmarks("landmarks", landmarks, B, Hkv, D, T // block)
    scale = check_scale(scale, D)
    bias = _landmark_bias(landmark_bias, Hq, q)
    outs = [
        _block_rows(q[:, t0 : t0 + block], t0, k, v, landmarks, block, top_k, scale, bias) for t0 in range(0, T, block)
    ]
    return torch.cat(outs, 1) if outs else q.new_zeros(B, 0, Hq, v.shape[3])


@dataclass
class LandmarkDecodeState:
    """What causal landmark attention needs to continue after ``t`` tokens: every key and value so far
    (``k [B, t, H_kv, D]``, ``v [B, t, H_kv, D_v]``: any earlier block may be retrieved, so this grows
    as a KV cache does) and the landmark keys of the complete blocks (``landmarks [B, t // block,
    H_kv, D]``)."""

    k: torch.Tensor
    v: torch.Tensor
    landmarks: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.landmarks))


def landmark_decode_state(
    k: torch.Tensor, v: torch.Tensor, landmarks: torch.Tensor, *, block: int
) -> LandmarkDecodeState:
    """The :class:`LandmarkDecodeState` after a prefix ``k, v [B, t, H_kv, *]`` with the landmarks of its
    ``t // block`` complete blocks (``t = 0``: the empty state).

    Example::

        >>> k = v = torch.randn(1, 10, 2, 8)
        >>> landmark_decode_state(k, v, torch.randn(1, 2, 2, 8), block=4).nbytes
        1408
    """
    check_positive_int("block", block)
    check_qkv(k, k, v)
    _check_landmarks("landmarks", landmarks, k.shape[0], k.shape[2], k.shape[3], k.shape[1] // block)
    return LandmarkDecodeState(k, v, landmarks)


def step_landmark_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: LandmarkDecodeState | None,
    *,
    block: int,
    top_k: int | None = None,
    landmarks: torch.Tensor | None = None,
    scale: float | None = None,
    landmark_bias: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, LandmarkDecodeState]:
    """``n >= 1`` new tokens ``q [B, n, H_q, D]``, ``k, v [B, n, H_kv, *]`` at positions ``t .. t + n - 1``
    (``t``: the state's length; ``None`` = empty) -> ``(o [B, n, H_q, D_v], new_state)``, equal to
    those rows of :func:`landmark_attention` over the whole sequence. ``landmarks [B, m, H_kv, D]``: the
    landmark keys of the ``m = (t + n) // block - t // block`` blocks these tokens complete (``None``
    when ``m = 0``); a block's landmark is read only by later tokens, so it may be made from the
    block's own tokens. ``landmark_bias`` as in :func:`landmark_attention`.

    Example::

        >>> q, k, v = torch.randn(3, 1, 9, 2, 8).unbind(0)
        >>> lm = torch.randn(1, 2, 2, 8)
        >>> full = landmark_attention(q, k, v, lm, block=4, top_k=1)
        >>> o, st = step_landmark_attention(q[:, :8], k[:, :8], v[:, :8], None, block=4, top_k=1, landmarks=lm)
        >>> o9, st = step_landmark_attention(q[:, 8:], k[:, 8:], v[:, 8:], st, block=4, top_k=1)
        >>> torch.allclose(torch.cat([o, o9], 1), full, atol=1e-6), tuple(st.k.shape)
        (True, (1, 9, 2, 8))
    """
    B, n, _, Hq, Hkv, D, Dv = check_qkv(q, k, v)
    if k.shape[1] != n:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: one key per new token")
    check_positive_int("block", block)
    _check_top_k(top_k)
    scale = check_scale(scale, D)
    bias = _landmark_bias(landmark_bias, Hq, q)
    if state is None:
        state = LandmarkDecodeState(k[:, :0], v[:, :0], k.new_zeros(B, 0, Hkv, D))
    if not isinstance(state, LandmarkDecodeState):
        raise TypeError(f"state must be a LandmarkDecodeState (or None), got {type(state).__name__}")
    t = state.k.shape[1]
    if state.k.shape[0] != B or state.k.shape[2:] != k.shape[2:] or state.v.shape[2:] != v.shape[2:]:
        raise ValueError(
            f"state holds keys {tuple(state.k.shape)}, values {tuple(state.v.shape)}; "
            f"these tokens have k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    _check_landmarks("state.landmarks", state.landmarks, B, Hkv, D, t // block)
    new = (t + n) // block - t // block
    if new:
        if landmarks is None:
            raise ValueError(f"these {n} tokens complete {new} block(s) at t={t}: landmarks [B, {new}, H_kv, D] needed")
        _check_landmarks("landmarks", landmarks, B, Hkv, D, new)
        lms = torch.cat([state.landmarks, landmarks.to(state.landmarks.dtype)], 1)
    else:
        if landmarks is not None and landmarks.shape[1] != 0:
            raise ValueError(f"these {n} tokens complete no block at t={t}, got landmarks {tuple(landmarks.shape)}")
        lms = state.landmarks
    k_all, v_all = torch.cat([state.k, k], 1), torch.cat([state.v, v], 1)
    outs, a = [], t
    while a < t + n:
        b = min(t + n, (a // block + 1) * block)  # up to the end of a's block
        outs.append(_block_rows(q[:, a - t : b - t], a, k_all, v_all, lms, block, top_k, scale, bias))
        a = b
    return torch.cat(outs, 1), LandmarkDecodeState(k_all, v_all, lms)
