"""demo.py's own parts (the stages are the scripts, tested elsewhere): the recall table, world reuse, bad flags."""

from __future__ import annotations

import pytest

import demo


def test_recall_table_rows_and_values():
    dhe = {"baseline": {"R@1": 12.5, "R@5": 40.0}, "reranked": {"R@1": 30.0, "R@5": 47.5}}
    finetuned = {"baseline": {"R@1": 20.0, "R@5": 50.0}, "reranked": None}
    lines = demo.recall_table([("DHE initialised", dhe), ("finetuned", finetuned)]).splitlines()
    assert lines[0].split() == ["R@1", "R@5"]
    assert lines[1].split() == ["DHE", "initialised", "baseline", "12.5", "40.0"]
    assert lines[2].split() == ["DHE", "initialised", "re-ranked", "30.0", "47.5"]
    assert lines[3].split() == ["finetuned", "baseline", "20.0", "50.0"]
    assert len(lines) == 4  # a null stage is skipped


def test_existing_world_is_reused(tmp_path, capsys):
    world = tmp_path / demo.DATASET_NAME
    world.mkdir()
    (world / "images").mkdir()
    assert demo.ensure_world(tmp_path, seed=0) is True
    assert "Reusing the synthetic world" in capsys.readouterr().out
    assert [p.name for p in world.iterdir()] == ["images"]


@pytest.mark.parametrize("argv", [["--num_workers", "-1"], ["--seed", "-3"], ["--exp_name", "a/b"]])
def test_bad_flags_are_refused(argv):
    with pytest.raises(SystemExit):
        demo.parse_arguments(argv)
