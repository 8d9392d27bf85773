"""Attention backends: what each one supports, declared as data, and the registry ``auto`` chooses from.

A backend is a class with a ``name``, a :class:`Capabilities` declaration and ``run(call)``; its
``why_not(call)`` (the human-readable reasons it cannot run an :class:`AttentionCall`, empty when it
can) is derived from the declaration by :meth:`Capabilities.reasons`, plus the few checks that
depend on more than the declared fields (``extra_reasons``). This is the shape of xFormers' fmha
operators (each declares its devices, dtypes, head dims and bias types, and lists reasons for a
refusal), so :func:`effattn.explain` reads the declarations instead of trying backends.

``auto`` rule: the backends that declare an ``auto_priority`` are tried in ascending priority and the
first whose ``why_not`` is empty runs the call; a backend without a priority (the reference) runs only
when asked for by name.

Example::

    >>> import torch
    >>> from effattn.exact.backends import REGISTRY, auto_order
    >>> auto_order()
    ['sdpa', 'tiled']
    >>> caps = REGISTRY["sdpa"].capabilities
    >>> sorted(caps.masks), caps.return_lse
    (['causal', 'none'], False)

Adding a backend (a ``triton`` backend for CUDA will be one) is one module in this package plus one
registration, nothing else to edit: write ``backends/<name>.py`` with a subclass of :class:`Backend`
whose ``capabilities`` state what its kernels cover (for Triton: ``devices=frozenset({"cuda"})``,
``max_head_dim=256``, ``masks`` without ``"mask_mod"`` and ``score_mod=False``, since arbitrary Python
callables are not compiled), put the checks that depend on the environment in ``extra_reasons`` (Triton
not installed; CPU tensors only under ``TRITON_INTERPRET=1``), give it an ``auto_priority`` and end the
module with ``REGISTRY.register(name, Backend())``. A priority between ``sdpa``'s 10 and ``tiled``'s 20
lets SDPA keep the plain dense calls it covers, the new backend take the masked ones on its devices and
``tiled`` the rest (below 10 where it is measured faster than SDPA for plain calls too). The registry
imports every module of this package on first lookup, so ``BACKENDS`` and ``explain()`` list the new
backend and the capability tests in ``tests/exact`` cover it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from effattn._checks import FLOAT_DTYPES
from effattn._registry import Registry
from effattn.exact.block_mask import BlockMask

__all__ = [
    "MASK_KINDS",
    "REGISTRY",
    "AttentionCall",
    "Backend",
    "Capabilities",
    "auto_order",
    "backend_names",
]

#: The mask kinds a call can use; a call with none of them is ``"none"``.
MASK_KINDS = ("none", "causal", "window", "block_mask", "mask_mod")


@dataclass
class AttentionCall:
    """A validated, normalized attention call (what backends inspect).

    ``user_mask_mod``/``user_score_mod`` are the caller's functions; ``mask_mod``/``score_mod`` the
    composed ones (causal, window, documents and the caller's mask; softcap, ALiBi and the caller's
    score mod) that the general backends evaluate.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    B: int
    Tq: int
    Tk: int
    Hq: int
    Hkv: int
    D: int
    Dv: int
    scale: float
    causal: bool
    window: tuple[int, int] | None
    user_mask_mod: object
    user_score_mod: object
    softcap: float | None
    alibi_slopes: torch.Tensor | None
    sinks: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    block_mask: BlockMask | None
    return_lse: bool
    mask_mod: object = None
    score_mod: object = None
    mod_tensors: tuple = field(default_factory=tuple)

    @property
    def offset(self) -> int:
        return self.Tk - self.Tq

    @property
    def mask_kinds(self) -> tuple[str, ...]:
        """The :data:`MASK_KINDS` this call uses (``("none",)`` when unmasked; ``cu_seqlens`` is a
        feature of its own, see :class:`Capabilities`)."""
        kinds = tuple(
            kind
            for kind, used in (
                ("causal", self.causal),
                ("window", self.window is not None),
                ("block_mask", self.block_mask is not None),
                ("mask_mod", self.user_mask_mod is not None),
            )
            if used
        )
        return kinds or (() if self.cu_seqlens is not None else ("none",))

    @property
    def needs_grad(self) -> bool:
        """Whether autograd will ask this call for gradients (grad mode on and an input requires grad)."""
        tensors = (self.q, self.k, self.v, self.sinks, self.alibi_slopes, *self.mod_tensors)
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# the optional features of a call: (Capabilities field, attention() argument, is it used by the call)
_FEATURES = (
    ("varlen", "cu_seqlens", lambda c: c.cu_seqlens is not None),
    ("score_mod", "score_mod", lambda c: c.user_score_mod is not None),
    ("softcap", "softcap", lambda c: c.softcap is not None),
    ("alibi", "alibi_slopes", lambda c: c.alibi_slopes is not None),
    ("sinks", "sinks", lambda c: c.sinks is not None),
    ("return_lse", "return_lse", lambda c: c.return_lse),
)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


