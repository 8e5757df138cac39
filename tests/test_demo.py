"""demo.py's own parts (the stages are the scripts, tested elsewhere): the recall table, world reuse, bad flags."""

from __future__ import annotations

import json

import pytest
from helpers import MICRO

import demo
from tools import outputs as tool_outputs
from tools.synthetic import cli as synthetic_cli
from tools.synthetic import world as synthetic_world


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
    flags = ["--out", str(tmp_path), "--name", demo.DATASET_NAME, "--seed", "0", *demo.WORLD_FLAGS]
    tool_outputs.write_marker(world, synthetic_world.TOOL, synthetic_cli.settings_of_flags(flags))
    assert demo.ensure_world(tmp_path, seed=0) is True
    assert "Reusing the synthetic world" in capsys.readouterr().out
    assert sorted(p.name for p in world.iterdir()) == [tool_outputs.MARKER, "images"]


@pytest.mark.parametrize("argv", [["--num_workers", "-1"], ["--seed", "-3"], ["--exp_name", "a/b"]])
def test_bad_flags_are_refused(argv):
    with pytest.raises(SystemExit):
        demo.parse_arguments(argv)


def test_main_chains_the_stages(tmp_path, monkeypatch, capsys):
    """Stand-in scripts: each checks the checkpoints it is given and writes its results.json."""
    (tmp_path / "data" / demo.DATASET_NAME / "images" / "test" / "queries").mkdir(parents=True)
    flags = ["--out", str(tmp_path / "data"), "--name", demo.DATASET_NAME, "--seed", "0", *demo.WORLD_FLAGS]
    settings = synthetic_cli.settings_of_flags(flags)
    tool_outputs.write_marker(tmp_path / "data" / demo.DATASET_NAME, synthetic_world.TOOL, settings)
    calls = []

    def fake(name, files):
        def cli(argv):
            calls.append((name, argv))
            folder = tmp_path / name
            folder.mkdir()
            for file in files:
                (folder / file).touch()
            recalls = {"R@1": 10.0 * len(calls), "R@5": 50.0}
            (folder / "results.json").write_text(json.dumps({"baseline": recalls, "reranked": recalls}))
            return {"output_folder": folder}

        return cli

    head = f"homography_regression_{demo.DHE_EPOCHS - 1:03d}.torch"
    monkeypatch.setattr(demo.train_dhe, "cli", fake("dhe", [head]))
    monkeypatch.setattr(demo.finetune, "cli", fake("joint", []))
    monkeypatch.setattr(demo.evaluation, "cli", fake("test", []))
    result = demo.main(demo.parse_arguments(["--datasets_folder", str(tmp_path / "data"), "--device", "cpu"]))
    assert [name for name, _ in calls] == ["dhe", "joint", "test"]
    joint_argv, test_argv = calls[1][1], calls[2][1]
    assert joint_argv[joint_argv.index("--resume_hr") + 1] == str(tmp_path / "dhe" / head)
    assert test_argv[test_argv.index("--resume_fe") + 1] == str(
        tmp_path / "joint" / f"features_extractor_{demo.FINETUNE_EPOCHS - 1:03d}.torch"
    )
    assert result["eval"]["baseline"]["R@1"] == 30.0
    out = capsys.readouterr().out
    assert "Reusing the synthetic world" in out and "python eval.py" in out and "finetuned  re-ranked" in out


def test_demo_does_not_train_on_a_folder_that_is_not_its_world(tmp_path):
    world = tmp_path / demo.DATASET_NAME / "images" / "test" / "queries"
    world.mkdir(parents=True)
    (world / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(SystemExit, match="is not a world that synthetic.py wrote"):
        demo.ensure_world(tmp_path, seed=0)
    assert (world / "holiday.jpg").read_bytes() == b"jpeg"


def test_demo_does_not_reuse_a_world_of_other_settings(tmp_path, capsys):
    """E.g. `synthetic.py --name synthetic_demo` with the default sizes: not the world the demo's numbers are for."""
    synthetic_world.generate_world(tmp_path, demo.DATASET_NAME, seed=0, **MICRO)
    with pytest.raises(SystemExit, match="was generated with other settings"):
        demo.ensure_world(tmp_path, seed=0)


def test_demo_reuses_its_world_whatever_the_seed(tmp_path, capsys):
    """The README's seed table: --seed changes the training, not the world."""
    from tools import outputs as tool_outputs

    world = tmp_path / demo.DATASET_NAME
    (world / "images").mkdir(parents=True)
    flags = ["--out", str(tmp_path), "--name", demo.DATASET_NAME, "--seed", "3", *demo.WORLD_FLAGS]
    tool_outputs.write_marker(world, synthetic_world.TOOL, synthetic_cli.settings_of_flags(flags))
    assert demo.ensure_world(tmp_path, seed=0) is True
    assert "of seed 3" in capsys.readouterr().out
