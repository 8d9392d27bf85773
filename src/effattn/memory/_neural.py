"""The machinery shared by the learned-memory methods (Titans, Miras, ATLAS): a per-head memory MLP
with hand-written per-token gradients, the attentional-bias losses, the retention read maps, the
Newton-Schulz orthogonalisation and a linear scan; plus the token-by-token reference of the generic
update that :mod:`effattn.memory.titans`, :mod:`~effattn.memory.miras` and :mod:`~effattn.memory.atlas`
state as their rules, and the chunk grid's bookkeeping shared with the chunked forms
(:mod:`effattn.memory._chunked`).

Generic rule (per head; ``W = rho(A)`` the memory read from its accumulator ``A``)::

    g_t = sum_{i = t-c+1}^{t} gamma_i * grad_W loss(W(A_{t-1}); k_i, v_i)      (c = window, 1 for Titans)
    S_t = eta_t S_{t-1} - theta_t g_t                  U_t = S_t
    (muon)  S_t = eta_t S_{t-1} + g_t                  U_t = -theta_t NS5(S_t)
    A_t = (1 - alpha_t) A_{t-1} + U_t                  y_t = M(rho(A_t); q_t)

``residual_norm=True`` makes the memory ``M(x) = x + LN(MLP(x))`` (LayerNorm without affine over the
output; key and value dims equal): the memory of TTT (Sun et al. 2024), Miras (section 5.3) and
titans-pytorch's default, in place of the plain ``M(x) = MLP(x)``.

``max_grad_norm = tau`` (optional) clips each token's own loss gradient before the window sum and the
momentum: ``grad_i <- grad_i * min(1, tau / ||grad_i||)`` with the norm over all of the memory's layers
(as titans-pytorch's ``max_grad_norm``). An update then moves the memory by at most ``theta tau`` per
token, so a memory whose gates make plain gradient descent diverge (a large step size with momentum and
little forgetting) stays finite at any length.

The chunked form takes every gradient of a chunk at the chunk's start weights (mini-batch gradient
descent per chunk), then runs the momentum and decay recurrences as linear scans over the chunk's
tokens (lower-triangular products of the gates, applied as matmuls). Chunk size 1 is the reference;
``reference_neural_memory(chunk_size=c)`` runs the chunked semantics token by token (decoding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from effattn._checks import check_float, check_int, check_positive_int, check_tensor

__all__ = [
    "LOSSES",
    "RETENTIONS",
    "check_memory_inputs",
    "check_residual_norm",
    "clip_scale",
    "decay_matrix",
    "init_state",
    "layer_norm",
    "layer_norm_backward",
    "linear_scan",
    "loss_grad",
    "mlp_apply",
    "mlp_token_factors",
    "mlp_token_grads",
    "newton_schulz",
    "read_weights",
    "reference_neural_memory",
]

LOSSES = ("l2", "huber", "lp")
RETENTIONS = ("linear", "lq", "softmax")


def _f(x: torch.Tensor) -> torch.Tensor:
    """float32, or float64 when given float64 (gradchecks)."""
    return x if x.dtype == torch.float64 else x.float()


def _silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def mlp_apply(
    weights: Sequence[torch.Tensor], x: torch.Tensor, per_token: bool = False, residual_norm: bool = False
) -> torch.Tensor:
    """The memory ``M(x)``: ``h_0 = x``, ``h_l = silu(h_{l-1} W_l)`` for ``l < L``, ``M(x) = h_{L-1} W_L``;
    with ``residual_norm``, ``M(x) = x + LN(h_{L-1} W_L)`` (:func:`layer_norm`).

    ``weights[l]`` is ``[B, H, d_l, d_{l+1}]`` (``[B, H, C, d_l, d_{l+1}]`` with ``per_token``, one memory
    per token); ``x`` is ``[B, H, C, d_0]``.

    Example::

        >>> w = [torch.eye(3).expand(1, 1, 3, 3)]
        >>> mlp_apply(w, torch.ones(1, 1, 2, 3)).tolist()
        [[[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]]]
        >>> y = mlp_apply(w, torch.tensor([[[[1.0, 0.0, -1.0]]]]), residual_norm=True)   # x + LN(x)
        >>> [round(t, 3) for t in y.flatten().tolist()]
        [2.225, 0.0, -2.225]
    """
    h = x
    for i, w in enumerate(weights):
        h = torch.einsum("bhci,bhcij->bhcj", h, w) if per_token else h @ w
        if i < len(weights) - 1:
            h = F.silu(h)
    return x + layer_norm(h) if residual_norm else h


#: the epsilon of the memory's output LayerNorm (``residual_norm``), torch's default
LN_EPS = 1e-5


def layer_norm(z: torch.Tensor) -> torch.Tensor:
    """``(z - mean(z)) / sqrt(var(z) + 1e-5)`` over the last dim (LayerNorm without affine).

    Example::

        >>> [round(t, 4) for t in layer_norm(torch.tensor([1.0, 3.0])).tolist()]
        [-1.0, 1.0]
    """
    return F.layer_norm(z, z.shape[-1:], eps=LN_EPS)


def layer_norm_backward(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The gradient at ``z`` of a loss whose gradient at ``n = layer_norm(z)`` is ``g``:
    ``(g - mean(g) - n mean(g n)) / sqrt(var(z) + eps)`` (written out, so the outer model differentiates
    through it).

    Example::

        >>> z = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
        >>> layer_norm(z).mul(torch.tensor([1.0, 0.0, 0.0])).sum().backward()
        >>> torch.allclose(layer_norm_backward(z.detach(), torch.tensor([1.0, 0.0, 0.0])), z.grad)
        True
    """
    inv = (z.var(-1, unbiased=False, keepdim=True) + LN_EPS).rsqrt()
    n = (z - z.mean(-1, keepdim=True)) * inv
    return inv * (g - g.mean(-1, keepdim=True) - n * (g * n).mean(-1, keepdim=True))


