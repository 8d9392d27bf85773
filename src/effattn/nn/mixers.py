"""Sequence-mixer layers of the linear family (linear attention, SSMs, recurrent mixers).

Every layer follows the mixer contract of :mod:`effattn.nn`: ``__init__(dim, heads, **kw)``,
``forward(x [B, T, dim], state=None, valid=None) -> (y [B, T, dim], new_state)`` and
``state_size(batch, seq_len)`` (bytes). A call with ``T > 1`` (training, prefill) runs the
functional op's chunkwise form (``chunk_*`` from :mod:`effattn.linear`), a call with ``T == 1``
(decoding) its ``step_*`` form; the state returned is the op's recurrent state plus, where the layer
has one, the short convolution's last ``kernel_size - 1`` inputs, so ``prefill + decode`` equals
one full forward.

Left padding: ``valid [B, T]`` (False at padded positions) makes every padded step an identity
step of the recurrence -- no write (``k``, ``v`` or ``beta`` or ``delta`` zeroed), no decay (log
gates set to 0) -- and the short convolutions see zeros there, so a left-padded row of a batch gives
exactly what the same sequence gives alone.

Layers (each docstring states the layer and cites its paper): :class:`LinearAttentionMixer`
("linear_attention"), :class:`BasedMixer` ("based"), :class:`RetNetMixer` ("retnet"),
:class:`GLAMixer` ("gla"), :class:`DeltaNetMixer` ("deltanet"), :class:`GatedDeltaNetMixer`
("gated_deltanet"), :class:`MambaMixer` ("mamba"), :class:`Mamba2Mixer` ("mamba2"),
:class:`AarenMixer` ("aaren"), :class:`MoMMixer` ("mom"), and from the sparse family
:class:`TopKBlockMixer` ("topk_block") and :class:`RoutingMixer` ("routing").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from effattn._checks import check_tensor
from effattn.exact import attention
from effattn.linear import (
    chunk_aaren,
    chunk_delta_rule,
    chunk_gated_delta_rule,
    chunk_gla,
    chunk_linear_attn,
    chunk_mom,
    chunk_retention,
    chunk_selective_scan,
    chunk_simple_gla,
    retention_log_decay,
    step_aaren,
    step_delta_rule,
    step_gated_delta_rule,
    step_gla,
    step_linear_attn,
    step_mom,
    step_retention,
    step_selective_scan,
    step_simple_gla,
)
from effattn.linear.linear_attn import FEATURE_MAPS
from effattn.nn.registry import register_mixer
from effattn.nn.rope import RotaryEmbedding
from effattn.sparse import KMeansRouter, routing_attention, topk_block_attention

__all__ = [
    "ShortConv",
    "LinearAttentionMixer",
    "BasedMixer",
    "RetNetMixer",
    "GLAMixer",
    "DeltaNetMixer",
    "GatedDeltaNetMixer",
    "MambaMixer",
    "Mamba2Mixer",
    "AarenMixer",
    "MoMMixer",
    "TopKBlockMixer",
    "RoutingMixer",
    "state_nbytes",
]

# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------


def state_nbytes(state) -> int:
    """Bytes held by a (nested tuple/list/dict of) state tensor(s); objects with ``nbytes`` count too."""
    if state is None:
        return 0
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(s) for s in state.values())
    if isinstance(state, (tuple, list)):
        return sum(state_nbytes(s) for s in state)
    nbytes = getattr(state, "nbytes", None)
    if nbytes is not None:
        return int(nbytes() if callable(nbytes) else nbytes)
    raise TypeError(f"cannot size a state of type {type(state).__name__}")


def check_heads(dim: int, heads: int) -> int:
    """``dim`` divisible by ``heads``; returns the head dim."""
    if not isinstance(dim, int) or dim <= 0:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
    return dim // heads


def check_mixer_input(x: torch.Tensor, dim: int, valid: torch.Tensor | None) -> torch.Tensor | None:
    """``x [B, T, dim]`` and an optional bool ``valid [B, T]``; returns ``valid`` (None if all True)."""
    check_tensor("x", x, 3, "[batch, seq, dim]")
    if x.shape[-1] != dim:
        raise ValueError(f"x must be [batch, seq, dim] with dim = {dim}, got shape {tuple(x.shape)}")
    if valid is None:
        return None
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor [batch, seq], got {getattr(valid, 'dtype', type(valid))}")
    if tuple(valid.shape) != tuple(x.shape[:2]):
        raise ValueError(f"valid must be [batch, seq] = {tuple(x.shape[:2])}, got {tuple(valid.shape)}")
    return valid


def _mask(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Zero ``x [B, T, ...]`` at the positions where ``valid [B, T]`` is False."""
    if valid is None:
        return x
    return x * valid.reshape(valid.shape + (1,) * (x.dim() - 2)).to(x.dtype)


class ShortConv(nn.Module):
    """Causal depthwise convolution over time (kernel ``kernel_size``, default 4) with SiLU.

    ``y_t = silu(b + sum_{i<K} w_i * x_{t-K+1+i})``; the state is the last ``K - 1`` inputs
    ``[B, K - 1, C]`` (zeros for a fresh sequence), so decoding one token continues exactly.
    Inputs at invalid (padded) positions are zeroed first, as if the sequence began later.
    """

    def __init__(self, channels: int, kernel_size: int = 4, activation: bool = True):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.kernel_size, self.activation = kernel_size, activation
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.uniform_(self.weight, -1 / math.sqrt(kernel_size), 1 / math.sqrt(kernel_size))

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, valid: torch.Tensor | None = None):
        B, T, C = x.shape
        x = _mask(x, valid)
        if state is None:
            state = x.new_zeros(B, self.kernel_size - 1, C)
        xs = torch.cat([state.to(x.dtype), x], dim=1)
        y = F.conv1d(xs.transpose(1, 2), self.weight.unsqueeze(1), self.bias, groups=C).transpose(1, 2)
        new_state = xs[:, xs.shape[1] - (self.kernel_size - 1) :]
        return (F.silu(y) if self.activation else y), new_state


class _Mixer(nn.Module):
    """Shared ``state_size``: the bytes of the state a real call leaves behind (zeros input)."""

    def _probe_len(self, seq_len: int) -> int:
        return 1  # recurrent: the state does not grow with the context

    def state_size(self, batch: int, seq_len: int) -> int:
        """Bytes of state held for ``batch`` sequences at context ``seq_len``."""
        if batch < 1 or seq_len < 0:
            raise ValueError(f"batch must be >= 1 and seq_len >= 0, got batch={batch}, seq_len={seq_len}")
        p = next(self.parameters())
        with torch.no_grad():
            x = torch.zeros(batch, max(1, self._probe_len(seq_len)), self.dim, device=p.device, dtype=p.dtype)
            _, state = self(x)
        return state_nbytes(state)


def _heads_view(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], heads, -1)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], -1)


