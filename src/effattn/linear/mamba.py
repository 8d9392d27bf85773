"""Mamba (S6) selective scan.

Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (2023). Every channel
``(h, p)`` carries an ``N``-dimensional diagonal state space whose step size ``delta_t`` and input /
output maps ``B_t``, ``C_t`` depend on the token::

    dt_t    = softplus(delta_t + delta_bias)          (or delta_t + delta_bias, delta_softplus=False)
    h_t     = exp(dt_t * A) * h_{t-1} + dt_t * x_t * B_t        h_t[p, n]: the state, [P, N] per head
    y_t     = sum_n C_t[n] * h_t[:, n] + D * x_t
    out_t   = y_t * silu(z_t)                                   (when the gate z is given)

(zero-order hold for ``A``, Euler for ``B``, as in the paper's reference implementation).

Layout, kept close to the family's ``[B, T, H, D]``: the ``d_inner`` channels are grouped as ``H``
heads of ``P`` channels (Mamba-1 has ``H * P = d_inner``; any split gives the same result).

- ``x``, ``delta``, ``z``: ``[B, T, H, P]``; ``delta`` is the raw step before bias/softplus;
- ``A``: ``[H, P, N]``, real and ``<= 0`` (``A = -exp(A_log)`` in Mamba);
- ``Bm``, ``Cm``: ``[B, T, G, N]``, input-dependent, ``G`` groups shared by ``H / G`` consecutive
  heads (``G = 1`` is Mamba-1);
- ``D``, ``delta_bias``: ``[H, P]``;
- state: float32 ``[B, H, P, N]``.

Forms: :func:`naive_selective_scan` (token-by-token, the ground truth), :func:`chunk_selective_scan`
(chunked scan for training) and :func:`step_selective_scan` (decoding against a carried state).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from effattn._checks import check_log_gate, check_same_dtype, check_tensor
from effattn.linear._common import LinearOp, check_chunk_size, check_state, register, run_varlen

__all__ = ["naive_selective_scan", "chunk_selective_scan", "step_selective_scan"]

# State size of the registry's example inputs (Mamba-1 uses d_state = 16).
_MAKE_INPUTS_N = 16


def _check_inputs(x, delta, A, Bm, Cm, D, z, delta_bias, delta_softplus) -> tuple[int, ...]:
    """Validate everything; returns ``(B, T, H, P, G, N)``."""
    check_tensor("x", x, 4, "[batch, seq, heads, head_dim]")
    B, T, H, P = x.shape
    check_tensor("delta", delta, 4, "[batch, seq, heads, head_dim]")
    if delta.shape != x.shape:
        raise ValueError(f"delta must have x's shape [B, T, H, P] = {tuple(x.shape)}, got {tuple(delta.shape)}")
    check_tensor("Bm", Bm, 4, "[batch, seq, groups, state_dim]")
    check_tensor("Cm", Cm, 4, "[batch, seq, groups, state_dim]")
    if Bm.shape[:2] != (B, T):
        raise ValueError(f"Bm must be [B, T, G, N] with x's B, T = ({B}, {T}), got {tuple(Bm.shape)}")
    if Cm.shape != Bm.shape:
        raise ValueError(f"Cm must have Bm's shape [B, T, G, N] = {tuple(Bm.shape)}, got {tuple(Cm.shape)}")
    G, N = Bm.shape[2], Bm.shape[3]
    if G == 0 or H % G != 0:
        raise ValueError(f"Bm's groups ({G}) must divide x's heads ({H}): x {tuple(x.shape)}, Bm {tuple(Bm.shape)}")
    check_tensor("A", A, 3, "[heads, head_dim, state_dim]")
    check_log_gate("A", A, (H, P, N), "[heads, head_dim, state_dim]")
    if not torch.isfinite(A).all():
        raise ValueError("A must be finite (and <= 0); got -inf entries")
    if z is not None:
        check_tensor("z", z, 4, "[batch, seq, heads, head_dim]")
        if z.shape != x.shape:
            raise ValueError(f"z must have x's shape [B, T, H, P] = {tuple(x.shape)}, got {tuple(z.shape)}")
    check_same_dtype(x=x, delta=delta, Bm=Bm, Cm=Cm, z=z)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is None:
            continue
        check_tensor(name, t, 2, "[heads, head_dim]")
        if tuple(t.shape) != (H, P):
            raise ValueError(f"{name} must have shape [heads, head_dim] = {(H, P)}, got {tuple(t.shape)}")
    for name, t in (("A", A), ("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not isinstance(delta_softplus, bool):
        raise TypeError(f"delta_softplus must be a bool, got {type(delta_softplus).__name__}")
    return B, T, H, P, G, N


def _discretize(x, delta, Bm, Cm, delta_bias, delta_softplus, H):
    """float32 ``dt [B,T,H,P]``, ``x``, and ``Bm``/``Cm`` expanded from groups to heads ``[B,T,H,N]``."""
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()
    if delta_softplus:
        dt = F.softplus(dt)
    elif (dt < 0).any():
        raise ValueError(f"delta (+ delta_bias) must be >= 0 when delta_softplus=False, got min {dt.min().item():.4g}")
    rep = H // Bm.shape[2]
    Bh = Bm.float().repeat_interleave(rep, dim=2) if rep > 1 else Bm.float()
    Ch = Cm.float().repeat_interleave(rep, dim=2) if rep > 1 else Cm.float()
    return dt, x.float(), Bh, Ch


def _epilogue(y: torch.Tensor, x: torch.Tensor, D, z) -> torch.Tensor:
    """``(y + D x) * silu(z)`` in float32, returned in x's dtype."""
    if D is not None:
        y = y + D.float() * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def _recurrence(dt, xf, Af, Bh, Ch, h):
    """The token-by-token scan (the reference). ``dt, xf [B, T, H, P]``, ``Bh, Ch [B, T, H, N]``,
    ``h`` the float32 state ``[B, H, P, N]`` before the first token; returns ``(y, final h)``."""
    ys = []
    for t in range(dt.shape[1]):
        decay = torch.exp(dt[:, t, :, :, None] * Af)  # [B, H, P, N], in (0, 1]
        h = decay * h + (dt[:, t] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(xf.shape)
    return y, h


def _chunk_scan(dt, xf, Af, Bh, Ch, h, chunk_size: int):
    """Chunked scan with the arguments and result of :func:`_recurrence` (see
    :func:`chunk_selective_scan` for the scheme)."""
    B, T, H, P = xf.shape
    N = Af.shape[-1]
    if T == 0:
        return xf.new_zeros(xf.shape), h
    c = min(chunk_size, T)
    nc = math.ceil(T / c)
    pad = nc * c - T
    if pad:
        # dt = 0 on padding: decay 1 and no input, so the state passes through unchanged.
        dt, xf, Bh, Ch = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (dt, xf, Bh, Ch))
    # Chunk position first ([c, B, nc, ...]) so that the per-position slices are contiguous.
    dt = dt.view(B, nc, c, H, P).permute(2, 0, 1, 3, 4).contiguous()
    dtx = dt * xf.view(B, nc, c, H, P).permute(2, 0, 1, 3, 4)
    Bc = Bh.view(B, nc, c, H, N).permute(2, 0, 1, 3, 4).contiguous()
    Cc = Ch.view(B, nc, c, H, N).permute(2, 0, 1, 3, 4).contiguous()

    # 1. Within every chunk, from a zero state: the per-position decays a_i = exp(dt_i A) and the
    #    chunk's own end state (h <- a_i h + dt_i x_i B_i^T, the rank-1 input added by baddbmm).
    #    Position by position, all chunks at once: [B * nc * H, P, N] tensors.
    X = B * nc * H
    dtx_l = [t.reshape(X, P, 1) for t in dtx.unbind(0)]
    B_l = [t.reshape(X, 1, N) for t in Bc.unbind(0)]
    decays = [torch.exp(dt_i[..., None] * Af).view(X, P, N) for dt_i in dt.unbind(0)]
    local_end = torch.bmm(dtx_l[0], B_l[0])
    for a_i, dtx_i, B_i in zip(decays[1:], dtx_l[1:], B_l[1:], strict=True):
        local_end = torch.baddbmm(a_i * local_end, dtx_i, B_i)
    local_end = local_end.view(B, nc, H, P, N)
    # Total decay of each chunk from the cumulative log-decay L_last = A * sum_i dt_i (<= 0).
    chunk_decay = torch.exp(dt.sum(dim=0)[..., None] * Af)  # [B, nc, H, P, N]

    # 2. States entering each chunk, passed along the chunks (unbind: one backward op, not nc).
    starts = []
    for d_k, e_k in zip(chunk_decay.unbind(1), local_end.unbind(1), strict=True):
        starts.append(h)
        h = d_k * h + e_k

    # 3. Outputs: the recurrence over the c positions again, every chunk from its entering state.
    hc = torch.stack(starts, dim=1).view(X, P, N)
    ys = []
    for a_i, dtx_i, B_i, C_i in zip(decays, dtx_l, B_l, Cc.unbind(0), strict=True):
        hc = torch.baddbmm(a_i * hc, dtx_i, B_i)
        ys.append(torch.bmm(hc, C_i.reshape(X, N, 1)).view(B, nc, H, P))
    y = torch.stack(ys, dim=2).reshape(B, nc * c, H, P)[:, :T]
    return y, h


