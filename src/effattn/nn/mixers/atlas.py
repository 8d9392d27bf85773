"""ATLAS as a mixer (Behrouz et al., "ATLAS: Learning to Optimally Memorize the Context at Test Time",
2025): a :class:`effattn.memory.NeuralMemory` with the Omega rule over the last ``window`` tokens
(learned per-token weights ``gamma``), degree-``feature_degree`` polynomial features of keys and
queries, and optionally the Muon-style update (``muon=True``); the rule is written out in
:mod:`effattn.memory.atlas`."""

from __future__ import annotations

from effattn.memory import NeuralMemory
from effattn.nn.mixers._base import MixerBase, check_heads, check_x_and_valid
from effattn.nn.registry import register_mixer

__all__ = ["AtlasMixer"]


@register_mixer("atlas")
class AtlasMixer(MixerBase):
    """ATLAS layer (module docstring); defaults ``window=4``, ``feature_degree=2``, ``depth=2``.

    Example::

        >>> mixer = AtlasMixer(16, 2, muon=True).eval()
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

    def __init__(
        self, dim: int, heads: int, window: int = 4, feature_degree: int = 2, depth: int = 2, muon: bool = False, **kw
    ):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, check_heads(dim, heads)
        self.memory = NeuralMemory(
            dim, heads, depth=depth, window=window, feature_degree=feature_degree, muon=muon, **kw
        )

    def forward(self, x, state=None, valid=None):
        valid = check_x_and_valid(x, self.dim, valid)
        return self.memory(x, state, valid)
