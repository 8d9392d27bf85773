"""Titans neural memory (Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time", 2025).

A per-head memory ``M`` (an MLP of ``depth`` layers; depth 1 is a ``[K, V]`` matrix) learns at test time
by gradient descent on the associative loss ``loss_t(M) = ||M(k_t) - v_t||^2``, with a per-token step
size ``theta_t``, momentum ``eta_t`` (the "surprise") and a forgetting gate ``alpha_t``::

    S_t = eta_t S_{t-1} - theta_t grad loss_t(M_{t-1})        (surprise: past + momentary)
    M_t = (1 - alpha_t) M_{t-1} + S_t                          (forgetting)
    y_t = M_t(q_t)                                             (retrieval, no update)

:func:`titans_memory` is the token-by-token reference; :func:`chunk_titans_memory` is the paper's
parallel form: within a chunk of ``b`` tokens every gradient is taken at the chunk-start memory
(mini-batch gradient descent), and momentum and decay run as scans over the chunk (in the fast factored
form of :mod:`effattn.memory._chunked`: no per-token memory weights). With
``chunk_size=1`` the two are the same computation; with larger chunks the chunked form is the paper's
approximation (it differs from the reference, and the tests check both statements).
:func:`step_titans_memory` is the one-token step for decoding. With depth 1, ``eta = alpha = 0`` and a
zero initial memory the rule is the delta rule with ``beta_t = 2 theta_t``.

State (dict): ``A`` (the memory weights, one ``[B, H, d_l, d_{l+1}]`` per layer), ``S`` (momentum,
same shapes), and an empty window buffer (``k``, ``v``, ``gamma``; used by ATLAS).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from effattn._checks import check_float, check_int, check_positive_int
from effattn.linear import causal_conv1d
from effattn.memory._chunked import chunk_neural_memory
from effattn.memory._neural import mlp_apply, read_weights, reference_neural_memory

__all__ = ["NeuralMemory", "chunk_titans_memory", "init_memory_weights", "step_titans_memory", "titans_memory"]


def init_memory_weights(
    heads: int,
    key_dim: int,
    value_dim: int,
    depth: int = 1,
    expansion: int = 2,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Initial memory weights ``[heads, d_l, d_{l+1}]`` for an MLP ``key_dim -> expansion*key_dim ... ->
    value_dim`` of ``depth`` layers, scaled ``1/sqrt(d_l)`` (a depth-1 memory starts at zero).

    Example::

        >>> [tuple(w.shape) for w in init_memory_weights(2, 4, 3, depth=2)]
        [(2, 4, 8), (2, 8, 3)]
    """
    for name, val in (
        ("heads", heads),
        ("key_dim", key_dim),
        ("value_dim", value_dim),
        ("depth", depth),
        ("expansion", expansion),
    ):
        check_positive_int(name, val)
    if depth == 1:
        return [torch.zeros(heads, key_dim, value_dim)]
    dims = [key_dim] + [expansion * key_dim] * (depth - 1) + [value_dim]
    return [torch.randn(heads, a, b, generator=generator) / math.sqrt(a) for a, b in zip(dims[:-1], dims[1:])]


def titans_memory(
    q, k, v, theta, eta, alpha, weights, *, initial_state=None, output_final_state=False, valid=None, max_grad_norm=None
):
    """Token-by-token Titans memory (the rule of the module docstring), float32. ``max_grad_norm``: clip
    each token's gradient to that norm (:mod:`effattn.memory._neural`).

    q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, theta (>= 0), eta, alpha (in [0, 1]) ``[B, T, H]``,
    ``weights`` the initial memory (:func:`init_memory_weights`). Returns ``(y [B, T, H, V], state)``.

    Example::

        >>> q = k = torch.randn(1, 5, 2, 4); v = torch.randn(1, 5, 2, 3)
        >>> g = torch.full((1, 5, 2), 0.3)
        >>> y, st = titans_memory(q, k, v, g, g, g, init_memory_weights(2, 4, 3, depth=2), output_final_state=True)
        >>> tuple(y.shape), len(st["A"])
        ((1, 5, 2, 3), 2)
    """
    return reference_neural_memory(
        q,
        k,
        v,
        theta,
        eta,
        alpha,
        weights,
        initial_state=initial_state,
        output_final_state=output_final_state,
        valid=valid,
        max_grad_norm=max_grad_norm,
    )


