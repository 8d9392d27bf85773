"""Sequence-mixer layers, one module per mixer, each registered in :data:`effattn.nn.registry.MIXERS`.

Every layer follows the mixer contract of :mod:`effattn.nn`: ``__init__(dim, heads, **kw)``,
``forward(x [B, T, dim], state=None, valid=None) -> (y [B, T, dim], new_state)`` and
``state_size(batch, seq_len)`` (bytes). A call with ``T > 1`` (training, prefill) runs the
functional op's full form (``chunk_*`` from :mod:`effattn.linear`, the sparse engine), a call with a
state its one-token ``step_*`` form; the state returned is the op's decoding state plus, where the
layer has one, the short convolution's last ``kernel_size - 1`` inputs, so ``prefill + decode``
equals one full forward.

Left padding: ``valid [B, T]`` (False at padded positions) makes every padded step an identity
step of the recurrence -- no write (``k``, ``v`` or ``beta`` or ``delta`` zeroed), no decay (log
gates set to 0) -- and the short convolutions see zeros there, so a left-padded row of a batch gives
exactly what the same sequence gives alone.

Modules (each class docstring states the layer and cites its paper): ``linear_attention``
(:class:`LinearAttentionMixer`), ``based`` (:class:`BasedMixer`), ``retnet`` (:class:`RetNetMixer`),
``gla`` (:class:`GLAMixer`), ``deltanet`` (:class:`DeltaNetMixer`, :class:`GatedDeltaNetMixer`),
``mamba`` (:class:`MambaMixer`), ``mamba2`` (:class:`Mamba2Mixer`), ``aaren`` (:class:`AarenMixer`),
``mom`` (:class:`MoMMixer`), from the sparse family ``topk_block`` (:class:`TopKBlockMixer`) and
``routing`` (:class:`RoutingMixer`), and ``attention`` (registers ``attention``, ``sliding_window``,
``mla`` and ``moh`` from :mod:`effattn.nn.attention`, :mod:`effattn.nn.mla`, :mod:`effattn.nn.moh`).
``_base`` holds what they share (:class:`MixerBase`, :class:`ShortConv`, the checks).
"""

from effattn.nn.mixers._base import (
    MixerBase,
    ShortConv,
    check_heads,
    check_x_and_valid,
    merge_heads,
    split_heads,
    state_nbytes,
    zero_invalid,
)
from effattn.nn.mixers.aaren import AarenMixer
from effattn.nn.mixers.attention import mla_mixer, sliding_window_mixer
from effattn.nn.mixers.based import BasedMixer
from effattn.nn.mixers.deltanet import DeltaNetMixer, GatedDeltaNetMixer
from effattn.nn.mixers.gla import GLAMixer
from effattn.nn.mixers.linear_attention import LinearAttentionMixer, normalized_linear_attn
from effattn.nn.mixers.mamba import MambaMixer
from effattn.nn.mixers.mamba2 import Mamba2Mixer
from effattn.nn.mixers.mom import MoMMixer
from effattn.nn.mixers.retnet import RetNetMixer
from effattn.nn.mixers.routing import RoutingMixer
from effattn.nn.mixers.topk_block import TopKBlockMixer

__all__ = [
    "ShortConv",
    "LinearAttentionMixer",
    "BasedMixer",
    "RetNetMixer",
    "GLAMixer",
    "DeltaNetMixer",
    "GatedDeltaNetMixer",
    "MambaMixer",
    "Mamba2Mixer",
    "AarenMixer",
    "MoMMixer",
    "TopKBlockMixer",
    "RoutingMixer",
    "state_nbytes",
    "MixerBase",
    "check_heads",
    "check_x_and_valid",
    "merge_heads",
    "split_heads",
    "zero_invalid",
    "normalized_linear_attn",
    "mla_mixer",
    "sliding_window_mixer",
]