def _normalized_linear_attn(q, k, v, valid, feature_map, scale, state, chunk_size):
    """Normalized kernel attention ``phi_q(q)^T S / (phi_q(q)^T z + eps)``, with the normalizer
    carried as an extra value column that is 1 at valid positions and 0 at padded ones (so padded
    steps add nothing to ``z`` even where ``phi(0) != 0``). State ``[B, H, F, V + 1]``."""
    ones = torch.ones_like(v[..., :1])
    v_ext = _mask(torch.cat([v, ones], dim=-1), valid)
    fn = step_linear_attn if q.shape[1] == 1 else chunk_linear_attn
    kw = {} if q.shape[1] == 1 else {"chunk_size": chunk_size}
    o_ext, state = fn(
        q, k, v_ext, feature_map=feature_map, scale=scale, initial_state=state, output_final_state=True, **kw
    )
    return o_ext[..., :-1] / (o_ext[..., -1:] + 1e-6), state


# ----------------------------------------------------------------------------------------------
# linear attention and Based
# ----------------------------------------------------------------------------------------------


@register_mixer("linear_attention")
class LinearAttentionMixer(_Mixer):
    """Causal linear attention with a feature map (Katharopoulos, Vyas, Pappas, Fleuret,
    "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention", 2020).

    ``o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t)``, ``S_t = S_{t-1} + phi(k_t) v_t^T``,
    ``z_t = z_{t-1} + phi(k_t)``; ``y = W_o o``. ``feature_map`` is one of
    :data:`effattn.linear.FEATURE_MAPS` (default ``"elu1"``); the normalizer is used for the
    non-negative maps, and for ``identity``/``cosine`` (which have none) the output goes through a
    per-head RMSNorm instead. ``feature_dim`` sets the per-head q/k size (default: the head dim).
    State: ``S [B, H, F, V (+1 normalizer column)]`` float32.
    """

    def __init__(self, dim: int, heads: int, feature_map: str = "elu1", feature_dim: int | None = None,
                 chunk_size: int = 64):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, check_heads(dim, heads)
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
        self.feature_map, self.chunk_size = feature_map, chunk_size
        self.normalize = feature_map in ("elu1", "relu", "taylor")
        self.key_dim = feature_dim or self.head_dim
        self.q_proj = nn.Linear(dim, heads * self.key_dim, bias=False)
        self.k_proj = nn.Linear(dim, heads * self.key_dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_norm = None if self.normalize else nn.RMSNorm(self.head_dim, eps=1e-5)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, state=None, valid=None):
        valid = check_mixer_input(x, self.dim, valid)
        H = self.heads
        q, k, v = (_heads_view(p(x), H) for p in (self.q_proj, self.k_proj, self.v_proj))
        k = _mask(k, valid)
        if self.normalize:
            o, state = _normalized_linear_attn(q, k, v, valid, self.feature_map, None, state, self.chunk_size)
        else:
            v = _mask(v, valid)
            fn = step_linear_attn if x.shape[1] == 1 else chunk_linear_attn
            kw = {} if x.shape[1] == 1 else {"chunk_size": self.chunk_size}
            o, state = fn(q, k, v, feature_map=self.feature_map, initial_state=state, output_final_state=True, **kw)
            o = self.o_norm(o)
        return self.o_proj(_merge_heads(o.to(x.dtype))), state