@dataclass(frozen=True)
class Capabilities:
    """What a backend supports, as data; :meth:`reasons` derives its refusals from it.

    Fields:
        devices: device types it runs on (``{"cuda"}``); ``None``: every device PyTorch runs on.
        dtypes: input dtypes. max_head_dim: the largest ``max(D, D_v)``, ``None`` for no bound.
        gqa: ``H_kv < H_q``. value_head_dim: ``D_v != D``.
        masks: the :data:`MASK_KINDS` it takes. causal_bottom_right: causal with ``T_q != T_k``
            aligned bottom-right (else only ``T_q == T_k``, where both alignments agree, or one query,
            which sees every key and so needs no mask).
        varlen, score_mod, softcap, alibi, sinks, return_lse: the optional features of ``attention()``
            (``cu_seqlens``, ``score_mod``, ``softcap``, ``alibi_slopes``, ``sinks``, ``return_lse``).
        backward: gradients for every differentiable input.
        deterministic_on: device types where forward and backward are bitwise reproducible run to run
            (``None``: all). Reported by ``explain()``; not a refusal reason (``attention()`` takes no
            ``deterministic=`` option).
        max_scores: a bound on ``B * H_q * T_q * T_k`` for a backend that materializes the scores.
        notes: per feature (an ``attention()`` argument name), why it is unsupported; appended to
            the reason.
    """

    summary: str
    devices: frozenset[str] | None = None
    dtypes: frozenset[torch.dtype] = frozenset(FLOAT_DTYPES)
    max_head_dim: int | None = None
    gqa: bool = True
    value_head_dim: bool = True
    masks: frozenset[str] = frozenset(MASK_KINDS)
    causal_bottom_right: bool = True
    varlen: bool = True
    score_mod: bool = True
    softcap: bool = True
    alibi: bool = True
    sinks: bool = True
    return_lse: bool = True
    backward: bool = True
    deterministic_on: frozenset[str] | None = None
    max_scores: int | None = None
    notes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.masks) - set(MASK_KINDS)
        if unknown:
            raise ValueError(f"masks must be a subset of {MASK_KINDS}, got unknown {sorted(unknown)}")

    def _unsupported(self, what: str) -> str:
        note = self.notes.get(what.split()[0])
        return f"{what} not supported" + (f" ({note})" if note else "")

    def reasons(self, call: AttentionCall) -> list[str]:
        """Why a backend with these capabilities cannot run ``call`` (empty: it can).

        Each reason starts with the argument or property of the call it is about.
        """
        r = []
        dev = call.q.device.type
        if self.devices is not None and dev not in self.devices:
            r.append(f"device {dev!r} not supported (runs on {sorted(self.devices)})")
        if call.q.dtype not in self.dtypes:
            names = sorted(_dtype_name(d) for d in self.dtypes)
            r.append(f"dtype {_dtype_name(call.q.dtype)} not supported (takes {names})")
        head = max(call.D, call.Dv)
        if self.max_head_dim is not None and head > self.max_head_dim:
            r.append(f"head_dim {head} not supported (at most {self.max_head_dim})")
        if call.Hq != call.Hkv and not self.gqa:
            r.append(self._unsupported(f"GQA (heads_q {call.Hq} != heads_kv {call.Hkv})"))
        if call.D != call.Dv and not self.value_head_dim:
            r.append(self._unsupported(f"head_dim_v {call.Dv} != head_dim {call.D}"))
        for kind in call.mask_kinds:
            if kind not in self.masks:
                r.append(self._unsupported("an unmasked call" if kind == "none" else kind))
        if call.causal and "causal" in self.masks and not self.causal_bottom_right and call.Tq not in (call.Tk, 1):
            r.append(
                f"causal with T_q={call.Tq} != T_k={call.Tk} needs bottom-right alignment; "
                "this backend aligns causal masks top-left"
            )
        for flag, arg, used in _FEATURES:
            if used(call) and not getattr(self, flag):
                r.append(self._unsupported(arg))
        if not self.backward and call.needs_grad:
            r.append(self._unsupported("backward (an input requires grad)"))
        if self.max_scores is not None:
            n = call.B * call.Hq * call.Tq * call.Tk
            if n > self.max_scores:
                r.append(f"would materialize {n} scores (> {self.max_scores}); use backend='tiled' (O(T) memory)")
        return r

    def describe(self) -> str:
        """One line listing the declaration (what :func:`effattn.explain` prints for a backend)."""
        feats = [arg for flag, arg, _ in _FEATURES if getattr(self, flag)]
        det = self.deterministic_on
        parts = [
            "devices " + ("any" if self.devices is None else "/".join(sorted(self.devices))),
            "dtypes " + "/".join(sorted(_dtype_name(d) for d in self.dtypes)),
            f"head_dim <= {self.max_head_dim}" if self.max_head_dim else "any head_dim",
            "masks " + "/".join(k for k in MASK_KINDS if k in self.masks),
            "causal " + ("bottom-right" if self.causal_bottom_right else "T_q == T_k or one query"),
            ("features " + "/".join(feats)) if feats else "no optional features",
            "GQA" if self.gqa else "no GQA",
            "backward" if self.backward else "forward only",
            "deterministic on " + ("every device" if det is None else "/".join(sorted(det))),
        ]
        if self.max_scores is not None:
            parts.append(f"at most {self.max_scores} scores")
        return ", ".join(parts)


