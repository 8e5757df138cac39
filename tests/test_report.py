"""`preds/index.html` (`evaluation.report`): every link resolves, the wrong queries come first, names are escaped,
nothing is fetched from the network; and `eval.py --num_preds_to_save` writes it."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from helpers import eval_argv

import eval as eval_script
from evaluation import report


class Page(HTMLParser):
    """The links, scripts, table rows (cell texts) and text of a page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.links: list[str] = []
        self.scripts = 0
        self.rows: list[list[str]] = []
        self.in_row = False
        self.text = ""
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.links += [attributes[name] for name in ("href", "src") if name in attributes]
        self.scripts += tag == "script"
        if tag == "tr":
            self.rows.append([])
            self.in_row = True

    def handle_endtag(self, tag):
        self.in_row = self.in_row and tag != "tr"

    def handle_data(self, data):
        self.text += data
        if self.in_row and data.strip():
            self.rows[-1].append(data.strip())


def read_page(path: Path) -> Page:
    page = Page(path.read_text(encoding="utf-8"))
    assert page.links and page.scripts == 0
    for link in page.links:
        assert "://" not in link and (path.parent / link).is_file(), link  # relative, and it resolves
    return page


def test_report_orders_escapes_and_links(tmp_path):
    pictures = []
    for q in range(4):
        pictures.append(tmp_path / f"{q:04d}.png")
        pictures[-1].write_bytes(b"png")
    queries = ["a.jpg", "b<&>.jpg", 'c".jpg', "d.jpg"]
    correct = [True, False, True, False]
    path = report.write_report(
        tmp_path, pictures, [0, 1, 2, 3], queries, correct, (1, 5), np.array([50.0, 75.0]), np.array([60, 80.0]), "t"
    )
    assert path == tmp_path / "index.html"
    page = read_page(path)
    query_rows = [row for row in page.rows if row[0].isdigit()]
    assert [row[0] for row in query_rows] == ["1", "3", "0", "2"]  # wrong first, each in query order
    assert [row[1] for row in query_rows] == ["b<&>.jpg", "d.jpg", "a.jpg", 'c".jpg']  # escaped, read back intact
    assert [row[2] for row in query_rows] == ["wrong", "wrong", "correct", "correct"]
    assert ["baseline", "50.0", "75.0"] in page.rows and ["after re-ranking", "60.0", "80.0"] in page.rows
    assert "b<&>" not in path.read_text()


def test_report_order_without_labels():
    assert report.report_order([None, False, True, None]) == [1, 2, 0, 3]


def test_eval_writes_index_html(tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = eval_argv(tiny_world, "--num_reranked_preds", "4", "--num_preds_to_save", "2", "--exp_name", "page")
    result = eval_script.cli(argv)
    folder = result["output_folder"] / "preds"
    page = read_page(folder / "index.html")
    assert sorted(set(page.links)) == sorted(p.name for p in folder.glob("*.png"))  # every picture, and only them
    query_rows = [row for row in page.rows if row[0].isdigit()]
    statuses = [row[2] for row in query_rows]
    num_queries = len(result["reranked_predictions"])
    wrong = round(num_queries * (1 - result["reranked_recalls"][0] / 100))
    assert statuses == ["wrong"] * wrong + ["correct"] * (num_queries - wrong)
    assert "R@1" in page.text and f"{result['baseline_recalls'][0]:.1f}" in page.text
