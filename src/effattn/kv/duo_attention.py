"""DuoAttention: full cache for retrieval heads, sinks + recent window for streaming heads.

Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and
Streaming Heads" (ICLR 2025). Only a fraction of heads ("retrieval heads") must see the whole
context; the others ("streaming heads") behave the same with the attention sinks and a recent
window. Scoring rule, per kv head ``h`` of layer ``l`` (``R`` = the set of retrieval heads)::

    budget_{l,h} = unbounded                 if (l, h) in R      (the head keeps every token)
                 = k (sinks + recent)        otherwise
    score(j)     = +inf if pos(j) < sinks, else pos(j)          (StreamingLLM inside a head)

so storage is ragged per head and really smaller. Applied after the prefill and at every step.

Finding ``R`` (:func:`calibrate_duo_attention`), on synthetic passkey sequences (filler tokens,
a marked passkey at a random depth, the mark and the passkey again at the end):

- ``method="gates"`` (the paper): a gate ``alpha_{l,h}`` in ``[0, 1]`` mixes each kv head's
  full-attention output with its streaming-attention output,
  ``o = alpha o_full + (1 - alpha) o_stream``; with the model frozen the gates minimise
  ``MSE(logits_mixed, logits_full) / mean(logits_full^2)`` on the answer positions ``+ l1 * mean(alpha)`` (Adam,
  clipped to ``[0, 1]``). The paper distils the last hidden states; here the logits.
- ``method="error"`` (cheaper, no gradients): one forward per head with only that head made
  streaming; its score is the MSE of the answer logits against the full model (relative, as above).

The ``retrieval_fraction`` highest-scoring heads become retrieval heads. The streaming pattern is
a mask mod run by the dense reference backend: calibration is meant for short synthetic sequences.
"""

from __future__ import annotations

import sys

import torch

from effattn.kv.policy import Policy, ScoreContext, _check_float, _check_int, register_policy

__all__ = ["DuoAttentionPolicy", "calibrate_duo_attention", "passkey_batch"]

UNBOUNDED = sys.maxsize


@register_policy("duo_attention")
class DuoAttentionPolicy(Policy):
    """Retrieval heads keep every token; streaming heads keep ``sinks`` + the most recent.

    ``retrieval_heads``: bool ``[num_layers, H_kv]`` (True = retrieval), e.g. from
    :func:`calibrate_duo_attention`; ``None`` makes every head streaming (StreamingLLM). The
    budget (or ratio) is the streaming heads' cache.

    Example::

        >>> import torch
        >>> from effattn.kv import make_policy
        >>> p = make_policy("duo_attention", budget=16, retrieval_heads=torch.tensor([[True, False]]))
        >>> p.budgets(0, 1, 2, 100)[1]
        16
    """

    per_head = True
    evicts_on_decode = True

    def __init__(
        self,
        *,
        budget: int | None = None,
        ratio: float | None = None,
        retrieval_heads: torch.Tensor | None = None,
        sinks: int = 4,
    ):
        super().__init__(budget=budget, ratio=ratio)
        self.sinks = _check_int("sinks", sinks, 0)
        if retrieval_heads is not None:
            retrieval_heads = torch.as_tensor(retrieval_heads)
            if retrieval_heads.dtype != torch.bool or retrieval_heads.dim() != 2:
                raise ValueError(
                    f"retrieval_heads must be a bool tensor [num_layers, heads_kv], got "
                    f"{retrieval_heads.dtype} of shape {tuple(retrieval_heads.shape)}"
                )
            retrieval_heads = retrieval_heads.cpu()
        self.retrieval_heads = retrieval_heads

    def extra_args(self) -> dict:
        n = None if self.retrieval_heads is None else int(self.retrieval_heads.sum())
        return {"sinks": self.sinks, "retrieval_heads": n}

    def budgets(self, layer_idx: int, num_layers: int, num_heads: int, context_len: int) -> list[int]:
        keep = self.keep_count(context_len)
        if self.retrieval_heads is None:
            return [keep] * num_heads
        if tuple(self.retrieval_heads.shape) != (num_layers, num_heads):
            raise ValueError(
                f"retrieval_heads has shape {tuple(self.retrieval_heads.shape)}, the cache has "
                f"[num_layers, heads_kv] = [{num_layers}, {num_heads}]"
            )
        return [UNBOUNDED if r else keep for r in self.retrieval_heads[layer_idx].tolist()]

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.positions.float().masked_fill(ctx.first(self.sinks), float("inf"))


# ---------------------------------------------------------------------------------- calibration