@register_mixer("based")
class BasedMixer(_Mixer):
    """Based: Taylor linear attention plus a small sliding-window softmax attention (Arora,
    Eyuboglu, Zhang, Timalsina, Alberti, Zinsley, Zou, Rudra, Re, "Simple linear attention language
    models balance the recall-throughput tradeoff", 2024).

    Linear branch: ``phi(x) = [1, x, x (x) x / sqrt(2)]`` on a small feature dim (``feature_dim``,
    default 16) so ``phi(s q) . phi(k) = 1 + s q.k + (s q.k)^2 / 2`` approximates ``exp(s q.k)``,
    normalized as softmax is. Window branch: exact causal softmax attention over the ``window``
    (default 64) most recent tokens (:func:`effattn.attention`). The paper stacks the two as
    separate layers; here one mixer holds both, ``y = W_o [o_linear ; o_window]``. State:
    the Taylor state ``[B, H, 1 + f + f^2, V + 1]`` and the window's last ``window - 1`` keys/values
    (with their validity), constant in the context length. No rotary embedding is applied.
    """

    def __init__(self, dim: int, heads: int, feature_dim: int = 16, window: int = 64, chunk_size: int = 64):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, check_heads(dim, heads)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.feature_dim, self.window, self.chunk_size = feature_dim, window, chunk_size
        self.q_proj = nn.Linear(dim, heads * feature_dim, bias=False)
        self.k_proj = nn.Linear(dim, heads * feature_dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.o_proj = nn.Linear(2 * dim, dim, bias=False)

    def _probe_len(self, seq_len: int) -> int:
        return min(seq_len, self.window)

    def _window_attention(self, x, buf, valid):
        B, T, _ = x.shape
        q, k, v = (_heads_view(t, self.heads) for t in self.wqkv(x).chunk(3, dim=-1))
        kval = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
        if buf is not None:
            k = torch.cat([buf[0].to(k.dtype), k], dim=1)
            v = torch.cat([buf[1].to(v.dtype), v], dim=1)
            kval = torch.cat([buf[2], kval], dim=1)
        mask_mod = None
        if not bool(kval.all()):
            kv_valid = kval

            def mask_mod(b, h, q_idx, kv_idx):
                return kv_valid[b, kv_idx]

        o = attention(q, k, v, causal=True, window=self.window, mask_mod=mask_mod)
        start = max(0, k.shape[1] - (self.window - 1))  # the keys a later query can still see
        new_buf = (k[:, start:], v[:, start:], kval[:, start:])
        return o, new_buf

    def forward(self, x, state=None, valid=None):
        valid = check_mixer_input(x, self.dim, valid)
        lin_state, buf = state if state is not None else (None, None)
        H = self.heads
        q, k, v = (_heads_view(p(x), H) for p in (self.q_proj, self.k_proj, self.v_proj))
        o_lin, lin_state = _normalized_linear_attn(
            q, _mask(k, valid), v, valid, "taylor", None, lin_state, self.chunk_size
        )
        o_win, buf = self._window_attention(x, buf, valid)
        o = torch.cat([_merge_heads(o_lin.to(x.dtype)), _merge_heads(o_win)], dim=-1)
        return self.o_proj(o), (lin_state, buf)


# ----------------------------------------------------------------------------------------------
# decaying linear attention: RetNet, GLA
# ----------------------------------------------------------------------------------------------


@register_mixer("retnet")
class RetNetMixer(_Mixer):
    """Multi-scale retention (Sun, Dong, Huang, Ma, Xia, Xue, Wang, Wei, "Retentive Network: A
    Successor to Transformer for Large Language Models", 2023).

    ``S_t = gamma_h S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t`` with a fixed decay
    ``gamma_h = 1 - 2^(-5 - h)`` per head (:func:`effattn.linear.retention_log_decay`);
    ``y = W_o (swish(W_g x) * GroupNorm_h(o))``. The xPos rotation of q/k is not applied (the decay
    alone gives the position signal). With left padding the same recurrence runs as
    :func:`effattn.linear.chunk_simple_gla` with the log decay zeroed at padded steps.
    State: ``S [B, H, K, V]`` float32.
    """

    def __init__(self, dim: int, heads: int, chunk_size: int = 64):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, check_heads(dim, heads)
        self.chunk_size = chunk_size
        self.qkvg = nn.Linear(dim, 4 * dim, bias=False)
        self.group_norm = nn.GroupNorm(heads, dim, eps=1e-5)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.register_buffer("log_decay", retention_log_decay(heads), persistent=False)

    def forward(self, x, state=None, valid=None):
        valid = check_mixer_input(x, self.dim, valid)
        B, T, _ = x.shape
        q, k, v, g = self.qkvg(x).chunk(4, dim=-1)
        q, k, v = (_heads_view(t, self.heads) for t in (q, k, v))
        log_decay = self.log_decay.to(x.device)
        step = T == 1
        if valid is None:
            fn = step_retention if step else chunk_retention
            kw = {} if step else {"chunk_size": self.chunk_size}
            o, state = fn(q, k, v, log_decay, initial_state=state, output_final_state=True, **kw)
        else:
            gate = _mask(log_decay.expand(B, T, self.heads), valid)
            fn = step_simple_gla if step else chunk_simple_gla
            kw = {} if step else {"chunk_size": self.chunk_size}
            o, state = fn(q, _mask(k, valid), _mask(v, valid), gate, initial_state=state, output_final_state=True,
                          **kw)
        o = self.group_norm(_merge_heads(o.to(x.dtype)).reshape(B * T, self.dim)).reshape(B, T, self.dim)
        return self.o_proj(F.silu(g) * o), state


@register_mixer("gla")
class GLAMixer(_Mixer):
    """Gated linear attention layer (Yang, Wang, Shen, Panda, Kim, "Gated Linear Attention
    Transformers with Hardware-Efficient Training", 2024).

    ``S_t = diag(alpha_t) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t`` with a data-dependent
    decay per key dimension from a low-rank projection,
    ``log alpha_t = logsigmoid(W_2 W_1 x_t + b) / gate_normalizer`` (rank 16, normalizer 16);
    ``y = W_o (RMSNorm(o) * swish(W_r x))``. Keys use half the width (``expand_k = 0.5``) as in the
    paper. State: ``S [B, H, K, V]`` float32.
    """

    def __init__(self, dim: int, heads: int, expand_k: float = 0.5, gate_low_rank: int = 16,
                 gate_normalizer: float = 16.0, chunk_size: int = 64):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, check_heads(dim, heads)
        key_total = int(dim * expand_k)
        if key_total < heads or key_total % heads:
            raise ValueError(f"dim * expand_k ({key_total}) must be a positive multiple of heads ({heads})")
        self.key_dim, self.gate_normalizer, self.chunk_size = key_total // heads, gate_normalizer, chunk_size
        self.q_proj = nn.Linear(dim, key_total, bias=False)
        self.k_proj = nn.Linear(dim, key_total, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.g_proj = nn.Linear(dim, dim, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(dim, gate_low_rank, bias=False), nn.Linear(gate_low_rank, key_total))
        self.o_norm = nn.RMSNorm(self.head_dim, eps=1e-5)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, state=None, valid=None):
        valid = check_mixer_input(x, self.dim, valid)
        H = self.heads
        q, k, v = (_heads_view(p(x), H) for p in (self.q_proj, self.k_proj, self.v_proj))
        gk = _heads_view(F.logsigmoid(self.gk_proj(x)) / self.gate_normalizer, H)
        k, v, gk = _mask(k, valid), _mask(v, valid), _mask(gk, valid)
        if x.shape[1] == 1:
            o, state = step_gla(q, k, v, gk, initial_state=state, output_final_state=True)
        else:
            o, state = chunk_gla(q, k, v, gk, initial_state=state, output_final_state=True,
                                 chunk_size=self.chunk_size)
        o = _merge_heads(self.o_norm(o.to(x.dtype)))
        return self.o_proj(o * F.silu(self.g_proj(x))), state


# ----------------------------------------------------------------------------------------------
# delta rule: DeltaNet, Gated DeltaNet
# ----------------------------------------------------------------------------------------------


class _DeltaBase(_Mixer):
    gated = False

    def __init__(self, dim: int, heads: int, conv_size: int = 4, use_gate: bool = True, chunk_size: int = 64):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, check_heads(dim, heads)
        self.chunk_size, self.use_gate = chunk_size, use_gate
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.b_proj = nn.Linear(dim, heads, bias=True)
        self.q_conv, self.k_conv, self.v_conv = (ShortConv(dim, conv_size) for _ in range(3))
        if self.gated:
            self.a_proj = nn.Linear(dim, heads, bias=False)
            self.A_log = nn.Parameter(torch.log(torch.empty(heads).uniform_(1.0, 16.0)))
            dt = torch.exp(torch.empty(heads).uniform_(math.log(1e-3), math.log(0.1)))
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.g_proj = nn.Linear(dim, dim, bias=False) if use_gate else None
        self.o_norm = nn.RMSNorm(self.head_dim, eps=1e-5)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, state=None, valid=None):
        valid = check_mixer_input(x, self.dim, valid)
        S, cq, ck, cv = state if state is not None else (None, None, None, None)
        q, cq = self.q_conv(self.q_proj(x), cq, valid)
        k, ck = self.k_conv(self.k_proj(x), ck, valid)
        v, cv = self.v_conv(self.v_proj(x), cv, valid)
        H = self.heads
        q, k, v = _heads_view(q, H), _heads_view(k, H), _mask(_heads_view(v, H), valid)
        beta = _mask(torch.sigmoid(self.b_proj(x)), valid)
        step = x.shape[1] == 1
        kw = {} if step else {"chunk_size": self.chunk_size}
        if self.gated:
            g = _mask(-self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias), valid)
            fn = step_gated_delta_rule if step else chunk_gated_delta_rule
            o, S = fn(q, k, v, g.to(x.dtype), beta, initial_state=S, output_final_state=True, **kw)
        else:
            fn = step_delta_rule if step else chunk_delta_rule
            o, S = fn(q, k, v, beta, initial_state=S, output_final_state=True, **kw)
        o = self.o_norm(o.to(x.dtype))
        if self.g_proj is not None:
            o = o * F.silu(_heads_view(self.g_proj(x), H))
        return self.o_proj(_merge_heads(o)), (S, cq, ck, cv)


@register_mixer("deltanet")
class DeltaNetMixer(_DeltaBase):
    """DeltaNet layer (Yang, Wang, Zhang, Shen, Kim, "Parallelizing Linear Transformers with the
    Delta Rule over Sequence Length", 2024).

    ``q, k, v = silu(conv4(W x))`` (short causal depthwise convolutions), q and k L2-normalized,
    ``beta_t = sigmoid(W_b x_t)``; ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``,
    ``o_t = scale * S_t^T q_t``; ``y = W_o (RMSNorm(o) * swish(W_g x))``.
    State: ``(S [B, H, K, V], conv_q, conv_k, conv_v [B, 3, dim])``.
    """