class Backend:
    """Base of every backend: ``why_not`` from the declared :class:`Capabilities` plus ``extra_reasons``.

    Subclasses set ``name``, ``capabilities`` and (to take part in ``auto``) ``auto_priority``, and
    implement ``run(call) -> (o [B, T_q, H_q, D_v], lse [B, H_q, T_q] or None)``; ``lse`` may be None
    only when the capabilities say ``return_lse=False``.
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    auto_priority: ClassVar[int | None] = None

    def why_not(self, call: AttentionCall) -> list[str]:
        """Human-readable reasons this backend cannot run ``call``; empty when it can."""
        return self.capabilities.reasons(call) + self.extra_reasons(call)

    def extra_reasons(self, call: AttentionCall) -> list[str]:
        """Checks a declaration cannot state (an optional dependency, an environment variable)."""
        return []

    def run(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


REGISTRY: Registry[Backend] = Registry("attention backend", package="effattn.exact.backends")


def backend_names() -> list[str]:
    """Every registered backend: the ``auto`` ones in priority order, then the others by name."""
    entries = REGISTRY.items()
    auto = auto_order()
    return auto + [n for n, _ in entries if n not in auto]


def auto_order() -> list[str]:
    """The backends ``auto`` tries, in order (ascending ``auto_priority``)."""
    ranked = [(b.auto_priority, n) for n, b in REGISTRY.items() if b.auto_priority is not None]
    return [n for _, n in sorted(ranked)]
