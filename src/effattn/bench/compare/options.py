"""``effattn compare --mixer-options``: keyword arguments for named mixers, e.g. the Titans memories' chunk.

The text ``titans_mag:chunk_size=16,atlas:chunk_size=16;depth=1`` becomes
``{"titans_mag": {"chunk_size": 16}, "atlas": {"chunk_size": 16, "depth": 1}}``: the per-mixer keyword
arguments of :class:`effattn.nn.LMConfig` (``mixer_kwargs``), handed to every training of that mixer in the
recall and reasoning sections and to its layer in the speed section's mixer rows. Entries are separated by
``,``; one mixer's options by ``;`` (or by repeating ``mixer:`` entries). Values are Python literals (``16``,
``0.5``, ``True``, ``None``, ``'elu'``); anything else is kept as a string. An unknown mixer, or an option
its constructor does not take, is an error that names it.
"""

from __future__ import annotations

import ast
import inspect

__all__ = ["check_mixer_options", "parse_mixer_options"]


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_mixer_options(text: str) -> dict[str, dict]:
    """Parse ``mixer:key=value[;key=value],mixer:key=value`` into ``{mixer: {key: value}}`` (syntax only;
    :func:`check_mixer_options` checks the names).

    Example::

        >>> parse_mixer_options("titans_mag:chunk_size=16,atlas:chunk_size=16;depth=1")
        {'titans_mag': {'chunk_size': 16}, 'atlas': {'chunk_size': 16, 'depth': 1}}
    """
    options: dict[str, dict] = {}
    for entry in (e.strip() for e in str(text).split(",")):
        if not entry:
            continue
        mixer, sep, rest = entry.partition(":")
        mixer = mixer.strip()
        if not sep or not mixer or not rest.strip():
            raise ValueError(f"mixer_options: expected 'mixer:key=value', got {entry!r}")
        kw = options.setdefault(mixer, {})
        for item in (i.strip() for i in rest.split(";")):
            if not item:
                continue
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key.isidentifier() or not value.strip():
                raise ValueError(f"mixer_options: expected 'key=value' for mixer {mixer!r}, got {item!r}")
            if key in ("dim", "heads"):
                raise ValueError(
                    f"mixer_options: {mixer}:{key} is set by the run (--widths, --head-dims), not by an option"
                )
            kw[key] = _value(value.strip())
    return options


def _accepted(factory) -> tuple[set[str], bool]:
    """The keyword names a mixer factory takes, and whether it also takes ``**kwargs``."""
    sig = inspect.signature(factory)
    names = {n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names - {"self", "dim", "heads"}, any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def check_mixer_options(options: dict[str, dict]) -> None:
    """Raise ``ValueError`` naming the mixer and the option when a mixer of ``options`` is not registered or
    does not take an option (a mixer that forwards ``**kwargs`` is built once at a tiny size to check them).

    Example::

        >>> check_mixer_options({"titans_mag": {"chunk_size": 16}})
        >>> check_mixer_options({"titans_mag": {"chunk": 16}})
        Traceback (most recent call last):
        ...
        ValueError: mixer_options: mixer 'titans_mag' does not take option 'chunk' ...
    """
    from effattn.nn import MIXERS, build_mixer, list_mixers

    for mixer, kw in options.items():
        if mixer not in list_mixers():
            raise ValueError(f"mixer_options: unknown mixer {mixer!r}; registered mixers: {', '.join(list_mixers())}")
        names, var_kw = _accepted(MIXERS[mixer])
        unknown = [k for k in kw if k not in names]
        if not unknown:
            continue
        reason = ""
        if var_kw:  # the rest goes on to an inner module (the Titans memories' NeuralMemory): try it
            try:
                build_mixer(mixer, dim=8, heads=1, **kw)
                continue
            except TypeError as e:
                reason = f" ({e})"
        raise ValueError(
            f"mixer_options: mixer {mixer!r} does not take option {unknown[0]!r}{reason}; "
            f"its options: {', '.join(sorted(names)) or 'none'}"
        )