@register_mixer("gated_deltanet")
class GatedDeltaNetMixer(_DeltaBase):
    """Gated DeltaNet layer (Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with
    Delta Rule", 2024).

    As :class:`DeltaNetMixer` with a Mamba-2 style scalar decay per head,
    ``log alpha_t = -exp(A_log) * softplus(W_a x_t + dt_bias)``:
    ``S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``.
    State: ``(S [B, H, K, V], conv_q, conv_k, conv_v [B, 3, dim])``.
    """

    gated = True


# ----------------------------------------------------------------------------------------------
# state-space models: Mamba, Mamba-2
# ----------------------------------------------------------------------------------------------


@register_mixer("mamba")
class MambaMixer(_Mixer):
    """The Mamba block (Gu, Dao, "Mamba: Linear-Time Sequence Modeling with Selective State
    Spaces", 2023).

    ``x, z = W_in u``; ``x = silu(conv4(x))``; ``delta, B, C = x_proj(x)`` (``delta`` of rank
    ``dt_rank``, default ``ceil(dim / 16)``); ``dt = softplus(W_dt delta + b_dt)``;
    ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t``, ``y_t = C_t h_t + D x_t``;
    ``out = W_out (y * silu(z))`` with ``A = -exp(A_log)`` ``[d_inner, N]`` (S4D-real init
    ``A = -(1..N)``), ``d_inner = expand * dim``. The ``d_inner`` channels are grouped as ``heads``
    heads for :func:`effattn.linear.chunk_selective_scan` (any split gives the same result).
    Padded steps get ``dt = 0`` (no decay, no write). State: ``(h [B, H, P, N], conv [B, 3, d_inner])``.
    """

    def __init__(self, dim: int, heads: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, chunk_size: int = 64):
        super().__init__()
        check_heads(dim, heads)
        self.dim, self.heads, self.d_state, self.chunk_size = dim, heads, d_state, chunk_size
        self.d_inner = expand * dim
        if self.d_inner % heads:
            raise ValueError(f"expand * dim ({self.d_inner}) must be divisible by heads ({heads})")
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=False)
        self.conv = ShortConv(self.d_inner, d_conv)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        dt = torch.exp(torch.empty(self.d_inner).uniform_(math.log(1e-3), math.log(0.1)))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)

    def forward(self, x, state=None, valid=None):
        valid = check_mixer_input(x, self.dim, valid)
        h, conv_state = state if state is not None else (None, None)
        xi, z = self.in_proj(x).chunk(2, dim=-1)
        xi, conv_state = self.conv(xi, conv_state, valid)
        delta, Bm, Cm = self.x_proj(xi).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = _mask(F.softplus(self.dt_proj(delta)), valid)
        H, P = self.heads, self.d_inner // self.heads
        A = -self.A_log.float().exp().reshape(H, P, self.d_state)
        args = (_heads_view(xi, H), _heads_view(dt, H), A.to(x.dtype), Bm.unsqueeze(2), Cm.unsqueeze(2))
        kw = dict(D=self.D.reshape(H, P), z=_heads_view(z, H), delta_softplus=False, initial_state=h,
                  output_final_state=True)
        if x.shape[1] == 1:
            y, h = step_selective_scan(*args, **kw)
        else:
            y, h = chunk_selective_scan(*args, **kw, chunk_size=self.chunk_size)
        return self.out_proj(_merge_heads(y.to(x.dtype))), (h, conv_state)


@register_mixer("mamba2")
class Mamba2Mixer(_Mixer):
    """The Mamba-2 block (Dao, Gu, "Transformers are SSMs: Generalized Models and Efficient
    Algorithms Through Structured State Space Duality", 2024).

    ``z, xBC, dt = W_in u``; ``x, B, C = silu(conv4(xBC))``; ``dt = softplus(dt + dt_bias)`` per
    head; ``h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T``, ``y_t = h_t C_t + D_h x_t`` (one scalar
    decay per head: the SSD form, run as :func:`effattn.linear.chunk_simple_gla` with ``q = C``,
    ``k = B``, ``v = dt x``, ``g = dt A``, scale 1); ``out = W_out RMSNorm(y * silu(z))``.
    ``d_inner = expand * dim`` split into ``heads`` heads; ``B, C`` are shared by all heads (one group).
    State: ``(h [B, H, N, P], conv [B, 3, d_inner + 2N])``.
    """

    def __init__(self, dim: int, heads: int, d_state: int = 64, d_conv: int = 4, expand: int = 2,
                 chunk_size: int = 64):
        super().__init__()
        check_heads(dim, heads)
        self.dim, self.heads, self.d_state, self.chunk_size = dim, heads, d_state, chunk_size
        self.d_inner = expand * dim
        if self.d_inner % heads:
            raise ValueError(f"expand * dim ({self.d_inner}) must be divisible by heads ({heads})")
        self.in_proj = nn.Linear(dim, 2 * self.d_inner + 2 * d_state + heads, bias=False)
        self.conv = ShortConv(self.d_inner + 2 * d_state, d_conv)
        self.A_log = nn.Parameter(torch.log(torch.empty(heads).uniform_(1.0, 16.0)))
        dt = torch.exp(torch.empty(heads).uniform_(math.log(1e-3), math.log(0.1)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.D = nn.Parameter(torch.ones(heads))
        self.norm = nn.RMSNorm(self.d_inner, eps=1e-5)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)

    def forward(self, x, state=None, valid=None):
        valid = check_mixer_input(x, self.dim, valid)
        h, conv_state = state if state is not None else (None, None)
        B, T, _ = x.shape
        H, N = self.heads, self.d_state
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.d_inner + 2 * N, H], dim=-1)
        xBC, conv_state = self.conv(xBC, conv_state, valid)
        xs, Bm, Cm = xBC.split([self.d_inner, N, N], dim=-1)
        dt = _mask(F.softplus(dt.float() + self.dt_bias), valid)  # [B, T, H]
        g = -self.A_log.float().exp() * dt
        xs = _heads_view(xs, H)
        q, k = Cm.unsqueeze(2).expand(B, T, H, N), Bm.unsqueeze(2).expand(B, T, H, N)
        v = xs * dt.unsqueeze(-1).to(xs.dtype)
        if T == 1:
            y, h = step_simple_gla(q, k, v, g.to(x.dtype), scale=1.0, initial_state=h, output_final_state=True)
        else:
            y, h = chunk_simple_gla(q, k, v, g.to(x.dtype), scale=1.0, initial_state=h, output_final_state=True,
                                    chunk_size=self.chunk_size)
        y = y.to(x.dtype) + self.D.to(x.dtype)[:, None] * xs
        y = self.norm(_merge_heads(y) * F.silu(z))
        return self.out_proj(y), (h, conv_state)


# ----------------------------------------------------------------------------------------------
# Aaren
# ----------------------------------------------------------------------------------------------

# a padded key's score: exp(score - running max) underflows to exactly 0 once a real key arrives
_PAD_SCORE = -1e9


