"""One look for every figure of the project: fonts, grid, colours, mean ± std bands, saving.

Each plotting function is wrapped in :func:`styled` (matplotlib's ``rc_context`` with :data:`RC`
around the whole drawing, so nothing leaks into a caller's own figures) and ends in :func:`save`.
Curves over seeds are :func:`mean_std` (markers at the means, a shaded ± std band); axis labels
carry their units. Colours: the Okabe-Ito palette (distinguishable with colour-blindness), ID in black.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from cycler import cycler  # noqa: E402

#: Okabe & Ito (2008), black left out: it is the ID / single-curve colour
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442")
ID_COLOUR = "black"
#: the chance level / reference lines
REFERENCE = {"color": "grey", "linewidth": 0.8, "linestyle": ":"}
#: line styles that tell apart curves of the same colour once the palette runs out
DASHES = ("-", "--", ":", "-.")
#: the shaded ± std band's opacity
BAND_ALPHA = 0.2
DPI = 120

RC = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "figure.titlesize": 10,
    "axes.grid": True,
    "grid.alpha": 0.35,
    "grid.linewidth": 0.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": cycler(color=PALETTE),
    "lines.linewidth": 1.4,
    "lines.markersize": 4,
    "image.cmap": "viridis",
    "savefig.dpi": DPI,
}

F = TypeVar("F", bound=Callable)


def styled(fn: F) -> F:
    """Draw ``fn``'s figure with :data:`RC` (text sizes and colours are fixed when artists are made)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with plt.rc_context(RC):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def mean_std(ax, xs, mean, std, label: str | None = None, color=None, linestyle: str = "-", marker: str = "o"):
    """Means as a line with markers, ± one (sample) standard deviation as a shaded band of the
    same colour; returns the line."""
    xs, mean, std = (np.asarray(a, dtype=np.float64) for a in (xs, mean, std))
    (line,) = ax.plot(xs, mean, marker=marker, linestyle=linestyle, color=color, label=label)
    if len(xs) and np.any(std > 0):
        ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=BAND_ALPHA, linewidth=0)
    return line


def reference(ax, y: float | None = None, x: float | None = None, diagonal: bool = False) -> None:
    """A chance level (``y``), a boundary (``x``) or the ROC diagonal, in the reference style."""
    if y is not None:
        ax.axhline(y, **REFERENCE)
    if x is not None:
        ax.axvline(x, **REFERENCE)
    if diagonal:
        ax.plot([0, 1], [0, 1], **REFERENCE)


def series_style(i: int) -> dict:
    """Colour and line style of the ``i``-th curve of a panel: the palette, then the palette again
    dashed, so every curve of a panel with more curves than colours stays distinct."""
    return {"color": PALETTE[i % len(PALETTE)], "linestyle": DASHES[(i // len(PALETTE)) % len(DASHES)]}


def legend(ax, **kwargs) -> None:
    """A legend when the axis has labelled artists (none otherwise: an empty box says nothing)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def legend_beside(ax, **kwargs) -> None:
    """:func:`legend` to the right of the axis, outside it: it never covers a curve."""
    legend(ax, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kwargs)


def legend_below(ax, ncol: int = 2, **kwargs) -> None:
    """:func:`legend` under the axis (below its x label), outside it: it never covers a curve."""
    legend(ax, loc="upper center", bbox_to_anchor=(0.5, -0.2), borderaxespad=0.0, ncol=ncol, **kwargs)


def wrap(text: str, width_in: float, fontsize: float | None = None) -> str:
    """``text`` broken into lines that fit ``width_in`` inches at ``fontsize`` points (an average
    character is about 0.6 em wide), so a long title or caption is never cut off at the figure's edge."""
    import textwrap

    fontsize = fontsize or RC["font.size"]
    return textwrap.fill(text, width=max(10, int(width_in * 72 / (0.6 * fontsize))), break_on_hyphens=False)


def save(fig, path: str | Path, title: str | None = None) -> Path:
    """Title (wrapped to the figure's width), layout, PNG at :data:`DPI`, close.

    A figure made with ``layout="constrained"`` (legends and captions outside the axes) keeps it;
    any other gets matplotlib's tight layout.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if title:
        fig.suptitle(wrap(title, fig.get_figwidth(), RC["figure.titlesize"]))
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