def chunk_titans_memory(
    q,
    k,
    v,
    theta,
    eta,
    alpha,
    weights,
    *,
    chunk_size: int = 16,
    initial_state=None,
    output_final_state=False,
    max_grad_norm=None,
):
    """Chunked Titans memory (gradients at each chunk's start memory; momentum and decay as scans).
    ``chunk_size=1`` equals :func:`titans_memory`; larger chunks approximate it.

    Example::

        >>> gen = torch.Generator().manual_seed(0)  # unclipped float32: some draws diverge (max_grad_norm)
        >>> q = k = torch.randn(1, 7, 1, 4, generator=gen); v = torch.randn(1, 7, 1, 4, generator=gen)
        >>> g = torch.full((1, 7, 1), 0.2)
        >>> w = init_memory_weights(1, 4, 4, depth=2, generator=gen)
        >>> a, _ = chunk_titans_memory(q, k, v, g, g, g, w, chunk_size=1)
        >>> torch.allclose(a, titans_memory(q, k, v, g, g, g, w)[0], atol=1e-5)
        True
    """
    return chunk_neural_memory(
        q,
        k,
        v,
        theta,
        eta,
        alpha,
        weights,
        chunk_size=chunk_size,
        initial_state=initial_state,
        output_final_state=output_final_state,
        max_grad_norm=max_grad_norm,
    )


def step_titans_memory(q, k, v, theta, eta, alpha, state, *, chunk_size: int = 1, max_grad_norm=None):
    """One decoding step (``T = 1``) from ``state``; returns ``(y [B, 1, H, V], new state)``. With
    ``chunk_size > 1`` the step continues the chunk grid of :func:`chunk_titans_memory` (its gradient at
    the current chunk's start memory), so steps after a chunked prefill equal one chunked call.

    Example::

        >>> q = k = v = torch.randn(1, 1, 1, 2); g = torch.full((1, 1, 1), 0.5)
        >>> _, st = titans_memory(q, k, v, g, g, g, [torch.zeros(1, 2, 2)], output_final_state=True)
        >>> y, st = step_titans_memory(q, k, v, g, g, g, st)
        >>> tuple(y.shape)
        (1, 1, 1, 2)
    """
    if q.dim() != 4 or q.shape[1] != 1:
        raise ValueError(f"q must be [batch, 1, heads, key_dim] for one step, got {tuple(q.shape)}")
    if state is None:
        raise ValueError("state must be the state of a previous call (a dict with 'A', 'S', ...), got None")
    weights = [a[0] for a in state["A"]]  # shapes only: the state replaces them
    return reference_neural_memory(
        q,
        k,
        v,
        theta,
        eta,
        alpha,
        weights,
        initial_state=state,
        output_final_state=True,
        chunk_size=chunk_size,
        max_grad_norm=max_grad_norm,
    )


