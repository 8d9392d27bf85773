"""Linear attention with a feature map: causal ``phi(q) phi(k)^T`` attention as a recurrence.

With a feature map ``phi: R^K -> R^F`` the causal kernel attention becomes (per head)::

    S_t = S_{t-1} + phi(k_t) v_t^T                  S_t: [F, V]
    z_t = z_{t-1} + phi(k_t)                        z_t: [F]  (only with normalize=True)
    o_t = phi_q(q_t)^T S_t                          normalize=False
    o_t = phi_q(q_t)^T S_t / (phi_q(q_t)^T z_t + eps)   normalize=True, eps = 1e-6

where ``phi_q(q) = scale * phi(q)`` for every map but ``taylor``, for which ``phi_q(q) =
phi(scale * q)`` (the scale is then the temperature of the exponential being approximated);
``scale`` defaults to ``K ** -0.5``. With ``normalize=True`` the output is a weighted average of
the values, as in softmax attention, and the scale cancels except in ``taylor``.

Feature maps (``feature_map=``):

- ``"identity"``: ``phi(x) = x`` (F = K) -- the plain linear kernel;
- ``"elu1"``: ``phi(x) = elu(x) + 1`` (F = K) -- Katharopoulos, Vyas, Pappas, Fleuret,
  "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention", 2020;
- ``"relu"``: ``phi(x) = max(x, 0)`` (F = K);
- ``"taylor"``: ``phi(x) = [1, x, (x (x) x) / sqrt(2)]`` (F = 1 + K + K^2), the second-order Taylor
  expansion of ``exp``: ``phi(s q) . phi(k) = 1 + s q.k + (s q.k)^2 / 2``. Based uses the
  symmetric form ``[1, x / d^(1/4), (x (x) x) / (sqrt(2) sqrt(d))]`` on both q and k, the same
  kernel for ``s = d^(-1/2)``; keeping the scale on the query side leaves the state independent of
  it. -- Arora, Eyuboglu, Zhang, Timalsina, Alberti, Zinsley, Zou, Rudra, Re, "Simple linear
  attention language models balance the recall-throughput tradeoff", 2024 (Based; it uses a small
  feature dimension, e.g. K = 16, since F grows as K^2);
- ``"cosine"``: ``phi(x) = x / ||x||`` (F = K), so ``phi(q) . phi(k)`` is the cosine similarity --
  Mongaras, Dohm, Larson, "Cottention: Linear Transformers With Cosine Attention", 2024.

``normalize=True`` needs a non-negative kernel (``elu1``, ``relu``, ``taylor``): with ``identity``
or ``cosine`` the denominator changes sign and the ratio is meaningless, so it is refused.

State: ``S [B, H, F, V]`` float32 without normalizer; with ``normalize=True`` the tuple
``(S [B, H, F, V], z [B, H, F])`` (the running sum of ``phi(k)``, the normalizer's key sum).
``initial_state`` takes the same form. Use :func:`feature_dim` for ``F``.

The chunkwise form is the no-decay case of the shared kernel of :mod:`effattn.linear._scalar_decay`
applied to the features; the normalizer rides along as an extra value column of ones (so
``z`` is the last column of the extended state ``[S | z]``).

Example::

    >>> import torch
    >>> from effattn.linear import chunk_linear_attn, naive_linear_attn
    >>> q, k, v = (torch.randn(1, 10, 2, 8) for _ in range(3))
    >>> o, (S, z) = chunk_linear_attn(q, k, v, feature_map="elu1", normalize=True,
    ...                               output_final_state=True, chunk_size=4)
    >>> o_ref, _ = naive_linear_attn(q, k, v, feature_map="elu1", normalize=True)
    >>> bool(torch.allclose(o, o_ref, atol=1e-5)), tuple(S.shape), tuple(z.shape)
    (True, (1, 2, 8, 8), (1, 2, 8))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from effattn._checks import check_scale
from effattn.linear._common import LinearOp, check_chunk_size, check_linear_qkv, check_state, register
from effattn.linear._scalar_decay import compute_dtype, num_states, run_scalar_decay

__all__ = ["FEATURE_MAPS", "feature_dim", "naive_linear_attn", "chunk_linear_attn", "step_linear_attn"]

FEATURE_MAPS = ("identity", "elu1", "relu", "taylor", "cosine")
_NON_NEGATIVE = ("elu1", "relu", "taylor")
NORMALIZER_EPS = 1e-6

LinearAttnState = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def feature_dim(feature_map: str, key_dim: int) -> int:
    """The feature dimension ``F`` (the state's key size): ``1 + K + K^2`` for ``taylor``, else ``K``.

    >>> feature_dim("taylor", 16), feature_dim("elu1", 16)
    (273, 16)
    """
    _check_feature_map(feature_map)
    return 1 + key_dim + key_dim * key_dim if feature_map == "taylor" else key_dim


def _check_feature_map(feature_map) -> None:
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")


def _phi(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    if feature_map == "identity":
        return x
    if feature_map == "elu1":
        return F.elu(x) + 1.0
    if feature_map == "relu":
        return F.relu(x)
    if feature_map == "cosine":
        return F.normalize(x, dim=-1)
    # taylor: [1, x, vec(x x^T) / sqrt(2)]
    x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) * (1.0 / math.sqrt(2.0))
    return torch.cat([torch.ones_like(x[..., :1]), x, x2], dim=-1)


def _linear_attn(
    form,
    q,
    k,
    v,
    feature_map,
    normalize,
    scale,
    initial_state,
    output_final_state,
    cu_seqlens,
    chunk_size=64,
    backend="auto",
):
    B, T, H, K, V = check_linear_qkv(q, k, v)
    _check_feature_map(feature_map)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    if normalize and feature_map not in _NON_NEGATIVE:
        raise ValueError(
            f"normalize=True needs a non-negative feature map {_NON_NEGATIVE}; feature_map={feature_map!r} "
            "can make the denominator phi(q).sum(phi(k)) vanish or change sign"
        )
    scale = check_scale(scale, K)
    if form == "chunk":
        check_chunk_size(chunk_size)
    n, Fd = num_states(B, T, cu_seqlens), feature_dim(feature_map, K)
    cdt = compute_dtype(q)

    # the extended state [S | z] (z as the last value column) when normalizing
    s0 = None
    if normalize:
        if initial_state is not None:
            if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
                raise TypeError(
                    f"with normalize=True, initial_state must be the tuple (S {(n, H, Fd, V)}, "
                    f"z {(n, H, Fd)}), got {type(initial_state).__name__}"
                )
            S0, z0 = initial_state
            check_state("initial_state[0]", S0, (n, H, Fd, V))
            check_state("initial_state[1]", z0, (n, H, Fd))
            s0 = torch.cat([S0.to(cdt), z0.to(cdt).unsqueeze(-1)], dim=-1)
    else:
        if initial_state is not None and not isinstance(initial_state, torch.Tensor):
            raise TypeError(
                f"initial_state must be a torch.Tensor of shape {(n, H, Fd, V)} (normalize=False), "
                f"got {type(initial_state).__name__}"
            )
        check_state("initial_state", initial_state, (n, H, Fd, V))
        s0 = initial_state.to(cdt) if initial_state is not None else None

    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    if feature_map == "taylor":
        phi_q, phi_k = _phi(qf * scale, "taylor"), _phi(kf, "taylor")
    else:
        phi_q, phi_k = _phi(qf, feature_map) * scale, _phi(kf, feature_map)
    if normalize:
        vf = torch.cat([vf, torch.ones_like(vf[..., :1])], dim=-1)

    o, s = run_scalar_decay(
        form,
        phi_q,
        phi_k,
        vf,
        None,
        scale=1.0,
        initial_state=s0,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
        backend=backend,
    )
    if normalize:
        o = o[..., :V] / (o[..., V:] + NORMALIZER_EPS)
        if s is not None:
            s = (s[..., :V], s[..., V])
    return o.to(q.dtype), s


def naive_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "identity",
    normalize: bool = False,
    scale: float | None = None,
    initial_state: LinearAttnState | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LinearAttnState | None]:
    """Reference: the recurrence token by token in float32.

    ``q, k [B, T, H, K]``, ``v [B, T, H, V]``; ``feature_map`` one of :data:`FEATURE_MAPS`;
    ``normalize`` divides by ``phi_q(q_t) . z_t`` (see the module docstring); ``scale`` defaults to
    ``K ** -0.5``. The state is ``S [B, H, F, V]``, or ``(S, z [B, H, F])`` with ``normalize=True``
    (``N`` rows instead of ``B`` for ``N`` packed sequences given by ``cu_seqlens``).
    Returns ``(o [B, T, H, V] in q's dtype, final_state or None)``.
    """
    return _linear_attn("naive", q, k, v, feature_map, normalize, scale, initial_state, output_final_state, cu_seqlens)


def chunk_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "identity",
    normalize: bool = False,
    scale: float | None = None,
    initial_state: LinearAttnState | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, LinearAttnState | None]:
    """Chunkwise-parallel form: masked ``phi(q) phi(k)^T`` attention inside chunks of
    ``chunk_size`` tokens, a running ``[F, V]`` state between them. Same arguments and result as
    :func:`naive_linear_attn`; differentiable by autograd, memory linear in T. The feature maps and
    the normaliser are PyTorch around the kernel (its state is ``[F, V]``, ``[F, V + 1]`` normalised).

    ``backend``: ``"torch"`` (this PyTorch chunk form), ``"triton"`` (the Triton chunk kernels, forward and
    backward; CPU tensors only under ``TRITON_INTERPRET=1``) or ``"auto"`` (Triton on CUDA tensors the kernels
    cover, else PyTorch; see :func:`effattn.linear.choose_linear_backend`)."""
    return _linear_attn(
        "chunk",
        q,
        k,
        v,
        feature_map,
        normalize,
        scale,
        initial_state,
        output_final_state,
        cu_seqlens,
        chunk_size,
        backend,
    )


def step_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "identity",
    normalize: bool = False,
    scale: float | None = None,
    initial_state: LinearAttnState | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LinearAttnState | None]:
    """Decoding: the recurrence on a few new tokens against the carried ``initial_state``.
    Same arguments and result as :func:`naive_linear_attn`."""
    return _linear_attn("naive", q, k, v, feature_map, normalize, scale, initial_state, output_final_state, cu_seqlens)


# ----------------------------------------------------------------------------------------------
# registration: the four published variants
# ----------------------------------------------------------------------------------------------

_VARIANTS = {
    # registry name: (feature_map, normalize, key dim as a function of D)
    "linear_attn": ("identity", False, lambda D: D),
    "linear_attn_elu1": ("elu1", True, lambda D: D),  # Katharopoulos et al. 2020
    "based": ("taylor", True, lambda D: min(D, 16)),  # Arora et al. 2024: small feature dim
    "cottention": ("cosine", False, lambda D: D),  # Mongaras et al. 2024
}


def _register_variant(name: str) -> None:
    feature_map, normalize, key_dim = _VARIANTS[name]

    def make_inputs(B, T, H, D, *, device="cpu", dtype=torch.float32, gate_strength=0.5):
        # no gates: gate_strength is unused. Keys are unit-norm for the unnormalised kernels, so
        # that q.k * scale is O(1/sqrt(K)) and outputs stay O(1) over hundreds of tokens.
        K = key_dim(D)
        q = torch.randn(B, T, H, K, device=device)
        k = torch.randn(B, T, H, K, device=device)
        if not normalize:
            k = F.normalize(k, dim=-1)
        v = torch.randn(B, T, H, D, device=device)
        return tuple(x.to(dtype) for x in (q, k, v)), {"feature_map": feature_map, "normalize": normalize}

    def state_shape(B, H, D):
        Fd = feature_dim(feature_map, key_dim(D))
        return ((B, H, Fd, D), (B, H, Fd)) if normalize else (B, H, Fd, D)

    make_inputs.__doc__ = f"Random inputs for feature_map={feature_map!r}, normalize={normalize}."
    register(
        LinearOp(
            name=name,
            naive=naive_linear_attn,
            chunk=chunk_linear_attn,
            step=step_linear_attn,
            make_inputs=make_inputs,
            state_shape=state_shape,
            differentiable_args=("q", "k", "v"),
        )
    )


for _name in _VARIANTS:
    _register_variant(_name)