@register_mixer("aaren")
class AarenMixer(_Mixer):
    """Aaren, attention as an RNN (Feng, Tung, Ahmed, Bengio, Hajimirsadeghi, "Attention as an RNN",
    2024).

    A learned query ``q_h`` per head (constant over time) attends to every prefix:
    ``o_t = sum_{i<=t} exp(s_i) v_i / sum_{i<=t} exp(s_i)``, ``s_i = q_h . k_i / sqrt(d)``, with
    ``k, v = W_k x, W_v x``; ``y = W_o o``. Run by :func:`effattn.linear.chunk_aaren` (prefix
    max / sums, carried ``(m, s, a)`` state) and :func:`effattn.linear.step_aaren`. Padded
    positions get a score of ``-1e9`` (through an extra key column), so their weight is exactly zero
    once a real token has been seen. State: ``(m [B, H], s [B, H], a [B, H, V])``.
    """

    def __init__(self, dim: int, heads: int, chunk_size: int = 64):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, check_heads(dim, heads)
        self.chunk_size = chunk_size
        self.query = nn.Parameter(torch.randn(heads, self.head_dim) / math.sqrt(self.head_dim))
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, state=None, valid=None):
        valid = check_mixer_input(x, self.dim, valid)
        H = self.heads
        k, v = _heads_view(self.k_proj(x), H), _heads_view(self.v_proj(x), H)
        q = self.query.to(x.dtype)
        scale = self.head_dim**-0.5
        if valid is not None:
            pad = torch.where(valid, 0.0, _PAD_SCORE / scale).to(x.dtype)
            k = torch.cat([_mask(k, valid), pad[:, :, None, None].expand(-1, -1, H, 1)], dim=-1)
            q = torch.cat([q, torch.ones_like(q[:, :1])], dim=-1)
            v = _mask(v, valid)
        if x.shape[1] == 1:
            o, state = step_aaren(q, k, v, scale=scale, initial_state=state, output_final_state=True)
        else:
            o, state = chunk_aaren(q, k, v, scale=scale, initial_state=state, output_final_state=True,
                                   chunk_size=self.chunk_size)
        return self.o_proj(_merge_heads(o.to(x.dtype))), state


# ----------------------------------------------------------------------------------------------
# Mixture-of-Memories
# ----------------------------------------------------------------------------------------------


@register_mixer("mom")
class MoMMixer(_Mixer):
    """Mixture-of-Memories layer (Du, Sun, Lan, Hu, Cheng, "MoM: Linear Sequence Modeling with
    Mixture-of-Memories", 2025).

    ``q, k, v = silu(conv4(W x))``; a router ``W_r x`` per head sends each token to its ``top_k``
    of ``memories`` memory matrices (plus one shared memory, always written and read); a selected
    memory decays by ``alpha_t = exp(-exp(A_log) * softplus(W_a x + dt_bias))`` and adds
    ``k_t v_t^T``; ``o_t = scale * sum_m w_t^m S^m_t^T q_t`` with ``w_t`` the softmax of the
    selected router logits; ``y = W_o (RMSNorm(o) * swish(W_g x))`` (:func:`effattn.linear.chunk_mom`).
    Keys are L2-normalized so the memories stay bounded. State:
    ``(S [B, H, memories + 1, K, V], conv_q, conv_k, conv_v)``.
    """

    def __init__(self, dim: int, heads: int, memories: int = 4, top_k: int = 2, shared_memory: bool = True,
                 conv_size: int = 4, chunk_size: int = 64):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, check_heads(dim, heads)
        if not 1 <= top_k <= memories:
            raise ValueError(f"top_k must be in [1, memories={memories}], got {top_k}")
        self.memories, self.top_k, self.shared_memory, self.chunk_size = memories, top_k, shared_memory, chunk_size
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_conv, self.k_conv, self.v_conv = (ShortConv(dim, conv_size) for _ in range(3))
        self.router = nn.Linear(dim, heads * memories, bias=False)
        self.a_proj = nn.Linear(dim, heads, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(heads).uniform_(1.0, 16.0)))
        dt = torch.exp(torch.empty(heads).uniform_(math.log(1e-3), math.log(0.1)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.g_proj = nn.Linear(dim, dim, bias=False)
        self.o_norm = nn.RMSNorm(self.head_dim, eps=1e-5)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, state=None, valid=None):
        valid = check_mixer_input(x, self.dim, valid)
        S, cq, ck, cv = state if state is not None else (None, None, None, None)
        H = self.heads
        q, cq = self.q_conv(self.q_proj(x), cq, valid)
        k, ck = self.k_conv(self.k_proj(x), ck, valid)
        v, cv = self.v_conv(self.v_proj(x), cv, valid)
        q = F.normalize(_heads_view(q, H), dim=-1)
        k = _mask(F.normalize(_heads_view(k, H), dim=-1), valid)
        v = _mask(_heads_view(v, H), valid)
        logits = _heads_view(self.router(x), H)
        g = _mask(-self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias), valid)
        kw = dict(top_k=self.top_k, shared_memory=self.shared_memory, initial_state=S, output_final_state=True)
        if x.shape[1] == 1:
            o, S = step_mom(q, k, v, logits, g.to(x.dtype), **kw)
        else:
            o, S = chunk_mom(q, k, v, logits, g.to(x.dtype), **kw, chunk_size=self.chunk_size)
        o = self.o_norm(o.to(x.dtype)) * F.silu(_heads_view(self.g_proj(x), H))
        return self.o_proj(_merge_heads(o)), (S, cq, ck, cv)


# ----------------------------------------------------------------------------------------------
# sparse family: top-k block retrieval (MoBA)
# ----------------------------------------------------------------------------------------------


