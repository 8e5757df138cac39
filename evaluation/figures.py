"""Figures drawn with matplotlib (Agg, no display needed): `recalls.png`, the Recall@N curves before and after
re-ranking that `eval.py` writes, and `save_figure`, the atomic PNG writer the training chart shares.

Figures are built with the object-oriented API (`matplotlib.figure.Figure` on an Agg canvas), never pyplot, so
nothing global changes in the process that draws them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from model.files import replaced_atomically

RECALLS_PNG = "recalls.png"
BASELINE_LABEL = "baseline (global descriptors)"
RERANKED_LABEL = "after DHE re-ranking"


def new_figure(width_inches: float, height_inches: float) -> Figure:
    """An empty figure on an Agg canvas (100 dpi: `width_inches` 10 gives 1000 pixels)."""
    figure = Figure(figsize=(width_inches, height_inches), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path) -> None:
    """Write `figure` to the PNG `path` atomically (`model.files.replaced_atomically`)."""
    with replaced_atomically(path) as temporary:
        figure.savefig(temporary, format="png")


def recalls_figure(
    recall_values: Sequence[int], baseline: np.ndarray, reranked: np.ndarray | None, title: str = ""
) -> Figure:
    """Recall@N (%) against N: the baseline (len(recall_values),) and, when given, the re-ranked recalls (same
    shape). The lines are labelled `BASELINE_LABEL` and `RERANKED_LABEL`; each point is annotated with its value."""
    figure = new_figure(6, 4)
    axes = figure.add_subplot()
    series = [(BASELINE_LABEL, baseline, "o-", -13)]
    if reranked is not None:
        series.append((RERANKED_LABEL, reranked, "s-", 6))
    for label, recalls, style, offset in series:  # values below the baseline's points, above the re-ranked ones
        axes.plot(list(recall_values), list(np.asarray(recalls, dtype=float)), style, label=label)
        for n, value in zip(recall_values, recalls):
            axes.annotate(
                f"{value:.1f}", (n, value), textcoords="offset points", xytext=(0, offset), ha="center", fontsize=8
            )
    axes.set_xscale("log")
    axes.set_xticks(list(recall_values), [str(n) for n in recall_values])
    axes.minorticks_off()
    axes.set_xlabel("N (top-N predictions)")
    axes.set_ylabel("Recall@N (%)")
    axes.set_ylim(0, 105)
    axes.grid(True, alpha=0.4)
    axes.legend(loc="lower right")
    axes.set_title(title or "Recall@N before and after re-ranking")
    figure.tight_layout()
    return figure
