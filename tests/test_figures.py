"""The matplotlib figures: the training chart (`training.records.training_figure`, training_curves.png) and eval's
Recall@N curves (`evaluation.figures.recalls_figure`, recalls.png): their series, their PNG metadata, and eval.py
writing recalls.png (or, without labels, saying why it does not)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from helpers import eval_argv
from PIL import Image

import eval as eval_script
from evaluation import figures
from training import records

ROWS = [
    {"epoch": 0, "loss": 2.0, "triplet_loss": 0.5, "lr": 1e-5, "seconds": 1.0, "val_R@1": 40.0, "val_R@5": 60.0},
    {"epoch": 1, "loss": 1.5, "triplet_loss": 0.4, "lr": 8e-6, "seconds": 1.0, "val_R@1": 45.0, "val_R@5": 65.0}
    | {"val_reranked_R@1": 55.0, "val_reranked_R@5": 70.0},
]


def is_matplotlib_png(path: Path) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG" and image.info.get("Software", "").startswith("Matplotlib")


def series(axes) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.lines}


def test_training_figure_series():
    figure = records.training_figure(ROWS)
    loss_axes, lr_axes, recall_axes = figure.axes[0], figure.axes[2], figure.axes[1]
    assert series(loss_axes) == {"loss": ([0, 1], [2.0, 1.5]), "triplet_loss": ([0, 1], [0.5, 0.4])}
    assert series(lr_axes) == {"lr (right axis)": ([0, 1], [1e-5, 8e-6])} and lr_axes.get_yscale() == "log"
    recalls = series(recall_axes)
    assert list(recalls) == ["R@1", "R@5", "reranked_R@1", "reranked_R@5"]
    assert recalls["R@5"] == ([0, 1], [60.0, 65.0])
    assert math.isnan(recalls["reranked_R@1"][1][0]) and recalls["reranked_R@1"][1][1] == 55.0  # a gap at epoch 0
    assert [t.get_text() for t in loss_axes.get_legend().get_texts()] == ["loss", "triplet_loss", "lr (right axis)"]
    assert loss_axes.get_xlabel() == recall_axes.get_xlabel() == "epoch"
    assert all(axes.xaxis._major_tick_kw.get("gridOn") for axes in (loss_axes, recall_axes))


@pytest.mark.parametrize(("validates", "text"), [(True, "no data yet"), (False, "no validation during training")])
def test_training_figure_without_recalls_says_why(validates, text):
    rows = [{k: v for k, v in row.items() if not k.startswith("val_")} for row in ROWS]
    recall_axes = records.training_figure(rows, validates).axes[1]
    assert not recall_axes.lines and text in recall_axes.texts[0].get_text()


def test_plot_metrics_writes_a_matplotlib_png(tmp_path):
    path = tmp_path / records.PLOT_PNG
    records.plot_metrics([{k: str(v) for k, v in row.items()} for row in ROWS], path)  # as read from metrics.csv
    assert is_matplotlib_png(path) and Image.open(path).size == (1000, 400)
    assert [p.name for p in tmp_path.iterdir()] == [records.PLOT_PNG]  # no temporary file left


def test_recalls_figure_series():
    baseline, reranked = np.array([40.0, 60.0, 70.0]), np.array([50.0, 65.0, 72.0])
    axes = figures.recalls_figure((1, 5, 10), baseline, reranked).axes[0]
    assert series(axes) == {
        figures.BASELINE_LABEL: ([1, 5, 10], [40.0, 60.0, 70.0]),
        figures.RERANKED_LABEL: ([1, 5, 10], [50.0, 65.0, 72.0]),
    }
    assert [t.get_text() for t in axes.get_xticklabels()] == ["1", "5", "10"]
    assert axes.get_xlabel().startswith("N") and axes.get_ylabel() == "Recall@N (%)"
    assert list(series(figures.recalls_figure((1, 5), baseline[:2], None).axes[0])) == [figures.BASELINE_LABEL]


def test_eval_writes_recalls_png(tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = eval_script.cli(eval_argv(tiny_world, "--num_reranked_preds", "4", "--exp_name", "curves"))
    path = result["output_folder"] / figures.RECALLS_PNG
    assert is_matplotlib_png(path)

    unlabelled = eval_script.cli(eval_argv(tiny_world, "--num_reranked_preds", "4", "--no_labels"))
    assert not (unlabelled["output_folder"] / figures.RECALLS_PNG).exists()
    info = (unlabelled["output_folder"] / "info.log").read_text()
    assert f"No labels (--no_labels): no recalls to draw, {figures.RECALLS_PNG} not written" in info