@register_mixer("topk_block")
class TopKBlockMixer(_Mixer):
    """Causal top-k block attention, MoBA-style (Lu et al., "MoBA: Mixture of Block Attention for
    Long-Context LLMs", 2025), on :func:`effattn.sparse.topk_block_attention`.

    Keys are cut into blocks of ``block`` tokens (counted from each sequence's first real token);
    a query in block ``i`` attends (exact softmax, RoPE on q/k) to its own block causally and to the
    ``top_k`` earlier complete blocks ``j`` with the largest ``p_i . mean(k_block_j)``, where ``p_i``
    is the mean of the ``block`` queries ending at block ``i``'s first position (no look-ahead);
    ``y = W_o o``. Prefill runs the sparse engine; decoding scores the cached blocks for the one new
    query and attends to the gathered keys. State per sequence: the KV cache (grows with the
    context), the last ``block`` queries and the current block's pooled query. Rows are processed
    one by one (each row's blocks start at its own first real token), so this layer is a correct
    reference, not a fast batched decoder.
    """

    def __init__(self, dim: int, heads: int, block: int = 64, top_k: int = 4, rope: bool = True,
                 rope_base: float = 10000.0):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, check_heads(dim, heads)
        if block < 1 or top_k < 1:
            raise ValueError(f"block and top_k must be >= 1, got block={block}, top_k={top_k}")
        self.block, self.top_k = block, top_k
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, rope_base) if rope else None

    def _probe_len(self, seq_len: int) -> int:
        return seq_len

    def _rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        if self.rope is None:
            return x
        return self.rope.apply(x, torch.arange(start, start + x.shape[1], device=x.device))

    def _prefill(self, q, k, v):
        """A fresh sequence ``[1, n, H, D]``: the sparse engine (dense causal while there is one block)."""
        n = q.shape[1]
        n_blocks = -(-n // self.block)
        top_k = min(self.top_k, n_blocks - 1)
        if top_k == 0:
            return attention(q, k, v, causal=True)
        return topk_block_attention(q, k, v, block=self.block, top_k=top_k, causal=True)

    def _pooled_query(self, q_hist: torch.Tensor, t_first: int, t_end: int) -> torch.Tensor:
        """Mean of the queries at positions ``max(0, t_first - block + 1) .. t_first``; ``q_hist`` holds
        positions ``t_end - len .. t_end - 1``."""
        lo = max(0, t_first - self.block + 1)
        off = t_end - q_hist.shape[1]
        return q_hist[:, lo - off : t_first + 1 - off].float().mean(dim=1)  # [1, H, D]

    def _decode_one(self, q, k_all, v_all, p):
        """One query ``[1, 1, H, D]`` at position ``t = len(k_all) - 1``."""
        t = k_all.shape[1] - 1
        i, bs = t // self.block, self.block
        own = torch.arange(i * bs, t + 1, device=q.device)
        H = self.heads
        if i > 0:
            reps = k_all[:, : i * bs].float().reshape(1, i, bs, H, -1).mean(dim=2)  # [1, i, H, D]
            scores = torch.einsum("bhd,bjhd->bhj", p, reps)[0]  # [H, i]
            sel = scores.topk(min(self.top_k, i), dim=-1).indices  # [H, k]
            pos = (sel[:, :, None] * bs + torch.arange(bs, device=q.device)).reshape(H, -1)
            pos = torch.cat([pos, own.expand(H, -1)], dim=1)  # [H, L]
        else:
            pos = own.expand(H, -1)
        h_idx = torch.arange(H, device=q.device)[:, None]
        kk, vv = k_all[0, pos, h_idx], v_all[0, pos, h_idx]  # [H, L, D]
        att = torch.einsum("hd,hld->hl", q[0, 0].float(), kk.float()) * self.head_dim**-0.5
        o = torch.einsum("hl,hld->hd", att.softmax(dim=-1), vv.float())
        return o[None, None].to(q.dtype)

    def _row(self, q, k, v, st):
        """One sequence: new tokens ``[1, n, H, D]`` and its state (or None)."""
        n = q.shape[1]
        t0 = 0 if st is None else st[0].shape[1]
        q, k = self._rotate(q, t0), self._rotate(k, t0)
        if st is None:
            if n == 0:
                return q.new_zeros(q.shape), None
            o = self._prefill(q, k, v)
            k_all, v_all, q_hist = k, v, q
            p = self._pooled_query(q, (n - 1) // self.block * self.block, n)  # the last token's block
        else:
            k_all, v_all, q_hist, p = st
            outs = []
            for j in range(n):
                t = t0 + j
                k_all, v_all = torch.cat([k_all, k[:, j : j + 1]], 1), torch.cat([v_all, v[:, j : j + 1]], 1)
                q_hist = torch.cat([q_hist, q[:, j : j + 1]], 1)[:, -self.block :]
                if t % self.block == 0:
                    p = self._pooled_query(q_hist, t, t + 1)
                outs.append(self._decode_one(q[:, j : j + 1], k_all, v_all, p))
            o = torch.cat(outs, dim=1) if outs else q.new_zeros(q.shape)
        return o, (k_all, v_all, q_hist[:, -self.block :], p)

    def forward(self, x, state=None, valid=None):
        valid = check_mixer_input(x, self.dim, valid)
        B, T, _ = x.shape
        if state is not None and (not isinstance(state, list) or len(state) != B):
            raise ValueError(f"state must be a list of {B} per-sequence states")
        q, k, v = (_heads_view(t, self.heads) for t in self.wqkv(x).chunk(3, dim=-1))
        out = x.new_zeros(B, T, self.heads, self.head_dim)
        new_state = []
        for b in range(B):
            lo = 0
            if valid is not None:
                n_valid = int(valid[b].sum())
                lo = T - n_valid
                if not bool(valid[b, lo:].all()):
                    raise ValueError("topk_block supports left padding only: valid must be False then True per row")
            st = None if state is None else state[b]
            o, st = self._row(q[b : b + 1, lo:], k[b : b + 1, lo:], v[b : b + 1, lo:], st)
            out[b, lo:] = o[0]
            new_state.append(st)
        return self.o_proj(_merge_heads(out)), new_state


# ----------------------------------------------------------------------------------------------
# sparse family: Routing Transformer (online k-means routing)
# ----------------------------------------------------------------------------------------------


def _attend_slots(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """Softmax attention of ``q [..., D]`` over the slots ``k [..., S, D]``, ``v [..., S, Dv]`` where
    ``mask [..., S]`` is True; float32, zeros where no slot is valid (as the engine's empty rows)."""
    s = torch.einsum("...d,...sd->...s", q.float(), k.float()) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.exp(s - s.amax(-1, keepdim=True).clamp_min(-1e30))
    return torch.einsum("...s,...sd->...d", p, v.float()) / p.sum(-1, keepdim=True).clamp_min(1e-30)


def _grow(buf: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``buf`` padded with zeros along ``dim`` to ``size`` (unchanged if already that long)."""
    extra = size - buf.shape[dim]
    if extra <= 0:
        return buf
    shape = list(buf.shape)
    shape[dim] = extra
    return torch.cat([buf, buf.new_zeros(shape)], dim=dim)


def _put(buf: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``buf.scatter(dim, index, src)``: in place for inference, out of place while autograd records."""
    if torch.is_grad_enabled() and (buf.requires_grad or src.requires_grad):
        return buf.scatter(dim, index, src)
    return buf.scatter_(dim, index, src)


_ROUTING_STATE_KEYS = ("pos", "lk", "lv", "lmask", "rk", "rv", "rmask", "rcount")


@register_mixer("routing")
class RoutingMixer(_Mixer):
    """Routing Transformer layer (Roy, Saffar, Vaswani, Grangier, "Efficient Content-Based Sparse
    Attention with Routing Transformers", 2021), causal, on :func:`effattn.sparse.routing_attention`.

    ``q, k, v = W_qkv x`` in ``heads`` heads; ``y = W_o o``. As in the paper, half the heads
    (``local_heads``, default ``heads // 2``) are local: exact softmax over the last ``window`` keys
    (RoPE on their q/k). The others are routing heads: an online spherical k-means
    (:class:`effattn.sparse.KMeansRouter`, ``num_clusters`` centroids per head, shared by queries and
    keys; the centroids are a buffer moved by an EMA step in every training-mode forward, over the
    call's real tokens and after its selection, never by a gradient) sends each query and key to its
    nearest centroid, and a query attends to the ``cluster_window`` most recent keys of its cluster
    at positions ``<= t`` (its own key included when it landed there); a query with no such key gets
    zeros from that head. ``cluster_window`` is fixed (not ``T // num_clusters``), so what a token
    sees does not depend on the length of the call: prefill, chunked prefill and token-by-token
    decoding compute the same thing. The routing heads carry no position encoding (routing is by
    content; a rotation would make a token's cluster depend on its position); order comes from
    causality and the local heads.

    Decoding state (a dict, bounded whatever the context; ``n`` = real tokens seen):
    ``pos [B]`` (``n``); for the local heads the last ``min(window, n)`` rotated keys and values,
    ``lk, lv [B, <= window, local_heads, D]`` with ``lmask`` (a ring: token ``i`` in slot
    ``i % window``); for every routing head and cluster the last ``cluster_window`` keys and values
    routed there, ``rk, rv [B, H_r, num_clusters, <= cluster_window, D]`` with ``rmask`` and the
    per-cluster counts ``rcount [B, H_r, num_clusters]`` (the ``j``-th key of a cluster in slot
    ``j % cluster_window``). A decoding step routes the new query and key with the same centroids
    (eval mode: unchanged), writes the key into its cluster's ring and attends to the query's
    cluster ring and the local ring: exactly the keys the full forward gives that query. Buffers grow
    with the context up to these bounds (:meth:`state_size`). Prefill runs the sparse engine (row by
    row when the batch is left-padded), decoding is batched; a call with a state is run token by token.

    Example::

        >>> mixer = RoutingMixer(32, 4, num_clusters=4, cluster_window=8, window=8).eval()
        >>> x = torch.randn(1, 40, 32)
        >>> y, state = mixer(x[:, :39])                   # prefill (sparse engine)
        >>> y_last, state = mixer(x[:, 39:], state)       # one decoding step
        >>> torch.allclose(y_last, mixer(x)[0][:, 39:], atol=1e-5)
        True
        >>> tuple(state["rk"].shape)                      # [B, routing heads, clusters, <= cluster_window, D]
        (1, 2, 4, 8, 8)
    """

    def __init__(self, dim: int, heads: int, num_clusters: int = 8, cluster_window: int = 128,
                 window: int = 128, local_heads: int | None = None, decay: float = 0.999, rope: bool = True,
                 rope_base: float = 10000.0, seed: int = 0):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, check_heads(dim, heads)
        for name, val in (("num_clusters", num_clusters), ("cluster_window", cluster_window), ("window", window)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        local_heads = heads // 2 if local_heads is None else local_heads
        if isinstance(local_heads, bool) or not isinstance(local_heads, int) or not 0 <= local_heads <= heads:
            raise ValueError(f"local_heads must be an int in [0, heads={heads}], got {local_heads!r}")
        self.num_clusters, self.cluster_window, self.window = num_clusters, cluster_window, window
        self.local_heads, self.routing_heads = local_heads, heads - local_heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, rope_base) if rope and local_heads else None
        self.router = (
            KMeansRouter(self.routing_heads, self.head_dim, num_clusters, decay=decay, seed=seed)
            if self.routing_heads
            else None
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, local_heads={self.local_heads}, window={self.window}, "
            f"num_clusters={self.num_clusters}, cluster_window={self.cluster_window}"
        )

    def state_size(self, batch: int, seq_len: int) -> int:
        """Bytes of decoding state at most held for ``batch`` sequences at context ``seq_len``: local
        rings of ``min(window, seq_len)`` tokens, routing rings of ``min(cluster_window, seq_len)``
        slots per cluster, their masks and counts (parameter dtype for keys and values)."""
        if batch < 1 or seq_len < 0:
            raise ValueError(f"batch must be >= 1 and seq_len >= 0, got batch={batch}, seq_len={seq_len}")
        el = self.wqkv.weight.element_size()
        D, L, Hr, K = self.head_dim, self.local_heads, self.routing_heads, self.num_clusters
        cl, cr = min(self.window, seq_len) if L else 0, min(self.cluster_window, seq_len)
        per_row = 8 + cl * (2 * L * D * el + 1) + Hr * K * (cr * (2 * D * el + 1) + 8)
        return batch * per_row

    # ------------------------------------------------------------------ prefill
    def _sparse(self, q, k, v):
        """One row (or an unpadded batch) through the sparse engine, the router's EMA step left out."""
        training = self.router is not None and self.router.training
        if training:
            self.router.train(False)  # the layer makes one EMA step itself, over the real tokens only
        try:
            return routing_attention(
                q, k, v, router=self.router, num_clusters=None if self.router is not None else 1,
                causal=True, local_heads=self.local_heads, window=self.window,
                cluster_window=self.cluster_window,
            )
        finally:
            if training:
                self.router.train(True)

    def _prefill(self, q, k, v, valid):
        B, T, H, D = q.shape
        L = self.local_heads
        if valid is not None and bool(valid.all()):
            valid = None
        vm = torch.ones(B, T, dtype=torch.bool, device=q.device) if valid is None else valid
        idx = vm.long().cumsum(1) - 1  # index of each real token in its row
        if self.rope is not None:
            pos = torch.arange(T, device=q.device) if valid is None else idx.clamp(min=0)
            q = torch.cat([self.rope.apply(q[:, :, :L], pos), q[:, :, L:]], 2)
            k = torch.cat([self.rope.apply(k[:, :, :L], pos), k[:, :, L:]], 2)
        if valid is None:
            o = self._sparse(q, k, v)
        else:
            o = q.new_zeros(B, T, H, v.shape[-1])
            for b in range(B):
                lo = T - int(vm[b].sum())
                if not bool(vm[b, lo:].all()):
                    raise ValueError("valid: routing supports left padding only (False then True per row)")
                if lo < T:
                    o[b, lo:] = self._sparse(q[b : b + 1, lo:], k[b : b + 1, lo:], v[b : b + 1, lo:])[0]
        return o, self._state_from(k, v, vm, idx)

    def _state_from(self, k, v, vm, idx):
        """The decoding state after a fresh sequence ``k, v [B, T, H, D]`` (local keys rotated)."""
        B, T, H, D = k.shape
        L, Hr, K, W, CW = self.local_heads, self.routing_heads, self.num_clusters, self.window, self.cluster_window
        n = vm.sum(1)
        st = {"pos": n}
        cl = min(W, int(n.max())) if L and T else 0
        keep = vm & (idx >= (n - W)[:, None])
        slot = torch.where(keep, idx % W, cl)  # slot cl: a token no later query sees, cut off below
        for name, x in (("lk", k[:, :, :L]), ("lv", v[:, :, :L])):
            buf = x.new_zeros(B, cl + 1, L, x.shape[-1])
            st[name] = _put(buf, 1, slot[:, :, None, None].expand(B, T, L, x.shape[-1]), x)[:, :cl]
        lmask = torch.zeros(B, cl + 1, dtype=torch.bool, device=k.device).scatter_(1, slot.clamp(max=cl), keep)
        st["lmask"] = lmask[:, :cl]
        kr = k[:, :, L:]
        ck = self.router.assign(kr) if Hr else torch.zeros(B, 0, T, dtype=torch.long, device=k.device)  # [B,Hr,T]
        member = F.one_hot(ck, K).bool() & vm[:, None, :, None]  # [B, Hr, T, K]
        count = member.long().sum(2)  # [B, Hr, K]
        j = (member.long().cumsum(2) - 1).gather(-1, ck[..., None])[..., 0]  # index within the cluster
        keep = vm[:, None] & (j >= count.gather(-1, ck) - CW)
        cr = min(CW, int(count.max())) if Hr and count.numel() else 0
        dest = torch.where(keep, ck * cr + j % CW, K * cr)  # [B, Hr, T]; K * cr: dropped
        for name, x in (("rk", kr), ("rv", v[:, :, L:])):
            Dx = x.shape[-1]
            buf = x.new_zeros(B, Hr, K * cr + 1, Dx)
            buf = _put(buf, 2, dest[..., None].expand(B, Hr, T, Dx), x.transpose(1, 2))
            st[name] = buf[:, :, : K * cr].reshape(B, Hr, K, cr, Dx)
        rmask = torch.zeros(B, Hr, K * cr + 1, dtype=torch.bool, device=k.device).scatter_(2, dest, keep)
        st["rmask"] = rmask[:, :, : K * cr].reshape(B, Hr, K, cr)
        st["rcount"] = count
        return st

    # ------------------------------------------------------------------ decoding
    def _step(self, q, k, v, valid, st):
        """One token per row ``q, k, v [B, H, D]`` (``valid [B]`` or None) against the state ``st``."""
        B, H, D = q.shape
        L, Hr, K, W, CW = self.local_heads, self.routing_heads, self.num_clusters, self.window, self.cluster_window
        vm = torch.ones(B, dtype=torch.bool, device=q.device) if valid is None else valid
        n = st["pos"]
        st = dict(st)
        scale = D**-0.5
        outs = []
        if L:
            ql, kl, vl = q[:, :L], k[:, :L], v[:, :L]
            if self.rope is not None:
                ql = self.rope.apply(ql[:, None], n[:, None])[:, 0]
                kl = self.rope.apply(kl[:, None], n[:, None])[:, 0]
            need = min(W, int(torch.where(vm, n, 0).max()) + 1)
            lk, lv = _grow(st["lk"], 1, need), _grow(st["lv"], 1, need)
            lmask = _grow(st["lmask"], 1, need)
            slot = (n % W).clamp(max=lk.shape[1] - 1)[:, None]  # a padded row writes its old value back
            new_k = torch.where(vm[:, None, None], kl, lk.gather(1, slot[:, :, None, None].expand(B, 1, L, D))[:, 0])
            new_v = torch.where(vm[:, None, None], vl, lv.gather(1, slot[:, :, None, None].expand(B, 1, L, D))[:, 0])
            st["lk"] = lk = _put(lk, 1, slot[:, :, None, None].expand(B, 1, L, D), new_k[:, None])
            st["lv"] = lv = _put(lv, 1, slot[:, :, None, None].expand(B, 1, L, D), new_v[:, None])
            st["lmask"] = lmask = lmask.scatter(1, slot, lmask.gather(1, slot) | vm[:, None])
            outs.append(_attend_slots(ql, lk.transpose(1, 2), lv.transpose(1, 2), lmask[:, None], scale))
        if Hr:
            qr, kr, vr = q[:, L:], k[:, L:], v[:, L:]
            cq = self.router.assign(qr[:, None])[..., 0]  # [B, Hr]
            ck = self.router.assign(kr[:, None])[..., 0]
            count = st["rcount"]
            c_now = count.gather(-1, ck[..., None])[..., 0]  # [B, Hr]
            need = min(CW, int(torch.where(vm[:, None], c_now, 0).max()) + 1)
            rk, rv, rmask = _grow(st["rk"], 3, need), _grow(st["rv"], 3, need), _grow(st["rmask"], 3, need)
            C = rk.shape[3]
            flat = ck * C + (c_now % CW).clamp(max=C - 1)  # [B, Hr]
            rk, rv, rmask = rk.reshape(B, Hr, K * C, D), rv.reshape(B, Hr, K * C, -1), rmask.reshape(B, Hr, K * C)
            idx = flat[..., None, None]
            w = vm[:, None, None]
            new_k = torch.where(w, kr, rk.gather(2, idx.expand(B, Hr, 1, D))[:, :, 0])
            new_v = torch.where(w, vr, rv.gather(2, idx.expand(B, Hr, 1, rv.shape[-1]))[:, :, 0])
            rk = _put(rk, 2, idx.expand(B, Hr, 1, D), new_k[:, :, None]).reshape(B, Hr, K, C, D)
            rv = _put(rv, 2, idx.expand(B, Hr, 1, rv.shape[-1]), new_v[:, :, None]).reshape(B, Hr, K, C, -1)
            rmask = rmask.scatter(2, flat[..., None], rmask.gather(2, flat[..., None]) | vm[:, None, None])
            rmask = rmask.reshape(B, Hr, K, C)
            st["rk"], st["rv"], st["rmask"] = rk, rv, rmask
            st["rcount"] = count + F.one_hot(ck, K) * vm[:, None, None].long()
            g = cq[:, :, None, None]
            kq = rk.gather(2, g[..., None].expand(B, Hr, 1, C, D))[:, :, 0]
            vq = rv.gather(2, g[..., None].expand(B, Hr, 1, C, rv.shape[-1]))[:, :, 0]
            mq = rmask.gather(2, g.expand(B, Hr, 1, C))[:, :, 0]
            outs.append(_attend_slots(qr, kq, vq, mq, scale))
        st["pos"] = n + vm.long()
        o = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
        return o.to(q.dtype), st

    def _check_state(self, state, B: int) -> dict:
        if not isinstance(state, dict) or set(state) != set(_ROUTING_STATE_KEYS):
            raise ValueError(f"state must be the dict a RoutingMixer call returned (keys {_ROUTING_STATE_KEYS})")
        if state["pos"].shape != (B,):
            raise ValueError(f"state holds batch {tuple(state['pos'].shape)}, x has batch {B}")
        return state

    def forward(self, x, state=None, valid=None):
        valid = check_mixer_input(x, self.dim, valid)
        B, T, _ = x.shape
        q, k, v = (_heads_view(t, self.heads) for t in self.wqkv(x).chunk(3, dim=-1))
        if state is None:
            o, state = self._prefill(q, k, v, valid)
        else:
            state = self._check_state(state, B)
            outs = []
            for t in range(T):
                o_t, state = self._step(q[:, t], k[:, t], v[:, t], None if valid is None else valid[:, t], state)
                outs.append(o_t)
            o = torch.stack(outs, 1) if outs else q.new_zeros(q.shape)
        if self.training and self.router is not None:
            L = self.local_heads
            sel = slice(None) if valid is None else valid
            qr, kr = q[:, :, L:][sel], k[:, :, L:][sel]  # [B, T, Hr, D] or [N, Hr, D]
            if valid is not None:
                qr, kr = qr[None], kr[None]
            if qr.shape[1]:
                self.router.update(qr, kr)
        return self.o_proj(_merge_heads(o)), state
