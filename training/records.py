"""The files of a run folder besides the checkpoints: `metrics.csv` (one row per epoch), the chart
`training_curves.png` (drawn with matplotlib) and the run's `results.json`."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

import util
from evaluation.figures import new_figure, save_figure
from model.files import replaced_atomically

METRICS_CSV = "metrics.csv"
RESULTS_JSON = "results.json"
PLOT_PNG = "training_curves.png"


def write_metrics(rows: Sequence[dict], path: str | Path) -> None:
    """`rows` (one dict per epoch) as CSV, atomically; columns in order of first appearance, empty where missing."""
    path = Path(path)
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with replaced_atomically(path) as temporary, open(temporary, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in row.items()})


def read_metrics(path: str | Path) -> list[dict[str, str]]:
    """The rows of a metrics.csv as dicts of strings."""
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _column(rows: Sequence[dict], name: str) -> list[float]:
    """The values of column `name`, NaN where a row has none (matplotlib leaves a gap)."""
    return [float(row[name]) if row.get(name) not in (None, "") else math.nan for row in rows]


def training_figure(rows: Sequence[dict], validates: bool = True) -> Figure:
    """The chart of `rows` (metrics.csv's, one per epoch), 1000 x 400 pixels: left, the per-epoch mean of each loss
    (the columns ending in "loss"; a logarithmic y axis when they span more than a factor 100) with the learning
    rate on a second, logarithmic y axis; right, the validation recalls (the "val_" columns: baseline solid,
    re-ranked dashed). Each line is labelled with its column's name. For a run that does not validate during
    training (`validates=False`: train_dhe.py) the recall panel says so."""
    figure = new_figure(10, 4)
    loss_axes, recall_axes = figure.subplots(1, 2)
    epochs = [int(row["epoch"]) for row in rows]
    names = list(dict.fromkeys(key for row in rows for key in row))
    loss_values = []
    for name in (n for n in names if n.endswith("loss")):
        loss_values += _column(rows, name)
        loss_axes.plot(epochs, loss_values[-len(rows) :], "o-", markersize=3, label=name)
    finite = [v for v in loss_values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) > 100 * min(finite):  # e.g. finetune: loss = triplet + 100 x REI
        loss_axes.set_yscale("log")
    loss_axes.set_title("training losses (epoch mean)")
    loss_axes.set_ylabel("loss")
    lr_axes = loss_axes.twinx()
    if "lr" in names:
        lr_axes.plot(epochs, _column(rows, "lr"), "--", color="grey", label="lr (right axis)")
        lr_axes.set_yscale("log")
    lr_axes.set_ylabel("learning rate")
    handles = loss_axes.get_legend_handles_labels()[0] + lr_axes.get_legend_handles_labels()[0]
    if handles:
        loss_axes.legend(handles=handles, loc="best", fontsize=8)
    for name in (n for n in names if n.startswith("val_")):
        style = "s--" if "reranked" in name else "o-"
        recall_axes.plot(epochs, _column(rows, name), style, markersize=3, label=name.removeprefix("val_"))
    recall_axes.set_title("validation recalls (%)")
    recall_axes.set_ylabel("Recall@N (%)")
    if recall_axes.lines:
        recall_axes.set_ylim(top=min(recall_axes.get_ylim()[1], 101))  # no room above 100%
        recall_axes.legend(loc="lower right", fontsize=8, ncol=2)
    else:
        empty = "no data yet" if validates else "no validation during training:\nthe test recalls are in results.json"
        recall_axes.text(0.5, 0.5, empty, transform=recall_axes.transAxes, ha="center", va="center", color="grey")
        recall_axes.set_yticks([])
    for axes in (loss_axes, recall_axes):
        axes.set_xlabel("epoch")
        axes.grid(True, alpha=0.4)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    return figure


def plot_metrics(rows: Sequence[dict], path: str | Path, validates: bool = True) -> None:
    """Write `training_figure(rows, validates)` to the PNG `path`, atomically."""
    save_figure(training_figure(rows, validates), path)


def save_training_results(output_folder: Path, recall_values: Sequence[int], results: dict) -> dict:
    """Write `results` (`Task.finish`'s {"baseline", "reranked", **extra}) to the run's results.json; returns what
    the file holds."""
    results = dict(results)
    util.save_results(
        output_folder / RESULTS_JSON,
        recall_values,
        results.pop("baseline"),
        results.pop("reranked"),
        **results,
    )
    return json.loads((output_folder / RESULTS_JSON).read_text())
