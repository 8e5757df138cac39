"""`eval.py` end to end on a tiny hand-made dataset whose recalls can be worked out by hand.

Queries are exact (lossless) copies of database images, so with any weights their global descriptors equal those of
the copied image, and a DHE head that always predicts the identity homography gives the copy every mutual match as
an inlier (64 on an 8 x 8 grid). q0 copies d1 (1 m away) and q1 copies d3 (2 m away): both are hits at rank 1,
before and after re-ranking. q2 copies d0 but lies 5 km away: it has no positive and counts as a miss. So R@1 = R@5
= 2/3 = 66.7 % in both stages.

The tests of what happens when things go wrong (interruptions, results never destroyed, odd numbers, resources) run
on the session's tiny synthetic world at --resize 64 64 with one CCT block.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import eval_argv, save_identity_head, wait_for
from PIL import Image

import commons
import eval as eval_script
import util
from evaluation import local_features, retrieval
from evaluation.local_features import LocalFeatureStore
from model import FeaturesExtractor
from model.checkpoints import save_state_dict

ROOT = Path(__file__).resolve().parent.parent
SIZE = 128
TRUNC_TE = 2  # two transformer blocks keep the test fast; the checkpoint is saved at that depth
DATABASE = {
    "d0": (500000.0, 4000000.0),
    "d1": (500100.0, 4000000.0),
    "d2": (500200.0, 4000000.0),
    "d3": (500300.0, 4000000.0),
}
QUERIES = {"q0": ("d1", 500101.0, 4000000.0), "q1": ("d3", 500302.0, 4000000.0), "q2": ("d0", 505000.0, 4005000.0)}


@pytest.fixture(scope="module")
def handmade_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    split = root / "tiny" / "images" / "test"
    rng = np.random.default_rng(0)
    pixels = {}
    for name, (east, north) in DATABASE.items():
        pixels[name] = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        path = split / "database" / f"@{east:.2f}@{north:.2f}@33@T@@@{name}@@@@@@@@.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[name]).save(path)
    for name, (source, east, north) in QUERIES.items():
        path = split / "queries" / f"@{east:.2f}@{north:.2f}@33@T@@@{name}@@@@@@@@.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[source]).save(path)

    torch.manual_seed(0)
    save_state_dict(FeaturesExtractor(resize=(SIZE, SIZE), trunc_te=TRUNC_TE), root / "fe.torch")
    save_identity_head(root / "hr.torch", SIZE)
    return root


def run_eval(world: Path, *extra: str, device: str = "cpu") -> dict:
    options = {"resize": SIZE, "trunc_te": TRUNC_TE, "checkpoints": world, "device": device}
    return eval_script.cli(eval_argv(world / "tiny", "--infer_batch_size", "3", *extra, **options))


def test_eval_end_to_end_recalls_logs_and_predictions(handmade_world, tmp_path, monkeypatch, device):
    monkeypatch.chdir(tmp_path)
    result = run_eval(handmade_world, "--exp_name", "e2e", "--save_predictions", device=device)
    np.testing.assert_allclose(result["baseline_recalls"], [200 / 3, 200 / 3])
    np.testing.assert_allclose(result["reranked_recalls"], [200 / 3, 200 / 3])
    # the copy is first, and keeps every one of the 64 mutual matches under the identity homography
    assert result["reranked_predictions"][:, 0].tolist() == [1, 3, 0]
    assert result["rerank_scores"][:, 0].tolist() == [64, 64, 64]
    assert (result["rerank_scores"][:, 1:] < 64).all()

    folder = result["output_folder"]
    assert folder.parent == Path("logs") / "e2e"
    info = (folder / "info.log").read_text()
    lines = info.splitlines()
    assert "python " in lines[0] and "Arguments: Namespace(" in lines[1] and "Versions: python" in lines[2]
    assert "Test set: < BaseDataset, tiny - #database: 4; #queries: 3 >" in info
    assert "Asked for 32 predictions, but the database has only 4 images: using 4" in info
    assert "baseline test: R@1: 66.7, R@5: 66.7" in info
    assert "test after re-ranking - R@1: 66.7, R@5: 66.7" in info
    assert "Time: descriptors" in info and "re-ranking" in info
    assert (folder / "debug.log").exists()
    assert not (folder / "local_features.f16").exists()  # the temporary store is gone
    results = json.loads((folder / "results.json").read_text())
    assert results["baseline"] == {"R@1": pytest.approx(200 / 3), "R@5": pytest.approx(200 / 3)}
    assert results["reranked"] == results["baseline"] and results["split"] == "test"

    with open(folder / "predictions.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 3 * 2 * 4
    top = [r for r in rows if r["stage"] == "reranked" and r["rank"] == "0"]
    assert [(r["database_index"], r["score"]) for r in top] == [("1", "64"), ("3", "64"), ("0", "64")]
    assert "@q0@" in top[0]["query_path"] and "@d1@" in top[0]["database_path"]


MARGIN = 16  # px of noise on each side of a wide query: its centre square is the copied database image


@pytest.fixture(scope="module")
def wide_world(handmade_world, tmp_path_factory) -> Path:
    """handmade_world with wide queries (SIZE x SIZE + 2 * MARGIN): the copied database image framed left and right by
    MARGIN pixels of noise, so that each test method sees something else (only central_crop sees the exact copy)."""
    root = tmp_path_factory.mktemp("wide")
    shutil.copytree(handmade_world, root, dirs_exist_ok=True)
    rng = np.random.default_rng(1)
    for path in (root / "tiny" / "images" / "test" / "queries").glob("*.png"):
        copy = np.asarray(Image.open(path))
        margins = rng.integers(0, 256, (2, SIZE, MARGIN, 3), dtype=np.uint8)
        Image.fromarray(np.concatenate([margins[0], copy, margins[1]], axis=1)).save(path)
    return root


@pytest.mark.parametrize("test_method", ["single_query", "central_crop", "five_crops", "nearest_crop", "maj_voting"])
def test_eval_test_methods(wide_world, tmp_path, monkeypatch, test_method, device):
    # wide queries: each method describes them differently, and every method still finds the copies
    monkeypatch.chdir(tmp_path)
    extra = ("--test_method", test_method, "--num_reranked_preds", "2", "--save_predictions")
    result = run_eval(wide_world, *extra, device=device)
    np.testing.assert_allclose(result["baseline_recalls"], [200 / 3, 200 / 3])
    np.testing.assert_allclose(result["reranked_recalls"], [200 / 3, 200 / 3])
    assert result["rerank_scores"].shape == (3, 2)
    # the global distance of each query's top prediction, its copy: 0 only for the method that sees the copy alone
    with open(result["output_folder"] / "predictions.csv") as file:
        rows = list(csv.DictReader(file))
    top = [float(r["score"]) for r in rows if r["stage"] == "global" and r["rank"] == "0"]
    if test_method in ("nearest_crop", "maj_voting"):
        assert np.isnan(top).all()  # merged crops have no distance
    elif test_method == "central_crop":
        np.testing.assert_allclose(top, 0, atol=1e-6)
    else:  # the whole wide query, or the mean of five crops of which four take in noise
        assert min(top) > 1e-4


def test_eval_on_a_missing_dataset_leaves_no_run_folder(handmade_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        eval_script.cli(["--datasets_folder", str(handmade_world), "--dataset_name", "nowhere", "--device", "cpu"])
    assert not any((tmp_path / "logs").rglob("*.log"))


def test_eval_with_a_checkpoint_that_does_not_fit(handmade_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="DHE head checkpoint"):
        run_eval(handmade_world, "--resume_fe", str(handmade_world / "hr.torch"))
    assert not any((tmp_path / "logs").rglob("*.log"))


def test_eval_with_a_corrupt_image_names_it_and_leaves_no_run_folder(handmade_world, tmp_path, monkeypatch):
    world = tmp_path / "world"
    shutil.copytree(handmade_world, world)
    broken = next((world / "tiny" / "images" / "test" / "database").glob("*@d2@*"))
    broken.write_bytes(b"\x89PNG not really")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError, match=f"cannot read image {broken}"):
        run_eval(world)
    assert not any((tmp_path / "logs").rglob("*"))


def test_eval_with_local_features_in_memory_gives_the_same_ranking(handmade_world, tmp_path, monkeypatch):
    """All records in RAM and 5 pairs a pass (passes across queries) against the defaults (file, 16 a pass)."""
    monkeypatch.chdir(tmp_path)
    default = run_eval(handmade_world, "--exp_name", "file")
    in_memory = run_eval(
        handmade_world, "--exp_name", "memory", "--local_features_in_memory_mb", "1", "--rerank_batch_size", "5"
    )
    np.testing.assert_array_equal(in_memory["reranked_predictions"], default["reranked_predictions"])
    np.testing.assert_array_equal(in_memory["rerank_scores"], default["rerank_scores"])
    info = (in_memory["output_folder"] / "info.log").read_text()
    store = in_memory["output_folder"] / "local_features.f16"
    assert f"Local features: 7 images, 0.3 MB in cpu memory, 0.0 MB in {store}; re-ranking 5 pairs per pass" in info


def test_evaluate_split_from_plain_values(handmade_world, tmp_path):
    """The library without flags, as a notebook or a training loop calls it: the recalls of the command line."""
    from commons import ModelConfig, build_models
    from datasets_ws import BaseDataset
    from evaluation.pipeline import EvalSettings, evaluate_split

    dataset = BaseDataset(str(handmade_world), "tiny", "test", resize=(SIZE, SIZE))
    config = ModelConfig(
        (SIZE, SIZE), TRUNC_TE, resume_fe=handmade_world / "fe.torch", resume_hr=handmade_world / "hr.torch"
    )
    features_extractor, homography_regression = build_models(config, torch.device("cpu"))
    settings = EvalSettings(recall_values=(1, 5), infer_batch_size=3, num_workers=0)
    result = evaluate_split(settings, dataset, features_extractor, homography_regression, torch.device("cpu"), tmp_path)
    np.testing.assert_allclose(result["baseline_recalls"], [200 / 3, 200 / 3])
    np.testing.assert_allclose(result["reranked_recalls"], [200 / 3, 200 / 3])
    assert result["reranked_predictions"][:, 0].tolist() == [1, 3, 0] and result["output_folder"] == tmp_path
    assert list(tmp_path.iterdir()) == []  # the temporary local features are gone; nothing else is written


# -------------------------------------------------------------------- when things go wrong, on the tiny synthetic world
def run_folders(root: Path) -> list[Path]:
    return sorted(p for p in (root / "logs").glob("*/*") if p.is_dir()) if (root / "logs").exists() else []


# A wrapper around eval.py that, at the first store write (DataLoader workers running, local_features.f16 on disk),
# records the worker pids and the store path, then waits for the test's signal.
_SLOW_EVAL = """
import multiprocessing, sys, time
sys.path.insert(0, {root!r})
import eval as eval_script
from evaluation.local_features import LocalFeatureStore
marker = {marker!r}
write = LocalFeatureStore.write
def slow_write(self, indexes, features):
    write(self, indexes, features)
    pids = [str(p.pid) for p in multiprocessing.active_children()]
    with open(marker + ".tmp", "w") as file:
        file.write(str(self.path.resolve()) + "\\n" + " ".join(pids))
    import os; os.replace(marker + ".tmp", marker)
    time.sleep(60)
