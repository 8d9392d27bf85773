"""Learned long-term memory: memories that learn at test time or carry state across segments.

- :mod:`~effattn.memory.titans`: Titans neural memory (Behrouz et al. 2025): an MLP memory updated by
  the gradient of ``||M(k) - v||^2`` with step size, momentum and forgetting; token-by-token reference,
  chunked form (a fast factored form where the update is linear in the gradients, ``_chunked``),
  one-token step; :class:`NeuralMemory` the layer (projections + gates + rule), chunked by default.
- :mod:`~effattn.memory.miras`: Moneta, Yaad, Memora (Behrouz et al. 2025, Miras) on the same machinery.
- :mod:`~effattn.memory.atlas`: ATLAS's Omega rule, polynomial features, Muon-style update.
- :mod:`~effattn.memory.infini_attention`: Infini-attention (Munkhdalai et al. 2024).
- :mod:`~effattn.memory.rmt`: Recurrent Memory Transformer tokens (Bulatov et al. 2022).

Example::

    >>> import torch
    >>> from effattn.memory import NeuralMemory
    >>> y, state = NeuralMemory(16, 2)(torch.randn(1, 5, 16))
    >>> tuple(y.shape)
    (1, 5, 16)
"""

from effattn.memory._chunked import chunk_neural_memory, fast_chunk_applies
from effattn.memory._neural import (
    LOSSES,
    RETENTIONS,
    decay_matrix,
    linear_scan,
    mlp_apply,
    mlp_token_factors,
    mlp_token_grads,
    newton_schulz,
    read_weights,
    reference_neural_memory,
)
from effattn.memory.atlas import atlas_memory, polynomial_features
from effattn.memory.infini_attention import infini_attention, infini_attention_reference
from effattn.memory.miras import MIRAS_RULES, memora, miras_memory, moneta, yaad
from effattn.memory.rmt import RecurrentMemoryAttention, set_start_memory
from effattn.memory.titans import (
    NeuralMemory,
    chunk_titans_memory,
    init_memory_weights,
    step_titans_memory,
    titans_memory,
)

__all__ = [
    "LOSSES",
    "MIRAS_RULES",
    "RETENTIONS",
    "NeuralMemory",
    "RecurrentMemoryAttention",
    "atlas_memory",
    "chunk_neural_memory",
    "chunk_titans_memory",
    "decay_matrix",
    "fast_chunk_applies",
    "infini_attention",
    "infini_attention_reference",
    "init_memory_weights",
    "linear_scan",
    "memora",
    "miras_memory",
    "mlp_apply",
    "mlp_token_factors",
    "mlp_token_grads",
    "moneta",
    "newton_schulz",
    "polynomial_features",
    "read_weights",
    "reference_neural_memory",
    "set_start_memory",
    "step_titans_memory",
    "titans_memory",
    "yaad",
]
