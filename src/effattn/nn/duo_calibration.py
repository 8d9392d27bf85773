"""DuoAttention calibration: find the retrieval heads of an :class:`~effattn.nn.LM`.

Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming
Heads" (ICLR 2025). The policy that uses the result (retrieval heads keep every token, streaming
heads keep sinks + a recent window) is :class:`effattn.kv.DuoAttentionPolicy`; finding the heads
needs the model, so it lives here, beside it.

On synthetic passkey sequences (filler tokens, a marked passkey at a random depth, the mark and the
passkey again at the end), every kv head ``h`` of layer ``l`` gets a gate ``alpha_{l,h}`` in ``[0, 1]``
through the layer's public hook :meth:`effattn.nn.Attention.set_head_gates`, which mixes the head's
full-attention output with its streaming-attention output (sinks + ``recent`` keys)::

    o = alpha o_full + (1 - alpha) o_stream

- ``method="gates"`` (the paper; the default): with the model frozen, the gates (initialised to 1)
  minimise a distillation loss to the full-attention model plus an L1 penalty on the gates::

      L(alpha) = mean_{answer positions} |H_mixed - H_full|^2 / mean |H_full|^2 + l1 * mean(alpha)

  where ``H`` are the final (normed) hidden states of :meth:`effattn.nn.LM.features` (``target=
  "hidden"``, as the paper; ``target="logits"`` distils the logits instead) on the ``passkey_len + 1``
  answer positions at the end of each sequence; Adam, each step projected onto ``[0, 1]``. A head
  whose streaming output equals its full output gets no distillation gradient, so the L1 term drives
  its gate to 0 (streaming); a head the answer needs is held up by the distillation term. Choices the
  paper leaves open or sets for 7B models: the loss is normalised by the mean square of the
  reference (scale-free ``l1``), the L1 term is the mean (not the sum) of the gates, ``l1=0.05`` (the
  paper's lambda), ``steps=50``, ``lr=0.05``, and the data are short synthetic passkey sequences
  (:func:`passkey_batch`) rather than the paper's passkeys embedded in long book text.
- ``method="error"`` (cheaper, no gradients; the default of effattn before): one forward per head
  with only that head's gate at 0 (streaming); its score is the MSE of the answer logits against the
  full model (relative, as above).

The ``retrieval_fraction`` highest-scoring heads become retrieval heads. The streaming branch is a
mask mod (the tiled engine): calibration is meant for short synthetic sequences.
"""

from __future__ import annotations

import torch

from effattn._checks import check_float, check_int
from effattn.nn.attention import Attention

__all__ = ["calibrate_duo_attention", "passkey_batch", "streaming_mask"]


