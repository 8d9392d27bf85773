"""Terminal tables and progress lines for the benchmark suites: ``rich`` where installed, aligned plain text otherwise.

A terminal table is the summary of a run and fits the terminal (80-100 columns by default): short
headers, numbers to three significant digits, long text cut with an ellipsis, one line per row. The
full table, every column and digit, is in the suite's report files (``.md`` and ``.json``).

Example::

    >>> rows = [{"method": "sdpa", "T": 1024, "fwd_s": 0.01234}, {"method": "tiled", "T": 1024, "error": "x" * 80}]
    >>> cols = [Column("method", key_column=True), Column("T"), Column("fwd_s", "fwd ms", scale=1e3)]
    >>> cols.append(Column("error", text=True))
    >>> print(render_table(rows, cols, width=40, use_rich=False))
    method     T  fwd ms  error
    sdpa    1024    12.3  —
    tiled   1024       —  xxxxxxxxxxxxxxxxx…
"""

from __future__ import annotations

import io
import math
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Column", "Progress", "format_value", "print_table", "render_table", "terminal_width"]

DEFAULT_WIDTH = 100  # a log file or a pipe: the table is laid out for a 100-column reader
GAP = 2  # characters between two columns (rich: collapsed padding; plain text: two spaces)
ELLIPSIS = "…"


@dataclass(frozen=True)
class Column:
    """One column of a terminal table: the row key, a short header, a scale for numbers (seconds -> ms:
    ``scale=1e3``) and whether it holds free text (``text=True``: cut with an ellipsis to fit, down to
    ``min_width`` characters, widest text column first). A table too wide even then leaves out columns
    from the right, text columns first, never a ``key_column`` (what names a row: method, length)."""

    key: str
    header: str = ""
    scale: float = 1.0
    text: bool = False
    min_width: int = 8
    key_column: bool = False

    @property
    def title(self) -> str:
        return self.header or self.key


def format_value(x: object, scale: float = 1.0) -> str:
    """A cell: ``—`` for a missing value, three significant digits for a float (no exponent between
    0.001 and a million), integers and text as they are.

    Example::

        >>> [format_value(x) for x in (None, 0.77123, 12.345, 1234.5, 2.5e-5, 3, "lsh", True)]
        ['—', '0.771', '12.3', '1234', '2.5e-05', '3', 'lsh', 'True']
        >>> format_value(0.0123, scale=1e3)
        '12.3'
    """
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int) and scale == 1.0:
        return str(x)
    v = float(x) * scale
    if math.isnan(v):
        return "—"
    if math.isinf(v) or v == 0:
        return f"{v:g}"
    a = abs(v)
    if 100 <= a < 1e6:
        return f"{v:.0f}"
    if 1e-3 <= a < 100:
        return f"{v:.3g}"
    return f"{v:.2g}"


def _cut(s: str, width: int) -> str:
    return s if len(s) <= width else s[: max(0, width - 1)] + ELLIPSIS


