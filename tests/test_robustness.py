"""What happens when things go wrong (issue 9): interruptions, results kept, checkpoints from the wild, odd
datasets, odd numbers, resources, concurrency, synthetic.py. Each test fails without the handling it checks.

End-to-end runs use the tiny synthetic world at --resize 64 64 with one CCT block, on CPU.
"""

from __future__ import annotations

import io
import os
import pickle
import signal
import subprocess
import sys
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import eval_argv

import commons
import eval as eval_script
import parser
import util
from datasets_ws import BaseDataset
from evaluation import local_features, retrieval
from evaluation.local_features import LocalFeatureStore
from model import FeaturesExtractor, HomographyRegression
from model.checkpoints import (
    GRID_METADATA_KEY,
    CheckpointMismatchError,
    NotACheckpointError,
    load_features_extractor,
    load_homography_regression,
    load_state_dict_file,
    save_state_dict,
)
from model.files import replaced_atomically
from model.rerank import rerank_order
from tools.synthetic import cli as synthetic_cli
from tools.synthetic import world as synthetic_world

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    """`synthetic.py --preset tiny` (16 database images and 6 queries in the test split)."""
    return synthetic_cli.main(["--out", str(tmp_path_factory.mktemp("worlds")), "--name", "tiny", "--preset", "tiny"])


def run_folders(root: Path) -> list[Path]:
    return sorted(p for p in (root / "logs").glob("*/*") if p.is_dir()) if (root / "logs").exists() else []


# ----------------------------------------------------------------------------------------- 1. interruptions
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


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never got going"
        time.sleep(0.05)


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


def test_pipe_safe_stream_survives_a_broken_pipe():
    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = commons.pipe_safe(os.fdopen(write_end, "w"))
    assert stream.write("lost\n") == 5
    stream.flush()
    stream.write("still fine\n")
    assert stream.broken


class _SignalsItselfWhenCollected:
    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000):  # Python runs the handler here, inside __del__, which swallows what it raises
            pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_signal_swallowed_by_a_finalizer_stops_the_run_at_the_next_step():
    restore = commons.install_signal_handlers()
    try:
        commons.raise_if_interrupted()  # nothing received yet
        _SignalsItselfWhenCollected()  # collected at once: the Interrupted it raises is only printed
        with pytest.raises(commons.Interrupted) as error:
            commons.raise_if_interrupted()
        assert error.value.signum == signal.SIGTERM
    finally:
        restore()
    commons.raise_if_interrupted()  # restoring the handlers forgets the signal


# The main process signalled just after forking a DataLoader worker: the Interrupted leaves torch's iterator before
# it registers the worker, so nothing shuts that worker down. At exit multiprocessing sends it SIGTERM and waits.
_SIGNAL_WHILE_STARTING_A_WORKER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import multiprocessing.process
from torch.utils.data import DataLoader
import commons
start = multiprocessing.process.BaseProcess.start
def start_then_signal(self):
    start(self)
    os.kill(os.getpid(), signal.SIGTERM)
multiprocessing.process.BaseProcess.start = start_then_signal
commons.install_signal_handlers()
try:
    for batch in DataLoader(list(range(8)), batch_size=2, num_workers=1, worker_init_fn=commons.worker_init):
        pass
except commons.Interrupted as interrupted:
    sys.exit(128 + interrupted.signum)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_worker_left_behind_by_a_signal_does_not_hang_the_exit():
    # a worker that ignored SIGTERM hung the exit for ever; one killed by it would be a "killed by signal" error
    script = _SIGNAL_WHILE_STARTING_A_WORKER.format(root=str(ROOT))
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 128 + signal.SIGTERM, completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr and "Exception ignored" not in completed.stderr, completed.stderr


# ------------------------------------------------------------------------------------ 2. results never destroyed
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