def passkey_batch(
    vocab_size: int, num_samples: int, seq_len: int, passkey_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """Synthetic retrieval sequences ``[num_samples, seq_len]``: random filler, then at a random depth
    a mark token and ``passkey_len`` passkey tokens, and at the end the mark and the passkey again.
    Returns the ids and the number of answer positions at the end (``passkey_len + 1``: the logits
    that must predict the passkey)."""
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


def _streaming_mask(sinks: int, recent: int, group: int, head: int | None):
    """mask_mod making kv head ``head`` (all heads when None) attend to sinks + ``recent`` keys."""

    def mask(b, h, q_idx, kv_idx):
        streaming = (kv_idx < sinks) | (q_idx - kv_idx < recent)
        if head is None:
            return streaming
        return streaming | torch.as_tensor(h // group != head, device=kv_idx.device)

    return mask


def calibrate_duo_attention(
    model,
    *,
    method: str = "error",
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
    ``method``: ``"gates"`` (the paper's gate optimisation) or ``"error"`` (each head's output error
    when made streaming); ``sinks``/``recent``: the streaming pattern used while calibrating.

    Example::

        >>> import torch
        >>> from effattn.nn import LM, LMConfig
        >>> from effattn.kv import calibrate_duo_attention, make_policy
        >>> lm = LM(LMConfig(vocab_size=32, dim=32, n_layers=2, heads=2))
        >>> mask = calibrate_duo_attention(lm, num_samples=2, seq_len=32, recent=4)
        >>> mask.shape, int(mask.sum())
        (torch.Size([2, 2]), 2)
        >>> policy = make_policy("duo_attention", budget=8, retrieval_heads=mask)
    """
    from effattn.nn.lm import LM

    if not isinstance(model, LM):
        raise TypeError(f"model must be an effattn.nn.LM, got {type(model).__name__}")
    if method not in ("gates", "error"):
        raise ValueError(f"method must be 'gates' or 'error', got {method!r}")
    _check_float("retrieval_fraction", retrieval_fraction, 0.0, 1.0)
    for name, val, lo in (
        ("sinks", sinks, 0),
        ("recent", recent, 1),
        ("num_samples", num_samples, 1),
        ("passkey_len", passkey_len, 1),
        ("steps", steps, 1),
    ):
        _check_int(name, val, lo)
    layers = model.policy_layers()
    if not layers:
        raise ValueError("model: no causal attention layer (without window or mods) to calibrate")
    mixers = [model.blocks[i].mixer for i in layers]
    H = mixers[0].kv_heads
    if any(m.kv_heads != H for m in mixers):
        raise ValueError(f"model: attention layers must share one kv_heads, got {[m.kv_heads for m in mixers]}")
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids, tail = passkey_batch(model.config.vocab_size, num_samples, seq_len, passkey_len, gen)
    ids = ids.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(ids)[0][:, -tail:].float()
        if method == "error":
            scores = _error_scores(model, mixers, ids, ref, tail, sinks, recent)
        else:
            scores = _gate_scores(model, mixers, ids, ref, tail, sinks, recent, steps, lr, l1)
    finally:
        model.train(was_training)
    n_ret = int(round(retrieval_fraction * scores.numel()))
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[scores.flatten().argsort(descending=True, stable=True)[:n_ret]] = True
    mask = mask.view_as(scores)
    return (mask, scores) if return_scores else mask


@torch.no_grad()
def _error_scores(model, mixers, ids, ref, tail, sinks, recent) -> torch.Tensor:
    scores = torch.zeros(len(mixers), mixers[0].kv_heads)
    for li, m in enumerate(mixers):
        group = m.heads // m.kv_heads
        for h in range(m.kv_heads):
            m.mask_mod, backend, m.backend = _streaming_mask(sinks, recent, group, h), m.backend, "reference"
            try:
                out = model(ids)[0][:, -tail:].float()
            finally:
                m.mask_mod, m.backend = None, backend
            scores[li, h] = ((out - ref).pow(2).mean() / ref.pow(2).mean().clamp(min=1e-30)).item()
    return scores


def _gate_scores(model, mixers, ids, ref, tail, sinks, recent, steps, lr, l1) -> torch.Tensor:
    gates = torch.ones(len(mixers), mixers[0].kv_heads, device=ids.device, requires_grad=True)

    def gated_forward(m, li):
        group = m.heads // m.kv_heads
        stream = _streaming_mask(sinks, recent, group, None)

        def forward(x, state=None, valid=None):
            o_full, _ = m.attend(x, None, valid)
            m.mask_mod, backend, m.backend = stream, m.backend, "reference"
            try:
                o_stream, _ = m.attend(x, None, valid)
            finally:
                m.mask_mod, m.backend = None, backend
            a = gates[li].repeat_interleave(group).view(1, 1, -1, 1).to(o_full.dtype)
            o = a * o_full + (1 - a) * o_stream
            return m.o_proj(o.flatten(2)), None

        return forward

    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for li, m in enumerate(mixers):
        m.forward = gated_forward(m, li)
    scale = ref.pow(2).mean().clamp(min=1e-30)
    m1, m2 = torch.zeros_like(gates), torch.zeros_like(gates)
    b1, b2 = 0.9, 0.999
    try:
        for step in range(1, steps + 1):
            out = model(ids)[0][:, -tail:].float()
            loss = (out - ref).pow(2).mean() / scale + l1 * gates.mean()
            (g,) = torch.autograd.grad(loss, gates)
            with torch.no_grad():  # Adam, projected onto [0, 1] (written out: torch.optim imports dynamo)
                m1.mul_(b1).add_(g, alpha=1 - b1)
                m2.mul_(b2).addcmul_(g, g, value=1 - b2)
                step_dir = (m1 / (1 - b1**step)) / ((m2 / (1 - b2**step)).sqrt() + 1e-8)
                gates.sub_(lr * step_dir).clamp_(0.0, 1.0)
    finally:
        for m in mixers:
            del m.forward
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return gates.detach().cpu()
