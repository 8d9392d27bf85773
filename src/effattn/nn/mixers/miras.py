"""Miras memories as mixers (Behrouz, Razaviyayn, Zhong, Mirrokni, "It's All Connected: A Journey
Through Test-Time Memorization, Attentional Bias, Retention, and Online Optimization", 2025):
``moneta`` (l_p loss, l_q-normalised retention), ``yaad`` (Huber loss), ``memora`` (softmax / KL
retention), each a :class:`effattn.memory.NeuralMemory` with the rule of :data:`effattn.memory.MIRAS_RULES`
and no momentum (the rules are written out in :mod:`effattn.memory.miras`)."""

from __future__ import annotations

from effattn.memory import MIRAS_RULES, NeuralMemory
from effattn.nn.mixers._base import MixerBase, check_heads, check_x_and_valid
from effattn.nn.registry import register_mixer

__all__ = ["MemoraMixer", "MirasMixer", "MonetaMixer", "YaadMixer"]


class MirasMixer(MixerBase):
    """A Miras rule ``rule`` as a mixer; ``depth`` layers of memory (default 2), other keywords go to
    :class:`~effattn.memory.NeuralMemory` (``p``, ``q_exp``, ``chunk_size``, ...).

    Example::

        >>> mixer = MirasMixer(16, 2, rule="yaad").eval()
        >>> x = torch.randn(1, 6, 16)
        >>> y, st = mixer(x[:, :5])
        >>> torch.allclose(mixer(x[:, 5:], st)[0], mixer(x)[0][:, 5:], atol=1e-5)
        True
    """

    # the LM raises with this under effattn.dist.sequence_parallel (docs/dist.md lists it)
    sequence_parallel_unsupported = (
        "its memory is a small network trained by gradient steps on every token (test-time training: "
        "Titans, Miras, ATLAS); that update is not a linear map of a state, so LASP-2 does not apply, and "
        "a sequential pass of the memory's weights from rank to rank is not implemented"
    )

    def __init__(self, dim: int, heads: int, rule: str = "moneta", depth: int = 2, **kw):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, check_heads(dim, heads)
        if rule not in MIRAS_RULES:
            raise ValueError(f"rule must be one of {sorted(MIRAS_RULES)}, got {rule!r}")
        self.memory = NeuralMemory(dim, heads, depth=depth, momentum=False, **{**MIRAS_RULES[rule], **kw})

    def forward(self, x, state=None, valid=None):
        valid = check_x_and_valid(x, self.dim, valid)
        return self.memory(x, state, valid)


@register_mixer("moneta")
class MonetaMixer(MirasMixer):
    """Moneta: ``loss = ||M(k) - v||_p^p`` (p = 3), ``W = A / ||A||_q^(q-2)`` (q = 4).

    Example::

        >>> MonetaMixer(16, 2).memory.opts["loss"]
        'lp'
    """

    def __init__(self, dim: int, heads: int, **kw):
        super().__init__(dim, heads, rule="moneta", **kw)


@register_mixer("yaad")
class YaadMixer(MirasMixer):
    """Yaad: coordinate-wise Huber loss (threshold ``p = 1``), plain decay retention.

    Example::

        >>> YaadMixer(16, 2).memory.opts["loss"]
        'huber'
    """

    def __init__(self, dim: int, heads: int, **kw):
        super().__init__(dim, heads, rule="yaad", **kw)


@register_mixer("memora")
class MemoraMixer(MirasMixer):
    """Memora: l2 loss, softmax (KL) retention: each memory row a distribution. The memory is Miras's
    ``M(x) = x + LN(MLP(x))`` (``residual_norm=True``, the default here since 2026-12-02): a plain MLP whose
    rows lie on the simplex outputs averages of its inputs and sat below chance on MQAR (docs/memory.md).

    Example::

        >>> m = MemoraMixer(16, 2).memory.opts
        >>> m["retention"], m["residual_norm"]
        ('softmax', True)
    """

    def __init__(self, dim: int, heads: int, residual_norm: bool = True, **kw):
        super().__init__(dim, heads, rule="memora", residual_norm=residual_norm, **kw)