def _run(
    form,
    core,
    x,
    delta,
    A,
    Bm,
    Cm,
    D,
    z,
    delta_bias,
    delta_softplus,
    initial_state,
    output_final_state,
    cu_seqlens,
    **extra,
):
    """What the three forms share: validation, cu_seqlens packing, discretization, D skip and gate;
    ``core`` is the scan itself (:func:`_recurrence` or :func:`_chunk_scan`)."""
    B, T, H, P, G, N = _check_inputs(x, delta, A, Bm, Cm, D, z, delta_bias, delta_softplus)
    if cu_seqlens is not None:
        return run_varlen(
            form,
            cu_seqlens,
            {"x": x, "delta": delta, "Bm": Bm, "Cm": Cm, "z": z},
            {"A": A, "D": D, "delta_bias": delta_bias, "delta_softplus": delta_softplus, **extra},
            initial_state,
            output_final_state,
        )
    h0 = check_state("initial_state", initial_state, (B, H, P, N))
    dt, xf, Bh, Ch = _discretize(x, delta, Bm, Cm, delta_bias, delta_softplus, H)
    h = h0 if h0 is not None else xf.new_zeros(B, H, P, N)
    y, h = core(dt, xf, A.float(), Bh, Ch, h, **extra)
    return _epilogue(y, x, D, z), (h if output_final_state else None)