# ------------------------------------------------------------------------------------ 3. checkpoints from the wild
class _Numpy1Pickler(pickle._Pickler):
    """Pickles numpy objects under numpy 1.x's module names (`numpy.core.multiarray`), as old checkpoints have."""

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "") or ""
        if module.startswith("numpy._core"):
            qualified = f"{module.replace('numpy._core', 'numpy.core')}\n{name or obj.__name__}\n"
            self.write(pickle.GLOBAL + qualified.encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


def test_benchmark_checkpoint_pickled_under_numpy_1_loads(tmp_path):
    features_extractor = FeaturesExtractor(resize=(64, 64), trunc_te=1)
    renames = {"encoder.": "module.backbone.", "pool.": "module.aggregation."}
    state_dict = {
        renames[k.split(".")[0] + "."] + k.split(".", 1)[1]: v for k, v in features_extractor.state_dict().items()
    }
    checkpoint = {"epoch_num": 3, "model_state_dict": state_dict, "recalls": np.array([80.1, 90.2])}
    checkpoint["best_r5"] = np.float64(90.2)
    path = tmp_path / "CCT14_msls.pth"
    shim = types.SimpleNamespace(Pickler=_Numpy1Pickler, Unpickler=pickle.Unpickler, __name__="pickle")
    torch.save(checkpoint, path, pickle_module=shim)
    assert b"numpy.core.multiarray\n_reconstruct" in zipfile.ZipFile(path).read("CCT14_msls/data.pkl")
    loaded = load_state_dict_file(path)
    assert loaded["recalls"].tolist() == [80.1, 90.2] and loaded["best_r5"] == 90.2
    load_features_extractor(FeaturesExtractor(resize=(64, 64), trunc_te=1), path)


def _truncated_checkpoint(path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(HomographyRegression(resize=(32, 32)).state_dict(), buffer)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


@pytest.mark.parametrize(
    ("make", "looks_like"),
    [
        (lambda p: p.write_text("these are not weights\n"), "is a text file"),
        (lambda p: p.write_text("<!DOCTYPE html>\n<html><head><title>Sign in</title>"), "is an HTML page"),
        (
            lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab12\nsize 123\n"),
            "is a Git LFS pointer",
        ),
        (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
        (lambda p: p.mkdir(), "is a folder"),
        (_truncated_checkpoint, "is a damaged or truncated zip archive"),
        (lambda p: p.write_bytes(b"\x00\x01\x02\x03binary"), "is not a torch checkpoint"),
    ],
    ids=["text", "html", "git-lfs", "empty", "folder", "truncated-zip", "binary"],
)
def test_files_that_are_not_checkpoints_say_what_they_look_like(tmp_path, make, looks_like):
    path = tmp_path / "finetunedDHE_pitts30k.torch"
    make(path)
    with pytest.raises(NotACheckpointError) as error:
        load_homography_regression(HomographyRegression(resize=(32, 32)), path)
    message = str(error.value)
    assert str(path) in message and looks_like in message
    assert "weights_only" not in message


def test_a_checkpoint_with_other_objects_is_refused_without_unsafe_advice(tmp_path):
    path = tmp_path / "pickled_model.torch"
    torch.save({"model": HomographyRegression(resize=(32, 32))}, path)
    with pytest.raises(NotACheckpointError) as error:
        load_state_dict_file(path)
    message = str(error.value)
    assert "objects other than tensors" in message and "HomographyRegression" in message
    assert "weights_only" not in message


def test_a_checkpoint_for_another_resize_is_refused_even_with_the_same_patch_count(tmp_path):
    # 192 x 128 and 128 x 192 both have 96 patches: every shape matches, only the recorded grid differs
    save_state_dict(FeaturesExtractor(resize=(192, 128), trunc_te=1), tmp_path / "fe.torch")
    save_state_dict(HomographyRegression(resize=(192, 128)), tmp_path / "hr.torch")
    with pytest.raises(CheckpointMismatchError, match=r"12 x 8 feature grid \(--resize 192 128\).*8 x 12"):
        load_features_extractor(FeaturesExtractor(resize=(128, 192), trunc_te=1), tmp_path / "fe.torch")
    with pytest.raises(CheckpointMismatchError, match="another --resize"):
        load_homography_regression(HomographyRegression(resize=(128, 192)), tmp_path / "hr.torch")
    load_homography_regression(HomographyRegression(resize=(192, 128)), tmp_path / "hr.torch")


def test_the_original_loads_our_checkpoints_strictly_and_the_grid_is_in_the_metadata(tmp_path):
    head = HomographyRegression(resize=(48, 32))
    save_state_dict(head, tmp_path / "hr.torch")
    saved = torch.load(tmp_path / "hr.torch", weights_only=False)  # as the original's torch.load
    assert set(saved) == set(head.state_dict())  # no extra key
    assert saved._metadata[""][GRID_METADATA_KEY] == (3, 2)
    HomographyRegression(resize=(48, 32)).load_state_dict(saved, strict=True)


def test_a_foreign_file_with_576_positions_is_taken_as_the_originals_24_x_24(tmp_path):
    # no recorded grid: 576 positions can only be the original's 24 x 24, not 12 x 48
    state_dict = dict(FeaturesExtractor(resize=(192, 768), trunc_te=1).state_dict())
    torch.save(state_dict, tmp_path / "foreign.torch")
    with pytest.raises(CheckpointMismatchError, match=r"24 x 24 feature grid \(--resize 384 384\)"):
        load_features_extractor(FeaturesExtractor(resize=(192, 768), trunc_te=1), tmp_path / "foreign.torch")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_saved_files_get_the_permissions_of_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        save_state_dict(HomographyRegression(resize=(32, 32)), tmp_path / "hr.torch")
        util.save_results(tmp_path / "results.json", [1], [50.0], None)
    finally:
        os.umask(previous)
    assert (tmp_path / "hr.torch").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_write_interrupted_midway_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("complete\n")
    with pytest.raises(commons.Interrupted), replaced_atomically(path) as temporary:
        temporary.write_text("half")
        raise commons.Interrupted(signal.SIGTERM)
    assert path.read_text() == "complete\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path):
    head = HomographyRegression(resize=(32, 32))
    with torch.no_grad():
        head.linear.bias[3] = float("nan")
    save_state_dict(head, tmp_path / "hr.torch")
    with pytest.raises(
        CheckpointMismatchError, match=r"non-finite values \(NaN or infinite\) in 1 tensors: linear.bias"
    ):
        load_homography_regression(HomographyRegression(resize=(32, 32)), tmp_path / "hr.torch")


# ------------------------------------------------------------------------------------------------- 4. odd datasets
@pytest.fixture
def world_copy(tiny_world, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(tiny_world, tmp_path / "worlds" / "tiny"))


def open_split(world: Path, split: str = "test") -> BaseDataset:
    """A split of `world` as eval.py opens it."""
    args = parser.parse_arguments("eval", eval_argv(world))
    return BaseDataset(str(world.parent), world.name, split, **parser.dataset_options(args))


def test_symlink_loops_and_links_back_do_not_duplicate_images(world_copy, caplog):
    count = len(open_split(world_copy).database_paths)
    database = world_copy / "images" / "test" / "database"
    (database / "loop").symlink_to(".")  # a loop: database/loop/loop/...
    (database / "again").symlink_to(database)  # a link back to the same folder
    first = sorted(database.glob("*.jpg"))[0]
    (database / "link.jpg").symlink_to(first)  # a second name for one image
    dataset = open_split(world_copy)
    assert dataset.database_num == count
    assert str(first) in dataset.database_paths  # the plain path is the one kept
    assert "a symlink loop" in caplog.text and "reached twice (through links) and used once" in caplog.text


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
def test_a_fifo_named_like_an_image_is_skipped_and_never_opened(world_copy, caplog):
    from datasets_ws import open_rgb_image

    queries = world_copy / "images" / "test" / "queries"
    fifo = queries / "@500000.00@4000000.00@33@T@@@fifo@@@@@@@@.jpg"
    os.mkfifo(fifo)
    dataset = open_split(world_copy)
    assert str(fifo) not in dataset.queries_paths
    assert f"{fifo} (a FIFO)" in caplog.text
    with pytest.raises(OSError, match="not a regular file"):
        open_rgb_image(str(fifo))  # returns at once instead of blocking on open()


def test_exif_orientation_turns_photos_upright(world_copy):
    from PIL import Image

    queries = world_copy / "images" / "test" / "queries"
    upright_jpg = sorted(queries.glob("*.jpg"))[0]
    with Image.open(upright_jpg) as image:
        upright = image.convert("RGB").crop((0, 0, image.width, image.height * 3 // 4))  # not square
    upright_jpg.unlink()
    upright.save(upright_jpg.with_suffix(".png"))
    # a camera held sideways stores the pixels turned, with orientation 6: "rotate 90 degrees clockwise to show"
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = queries / upright_jpg.name.replace("@.jpg", "sideways@.png")
    upright.transpose(Image.Transpose.ROTATE_90).save(sideways, exif=exif)
    dataset = open_split(world_copy)
    index = dataset.database_num + dataset.queries_paths.index(str(sideways))
    reference = dataset.database_num + dataset.queries_paths.index(str(upright_jpg.with_suffix(".png")))
    assert torch.equal(dataset.hard_resized(index), dataset.hard_resized(reference))


def test_a_query_that_is_a_database_image_through_a_link_is_refused(world_copy):
    split = world_copy / "images" / "test"
    image = sorted((split / "database").glob("*.jpg"))[0]
    (split / "queries" / image.name).symlink_to(image)
    with pytest.raises(ValueError, match=f"query {split / 'queries' / image.name} is the same file as database"):
        open_split(world_copy)


def test_a_training_split_linked_into_the_test_split_is_refused(world_copy):
    test_database = world_copy / "images" / "test" / "database"
    (test_database / "from_train").symlink_to(world_copy / "images" / "train" / "database")
    with pytest.raises(ValueError, match=r"the test split .* are the same files as images of the train split"):
        open_split(world_copy)
    with pytest.raises(ValueError, match=r"the train split .* the test split"):
        open_split(world_copy, "train")


# -------------------------------------------------------------------------------------------------- 5. odd numbers
@pytest.mark.parametrize(
    ("script", "argv", "message"),
    [
        ("eval", ["--seed", "-1"], "--seed -1: must be between 0 and 4294967295"),
        ("eval", ["--seed", str(2**32)], "--seed 4294967296: must be between 0 and 4294967295"),
        ("eval", ["--majority_weight", "nan"], "--majority_weight nan: must be a finite number"),
        ("eval", ["--majority_weight", "-0.5"], "--majority_weight -0.5: must be in [0, inf)"),
        ("eval", ["--hue", "0.7"], "--hue 0.7: must be in [0, 0.5]"),
        ("eval", ["--random_resized_crop", "1"], "--random_resized_crop 1.0: must be in [0, 1)"),
        ("eval", ["--val_positive_dist_threshold", str(10**20)], "must be at most 2147483647"),
        ("finetune", ["--lr", "inf"], "--lr inf: must be a finite number"),
        ("finetune", ["--lr", "0"], "--lr 0.0: must be in (0, inf)"),
        ("finetune", ["--margin", "-1"], "--margin -1.0: must be in [0, inf)"),
        ("finetune", ["--patience", "0"], "--patience 0: must be a positive integer"),
        ("train_dhe", ["--qp_threshold", "-0.1"], "--qp_threshold -0.1: must be in (0, inf)"),
        ("train_dhe", ["--qp_threshold", "nan"], "--qp_threshold nan: must be a finite number"),
        ("eval", ["--local_features_dir", "/nonexistent/scratch"], "/nonexistent/scratch: not an existing folder"),
    ],
)
def test_numeric_flags_are_range_checked(script, argv, message, capsys):
    with pytest.raises(SystemExit):
        parser.parse_arguments(script, ["--datasets_folder", "d", *argv])
    assert message in capsys.readouterr().err


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


def test_nan_scores_are_reported_not_ranked():
    with pytest.raises(ValueError, match="re-ranking scores are not finite"):
        rerank_order(np.array([[3.0, np.nan, 1.0]]))
    order, tied = rerank_order(np.array([[1.0, 5.0, 1.0], [2.0, 2.0, 2.0]]))
    assert order.tolist() == [[1, 2, 0], [0, 1, 2]] and tied.tolist() == [False, True]  # ties as the original


# ---------------------------------------------------------------------------------------------------- 6. resources
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


def test_a_disk_that_fills_up_while_writing_says_so(tmp_path, monkeypatch):
    store = LocalFeatureStore(tmp_path / "local_features.f16", 4, (8, 2, 2))

    def full(fd, data, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(local_features.os, "pwrite", full)
    with pytest.raises(OSError, match=r"writing .*local_features.f16 failed \(No space left on device\).*need"):
        store.write([0], torch.zeros(1, 8, 2, 2))
    monkeypatch.undo()
    store.close()
    assert not (tmp_path / "local_features.f16").exists()


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


# -------------------------------------------------------------------------------------------------- 7. concurrency
def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    from datetime import datetime

    frozen = datetime(2024, 2, 29, 12, 0, 0)
    monkeypatch.setattr(commons, "datetime", types.SimpleNamespace(now=lambda: frozen))
    folders = [commons.make_run_folder("same", root=tmp_path) for _ in range(3)]
    assert [f.name for f in folders] == ["2024-02-29_12-00-00", "2024-02-29_12-00-00_1", "2024-02-29_12-00-00_2"]


def test_concurrent_runs_never_share_a_folder(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor
    from datetime import datetime

    frozen = datetime(2024, 2, 29, 12, 0, 0)
    monkeypatch.setattr(commons, "datetime", types.SimpleNamespace(now=lambda: frozen))
    with ThreadPoolExecutor(8) as pool:
        folders = list(pool.map(lambda _: commons.make_run_folder("same", root=tmp_path), range(16)))
    assert len(set(folders)) == 16 and all(f.is_dir() for f in folders)


# ---------------------------------------------------------------------------------------------------- 8. synthetic.py
def tiny_flags(out: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--name", "w", "--preset", "tiny", "--database_per_split", "2", "2", "4", *extra]


def test_synthetic_output_inside_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(SystemExit):
            synthetic_cli.main(tiny_flags(out))
        assert "a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("sheet", ["sheet.xyz", "sheet.jpg", "sheet"])
def test_synthetic_contact_sheet_that_cannot_be_written_is_refused_before_generating(tmp_path, capsys, sheet):
    with pytest.raises(SystemExit):
        synthetic_cli.main(tiny_flags(tmp_path / "out", "--contact_sheet", str(tmp_path / sheet)))
    assert f"contact sheet {tmp_path / sheet}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


_SLOW_SYNTHETIC = """
import sys, time
sys.path.insert(0, {root!r})
from interrupts import Interrupted
from tools.synthetic import cli, world
generate_split = world._generate_split
def slow(split_dir, *args):
    result = generate_split(split_dir, *args)
    open({marker!r}, "w").close()
    time.sleep(60)
    return result
world._generate_split = slow
try:
    cli.main({argv!r})
except Interrupted as interrupted:
    sys.exit(128 + interrupted.signum)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_synthetic_interrupted_by_sigterm_or_sighup_leaves_no_partial_folder(tmp_path, signum):
    marker = tmp_path / "started"
    script = _SLOW_SYNTHETIC.format(root=str(ROOT), marker=str(marker), argv=tiny_flags(tmp_path / "out"))
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    wait_for(marker, process)
    assert any(p.name.startswith(".w.partial-") for p in (tmp_path / "out").iterdir())
    process.send_signal(signum)
    process.communicate(timeout=60)
    assert process.returncode == 128 + signum
    assert list((tmp_path / "out").iterdir()) == []


def test_synthetic_removes_the_partial_folder_of_a_killed_run(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "out" / f".w.partial-{dead.pid}"
    (stale / "images").mkdir(parents=True)
    world = synthetic_cli.main(tiny_flags(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [world.name]
    assert f"Removing {stale}, left behind by an interrupted run" in caplog.text


def test_synthetic_second_run_on_one_name_refuses(tmp_path, monkeypatch):
    # a run that is still writing: its temporary folder names a live process
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / "out" / f".w.partial-{running.pid}"
        busy.mkdir(parents=True)
        with pytest.raises(FileExistsError, match=f"another run \\(process {running.pid}\\) is writing"):
            synthetic_world.generate_world(tmp_path / "out", "w", **synthetic_world.PRESETS["tiny"])
        assert busy.exists()  # the other run's folder is left alone
    finally:
        running.kill()
        running.wait()
    # a run that finished while this one was writing: the end refuses rather than replacing its world
    generate_split = synthetic_world._generate_split

    def meanwhile(split_dir, *args):
        (tmp_path / "out2" / "w" / "theirs").mkdir(parents=True, exist_ok=True)
        return generate_split(split_dir, *args)

    monkeypatch.setattr(synthetic_world, "_generate_split", meanwhile)
    with pytest.raises(FileExistsError, match="was written by another run meanwhile"):
        synthetic_world.generate_world(tmp_path / "out2", "w", **synthetic_world.PRESETS["tiny"])
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["w"]
    assert [p.name for p in (tmp_path / "out2" / "w").iterdir()] == ["theirs"]