def _layout(
    rows: Sequence[dict], columns: Sequence[Column], width: int
) -> tuple[list[Column], list[int], list[list[str]], list[str]]:
    """Cells, column widths and the columns left out, so that the table is at most ``width`` wide."""
    cols = list(columns)
    cells = [[format_value(r.get(c.key), c.scale) for c in cols] for r in rows]
    widths = [max([len(c.title)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    dropped: list[str] = []
    while True:
        excess = sum(widths) + GAP * (len(cols) - 1) - width
        # shorten the widest text column by one character at a time, down to its minimum width
        while excess > 0:
            shrinkable = [i for i, c in enumerate(cols) if c.text and widths[i] > max(c.min_width, 2)]
            if not shrinkable:
                break
            i = max(shrinkable, key=lambda j: widths[j])
            widths[i] -= 1
            excess -= 1
        if excess <= 0:
            break
        # still too wide: leave out the last column that does not name the row (text columns first)
        optional = [i for i, c in enumerate(cols) if not c.key_column]
        if not optional:
            break
        texts = [i for i in optional if cols[i].text]
        i = texts[-1] if texts else optional[-1]
        dropped.append(cols[i].title)
        del cols[i], widths[i]
        for row in cells:
            del row[i]
    cells = [[_cut(v, w) for v, w in zip(row, widths)] for row in cells]
    return cols, widths, cells, dropped


def render_table(
    rows: Sequence[dict],
    columns: Sequence[Column | str],
    *,
    width: int = DEFAULT_WIDTH,
    title: str = "",
    use_rich: bool | None = None,
) -> str:
    """The table as text at most ``width`` characters wide, one line per row (see the module docstring).

    ``use_rich=None`` uses ``rich`` where it is installed. A column whose key is a plain string is
    numeric unless its values are text. Columns that cannot fit even with their text cut are left out,
    and a last line names them.
    """
    cols = [c if isinstance(c, Column) else Column(c, text=_is_text(rows, c)) for c in columns]
    cols, widths, cells, dropped = _layout(rows, cols, width)
    lines: list[str] = [title] if title else []
    if use_rich is None:
        try:
            import rich  # noqa: F401
        except ImportError:
            use_rich = False
        else:
            use_rich = True
    right = [not c.text and not _is_text(rows, c.key) for c in cols]
    if use_rich:
        from rich import box
        from rich.console import Console
        from rich.table import Table

        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True)
        for c, w, r in zip(cols, widths, right):
            table.add_column(_cut(c.title, w), justify="right" if r else "left", no_wrap=True, min_width=w, max_width=w)
        for row in cells:
            table.add_row(*row)
        buf = io.StringIO()
        Console(file=buf, width=width, color_system=None, force_terminal=False, highlight=False).print(table)
        lines += [line.rstrip() for line in buf.getvalue().splitlines()]
    else:
        heads = [_cut(c.title, w) for c, w in zip(cols, widths)]
        lines.append("  ".join(h.rjust(w) if r else h.ljust(w) for h, w, r in zip(heads, widths, right)).rstrip())
        for row in cells:
            lines.append("  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(row, widths, right)).rstrip())
    if dropped:
        lines.append(_cut(f"(left out to fit {width} columns: {', '.join(dropped)}; see the report)", width))
    return "\n".join(lines)


def _is_text(rows: Sequence[dict], key: str) -> bool:
    return any(isinstance(r.get(key), str) for r in rows)


def terminal_width() -> int:
    """The terminal's width when standard output is one, else :data:`DEFAULT_WIDTH` (a log file or a pipe)."""
    if sys.stdout.isatty():
        return shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
    return DEFAULT_WIDTH


def print_table(title: str, rows: Sequence[dict], columns: Sequence[Column | str], width: int | None = None) -> None:
    """Print :func:`render_table` under a title line, at the terminal's width (``width`` overrides)."""
    width = width or terminal_width()
    print(f"\n{_cut(title, width)}")
    print(render_table(rows, columns, width=width), flush=True)


class Progress:
    """A progress bar over ``total`` steps (rich where installed and writing to a terminal; one printed
    line per step otherwise, which reads better in a log file than a redrawn bar)."""

    def __init__(self, title: str, total: int):
        self.title, self.total, self.done = title, total, 0
        self._rich = None
        try:
            from rich.console import Console
            from rich.progress import Progress as RichProgress
        except ImportError:
            return
        if Console().is_terminal:
            self._rich = RichProgress(transient=False)
            self._rich.start()
            self._task = self._rich.add_task(title, total=total)

    def advance(self, what: str) -> None:
        """One step done; ``what`` says which."""
        self.done += 1
        if self._rich is not None:
            self._rich.update(self._task, advance=1, description=f"{self.title}: {what}")
        else:
            print(f"[{self.title} {self.done}/{self.total}] {what}", flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
