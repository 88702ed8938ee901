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


def legend(ax, **kwargs) -> None:
    """A legend when the axis has labelled artists (none otherwise: an empty box says nothing)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def save(fig, path: str | Path, title: str | None = None) -> Path:
    """Title, tight layout, PNG at :data:`DPI`, close."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
