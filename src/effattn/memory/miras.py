"""Miras memories (Behrouz, Razaviyayn, Zhong, Mirrokni, "It's All Connected: A Journey Through
Test-Time Memorization, Attentional Bias, Retention, and Online Optimization", 2025): the Titans
machinery (:mod:`effattn.memory.titans`) with other attentional-bias losses and retention gates.
With ``e = M(k_t) - v_t`` and ``g_t = grad_W loss_t(W_{t-1})``:

- **Moneta** (l_p attentional bias, l_q retention)::

      loss_t = ||e||_p^p                     (grad wrt M(k): p sign(e) |e|^(p-1))
      A_t = (1 - alpha_t) A_{t-1} - theta_t g_t
      W_t = A_t / ||A_t||_q^(q-2)            (the normalised retention; q = 2 is plain decay)

- **Yaad** (Huber attentional bias, coordinate-wise, threshold ``delta``)::

      loss_t = sum_i h(e_i),  h(e) = e^2 if |e| <= delta else 2 delta |e| - delta^2
      A_t = (1 - alpha_t) A_{t-1} - theta_t g_t,  W_t = A_t   (grad wrt M(k): 2 clamp(e, -delta, delta))

- **Memora** (l2 attentional bias, KL / softmax retention: each row of W on the simplex)::

      W_t = softmax((1 - alpha_t) log W_{t-1} - theta_t g_t)   (row-wise)

  kept as logits ``A_t = (1 - alpha_t) A_{t-1} - theta_t g_t`` (the row constants of ``log W`` cancel
  in the softmax), so the chunked form is the same linear scan.

The rules take no momentum (the paper's choice; ``eta`` is zero); for deeper memories ``W`` is every
layer's weight matrix. Each has the token-by-token reference (``chunk_size=1`` or
``mode="reference"``) and the chunked form (gradients at the chunk-start memory).
"""

from __future__ import annotations

import torch

from effattn.memory._chunked import chunk_neural_memory
from effattn.memory._neural import reference_neural_memory

__all__ = ["MIRAS_RULES", "memora", "miras_memory", "moneta", "yaad"]

#: name -> options of the generic rule
MIRAS_RULES = {
    "moneta": dict(loss="lp", p=3.0, retention="lq", q_exp=4.0),
    "yaad": dict(loss="huber", p=1.0, retention="linear"),
    "memora": dict(loss="l2", p=2.0, retention="softmax"),
}


def miras_memory(
    rule: str,
    q,
    k,
    v,
    theta,
    alpha,
    weights,
    *,
    chunk_size: int | None = None,
    initial_state=None,
    output_final_state=False,
    valid=None,
    **overrides,
):
    """Run Miras rule ``rule`` (``moneta``, ``yaad``, ``memora``); ``chunk_size=None`` is the
    token-by-token reference, an int the chunked form. ``overrides`` change ``p`` (Moneta's p, Yaad's
    delta), ``q_exp`` (Moneta's q) or set ``max_grad_norm`` (per-token gradient clipping). Shapes as
    :func:`effattn.memory.titans_memory` (no ``eta``).

    Example::

        >>> q = k = torch.randn(1, 4, 1, 3); v = torch.randn(1, 4, 1, 3); g = torch.full((1, 4, 1), 0.3)
        >>> y, _ = miras_memory("yaad", q, k, v, g, g, [torch.zeros(1, 3, 3)])
        >>> tuple(y.shape)
        (1, 4, 1, 3)
    """
    if rule not in MIRAS_RULES:
        raise ValueError(f"rule must be one of {sorted(MIRAS_RULES)}, got {rule!r}")
    opts = {**MIRAS_RULES[rule], **overrides}
    eta = torch.zeros_like(theta)
    if chunk_size is None:
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
            **opts,
        )
    if valid is not None:
        raise ValueError("valid is supported by the reference form only (chunk_size=None)")
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
        **opts,
    )


def moneta(q, k, v, theta, alpha, weights, **kw):
    """Moneta: :func:`miras_memory` with ``rule="moneta"`` (p = 3, q = 4 unless overridden).

    Example::

        >>> x = torch.randn(1, 3, 1, 2); g = torch.full((1, 3, 1), 0.5)
        >>> moneta(x, x, x, g, g, [torch.zeros(1, 2, 2)])[0].shape[1]
        3
    """
    return miras_memory("moneta", q, k, v, theta, alpha, weights, **kw)


def yaad(q, k, v, theta, alpha, weights, **kw):
    """Yaad: :func:`miras_memory` with ``rule="yaad"`` (Huber threshold ``p = 1``).

    Example::

        >>> x = torch.randn(1, 3, 1, 2); g = torch.full((1, 3, 1), 0.5)
        >>> yaad(x, x, x, g, g, [torch.zeros(1, 2, 2)])[0].shape[1]
        3
    """
    return miras_memory("yaad", q, k, v, theta, alpha, weights, **kw)


def memora(q, k, v, theta, alpha, weights, **kw):
    """Memora: :func:`miras_memory` with ``rule="memora"`` (softmax rows).

    Example::

        >>> x = torch.randn(1, 3, 1, 2); g = torch.full((1, 3, 1), 0.5)
        >>> memora(x, x, x, g, g, [torch.zeros(1, 2, 2)])[0].shape[1]
        3
    """
    return miras_memory("memora", q, k, v, theta, alpha, weights, **kw)