class NeuralMemory(nn.Module):
    """A learned-memory layer on ``[B, T, dim]``: projections ``q, k, v`` (q, k L2-normalised, after
    an optional polynomial feature map), per-token gates ``theta_t = theta_max * sigmoid(w_theta x)``,
    ``eta_t = sigmoid(w_eta x)``, ``alpha_t = sigmoid(w_alpha x)`` (and ``gamma_t`` for a window),
    the memory rule (Titans by default; ``loss``/``retention``/``window``/``muon`` select Miras and
    ATLAS rules), and ``y = W_o(RMSNorm(M_t(q_t)) * silu(W_g x))``.

    ``forward(x, state=None, valid=None) -> (y, state)``. ``chunk_size`` (default 16) fixes the chunk
    grid of the paper's chunked form on the sequence's (valid) tokens: every gradient of a chunk at the
    chunk's start memory. Multi-token calls run it in parallel (the fast factored form where the rule is
    linear in the gradients, :func:`effattn.memory.fast_chunk_applies`); one-token steps, padded calls and
    rows at different grid positions run the same semantics token by token
    (``reference_neural_memory(chunk_size=...)``), so decoding, or a call split anywhere, equals one
    full forward exactly. ``chunk_size=1`` is the exact token-by-token rule. Invalid (``valid`` False)
    tokens are identity steps and do not advance the grid. ``fast`` picks the chunk form (None: the
    factored one where it applies; False: the materialized one, the same numbers, for comparisons).
    ``max_grad_norm`` (default 1.0; None: off) clips each token's memory gradient to that norm, which keeps
    a memory with a large step size and momentum finite at any length (unclipped, Titans MAL/MAG trained on
    MQAR at lr 3e-3 went NaN in 17 of 18 runs; docs/memory.md).

    ``theta_max`` (default 1.0; 0.1 before 2026-12-02) caps the step size: with L2-normalised keys a depth-1
    memory's l2 write is the delta rule with ``beta_t = 2 theta_t < 2`` (a contraction for unit keys), the
    range of titans-pytorch's default too (``max_lr`` 1 on keys of squared norm ~d, loss averaged over d). At
    0.1 a write stores at most a fifth of a value: on the quick MQAR preset Yaad went from 0.35 to 0.94 and
    ATLAS from 0.93 to 0.99 with the larger cap (docs/memory.md).

    ``conv_size`` (default 4; 0: none, with ``theta_max=0.1`` the layer as it was before 2026-12-02) puts a
    causal depthwise convolution with SiLU after the q and k projections (and v with ``conv_values=True``),
    before the feature map and the L2 norm (Titans section 4.4, whose block Miras and ATLAS share, convolves
    all three): ``q_t = silu(b + sum_{i<K} w_i (W_q x)_{t-K+1+i})`` (:func:`effattn.linear.causal_conv1d`),
    each projection with its own weight ``[dim, K]`` and bias, so a key can carry the tokens just before it.
    Invalid tokens are skipped by it as by the memory (they enter no window and no state), so padding never
    reaches a valid row, also after a non-empty state. Its states, the last ``K - 1`` projections, ride in the
    state dict as ``state["conv"] = [q, k]`` (``[q, k, v]`` with ``conv_values=True``; ``[B, K - 1, dim]``
    each); the other keys are the memory's (``A``, ``S``, ...).

    ``conv_values`` (default False since 2026-12-03; True: the papers' block) also convolves the value. By default
    the memory gets ``v = W_v x`` itself: measured on this CPU, the SiLU-convolved value put ATLAS at chance on
    passkey (0.5-0.98 per digit without it, three seeds; Titans MAL 0.16-0.53 -> 0.73-0.99, two seeds) and
    slowed or stopped every memory on the quick MQAR task (docs/memory.md); language modelling not measured.

    ``residual_norm`` (default False) makes the memory ``M(x) = x + LN(MLP(x))`` (LayerNorm without affine;
    :func:`effattn.memory.mlp_apply`), the memory of TTT, Miras and titans-pytorch's default; Memora's mixer
    turns it on (docs/memory.md).

    Example::

        >>> mem = NeuralMemory(16, 2, depth=2).eval()
        >>> x = torch.randn(1, 6, 16)
        >>> y, st = mem(x[:, :5])
        >>> y6, _ = mem(x[:, 5:], st)
        >>> torch.allclose(y6, mem(x)[0][:, 5:], atol=1e-5)
        True
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        depth: int = 1,
        expansion: int = 2,
        loss: str = "l2",
        p: float = 2.0,
        retention: str = "linear",
        q_exp: float = 2.0,
        window: int = 1,
        muon: bool = False,
        feature_degree: int = 1,
        momentum: bool = True,
        theta_max: float = 1.0,
        chunk_size: int = 16,
        fast: bool | None = None,
        max_grad_norm: float | None = 1.0,
        conv_size: int = 4,
        residual_norm: bool = False,
        conv_values: bool = False,
    ):
        super().__init__()
        check_int("conv_size", conv_size, 0)
        if not isinstance(conv_values, bool):
            raise ValueError(f"conv_values must be a bool, got {conv_values!r}")
        check_positive_int("heads", heads)
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        check_positive_int("chunk_size", chunk_size)
        check_positive_int("feature_degree", feature_degree)
        if max_grad_norm is not None:
            check_float("max_grad_norm", max_grad_norm, 0.0, float("inf"), lo_open=True)
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.opts = dict(loss=loss, p=p, retention=retention, q_exp=q_exp, window=window, muon=muon)
        if not isinstance(residual_norm, bool):
            raise ValueError(f"residual_norm must be a bool, got {residual_norm!r}")
        if residual_norm and feature_degree > 1:
            raise ValueError(
                f"residual_norm (M(x) = x + LN(MLP(x))) needs the key dim to equal the value dim; feature_degree "
                f"{feature_degree} makes the keys {feature_degree}x wider"
            )
        self.opts.update(max_grad_norm=max_grad_norm, residual_norm=residual_norm)
        self.feature_degree, self.momentum = feature_degree, momentum
        self.theta_max, self.chunk_size, self.fast = theta_max, chunk_size, fast
        fdim = self.head_dim * feature_degree
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.gate_proj = nn.Linear(dim, heads * (4 if window > 1 else 3))
        with torch.no_grad():  # start with small forgetting and a moderate step
            b = self.gate_proj.bias.view(-1, heads)
            b[0].fill_(-1.0)
            b[1].fill_(0.0)
            b[2].fill_(-3.0)
        self.weights = nn.ParameterList(init_memory_weights(heads, fdim, self.head_dim, depth, expansion))
        if retention == "softmax":  # rows of a softmax memory start uniform-ish, not at zero logits only
            with torch.no_grad():
                for w in self.weights:
                    w.normal_(0, 0.1)
        self.o_norm = nn.RMSNorm(self.head_dim, eps=1e-5)
        self.g_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.conv_size, self.conv_values = conv_size, conv_values
        if conv_size:  # created last: with conv_size=0 the layer and its initialisation are the old ones
            bound = 1 / math.sqrt(conv_size)  # ShortConv's initialisation
            n_conv = 3 if conv_values else 2  # q, k (, v)
            self.conv_weight = nn.ParameterList(
                nn.Parameter(torch.empty(dim, conv_size).uniform_(-bound, bound)) for _ in range(n_conv)
            )
            self.conv_bias = nn.ParameterList(nn.Parameter(torch.zeros(dim)) for _ in range(n_conv))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised ``x`` followed by the polynomial map ``[x, x^2, ..., x^p]`` (elementwise powers,
        each divided by ``sqrt(i!)``) of ``feature_degree`` p."""
        x = F.normalize(x, dim=-1)
        if self.feature_degree == 1:
            return x
        return torch.cat([x.pow(i) / math.sqrt(math.factorial(i)) for i in range(1, self.feature_degree + 1)], -1)

    def _conv(self, q, k, v, state, valid):
        """q, k (and v where ``conv_values``) through their short convolutions; returns q, k, v, the memory's
        state without ``conv`` and the new conv states."""
        conv = None
        if state is not None:
            if not isinstance(state, dict) or "conv" not in state:
                raise ValueError(
                    f"state must be the dict a previous call of this layer returned (with a 'conv' entry for "
                    f"conv_size={self.conv_size}), got {type(state).__name__}"
                    + (f" with keys {sorted(state)}" if isinstance(state, dict) else "")
                )
            conv = state["conv"]
            state = {key: val for key, val in state.items() if key != "conv"}
        out, new_conv = [], []
        for i, z in enumerate((q, k, v)[: len(self.conv_weight)]):
            c = None if conv is None else conv[i]
            y, c = causal_conv1d(z, self.conv_weight[i], self.conv_bias[i], c, valid=valid)
            out.append(y)
            new_conv.append(c)
        if not self.conv_values:
            out.append(v)
        return *out, state, new_conv

    def read(self, q: torch.Tensor, state=None) -> torch.Tensor:
        """Retrieval without a write, ``RMSNorm(M*(phi(q)))`` for raw queries ``q [B, T, heads, head_dim]``
        (``phi``: :meth:`features`), from the memory as it stood at the start of its current chunk: the state's
        ``A0`` (its ``A`` for ``chunk_size`` 1), the initial weights without a state. With ``chunk_size`` equal
        to a segment this is Titans MAC's ``h = M*_{s-1}(q)``, the memory the previous segment left. Returns
        ``[B, T, heads, head_dim]`` in ``q``'s dtype."""
        B, T = q.shape[:2]
        if state is None:
            start = [(w if w.dtype == torch.float64 else w.float()).expand(B, *w.shape) for w in self.weights]
        else:
            start = state["A0"] if "A0" in state else state["A"]
        W = [read_weights(a, self.opts["retention"], self.opts["q_exp"]) for a in start]
        h = mlp_apply(W, self.features(q).transpose(1, 2).to(W[0].dtype), residual_norm=self.opts["residual_norm"])
        h = h.transpose(1, 2)
        return self.o_norm(h.to(q.dtype))

    def forward(self, x: torch.Tensor, state=None, valid: torch.Tensor | None = None):
        B, T, _ = x.shape
        H, D = self.heads, self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        conv = None
        if self.conv_size:
            q, k, v, state, conv = self._conv(q, k, v, state, valid)
        q = self.features(q.view(B, T, H, D))
        k = self.features(k.view(B, T, H, D))
        v = v.view(B, T, H, D)
        gates = torch.sigmoid(self.gate_proj(x)).view(B, T, -1, H)
        theta = self.theta_max * gates[:, :, 0]
        eta = gates[:, :, 1] if self.momentum else torch.zeros_like(gates[:, :, 1])
        alpha = gates[:, :, 2]
        gamma = gates[:, :, 3] if self.opts["window"] > 1 else None
        if valid is not None:  # padded tokens: no write, no decay, no window weight
            theta = theta * valid[..., None]
            alpha = alpha * valid[..., None]
            eta = torch.where(valid[..., None], eta, torch.ones_like(eta))
            gamma = None if gamma is None else gamma * valid[..., None]
            k = k * valid[..., None, None]
            v = v * valid[..., None, None]
        weights = list(self.weights)
        if valid is not None and T > 1 and bool(valid.all()):
            valid = None
        if self.chunk_size > 1 and valid is None and T > 1:
            o, state = chunk_neural_memory(
                q,
                k,
                v,
                theta,
                eta,
                alpha,
                weights,
                gamma=gamma,
                **self.opts,
                chunk_size=self.chunk_size,
                initial_state=state,
                output_final_state=True,
                fast=self.fast,
            )
        else:
            o, state = reference_neural_memory(
                q,
                k,
                v,
                theta,
                eta,
                alpha,
                weights,
                gamma=gamma,
                **self.opts,
                initial_state=state,
                output_final_state=True,
                valid=valid,
                chunk_size=self.chunk_size,
            )
        if conv is not None:
            state = {**state, "conv": conv}
        o = self.o_norm(o.to(x.dtype)).reshape(B, T, -1)
        return self.o_proj(o * F.silu(self.g_proj(x))), state