def passkey_batch(
    vocab_size: int, num_samples: int, seq_len: int, passkey_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """Synthetic retrieval sequences ``[num_samples, seq_len]``: random filler, then at a random depth
    a mark token (id 0) and ``passkey_len`` passkey tokens, and at the end the mark and the passkey
    again. Returns the ids and the number of answer positions at the end (``passkey_len + 1``: the
    logits that must predict the passkey).

    >>> ids, tail = passkey_batch(16, 2, 12, 2, torch.Generator().manual_seed(0))
    >>> tuple(ids.shape), tail, ids[:, -3].tolist()
    ((2, 12), 3, [0, 0])
    """
    if seq_len < 2 * (passkey_len + 1) + 2:
        raise ValueError(f"seq_len must be >= {2 * (passkey_len + 1) + 2} for passkey_len={passkey_len}, got {seq_len}")
    ids = torch.randint(1, vocab_size, (num_samples, seq_len), generator=generator)
    mark = 0
    tail = passkey_len + 1
    for n in range(num_samples):
        key = torch.randint(1, vocab_size, (passkey_len,), generator=generator)
        depth = int(torch.randint(0, seq_len - 2 * tail, (1,), generator=generator))
        ids[n, depth] = mark
        ids[n, depth + 1 : depth + tail] = key
        ids[n, -tail] = mark
        ids[n, -tail + 1 :] = key
    return ids, tail


def streaming_mask(sinks: int, recent: int):
    """The streaming heads' mask mod: a query sees the first ``sinks`` keys and the ``recent`` latest
    (itself included): ``kv < sinks or q - kv < recent`` (StreamingLLM's pattern, on top of causal).

    >>> streaming_mask(1, 2)(0, 0, torch.tensor(5), torch.arange(6)).tolist()
    [True, False, False, False, True, True]
    """

    def mask(b, h, q_idx, kv_idx):
        return (kv_idx < sinks) | (q_idx - kv_idx < recent)

    return mask


def calibrate_duo_attention(
    model,
    *,
    method: str = "gates",
    target: str = "hidden",
    retrieval_fraction: float = 0.5,
    sinks: int = 4,
    recent: int = 16,
    num_samples: int = 8,
    seq_len: int = 128,
    passkey_len: int = 4,
    steps: int = 50,
    lr: float = 0.05,
    l1: float = 0.05,
    seed: int = 0,
    return_scores: bool = False,
):
    """Find the retrieval heads of ``model`` (an :class:`effattn.nn.LM`) on synthetic passkey data.

    Returns a bool ``[num_policy_layers, H_kv]`` mask (True = retrieval head; layers as in
    :meth:`effattn.nn.LM.policy_layers`), and the per-head scores with ``return_scores=True``.
    ``method``: ``"gates"`` (default, the paper's gate optimisation; ``target`` ``"hidden"`` or
    ``"logits"`` is what it distils) or ``"error"`` (each head's output error when made streaming);
    ``sinks``/``recent``: the streaming pattern used while calibrating. The
    layers' gates are removed afterwards (also on error).

    Example::

        >>> from effattn.nn import LM, LMConfig, calibrate_duo_attention
        >>> from effattn.kv import make_policy
        >>> lm = LM(LMConfig(vocab_size=32, dim=32, n_layers=2, heads=2))
        >>> mask = calibrate_duo_attention(lm, num_samples=2, seq_len=32, recent=4)
        >>> mask.shape, int(mask.sum())
        (torch.Size([2, 2]), 2)
        >>> policy = make_policy("duo_attention", budget=8, retrieval_heads=mask)
    """
    # duck-typed (LM.calibrate_duo_attention calls this function: no import of effattn.nn.lm here)
    if not callable(getattr(model, "policy_layers", None)) or not hasattr(model, "blocks"):
        raise TypeError(f"model must be an effattn.nn.LM, got {type(model).__name__}")
    if method not in ("gates", "error"):
        raise ValueError(f"method must be 'gates' or 'error', got {method!r}")
    if target not in ("hidden", "logits"):
        raise ValueError(f"target must be 'hidden' or 'logits', got {target!r}")
    check_float("retrieval_fraction", retrieval_fraction, 0.0, 1.0)
    for name, val, lo in (
        ("sinks", sinks, 0),
        ("recent", recent, 1),
        ("num_samples", num_samples, 1),
        ("passkey_len", passkey_len, 1),
        ("steps", steps, 1),
    ):
        check_int(name, val, lo)
    layers = model.policy_layers()
    mixers = [model.blocks[i].mixer for i in layers]
    if not mixers or not all(isinstance(m, Attention) for m in mixers):
        raise ValueError("model: no causal attention layer (without window or mods) to calibrate")
    H = mixers[0].kv_heads
    if any(m.kv_heads != H for m in mixers):
        raise ValueError(f"model: attention layers must share one kv_heads, got {[m.kv_heads for m in mixers]}")
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids, tail = passkey_batch(model.config.vocab_size, num_samples, seq_len, passkey_len, gen)
    ids = ids.to(device)
    stream = streaming_mask(sinks, recent)
    was_training = model.training
    model.eval()
    try:
        if method == "error":
            with torch.no_grad():
                ref = model(ids)[0][:, -tail:].float()
            scores = _error_scores(model, mixers, ids, ref, tail, stream)
        else:
            out_fn = model.features if target == "hidden" else model
            with torch.no_grad():
                ref = out_fn(ids)[0][:, -tail:].float()
            scores = _gate_scores(out_fn, model, mixers, ids, ref, tail, stream, steps, lr, l1)
    finally:
        for m in mixers:
            m.set_head_gates(None)
        model.train(was_training)
    n_ret = int(round(retrieval_fraction * scores.numel()))
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[scores.flatten().argsort(descending=True, stable=True)[:n_ret]] = True
    mask = mask.view_as(scores)
    return (mask, scores) if return_scores else mask


@torch.no_grad()
def _error_scores(model, mixers, ids, ref, tail, stream) -> torch.Tensor:
    scores = torch.zeros(len(mixers), mixers[0].kv_heads)
    for li, m in enumerate(mixers):
        for h in range(m.kv_heads):
            gates = torch.ones(m.kv_heads, device=ids.device)
            gates[h] = 0.0  # only head h streaming
            m.set_head_gates(gates, stream)
            try:
                out = model(ids)[0][:, -tail:].float()
            finally:
                m.set_head_gates(None)
            scores[li, h] = ((out - ref).pow(2).mean() / ref.pow(2).mean().clamp(min=1e-30)).item()
    return scores


def _gate_scores(out_fn, model, mixers, ids, ref, tail, stream, steps, lr, l1) -> torch.Tensor:
    """The paper's gate optimisation; ``out_fn(ids)[0]`` is what is distilled (hidden states or logits)."""
    gates = torch.ones(len(mixers), mixers[0].kv_heads, device=ids.device, requires_grad=True)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for li, m in enumerate(mixers):
        m.set_head_gates(gates[li], stream)
    scale = ref.pow(2).mean().clamp(min=1e-30)
    m1, m2 = torch.zeros_like(gates), torch.zeros_like(gates)
    b1, b2 = 0.9, 0.999
    try:
        for step in range(1, steps + 1):
            out = out_fn(ids)[0][:, -tail:].float()
            loss = (out - ref).pow(2).mean() / scale + l1 * gates.mean()
            (g,) = torch.autograd.grad(loss, gates)
            with torch.no_grad():  # Adam, projected onto [0, 1] (written out: torch.optim imports dynamo)
                m1.mul_(b1).add_(g, alpha=1 - b1)
                m2.mul_(b2).addcmul_(g, g, value=1 - b2)
                step_dir = (m1 / (1 - b1**step)) / ((m2 / (1 - b2**step)).sqrt() + 1e-8)
                gates.sub_(lr * step_dir).clamp_(0.0, 1.0)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return gates.detach().cpu()
