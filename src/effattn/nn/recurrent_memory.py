"""The Recurrent Memory Transformer as its paper builds it (Bulatov, Kuratov, Burtsev, "Recurrent Memory
Transformer", 2022): ``m`` memory tokens that pass through the whole stack of an :class:`effattn.nn.LM`.

Each segment ``s`` of ``N`` tokens runs through all the blocks as one causal sequence of ``2m + N`` vectors,
the decoder layout of the paper (memory read at the start, written at the end)::

    H_s      = norm(Blocks([Mem_{s-1} | E(x_s) | Mem_{s-1} + P_write]))
    logits_s = head(H_s[m : m + N])                 (the segment's tokens read the memory, causally)
    Mem_s    = H_s[m + N :]                          (the write tokens have seen the whole segment)

with a learned start memory ``Mem_0 [m, dim]`` and write-position embedding ``P_write [m, dim]`` (both drawn at
the token embeddings' scale); the
blocks start empty in every segment (positions count from the segment's read tokens), so the memory is the
only path between segments. Training backpropagates through at most ``bptt_segments`` segments (the memory
is detached after every ``bptt_segments``-th write of a call; None: through all).

:class:`effattn.memory.RecurrentMemoryAttention` (the ``rmt`` mixer) is the per-layer variant: each layer
keeps its own memory vectors as extra keys and values. Here the memory is one set of tokens, rewritten by
the last layer, read by the first.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from effattn._checks import check_positive_int
from effattn.dist import current_sequence_parallel
from effattn.memory import set_start_memory
from effattn.nn.lm import LM, LMConfig, check_ids
from effattn.nn.memory_saving import run_blocks

__all__ = ["RecurrentMemoryLM"]

OPTIONS_FILE = "recurrent_memory.json"


class RecurrentMemoryLM(LM):
    """An :class:`effattn.nn.LM` run segment by segment with ``num_memory`` memory tokens through the whole
    stack (module docstring). ``forward(ids, state=None) -> (logits, state)``; the state is a dict (the
    memory ``mem [B, m, dim]``, the blocks' states of the current segment, its fill ``count``), bounded
    by one segment: decoding token by token (``generate``) equals the full forward. No left padding.

    Example::

        >>> cfg = LMConfig(vocab_size=32, dim=16, n_layers=2, heads=2)
        >>> model = RecurrentMemoryLM(cfg, num_memory=2, segment=4).eval()
        >>> ids = torch.randint(0, 32, (1, 10))
        >>> logits, st = model(ids[:, :9])
        >>> torch.allclose(model(ids[:, 9:], st)[0], model(ids)[0][:, 9:], atol=1e-5)
        True
    """

    def __init__(
        self,
        config: LMConfig,
        num_memory: int = 4,
        segment: int = 16,
        bptt_segments: int | None = None,
        start_memory: str = "learned",
    ):
        super().__init__(config)
        check_positive_int("num_memory", num_memory)
        check_positive_int("segment", segment)
        check_positive_int("bptt_segments", bptt_segments, allow_none=True)
        self.num_memory, self.segment, self.bptt_segments = num_memory, segment, bptt_segments
        # learned: at the token embeddings' scale (LM._init_weights, std 0.02), as the paper's code draws its memory
        # at the embeddings' std; zeros: fixed at zero, so the first segment reads nothing (docs/memory.md, "The
        # RMTs' start memory": a learned one kept attention from learning the state cell, helped on the quick task)
        set_start_memory(self, torch.randn(num_memory, config.dim) * 0.02, start_memory)
        self.write_pos = nn.Parameter(torch.randn(num_memory, config.dim) * 0.02)

    def forward(self, ids: torch.Tensor, state: dict | None = None, valid: torch.Tensor | None = None):
        """``ids [B, T]`` -> ``(logits [B, T, vocab], state)`` (class docstring)."""
        h, state = self.features(ids, state, valid)
        return self.head(h), state

    def features(self, ids: torch.Tensor, state: dict | None = None, valid: torch.Tensor | None = None):
        """The normed hidden states of the tokens ``[B, T, dim]`` and the new state."""
        check_ids(ids, self.config.vocab_size)
        if current_sequence_parallel() is not None:
            raise ValueError("RecurrentMemoryLM cannot run on sequence shards: its segments run one after another")
        if valid is not None and not bool(valid.all()):
            raise ValueError("valid: RecurrentMemoryLM takes no padding (its segments count from each row's start)")
        B, T = ids.shape
        m, N = self.num_memory, self.segment
        st = self._check_state(state, B)
        mem, blocks_state, count = st["mem"], st["blocks"], st["count"]
        outs, t, writes = [], 0, 0
        while t < T:
            n = min(N - count, T - t)
            parts = [self.embed(ids[:, t : t + n])]
            if blocks_state is None:  # a new segment: its read tokens first
                parts.insert(0, mem.to(parts[0].dtype))
            done = count + n == N
            if done:
                parts.append((mem + self.write_pos).to(parts[0].dtype))
            start = m if blocks_state is None else 0
            h, blocks_state = run_blocks(
                self.blocks, torch.cat(parts, 1), blocks_state or [None] * len(self.blocks), None, self.config
            )
            h = self.norm(h)
            outs.append(h[:, start : start + n])
            if done:
                mem, blocks_state, count = h[:, -m:], None, 0
                writes += 1
                if self.training and self.bptt_segments is not None and writes % self.bptt_segments == 0:
                    mem = mem.detach()
            else:
                count += n
            t += n
        h = torch.cat(outs, 1) if outs else self.embed(ids)
        return h, dict(mem=mem, blocks=blocks_state, count=count)

    def _check_state(self, state, batch: int) -> dict:
        if state is None:
            return dict(mem=self.memory_init.expand(batch, -1, -1), blocks=None, count=0)
        if not isinstance(state, dict) or set(state) != {"mem", "blocks", "count"}:
            raise ValueError(
                "state must be None or the dict a RecurrentMemoryLM call returned (mem, blocks, count); "
                f"got {type(state).__name__} (KV-cache policies and cache kinds do not apply here)"
            )
        if tuple(state["mem"].shape) != (batch, self.num_memory, self.config.dim):
            raise ValueError(
                f"state['mem'] must be [batch={batch}, num_memory={self.num_memory}, dim={self.config.dim}], "
                f"got {tuple(state['mem'].shape)}"
            )
        return state

    def save(self, path: str | os.PathLike) -> None:
        """:meth:`LM.save` plus ``path/recurrent_memory.json`` (``num_memory``, ``segment``, ``bptt_segments``,
        ``start_memory``)."""
        super().save(path)
        with open(os.path.join(path, OPTIONS_FILE), "w") as f:
            opts = dict(num_memory=self.num_memory, segment=self.segment, bptt_segments=self.bptt_segments)
            json.dump(dict(opts, start_memory=self.start_memory), f)

    @classmethod
    def build_for_load(cls, config: LMConfig, path: str | os.PathLike) -> RecurrentMemoryLM:
        file = os.path.join(path, OPTIONS_FILE)
        if not os.path.exists(file):
            raise ValueError(f"{path} holds no {OPTIONS_FILE}: not saved by a RecurrentMemoryLM (LM.load reads it)")
        with open(file) as f:
            return cls(config, **json.load(f))

    def state_size(self, seq_len: int, batch: int = 1) -> int:
        """Bytes of the state: the memory plus the blocks' states over at most one segment with its read tokens."""
        held = self.num_memory + min(seq_len, self.segment - 1)
        mem = batch * self.num_memory * self.config.dim * self.memory_init.element_size()
        return mem + sum(b.mixer.state_size(batch, held) for b in self.blocks)