def loss_grad(err: torch.Tensor, loss: str, p: float) -> torch.Tensor:
    """``d loss / d M(k)`` at the error ``e = M(k) - v``: ``l2``: ``||e||^2 -> 2e``; ``huber``
    (``e_i^2`` for ``|e_i| <= p``, ``2p|e_i| - p^2`` beyond) ``-> 2 clamp(e, -p, p)``; ``lp``:
    ``||e||_p^p -> p sign(e) |e|^(p-1)``.

    Example::

        >>> loss_grad(torch.tensor([-3.0, 0.5]), "huber", 1.0).tolist()
        [-2.0, 1.0]
    """
    if loss == "l2":
        return 2 * err
    if loss == "huber":
        return 2 * err.clamp(-p, p)
    return p * torch.sign(err) * err.abs().pow(p - 1)


def mlp_token_factors(
    weights: Sequence[torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    loss: str,
    p: float,
    max_grad_norm: float | None = None,
    residual_norm: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The two factors of every per-token gradient: ``grad_{W_l} loss(M(k_c), v_c) = a_{l,c}^T delta_{l,c}``
    (rank one), with ``a_l [B, H, C, d_l]`` the layer's inputs and ``delta_l [B, H, C, d_{l+1}]`` the loss
    gradient at its output, at the shared weights ``weights`` (``[B, H, d_l, d_{l+1}]``). Backpropagation
    written out, so the outer model differentiates through it. ``max_grad_norm = tau`` scales token
    ``c``'s deltas by ``min(1, tau / ||G_c||)``, ``||G_c||^2 = sum_l ||a_{l,c}||^2 ||delta_{l,c}||^2``
    (the Frobenius norm of the whole per-token gradient; :func:`clip_scale`). ``residual_norm``: the
    memory ``k + LN(MLP(k))`` (:func:`mlp_apply`); the loss gradient enters the MLP through the LayerNorm.

    Example::

        >>> w = [torch.zeros(1, 1, 2, 2)]
        >>> a, d = mlp_token_factors(w, torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[0.0, 1.0]]]]), "l2", 2.0)
        >>> (a[0][0, 0, 0].tolist(), d[0][0, 0, 0].tolist())    # k and 2 (M(k) - v)
        ([1.0, 0.0], [0.0, -2.0])
    """
    hs, zs = [k], []
    h = k
    for i, w in enumerate(weights):
        z = h @ w
        zs.append(z)
        h = F.silu(z) if i < len(weights) - 1 else z
        hs.append(h)
    if residual_norm:
        delta = layer_norm_backward(h, loss_grad(k + layer_norm(h) - v, loss, p))
    else:
        delta = loss_grad(h - v, loss, p)
    deltas: list[torch.Tensor] = [None] * len(weights)  # type: ignore[list-item]
    for i in range(len(weights) - 1, -1, -1):
        deltas[i] = delta
        if i > 0:
            delta = (delta @ weights[i].transpose(-1, -2)) * _silu_grad(zs[i - 1])
    ins = hs[: len(weights)]
    if max_grad_norm is not None:
        scale = clip_scale(ins, deltas, max_grad_norm)[..., None]
        deltas = [d * scale for d in deltas]
    return ins, deltas


def clip_scale(ins: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor], max_grad_norm: float) -> torch.Tensor:
    """``min(1, tau / ||G_c||)`` per token (``[B, H, C]``) for the rank-one per-token gradients
    ``G_{l,c} = a_{l,c}^T delta_{l,c}``: ``||G_c||^2 = sum_l ||a_{l,c}||^2 ||delta_{l,c}||^2`` (the Frobenius
    norm of an outer product is the product of the norms), so no ``[C, d_in, d_out]`` tensor is formed.

    Example::

        >>> a, d = [torch.tensor([[[[3.0, 0.0]]]])], [torch.tensor([[[[0.0, 4.0]]]])]   # ||G|| = 12
        >>> clip_scale(a, d, 6.0).item(), clip_scale(a, d, 20.0).item()
        (0.5, 1.0)
    """
    sq = sum(a.square().sum(-1) * d.square().sum(-1) for a, d in zip(ins, deltas))
    norm = sq.clamp_min(1e-30).sqrt()
    return max_grad_norm / norm.clamp_min(max_grad_norm)


def mlp_token_grads(
    weights: Sequence[torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    loss: str,
    p: float,
    max_grad_norm: float | None = None,
    residual_norm: bool = False,
) -> list[torch.Tensor]:
    """Per-token gradients ``grad_{W_l} loss(M(k_c), v_c)`` at the shared weights ``weights`` (``[B, H,
    d_l, d_{l+1}]``) for ``k [B, H, C, d_0]``, ``v [B, H, C, d_L]``; each ``[B, H, C, d_l, d_{l+1}]``
    (the outer products of :func:`mlp_token_factors`).

    Example::

        >>> w = [torch.zeros(1, 1, 2, 2)]
        >>> g = mlp_token_grads(w, torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[0.0, 1.0]]]]), "l2", 2.0)
        >>> (g[0][0, 0, 0] + 0.0).tolist()                # 2 k (M(k) - v)^T
        [[0.0, -2.0], [0.0, 0.0]]
    """
    ins, deltas = mlp_token_factors(weights, k, v, loss, p, max_grad_norm, residual_norm)
    return [a.unsqueeze(-1) * d.unsqueeze(-2) for a, d in zip(ins, deltas)]


def read_weights(a: torch.Tensor, retention: str, q_exp: float) -> torch.Tensor:
    """The memory read from its accumulator: ``linear``: ``W = A``; ``lq`` (Moneta):
    ``W = A / ||A||_q^(q-2)`` (norm over each weight matrix); ``softmax`` (Memora): ``W = softmax(A)``
    along each row (the memory's rows live on the simplex).

    Example::

        >>> read_weights(torch.zeros(1, 2), "softmax", 2.0).tolist()
        [[0.5, 0.5]]
    """
    if retention == "linear":
        return a
    if retention == "softmax":
        return torch.softmax(a, dim=-1)
    # ||A||_q^(q-2) = s^((q-2)/q), s = sum |A|^q floored at (1e-6)^q before the power: the norm floored at
    # 1e-6 as before, and a finite gradient where A = 0 (a depth-1 memory starts there; s^(1/q)'s gradient at
    # 0 is infinite, which times clamp's zero gave NaN in the initial weights' gradient)
    s = a.abs().pow(q_exp).sum((-1, -2), keepdim=True)
    floor = max(1e-6**q_exp, torch.finfo(s.dtype).tiny)
    return a / s.clamp_min(floor).pow((q_exp - 2) / q_exp)


def newton_schulz(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximate orthogonalisation of the last two dims (the quintic Newton-Schulz iteration of Muon,
    Jordan et al. 2024, coefficients (3.4445, -4.7750, 2.0315)): ``X <- aX + b(XX^T)X + c(XX^T)^2 X``
    after scaling ``X`` to unit Frobenius norm. Odd in ``X``, so ``NS(-X) = -NS(X)``.

    Example::

        >>> y = newton_schulz(torch.diag(torch.tensor([1.0, 0.5])))
        >>> bool((y.diagonal() > 0.6).all() and (y.diagonal() < 1.3).all())
        True
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = x.shape[-2] > x.shape[-1]
    y = x.transpose(-1, -2) if tall else x
    y = y / (y.square().sum((-1, -2), keepdim=True) + 1e-7).sqrt()
    for _ in range(steps):
        gram = y @ y.transpose(-1, -2)
        y = a * y + (b * gram + c * gram @ gram) @ y
    return y.transpose(-1, -2) if tall else y


def decay_matrix(d: torch.Tensor) -> torch.Tensor:
    """The lower-triangular gate products ``L[t, i] = prod_{i<j<=t} d_j`` (``L[t, t] = 1``, 0 above the
    diagonal) of ``d [..., C]``, as ``[..., C, C]``: ``y_t = d_t y_{t-1} + x_t`` is ``y = L x`` (plus the
    initial value's term), built from cumulative products of the gates (no division by a gate).

    Example::

        >>> decay_matrix(torch.full((1, 1, 3), 0.5))[0, 0].tolist()
        [[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.25, 0.5, 1.0]]
    """
    C = d.shape[-1]
    idx = torch.arange(C, device=d.device)
    later = idx[None, :] > idx[:, None]  # [i, j]: j > i
    e = torch.where(later, d[..., None, :], torch.ones_like(d)[..., None, :])  # [..., i, j]
    prods = torch.cumprod(e, dim=-1)  # [..., i, t] = prod_{i<j<=t} d_j  (t >= i)
    return prods.transpose(-1, -2) * (idx[:, None] >= idx[None, :]).to(d.dtype)  # [..., t, i]


def linear_scan(x: torch.Tensor, d: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    """``y_t = d_t y_{t-1} + x_t`` over dim 2 with ``y_{-1} = init``, all ``t`` at once:
    ``y_t = (prod_{j<=t} d_j) init + sum_{i<=t} (prod_{i<j<=t} d_j) x_i`` as one matmul with the
    lower-triangular product matrix (:func:`decay_matrix`). ``x [B, H, C, *P]``, ``d [B, H, C]``,
    ``init [B, H, *P]``.

    Example::

        >>> y = linear_scan(torch.ones(1, 1, 3, 1), torch.full((1, 1, 3), 0.5), torch.zeros(1, 1, 1))
        >>> y.flatten().tolist()
        [1.0, 1.5, 1.75]
    """
    B, H, C = d.shape
    flat = x.reshape(B, H, C, -1)
    y = decay_matrix(d) @ flat + torch.cumprod(d, dim=-1)[..., None] * init.reshape(B, H, 1, -1)
    return y.reshape(x.shape)


def check_memory_inputs(
    q, k, v, theta, eta, alpha, weights, gamma, loss, p, retention, q_exp, window, muon, max_grad_norm=None
) -> tuple[int, int, int]:
    """Shapes, dtypes and options of a neural-memory call; returns ``(B, T, H)``.

    Example::

        >>> x = torch.zeros(1, 2, 1, 3); g = torch.zeros(1, 2, 1)
        >>> check_memory_inputs(x, x, x, g, g, g, [torch.zeros(1, 3, 3)], None, "l2", 2.0, "linear", 2.0, 1, False)
        (1, 2, 1)
    """
    check_tensor("q", q, 4, "[batch, seq, heads, key_dim]")
    check_tensor("k", k, 4, "[batch, seq, heads, key_dim]")
    check_tensor("v", v, 4, "[batch, seq, heads, value_dim]")
    B, T, H, K = q.shape
    if tuple(k.shape) != (B, T, H, K):
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v must be [batch, seq, heads, value_dim] with {(B, T, H)} leading, got {tuple(v.shape)}")
    for name, g in (("theta", theta), ("eta", eta), ("alpha", alpha), ("gamma", gamma)):
        if g is None and name == "gamma":
            continue
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != (B, T, H):
            raise ValueError(
                f"{name} must be a [batch, seq, heads] = {(B, T, H)} tensor, got "
                f"{tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__}"
            )
        if name != "theta" and g.numel() and (g.min() < 0 or g.max() > 1):
            raise ValueError(f"{name} must lie in [0, 1], got values in [{g.min().item()}, {g.max().item()}]")
    if theta.numel() and theta.min() < 0:
        raise ValueError(f"theta (the step size) must be >= 0, got a minimum of {theta.min().item()}")
    dims = [K]
    if not weights:
        raise ValueError("weights must hold at least one [heads, d_in, d_out] matrix")
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor) or w.dim() != 3 or w.shape[0] != H or w.shape[1] != dims[-1]:
            raise ValueError(
                f"weights[{i}] must be [heads={H}, {dims[-1]}, d_out], got "
                f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}"
            )
        dims.append(w.shape[2])
    if dims[-1] != v.shape[-1]:
        raise ValueError(f"the last weight's output dim ({dims[-1]}) must equal v's value_dim ({v.shape[-1]})")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if retention not in RETENTIONS:
        raise ValueError(f"retention must be one of {RETENTIONS}, got {retention!r}")
    check_float("p", p, 1.0 if loss == "lp" else 0.0, float("inf"), lo_open=loss != "lp")
    check_float("q_exp", q_exp, 1.0, float("inf"))
    check_positive_int("window", window)
    if muon not in (True, False):
        raise ValueError(f"muon must be a bool, got {muon!r}")
    if max_grad_norm is not None:
        check_float("max_grad_norm", max_grad_norm, 0.0, float("inf"), lo_open=True)
    return B, T, H


def check_residual_norm(residual_norm, k: torch.Tensor, v: torch.Tensor) -> None:
    """``residual_norm`` must be a bool, and with it the memory ``x + LN(MLP(x))`` needs key dim == value dim.

    Example::

        >>> try:
        ...     check_residual_norm(True, torch.zeros(1, 1, 1, 3), torch.zeros(1, 1, 1, 2))
        ... except ValueError as e:
        ...     print(str(e)[:64])
        residual_norm (M(x) = x + LN(MLP(x))) needs key_dim == value_dim
    """
    if not isinstance(residual_norm, bool):
        raise ValueError(f"residual_norm must be a bool, got {residual_norm!r}")
    if residual_norm and k.shape[-1] != v.shape[-1]:
        raise ValueError(
            f"residual_norm (M(x) = x + LN(MLP(x))) needs key_dim == value_dim, got key_dim {k.shape[-1]} and "
            f"value_dim {v.shape[-1]} (a polynomial feature map widens the keys)"
        )


def init_state(weights, B, window, k, v, initial_state):
    """``(A, S, A0, pos, k, v, gamma)`` to start a call from: the given state or, without one, the initial
    weights with zero momentum, an empty window buffer, ``A0 = A`` and ``pos = 0``. ``A0`` (the
    accumulators at the start of the current chunk) and ``pos [B]`` (tokens into that chunk) place a call
    on the chunk grid of the chunked form; a state without them (chunk size 1) is on the grid.

    Example::

        >>> A, S, A0, pos, kb, vb, gb = init_state([torch.zeros(1, 2, 2)], 3, 1, torch.zeros(3, 1, 1, 2),
        ...                                        torch.zeros(3, 1, 1, 2), None)
        >>> tuple(A[0].shape), pos.tolist(), tuple(kb.shape)
        ((3, 1, 2, 2), [0, 0, 0], (3, 1, 0, 2))
    """
    if initial_state is not None:
        st = initial_state
        A = [_f(a) for a in st["A"]]
        A0 = [_f(a) for a in st["A0"]] if "A0" in st else A
        pos = st["pos"] if "pos" in st else torch.zeros(A[0].shape[0], dtype=torch.long, device=A[0].device)
        return (A, [_f(s) for s in st["S"]], A0, pos, _f(st["k"]), _f(st["v"]), _f(st["gamma"]))
    H, K, V = k.shape[2], k.shape[3], v.shape[3]
    A = [_f(w).unsqueeze(0).expand(B, *w.shape) for w in weights]
    S = [torch.zeros_like(a) for a in A]
    kb = k.new_zeros(B, H, window - 1, K, dtype=A[0].dtype)
    vb = v.new_zeros(B, H, window - 1, V, dtype=A[0].dtype)
    gb = k.new_zeros(B, H, window - 1, dtype=A[0].dtype)
    return A, S, A, torch.zeros(B, dtype=torch.long, device=k.device), kb, vb, gb


def window_grads(W, kw, vw, gw, C, window, loss, p, max_grad_norm=None, residual_norm=False):
    """Per-token window gradients ``sum_j gamma_{t-j} grad loss(W; k_{t-j}, v_{t-j})`` (materialized,
    ``[B, H, C, d_l, d_{l+1}]`` per layer) for the last ``C`` tokens of ``kw [B, H, window-1+C, K]``.

    Example::

        >>> x = torch.ones(1, 1, 2, 1)
        >>> window_grads([torch.zeros(1, 1, 1, 1)], x, x, torch.ones(1, 1, 2), 1, 2, "l2", 2.0)[0].item()
        -4.0
    """
    G = mlp_token_grads(W, kw, vw, loss, p, max_grad_norm, residual_norm)
    out = []
    for g in G:
        g = g * gw[..., None, None]
        acc = g[:, :, window - 1 :]
        for j in range(1, window):
            acc = acc + g[:, :, window - 1 - j : window - 1 - j + C]
        out.append(acc)
    return out


def make_state(A, S, A0, pos, kb, vb, gb, chunk_size: int) -> dict:
    """The state dict a call leaves: ``A``, ``S`` and the window buffer; plus ``A0`` and ``pos`` (the
    chunk grid) when ``chunk_size > 1``.

    Example::

        >>> sorted(make_state([1], [2], [1], 0, 3, 4, 5, chunk_size=16))
        ['A', 'A0', 'S', 'gamma', 'k', 'pos', 'v']
    """
    state = dict(A=A, S=S, k=kb, v=vb, gamma=gb)
    if chunk_size > 1:
        state.update(A0=A0, pos=pos)
    return state


def reference_neural_memory(
    q,
    k,
    v,
    theta,
    eta,
    alpha,
    weights,
    *,
    gamma=None,
    loss="l2",
    p=2.0,
    retention="linear",
    q_exp=2.0,
    window=1,
    muon=False,
    max_grad_norm=None,
    residual_norm=False,
    initial_state=None,
    output_final_state=False,
    valid=None,
    chunk_size=1,
):
    """Token-by-token generic rule (module docstring); returns ``(y [B, T, H, V], state or None)``.
    ``valid [B, T]`` (bool): an invalid token is an identity step (the state is kept as it was).

    ``chunk_size > 1`` runs the chunked form's semantics token by token (each row on its own chunk grid,
    counted in valid tokens): gradients at the weights ``A0`` of the current chunk's start, which move on
    every ``chunk_size`` valid tokens. It equals :func:`effattn.memory.chunk_neural_memory` with the same
    chunk size and is its one-token step (decoding) and padded path.

    Example::

        >>> x = torch.randn(1, 4, 1, 3); g = torch.full((1, 4, 1), 0.5)
        >>> y, st = reference_neural_memory(x, x, x, g, g, g, [torch.zeros(1, 3, 3)], output_final_state=True)
        >>> tuple(y.shape), tuple(st["A"][0].shape)
        ((1, 4, 1, 3), (1, 1, 3, 3))
    """
    B, T, H = check_memory_inputs(
        q, k, v, theta, eta, alpha, weights, gamma, loss, p, retention, q_exp, window, muon, max_grad_norm
    )
    check_residual_norm(residual_norm, k, v)
    check_int("chunk_size", chunk_size, 1)
    A, S, A0, pos, kb, vb, gb = init_state(weights, B, window, k, v, initial_state)
    qf, kf, vf = (_f(t).transpose(1, 2) for t in (q, k, v))  # [B, H, T, *]
    th, et, al = (_f(t).transpose(1, 2) for t in (theta, eta, alpha))
    ga = torch.ones_like(th) if gamma is None else _f(gamma).transpose(1, 2)
    ys = []
    for t in range(T):
        kw = torch.cat([kb, kf[:, :, t : t + 1]], 2)
        vw = torch.cat([vb, vf[:, :, t : t + 1]], 2)
        gw = torch.cat([gb, ga[:, :, t : t + 1]], 2)
        W = [read_weights(a, retention, q_exp) for a in (A if chunk_size == 1 else A0)]
        G = window_grads(W, kw, vw, gw, 1, window, loss, p, max_grad_norm, residual_norm)
        th_t, et_t, al_t = (x[:, :, t, None, None] for x in (th, et, al))
        newA, newS = [], []
        for a, s, g in zip(A, S, G):
            g = g[:, :, 0]
            if muon:
                s = et_t * s + g
                u = -th_t * newton_schulz(s)
            else:
                s = et_t * s - th_t * g
                u = s
            newA.append((1 - al_t) * a + u)
            newS.append(s)
        step = torch.ones(B, dtype=torch.bool, device=pos.device) if valid is None else valid[:, t].to(pos.device)
        if valid is not None:
            keep = valid[:, t].reshape(B, 1, 1, 1)
            newA = [torch.where(keep, n, o) for n, o in zip(newA, A)]
            newS = [torch.where(keep, n, o) for n, o in zip(newS, S)]
            keep3 = keep.reshape(B, 1, 1)
            kw = torch.where(keep, kw[:, :, 1:], kw[:, :, :-1])
            vw = torch.where(keep, vw[:, :, 1:], vw[:, :, :-1])
            gw = torch.where(keep3, gw[:, :, 1:], gw[:, :, :-1])
            kb, vb, gb = kw, vw, gw
        else:
            kb, vb, gb = kw[:, :, 1:], vw[:, :, 1:], gw[:, :, 1:]
        A, S = newA, newS
        if chunk_size > 1:  # a row that completes its chunk starts the next one at its new weights
            pos = torch.where(step, (pos + 1) % chunk_size, pos)
            edge = (step & (pos == 0)).reshape(B, 1, 1, 1)
            A0 = [torch.where(edge, a, a0) for a, a0 in zip(A, A0)]
        else:
            A0 = A
        Wt = [read_weights(a, retention, q_exp) for a in A]
        ys.append(mlp_apply(Wt, qf[:, :, t : t + 1], residual_norm=residual_norm)[:, :, 0])
    y = torch.stack(ys, dim=1) if ys else vf.new_zeros(B, 0, H, v.shape[-1])
    state = make_state(A, S, A0, pos, kb, vb, gb, chunk_size) if output_final_state else None
    return y.to(q.dtype), state
