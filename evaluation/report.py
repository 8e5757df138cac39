"""`preds/index.html`: one offline page over the prediction pictures of `eval.py --num_preds_to_save N`.

The page holds the recall table (before and after re-ranking), then one row per saved query, the queries whose
top prediction after re-ranking is wrong first, each with its picture linked relatively (the folder can be moved
or zipped). Plain HTML with inline CSS: no script, nothing fetched from the network. Every name is escaped.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model.files import replaced_atomically

REPORT_HTML = "index.html"

_STYLE = (
    "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
    "padding:4px 8px;vertical-align:top}.wrong{color:#c00}.correct{color:#080}img{max-width:100%}"
)


def _recall_table(recall_values: Sequence[int], baseline: np.ndarray | None, reranked: np.ndarray | None) -> str:
    if baseline is None:
        return "<p>No labels (--no_labels): no recalls.</p>"
    header = "".join(f"<th>R@{n}</th>" for n in recall_values)
    lines = [f"<table><tr><th></th>{header}</tr>"]
    for name, recalls in (("baseline", baseline), ("after re-ranking", reranked)):
        if recalls is not None:
            lines.append(f"<tr><th>{name}</th>" + "".join(f"<td>{v:.1f}</td>" for v in recalls) + "</tr>")
    return "\n".join(lines) + "</table>"


def report_order(correct: Sequence[bool | None]) -> list[int]:
    """Positions of `correct` (one per saved query; None without labels) in the page's order: wrong first, then
    correct, then unlabelled, each in query order."""
    rank = {False: 0, True: 1, None: 2}
    return sorted(range(len(correct)), key=lambda i: (rank[correct[i]], i))


def write_report(
    folder: str | Path,
    pictures: Sequence[Path],
    query_positions: Sequence[int],
    query_paths: Sequence[str],
    correct: Sequence[bool | None],
    recall_values: Sequence[int],
    baseline: np.ndarray | None,
    reranked: np.ndarray | None,
    title: str,
) -> Path:
    """Write `folder/index.html` atomically and return its path.

    Args:
        folder: the pictures' folder (`preds/`).
        pictures: (S,) the saved pictures, in `folder`.
        query_positions: (S,) their query positions; query_paths: (S,) their query images.
        correct: (S,) whether each query's top prediction after re-ranking is a positive (None: no labels).
        recall_values, baseline, reranked: the recall table ((len(recall_values),) each; None: not computed).
        title: the page's title (the dataset and split).
    """
    if not len(pictures) == len(query_positions) == len(query_paths) == len(correct):
        raise ValueError(
            f"expected one picture, query and correctness per saved query, got {len(pictures)}, "
            f"{len(query_positions)}, {len(query_paths)}, {len(correct)}"
        )
    folder = Path(folder)
    rows = []
    for i in report_order(correct):
        status = {False: "wrong", True: "correct", None: "no label"}[correct[i]]
        link = html.escape(Path(pictures[i]).relative_to(folder).as_posix(), quote=True)
        name = html.escape(Path(query_paths[i]).name)
        rows.append(
            f'<tr><td>{int(query_positions[i])}</td><td>{name}</td><td class="{status.replace(" ", "-")}">{status}'
            f'</td><td><a href="{link}"><img src="{link}" alt="query {int(query_positions[i])}" loading="lazy">'
            "</a></td></tr>"
        )
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            _recall_table(recall_values, baseline, reranked),
            f"<h2>{len(rows)} queries (top-1 after re-ranking wrong first)</h2>",
            "<table><tr><th>query</th><th>image</th><th>top-1 after re-ranking</th><th>picture</th></tr>",
            *rows,
            "</table></body></html>",
        ]
    )
    path = folder / REPORT_HTML
    with replaced_atomically(path) as temporary:
        temporary.write_text(page + "\n", encoding="utf-8")
    return path