def naive_selective_scan(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference Mamba selective scan, token by token in float32 (see the module docstring).

    Returns ``(out [B, T, H, P] in x's dtype, final_state [B, H, P, N] float32 or None)``.

    >>> import torch
    >>> x, delta = torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2, 4)
    >>> A = -torch.rand(2, 4, 3)
    >>> Bm, Cm = torch.randn(1, 5, 1, 3), torch.randn(1, 5, 1, 3)
    >>> out, state = naive_selective_scan(x, delta, A, Bm, Cm, output_final_state=True)
    >>> out.shape, state.shape
    (torch.Size([1, 5, 2, 4]), torch.Size([1, 2, 4, 3]))
    """
    return _run(
        naive_selective_scan,
        _recurrence,
        x,
        delta,
        A,
        Bm,
        Cm,
        D,
        z,
        delta_bias,
        delta_softplus,
        initial_state,
        output_final_state,
        cu_seqlens,
    )


def step_selective_scan(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode one or a few tokens against a carried state ``[B, H, P, N]`` (constant memory).

    Same arguments and result as :func:`naive_selective_scan`; ``initial_state`` is the state
    returned by the previous call (``output_final_state=True``).

    >>> import torch
    >>> x, delta = torch.randn(1, 6, 2, 4), torch.randn(1, 6, 2, 4)
    >>> A, Bm, Cm = -torch.rand(2, 4, 3), torch.randn(1, 6, 1, 3), torch.randn(1, 6, 1, 3)
    >>> full, _ = naive_selective_scan(x, delta, A, Bm, Cm)
    >>> o1, h = step_selective_scan(x[:, :4], delta[:, :4], A, Bm[:, :4], Cm[:, :4], output_final_state=True)
    >>> o2, _ = step_selective_scan(x[:, 4:], delta[:, 4:], A, Bm[:, 4:], Cm[:, 4:], initial_state=h)
    >>> torch.allclose(torch.cat([o1, o2], dim=1), full, atol=1e-6)
    True
    """
    return _run(
        step_selective_scan,
        _recurrence,
        x,
        delta,
        A,
        Bm,
        Cm,
        D,
        z,
        delta_bias,
        delta_softplus,
        initial_state,
        output_final_state,
        cu_seqlens,
    )


def chunk_selective_scan(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked selective scan for training, differentiable through plain autograd.

    The sequence is cut into chunks of ``c = chunk_size`` tokens (the last one padded with
    ``dt = 0``, which leaves the state unchanged). Decays are only ever ``exp`` of non-positive
    numbers (``dt_i A``, and the chunk's cumulative log-decay ``L_last = A sum_i dt_i``), so strong
    decay cannot overflow.

    1. Every chunk's own end state (from zero) ``sum_j exp(L_last - L_j) dt_j x_j B_j^T`` is
       accumulated position by position, all chunks at once, and its total decay is
       ``exp(L_last)``;
    2. the states entering the chunks are passed along the chunks (a Python loop over chunks on
       ``[B, H, P, N]`` tensors);
    3. the outputs ``C_t . h_t`` come from the recurrence run for the ``c`` positions, all chunks at
       once, each chunk starting from its entering state.

    The decay depends on ``(p, n)``, so unlike Mamba-2's SSD it does not factor into matmuls, and a
    quadratic in-chunk form would build ``[c, c, P, N]`` tensors (``c`` times the work of the scan).
    Here work and memory are ``O(T H P N)`` (the per-token states autograd keeps, as any autograd
    scan; nothing ``T x T``), the Python loops run ``2c + T / c`` times, and ``[B, T/c, H, P, N]``
    tensors are the unit of work. Same arguments and result as :func:`naive_selective_scan`,
    plus ``chunk_size``.

    >>> import torch
    >>> x, delta = torch.randn(1, 50, 2, 4), torch.randn(1, 50, 2, 4)
    >>> A, Bm, Cm = -torch.rand(2, 4, 3), torch.randn(1, 50, 1, 3), torch.randn(1, 50, 1, 3)
    >>> o, _ = chunk_selective_scan(x, delta, A, Bm, Cm, chunk_size=16)
    >>> torch.allclose(o, naive_selective_scan(x, delta, A, Bm, Cm)[0], atol=1e-5)
    True
    """
    check_chunk_size(chunk_size)
    return _run(
        chunk_selective_scan,
        _chunk_scan,
        x,
        delta,
        A,
        Bm,
        Cm,
        D,
        z,
        delta_bias,
        delta_softplus,
        initial_state,
        output_final_state,
        cu_seqlens,
        chunk_size=chunk_size,
    )


# ----------------------------------------------------------------------------------------------
# Registry entry: realistic example inputs for generic tests and benchmarks.


def _make_inputs(B, T, H, D, *, device=None, dtype=torch.float32, gate_strength=0.5):
    """``(args, kwargs)`` for the three forms: ``x, delta, A, Bm, Cm`` and ``D, z, delta_bias``.

    Mamba's initialization: ``A = -[1..N]`` per channel (S4D-real) and a per-channel step
    ``softplus(delta_bias)`` log-uniform around ``10 ** (-3 + 3 * gate_strength)``, so
    ``gate_strength`` 0 gives steps ~1e-3 (per-token decay ``>= exp(-0.03)``, weak) and 1 gives
    steps ~1 (decay down to ``exp(-40)`` per token for the fastest state, very strong).
    """
    P, N = D, _MAKE_INPUTS_N
    g = float(gate_strength)
    kw = {"device": device, "dtype": torch.float32}
    x = torch.randn(B, T, H, P, **kw)
    delta = 0.5 * torch.randn(B, T, H, P, **kw)
    A = -torch.arange(1, N + 1, **kw).expand(H, P, N) * (1 + 0.1 * torch.rand(H, P, N, **kw))
    Bm = torch.randn(B, T, 1, N, **kw)
    Cm = torch.randn(B, T, 1, N, **kw)
    Dskip = 1 + 0.1 * torch.randn(H, P, **kw)
    z = torch.randn(B, T, H, P, **kw)
    log10_dt = -3 + 3 * g + (torch.rand(H, P, **kw) - 0.5)  # +- half a decade around the centre
    dt0 = 10**log10_dt
    delta_bias = dt0 + torch.log(-torch.expm1(-dt0))  # inverse softplus
    tensors = [t.to(dtype) for t in (x, delta, A, Bm, Cm, Dskip, z, delta_bias)]
    x, delta, A, Bm, Cm, Dskip, z, delta_bias = tensors
    return (x, delta, A, Bm, Cm), {"D": Dskip, "z": z, "delta_bias": delta_bias}


register(
    LinearOp(
        name="mamba",
        naive=naive_selective_scan,
        chunk=chunk_selective_scan,
        step=step_selective_scan,
        make_inputs=_make_inputs,
        state_shape=lambda B, H, D: (B, H, D, _MAKE_INPUTS_N),
        differentiable_args=("x", "delta", "A", "Bm", "Cm", "D", "z", "delta_bias"),
    )
)
