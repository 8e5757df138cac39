"""The files of a run folder besides the checkpoints: `metrics.csv` (one row per epoch), the chart
`training_curves.png` (drawn with Pillow) and the run's `results.json`."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

import util
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


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    title: str,
    series: dict[str, list],
    epochs: list,
    empty: str = "no data yet",
) -> None:
    """One line chart inside `box` (left, top, right, bottom): axes, min/max labels, one polyline per series; the
    text `empty` where there is nothing to draw."""
    left, top, right, bottom = box
    draw.text((left, top - 16), title, fill="black")
    draw.rectangle(box, outline="black")
    values = [v for points in series.values() for v in points if v is not None and math.isfinite(v)]
    if not values or not epochs:
        draw.text((left + 8, top + 8), empty, fill="grey")
        return
    low, high = min(values), max(values)
    if high == low:
        low, high = low - 1, high + 1
    first, last = min(epochs), max(epochs)
    span = max(last - first, 1)

    def xy(epoch: float, value: float) -> tuple[float, float]:
        return (
            left + 6 + (epoch - first) / span * (right - left - 12),
            bottom - 6 - (value - low) / (high - low) * (bottom - top - 12),
        )

    draw.text((left - 58, top), f"{high:.4g}", fill="black")
    draw.text((left - 58, bottom - 12), f"{low:.4g}", fill="black")
    draw.text((left, bottom + 4), f"epoch {first}", fill="black")
    draw.text((right - 60, bottom + 4), f"epoch {last}", fill="black")
    for slot, (name, points) in enumerate(series.items()):
        colour = _COLOURS[slot % len(_COLOURS)]
        line = [xy(e, v) for e, v in zip(epochs, points) if v is not None and math.isfinite(v)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        legend_y = top + 6 + 14 * slot
        draw.line((right - 150, legend_y + 6, right - 135, legend_y + 6), fill=colour, width=2)
        draw.text((right - 130, legend_y), name, fill=colour)


def plot_metrics(rows: Sequence[dict], path: str | Path, validates: bool = True) -> None:
    """Draw the losses (left) and validation recalls (right) per epoch of `rows` to a PNG, atomically (Pillow).
    For a run that does not validate during training (`validates=False`: train_dhe.py) the recall panel says so."""
    path = Path(path)
    epochs = [int(row["epoch"]) for row in rows]

    def column(name: str) -> list:
        return [float(row[name]) if row.get(name) not in (None, "") else None for row in rows]

    names = list(dict.fromkeys(key for row in rows for key in row))
    losses = {name: column(name) for name in names if name.endswith("loss")}
    recalls = {name: column(name) for name in names if name.startswith("val_")}
    image = Image.new("RGB", (1000, 400), "white")
    draw = ImageDraw.Draw(image)
    _panel(draw, (70, 30, 480, 360), "training losses (epoch mean)", losses, epochs)
    empty = "no data yet" if validates else "no validation during training:\nthe test recalls are in results.json"
    _panel(draw, (570, 30, 980, 360), "validation recalls (%)", recalls, epochs, empty)
    with replaced_atomically(path) as temporary:
        image.save(temporary, format="PNG")


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
