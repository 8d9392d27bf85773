"""Shared look of the ``effattn compare`` plots: distinct series styles and overlapping markers spread apart.

A panel's series take their colour, marker and line style from :func:`series_style` (no colour repeats
within a panel of up to 16 series; grey is kept for the reference drawn in every panel). Markers that
would hide each other (closer than a few pixels) are spread sideways by :func:`dodge_offsets` and
drawn by :func:`draw_dodged`, each with a leader line to its label: the data stay where they are, only
the marker moves, and the caption says so.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["LINESTYLES", "MARKERS", "PALETTE", "dodge_offsets", "draw_dodged", "series_style"]

PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#000000",
    "#f0027f",
    "#386cb0",
    "#66a61e",
    "#e6ab02",
    "#a6761d",
    "#7570b3",
)
MARKERS = "osD^vP<X>hp*d"
LINESTYLES = ("-", "--", "-.", ":")


def series_style(i: int) -> dict:
    """Style of the ``i``-th series of a panel: colour, marker and line style each cycle with a different
    period (16, 13, 4), so no two of the first 16 series share a colour, nor any two all three.

    Example::

        >>> series_style(0), series_style(17)["color"] == series_style(1)["color"]
        ({'color': '#1f77b4', 'marker': 'o', 'linestyle': '-'}, True)
    """
    return {
        "color": PALETTE[i % len(PALETTE)],
        "marker": MARKERS[i % len(MARKERS)],
        "linestyle": LINESTYLES[i % len(LINESTYLES)],
    }


def dodge_offsets(points: Sequence[tuple[float, float]], radius: float) -> tuple[list[float], list[int]]:
    """Horizontal offsets that spread apart points (in pixels) closer than ``radius`` to another, and the
    group of each point (points in a group of one keep offset 0 and their own group).

    Groups are chains of points each within ``radius`` of the next; a group of ``k`` is laid out
    ``radius`` apart, centred on its mean ``x``, in order of ``x`` (ties in input order).

    Example::

        >>> offsets, groups = dodge_offsets([(100, 50), (102, 50), (300, 50)], radius=10)
        >>> offsets, groups
        ([-4.0, 4.0, 0.0], [0, 0, 2])
    """
    n = len(points)
    group = list(range(n))

    def find(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            (xi, yi), (xj, yj) = points[i], points[j]
            if (xi - xj) ** 2 + (yi - yj) ** 2 < radius**2:
                group[find(j)] = find(i)
    roots = [find(i) for i in range(n)]
    offsets = [0.0] * n
    for root in set(roots):
        members = sorted((i for i in range(n) if roots[i] == root), key=lambda i: (points[i][0], i))
        if len(members) < 2:
            continue
        centre = sum(points[i][0] for i in members) / len(members)
        for rank, i in enumerate(members):
            offsets[i] = centre + (rank - (len(members) - 1) / 2) * radius - points[i][0]
    return offsets, roots


def draw_dodged(ax, markers: Sequence[dict], radius_px: float = 11.0) -> int:
    """Draw ``markers`` (dicts with ``x``, ``y``, ``color``, ``marker`` and an optional ``label``) on
    ``ax`` in data coordinates, spreading apart those closer than ``radius_px`` pixels; a marker moved
    this way is labelled with a leader line (its ``label``, stacked below its group). Call it after the
    axes' limits and the figure's layout are final. Returns how many markers were moved.
    """
    from matplotlib.transforms import offset_copy

    ax.autoscale(False)
    pix = [tuple(ax.transData.transform((m["x"], m["y"]))) for m in markers]
    offsets, groups = dodge_offsets(pix, radius_px)
    fig = ax.figure
    moved = 0
    # labels are listed below the leftmost marker of their group; groups whose lists would collide (anchors
    # closer than a label's width) share one list
    anchor: dict[int, tuple[float, float]] = {}
    for (x, y), dx, g in zip(pix, offsets, groups):
        if groups.count(g) > 1:
            anchor[g] = (min(anchor.get(g, (x + dx, y))[0], x + dx), y)
    _, lists = dodge_offsets(list(anchor.values()), 90.0)
    list_of = dict(zip(anchor, lists))
    left = {g: min(anchor[h][0] for h in anchor if list_of[h] == list_of[g]) for g in anchor}
    rank_in_group: dict[int, int] = {}
    # in order of the drawn x, so that the leader lines to a list of labels do not cross
    order = sorted(range(len(markers)), key=lambda i: pix[i][0] + offsets[i])
    for m, (x, _), dx, g in ((markers[i], pix[i], offsets[i], groups[i]) for i in order):
        tr = offset_copy(ax.transData, fig=fig, x=dx, y=0, units="dots")
        ax.plot(
            [m["x"]],
            [m["y"]],
            marker=m["marker"],
            color=m["color"],
            markersize=6,
            linestyle="none",
            transform=tr,
            zorder=5,
            clip_on=False,
        )
        if groups.count(g) > 1:
            moved += 1
            if m.get("label"):
                j = rank_in_group.get(list_of[g], 0)
                rank_in_group[list_of[g]] = j + 1
                ax.annotate(
                    m["label"],
                    (m["x"], m["y"]),
                    xycoords=tr,
                    xytext=((left[g] - x - dx) * 72 / fig.dpi + 6, -14 - 8.5 * j),
                    textcoords="offset points",
                    fontsize=6,
                    color=m["color"],
                    va="center",
                    arrowprops={"arrowstyle": "-", "color": m["color"], "linewidth": 0.4, "shrinkA": 0, "shrinkB": 3},
                )
    return moved
