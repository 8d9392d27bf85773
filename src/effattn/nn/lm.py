"""A small decoder-only language model over any mix of registered sequence mixers.

Each block is pre-norm (as in LLaMA / nanoGPT-style models)::

    h = h + mixer_l(RMSNorm(h))              mixer_l: any name of effattn.nn.list_mixers()
    h = h + W_down(silu(W_gate x) * W_up x),  x = RMSNorm(h)     (SwiGLU MLP; Shazeer, "GLU Variants
                                                                  Improve Transformer", 2020)

followed by a final RMSNorm and the vocabulary head (optionally tied to the embedding). A hybrid
model is a list of mixer names, one per layer (``"gated_deltanet,gated_deltanet,attention"``).
``forward(ids, state=None, valid=None) -> (logits, state)`` carries one mixer state per layer, so
prefill + token-by-token decoding equals one full forward; :meth:`LM.generate` samples with batch
and left padding.

Example::

    >>> import torch
    >>> from effattn.nn import LM, LMConfig
    >>> model = LM(LMConfig(vocab_size=50, dim=32, n_layers=2, heads=2, mixers="mamba2,attention"))
    >>> logits, state = model(torch.randint(0, 50, (1, 8)))
    >>> tuple(logits.shape), len(state)
    ((1, 8, 50), 2)
    >>> out = model.generate(torch.randint(0, 50, (1, 4)), max_new_tokens=3, temperature=0.0)
    >>> tuple(out.shape)
    (1, 7)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from effattn._checks import check_int, check_positive_int
from effattn.dist import current_sequence_parallel
from effattn.kv import AttentionPattern, CompressedKVCache, Policy, make_cache
from effattn.moe import MoE
from effattn.nn.duo_calibration import calibrate_duo_attention
from effattn.nn.memory_saving import check_memory_options, run_blocks
from effattn.nn.registry import build_mixer, list_mixers
from effattn.nn.streambp import check_streambp

__all__ = ["LMConfig", "LM", "check_ids", "mixer_pattern"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def mixer_pattern(pattern: str | list[str], n_layers: int) -> list[str]:
    """Repeat ``pattern`` (names, or a comma string) to ``n_layers`` layers:
    ``mixer_pattern("mamba2,mamba2,attention", 6)`` gives two copies of the three-layer pattern."""
    names = [s.strip() for s in pattern.split(",")] if isinstance(pattern, str) else list(pattern)
    if not names or not all(names):
        raise ValueError(f"pattern must name at least one mixer, got {pattern!r}")
    return [names[i % len(names)] for i in range(n_layers)]


@dataclass
class LMConfig:
    """Configuration of :class:`LM`.

    ``mixers``: one name per layer (a list, or a comma string); a single name is used for every
    layer, and a shorter list is repeated (:func:`mixer_pattern`). ``mixer_kwargs``: extra keyword
    arguments per mixer name (``{"attention": {"kv_heads": 1}}``); ``kv_heads`` is passed to the
    attention-family mixers. ``mlp_ratio``: SwiGLU hidden size is ``2/3 * mlp_ratio * dim``
    rounded up to a multiple of 8. ``max_seq_len`` records the context the model is meant for (the
    benchmark sizes it; nothing truncates at it). ``ffn``: ``"dense"`` (SwiGLU) or ``"moe"`` per layer, a
    pattern like ``mixers`` (``"dense,moe"`` alternates); ``moe``: keyword arguments of
    :class:`effattn.moe.MoE` for the MoE layers (``num_experts`` and ``top_k`` required; ``hidden``
    defaults to the SwiGLU hidden size / ``top_k``, equal active parameters). Their auxiliary losses
    of the last forward are :meth:`LM.aux_loss`.
    """

    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 4
    heads: int = 4
    kv_heads: int | None = None
    mixers: str | list[str] = "attention"
    mlp_ratio: float = 4.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    mixer_kwargs: dict[str, dict] = field(default_factory=dict)
    ffn: str | list[str] = "dense"
    moe: dict | None = None
    # training memory (effattn.nn.memory_saving, docs/train.md): recomputation, reversible stream,
    # MLP in sequence chunks of this many tokens (0: off), loss chunk for effattn.train (0: off), int8
    checkpoint: str = "none"
    reversible: bool = False
    chunked_mlp: int = 0
    chunked_loss: int = 0
    mesa: bool = False
    # StreamBP (effattn.nn.streambp): exact backward in sequence chunks of this many tokens (0: off)
    streambp: int = 0

    def __post_init__(self) -> None:
        check_memory_options(
            self.checkpoint, self.reversible, self.chunked_mlp, self.chunked_loss, self.mesa, self.streambp
        )
        for name in ("vocab_size", "dim", "n_layers", "heads", "max_seq_len"):
            check_positive_int(name, getattr(self, name))
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.kv_heads is not None and (self.kv_heads <= 0 or self.heads % self.kv_heads):
            raise ValueError(f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        self.mixers = mixer_pattern(self.mixers, self.n_layers)
        known = list_mixers()
        for name in self.mixers:
            if name not in known:
                raise ValueError(f"unknown mixer {name!r} in mixers; registered mixers: {known}")
        self.ffn = mixer_pattern(self.ffn, self.n_layers)
        if any(f not in FFN_KINDS for f in self.ffn):
            raise ValueError(f"ffn must name {FFN_KINDS} per layer, got {self.ffn}")
        if "moe" in self.ffn and not (isinstance(self.moe, dict) and {"num_experts", "top_k"} <= set(self.moe)):
            raise ValueError(
                f"ffn='moe' needs moe=dict(num_experts=..., top_k=..., ...) (effattn.moe.MoE), got {self.moe!r}"
            )
        check_streambp(self.streambp, self.mixers, self.ffn)
        if not isinstance(self.mixer_kwargs, dict):
            raise TypeError(f"mixer_kwargs must be a dict name -> kwargs, got {type(self.mixer_kwargs).__name__}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FFN_KINDS = ("dense", "moe")
_KV_HEAD_MIXERS = ("attention", "sliding_window")


class SwiGLU(nn.Module):
    """``W_down(silu(W_gate x) * W_up x)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm block: ``h + mixer(norm(h))`` then ``h + mlp(norm(h))``."""

    def __init__(self, config: LMConfig, mixer: str, ffn: str = "dense"):
        super().__init__()
        kw = dict(config.mixer_kwargs.get(mixer, {}))
        if config.kv_heads is not None and mixer in _KV_HEAD_MIXERS:
            kw.setdefault("kv_heads", config.kv_heads)
        self.mixer_name = mixer
        self.mixer_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.mixer = build_mixer(mixer, dim=config.dim, heads=config.heads, **kw)
        self.mlp_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        hidden = 8 * math.ceil(2 * config.mlp_ratio * config.dim / 3 / 8)
        if ffn == "moe":  # expert hidden defaults to hidden / top_k: the dense layer's active parameters
            moe_kw = dict(config.moe)
            moe_kw.setdefault("hidden", max(1, hidden // moe_kw["top_k"]))
            self.mlp = MoE(config.dim, **moe_kw)
        else:
            self.mlp = SwiGLU(config.dim, hidden)

    def forward(self, h, state=None, valid=None):
        y, state = self.mixer(self.mixer_norm(h), state, valid)
        h = h + y
        x = self.mlp_norm(h)
        return h + (self.mlp(x, valid) if isinstance(self.mlp, MoE) else self.mlp(x)), state


def check_ids(ids, vocab_size: int, name: str = "ids") -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids [batch, seq], got {type(ids).__name__}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must be [batch, seq], got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(
            f"{name} must lie in [0, {vocab_size}), got values in [{ids.min().item()}, {ids.max().item()}]"
        )


class LM(nn.Module):
    """Decoder-only LM: embedding, ``n_layers`` pre-norm blocks (mixer + SwiGLU), RMSNorm, head."""

    def __init__(self, config: LMConfig):
        super().__init__()
        if not isinstance(config, LMConfig):
            raise TypeError(f"config must be an LMConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config, name, ffn) for name, ffn in zip(config.mixers, config.ffn))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # weights only: mixers initialise their own biases and special parameters (dt biases, A_log)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, MoE):
            module.reset_parameters(std=0.02)

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' auxiliary losses (``MoE.last_aux.loss``) of the last forward; add it to the
        training loss (0 without MoE layers)."""
        losses = [b.mlp.last_aux.loss for b in self.blocks if isinstance(b.mlp, MoE) and b.mlp.last_aux is not None]
        return torch.stack(losses).sum() if losses else self.head.weight.new_zeros(())

    def num_parameters(self) -> int:
        """Number of parameters (a tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, ids: torch.Tensor, state: list | None = None, valid: torch.Tensor | None = None):
        """``ids [B, T]`` -> ``(logits [B, T, vocab], state)``; ``state`` is a list, one mixer state per
        layer (None for a fresh sequence). ``valid [B, T]`` bool marks left padding (False)."""
        check_ids(ids, self.config.vocab_size)
        if state is not None and (not isinstance(state, (list, tuple)) or len(state) != len(self.blocks)):
            raise ValueError(f"state must be a list of {len(self.blocks)} per-layer states (or None)")
        if valid is not None and (not isinstance(valid, torch.Tensor) or tuple(valid.shape) != tuple(ids.shape)):
            raise ValueError(f"valid must be a bool tensor of ids' shape {tuple(ids.shape)}")
        h, new_states = self.features(ids, state, valid)
        return self.head(h), new_states

    def features(self, ids: torch.Tensor, state: list | None = None, valid: torch.Tensor | None = None):
        """The final normed hidden states ``[B, T, dim]`` (the head's input) and the new state: what
        a chunked loss (:func:`effattn.train.chunked_cross_entropy`) takes instead of logits."""
        if current_sequence_parallel() is not None:  # every layer must run on sequence shards
            bad = [b for b in self.blocks if not getattr(b.mixer, "supports_sequence_parallel", False)]
            if bad:
                why = "; ".join(
                    f"{b.mixer_name!r}: "
                    + (getattr(b.mixer, "sequence_parallel_unsupported", None) or "no sequence-parallel path declared")
                    for b in bad
                )
                raise ValueError(
                    f"mixers {[b.mixer_name for b in bad]} cannot run on sequence shards "
                    f"(effattn.dist.sequence_parallel): {why}"
                )
            if self.config.reversible and torch.is_grad_enabled():
                raise ValueError(
                    "reversible=True is not supported under sequence parallelism (its backward rebuilds the "
                    "blocks outside the sequence-parallel context); use checkpoint='block' or 'mixer'"
                )
            if self.config.streambp and torch.is_grad_enabled():
                raise ValueError(
                    f"streambp={self.config.streambp} is not supported under sequence parallelism (its chunked "
                    "backward computes attention itself, over this rank's shard only); use checkpoint='block'"
                )
        h = self.embed(ids)
        states = state if state is not None else [None] * len(self.blocks)
        h, new_states = run_blocks(self.blocks, h, states, valid, self.config)
        return self.norm(h), new_states

    def state_size(self, seq_len: int, batch: int = 1) -> int:
        """Bytes of decoding state (KV caches, recurrent and conv states) at context ``seq_len``."""
        return sum(b.mixer.state_size(batch, seq_len) for b in self.blocks)

    @torch.no_grad()
    def generate(
        self,
        ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos: int | None = None,
        valid: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        kv_policy=None,
        kv_cache=None,
    ) -> torch.Tensor:
        """Prefill ``ids [B, T]`` (left-padded where ``valid`` is False), then sample up to
        ``max_new_tokens`` tokens one at a time against the carried state.

        ``temperature == 0`` is greedy; otherwise softmax(logits / temperature) restricted to the
        ``top_k`` largest and/or the smallest set with cumulative probability ``>= top_p``. A row that
        has produced ``eos`` keeps producing ``eos``; generation stops early once every row has.
        Returns ``[B, T + n]`` (prompt followed by the new tokens).

        ``kv_policy``: an :class:`effattn.kv.Policy` (e.g. ``make_policy("snapkv", ratio=0.5)``);
        the attention layers then share one :class:`effattn.kv.CompressedKVCache` that keeps what
        the policy selects (:meth:`compressed_state`). Left padding is not supported with a policy.

        ``kv_cache``: the cache of every layer that holds one and accepts it (:meth:`cache_state`):
        ``None`` (the contiguous :class:`effattn.kv.KVCache`), a name (``"contiguous"``,
        ``"quantized"``: KIVI's :class:`effattn.kv.QuantizedKVCache` with its defaults) or a callable
        returning a fresh :class:`effattn.kv.LayerCache` (``functools.partial(QuantizedKVCache,
        bits=4)``). Not together with ``kv_policy``.
        """
        check_ids(ids, self.config.vocab_size)
        check_int("max_new_tokens", max_new_tokens, minimum=0)
        if temperature < 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if ids.shape[1] == 0:
            raise ValueError("ids must hold at least one prompt token per row")
        if valid is not None:
            if valid.dtype != torch.bool or tuple(valid.shape) != tuple(ids.shape):
                raise ValueError(f"valid must be a bool tensor of ids' shape {tuple(ids.shape)}")
            if not bool(valid[:, -1].all()):
                raise ValueError("valid must mark left padding only: the last prompt position of every row is real")
        out = ids
        if max_new_tokens == 0:
            return out
        if kv_policy is not None and kv_cache is not None:
            raise ValueError("pass kv_policy or kv_cache, not both (a policy brings its own cache)")
        state = None
        if kv_policy is not None:
            state = self.compressed_state(kv_policy)
        elif kv_cache is not None:
            state = self.cache_state(kv_cache)
        logits, state = self(ids, state, valid=valid)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for i in range(max_new_tokens):
            nxt = self._sample(logits[:, -1].float(), temperature, top_k, top_p, generator)
            if eos is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                done = done | (nxt == eos)
            out = torch.cat([out, nxt[:, None].to(out.dtype)], dim=1)
            if (eos is not None and bool(done.all())) or i == max_new_tokens - 1:
                break
            logits, state = self(nxt[:, None].to(ids.dtype), state)
        return out

    def cache_layers(self) -> list[int]:
        """Indices of the blocks whose mixer holds a KV cache (in depth order): the mixers that declare
        a ``cache_pattern`` (an :class:`effattn.kv.AttentionPattern`: Attention, MoH, MLA, ...)."""
        return [
            i
            for i, b in enumerate(self.blocks)
            if isinstance(getattr(b.mixer, "cache_pattern", None), AttentionPattern)
        ]

    def cache_state(self, kv_cache="contiguous") -> list:
        """A fresh decoding ``state`` in which every layer holding a KV cache (:meth:`cache_layers`)
        starts with its own cache built by :func:`effattn.kv.make_cache` from ``kv_cache``, where that
        cache accepts the layer's pattern (:meth:`effattn.kv.LayerCache.check_pattern`: MLA's
        key-only latent cache takes a contiguous cache, not a quantized one); other layers start empty."""
        state: list = [None] * len(self.blocks)
        for i in self.cache_layers():
            cache = make_cache(kv_cache)
            try:
                cache.check_pattern(self.blocks[i].mixer.cache_pattern)
            except (TypeError, ValueError):
                continue
            state[i] = cache
        return state

    def policy_layers(self) -> list[int]:
        """Indices of the blocks whose KV cache a policy can compress (in depth order): the cache
        layers whose pattern a policy cache accepts (:meth:`effattn.kv.CompressedKVCache.accepts`:
        causal attention over keys and values, without window or mods)."""
        return [i for i in self.cache_layers() if CompressedKVCache.accepts(self.blocks[i].mixer.cache_pattern)]

    def compressed_state(self, kv_policy, scale: float | None = None) -> list:
        """A fresh decoding ``state`` whose causal attention layers (no window or mods) share one
        :class:`effattn.kv.CompressedKVCache` under ``kv_policy`` (layers numbered in depth order);
        other layers start empty as usual. The cache is ``state[i].cache`` for those layers."""
        if not isinstance(kv_policy, Policy):
            raise TypeError(
                f"kv_policy must be an effattn.kv.Policy (make_policy(...)), got {type(kv_policy).__name__}"
            )
        idx = self.policy_layers()
        if not idx:
            raise ValueError("kv_policy: the model has no causal attention layer (without window or mods) to compress")
        cache = CompressedKVCache(kv_policy, num_layers=len(idx), scale=scale)
        state: list = [None] * len(self.blocks)
        for n, i in enumerate(idx):
            state[i] = cache.layer(n)
        return state

    def calibrate_duo_attention(self, **kwargs):
        """DuoAttention's retrieval heads of this model: :func:`effattn.nn.calibrate_duo_attention`
        ``(self, **kwargs)`` (a bool ``[len(policy_layers()), H_kv]`` mask for
        ``make_policy("duo_attention", retrieval_heads=...)``)."""
        return calibrate_duo_attention(self, **kwargs)

    @staticmethod
    def _sample(logits, temperature, top_k, top_p, generator) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if top_p is not None and top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
            sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
            logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    # ------------------------------------------------------------------------------------------
    # save / load
    # ------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path/config.json`` and ``path/model.safetensors`` (needs ``pip install effattn[io]``)."""
        save_file = _safetensors().save_file
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self._unique_state_dict().items()}
        save_file(tensors, os.path.join(path, WEIGHTS_FILE))

    def _unique_state_dict(self) -> dict[str, torch.Tensor]:
        sd = self.state_dict()
        if self.config.tie_embeddings:
            sd.pop("head.weight", None)  # the same tensor as embed.weight
        return sd

    @classmethod
    def build_for_load(cls, config: LMConfig, path: str | os.PathLike) -> LM:
        """The empty model :meth:`load` fills: ``cls(config)``; a subclass with options beyond the config reads
        them from ``path`` here."""
        return cls(config)

    @classmethod
    def load(cls, path: str | os.PathLike, config: LMConfig | None = None, map_location: str = "cpu") -> LM:
        """Rebuild a model saved by :meth:`save`. With ``config``, that config is used instead of the
        saved one; weights missing, unexpected, or of the wrong shape raise ``ValueError`` naming them."""
        load_file = _safetensors().load_file
        if config is None:
            with open(os.path.join(path, CONFIG_FILE)) as f:
                config = LMConfig(**json.load(f))
        model = cls.build_for_load(config, path)
        tensors = load_file(os.path.join(path, WEIGHTS_FILE), device=map_location)
        expected = model._unique_state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        wrong = sorted(
            f"{k}: saved {tuple(tensors[k].shape)}, model {tuple(expected[k].shape)}"
            for k in set(expected) & set(tensors)
            if tensors[k].shape != expected[k].shape
        )
        if missing or unexpected or wrong:
            raise ValueError(
                f"weights in {path} do not fit the config: missing {missing}, unexpected {unexpected}, "
                f"wrong shape {wrong}"
            )
        model.load_state_dict(tensors, strict=False)
        return model.to(map_location)


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:
        raise ImportError("LM.save / LM.load need safetensors: pip install 'effattn[io]'") from e
    return safetensors.torch