LocalFeatureStore.write = slow_write
sys.argv = ["eval.py", *{argv!r}]
try:
    eval_script.cli()
except eval_script.commons.Interrupted as interrupted:
    sys.exit(128 + interrupted.signum)
"""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGTERM])  # SIGHUP goes the same way: see the synthetic.py test
def test_sigterm_and_sighup_clean_up_like_ctrl_c(tiny_world, tmp_path, signum):
    marker = tmp_path / "started"
    argv = eval_argv(tiny_world, "--num_workers", "1", "--infer_batch_size", "4")
    script = _SLOW_EVAL.format(root=str(ROOT), marker=str(marker), argv=argv)
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(marker, process)
    store_path, worker_pids = marker.read_text().split("\n")
    assert Path(store_path).exists() and worker_pids  # mid-extraction, with a DataLoader worker
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum
    assert f"The run was interrupted ({signal.Signals(signum).name})" in stderr
    assert not Path(store_path).exists()
    assert run_folders(tmp_path) == []  # nothing was produced yet: nothing is left
    time.sleep(0.5)
    assert not any(pid_alive(int(pid)) for pid in worker_pids.split())


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX pipes")
def test_a_reader_that_stops_reading_does_not_kill_the_run(tiny_world, tmp_path):
    # as `eval.py ... 2>&1 | head -1`: the pipe closes after the first line
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "eval.py"), *eval_argv(tiny_world, "--exp_name", "piped")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    process.stdout.readline()
    process.stdout.close()
    assert process.wait(timeout=300) == 0
    (folder,) = run_folders(tmp_path)
    info = (folder / "info.log").read_text()
    assert "baseline test: R@1" in info and "test after re-ranking - R@1" in info


def test_a_failure_after_the_recalls_keeps_the_run_folder_and_says_what_failed(tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def disk_full(path, *args):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(util, "save_predictions", disk_full)
    with pytest.raises(OSError, match="No space left"):
        eval_script.cli(eval_argv(tiny_world, "--save_predictions"))
    (folder,) = run_folders(tmp_path)
    info = (folder / "info.log").read_text()
    assert "baseline test: R@1" in info and "test after re-ranking - R@1" in info
    assert "The run failed: OSError: [Errno 28] No space left on device" in info
    assert "is kept with the results logged so far" in info
    assert not (folder / "local_features.f16").exists()


def test_an_interruption_after_the_recalls_keeps_the_run_folder(tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def interrupted(*args):
        raise commons.Interrupted(signal.SIGTERM)

    monkeypatch.setattr(util, "save_predictions", interrupted)
    with pytest.raises(KeyboardInterrupt):
        eval_script.cli(eval_argv(tiny_world, "--save_predictions"))
    (folder,) = run_folders(tmp_path)
    info = (folder / "info.log").read_text()
    assert "test after re-ranking - R@1" in info and "The run was interrupted (SIGTERM)" in info


def test_a_failure_before_the_recalls_leaves_nothing(tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(retrieval, "compute_recalls", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        eval_script.cli(eval_argv(tiny_world))
    assert run_folders(tmp_path) == []


@pytest.mark.skipif(sys.platform != "linux", reason="file names as bytes")
def test_a_file_name_that_is_not_utf8_is_evaluated_and_saved(tiny_world, tmp_path, monkeypatch):
    import shutil

    world = tmp_path / "worlds" / "tiny"
    shutil.copytree(tiny_world, world)
    database = world / "images" / "test" / "database"
    first = sorted(os.listdir(database))[0]
    odd_name = os.fsencode(first).replace(b"@.jpg", b"caf\xe9@.jpg")  # Latin-1, not UTF-8
    os.rename(os.fsencode(database / first), os.fsencode(database) + b"/" + odd_name)
    monkeypatch.chdir(tmp_path)
    result = eval_script.cli(eval_argv(world, "--save_predictions"))
    csv_bytes = (result["output_folder"] / "predictions.csv").read_bytes()
    assert odd_name in csv_bytes  # the exact bytes, so the row still names the file


def test_non_finite_descriptors_are_reported_clearly(tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    forward = FeaturesExtractor.forward

    def nan_forward(self, images):
        global_descriptors, local_features = forward(self, images)
        return global_descriptors * float("nan"), local_features

    monkeypatch.setattr(FeaturesExtractor, "forward", nan_forward)
    with pytest.raises(ValueError, match=r"non-finite \(NaN or infinite\) database descriptors for 16 of 16 images"):
        eval_script.cli(eval_argv(tiny_world))
    assert run_folders(tmp_path) == []


def test_when_every_score_of_a_query_ties_the_global_order_is_kept(tiny_world, tmp_path, monkeypatch, caplog):
    # at 32 x 16 the grid is 2 x 1: never 4 mutual matches, so every re-ranking score is 0
    monkeypatch.chdir(tmp_path)
    argv = eval_argv(tiny_world, "--num_reranked_preds", "5")
    argv[argv.index("64") : argv.index("64") + 2] = ["32", "16"]
    result = eval_script.cli(argv)
    assert (result["rerank_scores"] == 0).all()
    np.testing.assert_array_equal(result["reranked_predictions"], result["predictions"])
    assert "For 6 of 6 queries every re-ranked candidate got the same score: they keep their global order" in (
        caplog.text
    )


def test_too_little_free_space_stops_before_extracting(tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(local_features.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1000, total=10**6))
    extracted = []
    monkeypatch.setattr(util, "extract_features", lambda *a, **k: extracted.append(1))
    with pytest.raises(OSError) as error:
        eval_script.cli(eval_argv(tiny_world))
    message = str(error.value)
    # 22 images x 384 channels x 4 x 4 positions x 2 bytes
    assert "the local features of 22 images need" in message and "(270336 bytes)" in message
    assert "local_features.f16" in message and "only 1e-06 GB are free" in message
    assert "--local_features_dir" in message
    assert extracted == [] and run_folders(tmp_path) == []


@pytest.mark.skipif(sys.platform == "win32", reason="resource limits")
def test_a_file_size_limit_below_the_store_size_stops_before_extracting(tiny_world, tmp_path, monkeypatch):
    import resource

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (100_000, resource.RLIM_INFINITY))
    with pytest.raises(OSError, match=r"more than this process's file-size limit of 100000 bytes \(ulimit -f\)"):
        eval_script.cli(eval_argv(tiny_world))


def test_local_features_dir_puts_the_file_elsewhere(tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "scratch"
    elsewhere.mkdir()
    seen = []
    init = LocalFeatureStore.__init__

    def spy(self, path, *args):
        seen.append(Path(path))
        init(self, path, *args)

    monkeypatch.setattr(LocalFeatureStore, "__init__", spy)
    eval_script.cli(eval_argv(tiny_world, "--local_features_dir", str(elsewhere)))
    assert seen[0].parent == elsewhere and seen[0].suffix == ".f16"
    assert list(elsewhere.iterdir()) == []  # deleted at the end


def test_eval_run_folder_blocked_by_a_file_one_line(tmp_path):
    (tmp_path / "logs").write_text("not a folder")
    argv = ["--datasets_folder", str(tmp_path), "--device", "cpu", "--num_workers", "0"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("eval.py: error: cannot create the run folder logs/default/")
    assert line.endswith("logs is a file, not a folder")
