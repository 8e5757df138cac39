"""Hostile inputs of the dataset tools (make_vg_dataset.py, synthetic.py, demo.py's world): a destructive --overwrite,
interrupted and concurrent runs, bad CSV rows."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import demo
import make_vg_dataset as make_vg_dataset_script
from tools import make_vg_dataset
from tools.synthetic import cli as synthetic_cli
from tools.synthetic import world as synthetic_world

ROOT = Path(__file__).resolve().parents[1]
MARKER = ".dataset_tool.json"  # the marker of the datasets the tools write (tool_outputs.MARKER)
MICRO = {  # the smallest synthetic world
    "image_size": (48, 64),
    "database_per_split": (2, 2, 2),
    "queries_per_split": (1, 1, 1),
    "images_per_street": 2,
    "database_spacing": 5.0,
}
LAT, LON = 45.4371, 12.3326


def make_photos(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(folder / name)
    return folder


def photo_csv(path: Path, rows: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"path,role,lat,lon\na.jpg,database,{LAT},{LON}\nq.jpg,queries,{LAT + 0.00002},{LON}\n{rows}")
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def inputs(tmp_path) -> tuple[Path, Path]:
    """(photos folder, CSV) in tmp_path/data."""
    photos = make_photos(tmp_path / "data" / "photos", ["a.jpg", "q.jpg"])
    return photos, photo_csv(tmp_path / "data" / "photos.csv")


# 1. --overwrite replaces only what the same tool wrote


def _user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    return folder


def _old_vg_dataset(tmp_path: Path) -> Path:
    """A dataset as make_vg_dataset.py wrote it before the marker: no way to tell it from a user's folder."""
    folder = tmp_path / "old" / "images" / "test" / "database"
    folder.mkdir(parents=True)
    (folder / "@1@2@33@T@45@12@@@@@@@@a@.jpg").write_bytes(b"jpeg")
    return tmp_path / "old"


def _file(tmp_path: Path) -> Path:
    (tmp_path / "a_file").write_text("keep me")
    return tmp_path / "a_file"


def _synthetic_world(tmp_path: Path) -> Path:
    return synthetic_world.generate_world(tmp_path, "world", **MICRO)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (lambda tmp_path: tmp_path / "data" / "photos", "holds the input"),  # the photos folder
        (lambda tmp_path: tmp_path / "data", "holds the input"),  # the parent of the photos and the CSV
        (_user_folder, f"has no {MARKER}"),
        (_old_vg_dataset, "delete it by hand (rm -r"),
        (_synthetic_world, "written by synthetic.py, not by make_vg_dataset.py"),
        (_file, "it is a file"),
    ],
    ids=["photos", "parent-of-inputs", "user-folder", "unmarked-old-dataset", "synthetic-world", "file"],
)
def test_make_vg_overwrite_refuses_what_it_did_not_write(inputs, tmp_path, capsys, target, message):
    photos, csv_path = inputs
    folder = target(tmp_path)
    before = snapshot(folder) if folder.is_dir() else folder.read_bytes()
    argv = ["--photos", str(photos), "--csv", str(csv_path), "--out", str(folder.parent), "--name", folder.name]
    with pytest.raises(SystemExit) as stop:
        make_vg_dataset_script.main([*argv, "--overwrite"])
    assert isinstance(stop.value.code, str) and message in stop.value.code and str(folder) in stop.value.code
    assert "\n" not in stop.value.code
    assert (snapshot(folder) if folder.is_dir() else folder.read_bytes()) == before
    assert not [p for p in folder.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_make_vg_overwrite_refuses_its_own_dataset_with_a_user_file_added(inputs, tmp_path):
    photos, csv_path = inputs
    folder = make_vg_dataset.make_vg_dataset(photos, csv_path, tmp_path / "out", "venice")
    (folder / "images" / "test" / "my_notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="did not write \\(images/test/my_notes.txt\\)"):
        make_vg_dataset.make_vg_dataset(photos, csv_path, tmp_path / "out", "venice", overwrite=True)
    assert (folder / "images" / "test" / "my_notes.txt").read_text() == "keep me"
    (folder / "images" / "test" / "my_notes.txt").unlink()
    assert make_vg_dataset.make_vg_dataset(photos, csv_path, tmp_path / "out", "venice", overwrite=True) == folder


def test_make_vg_overwrite_refuses_a_dataset_that_holds_the_photos(tmp_path):
    """The photos of a dataset it wrote, used as the input of the next run: replacing it would delete them."""
    photos, csv_path = make_photos(tmp_path / "p", ["a.jpg", "q.jpg"]), photo_csv(tmp_path / "photos.csv")
    first = make_vg_dataset.make_vg_dataset(photos, csv_path, tmp_path / "out", "first")
    database = first / "images" / "test" / "database"
    queries = first / "images" / "test" / "queries"
    (csv := tmp_path / "again.csv").write_text(
        f"path,role,lat,lon\n{next(database.iterdir())},database,{LAT},{LON}\n"
        f"{next(queries.iterdir())},queries,{LAT},{LON}\n"
    )
    before = snapshot(first)
    with pytest.raises(FileExistsError, match="holds the input"):
        make_vg_dataset.make_vg_dataset(tmp_path, csv, tmp_path / "out", "first", overwrite=True)
    assert snapshot(first) == before


@pytest.mark.parametrize("target", [_user_folder, _file, "vg"], ids=["user-folder", "file", "vg-dataset"])
def test_synthetic_overwrite_refuses_what_it_did_not_write(inputs, tmp_path, target):
    if target == "vg":
        folder = make_vg_dataset.make_vg_dataset(*inputs, tmp_path, "vg")
    else:
        folder = target(tmp_path)
    before = snapshot(folder) if folder.is_dir() else folder.read_bytes()
    with pytest.raises(FileExistsError, match="is not replaced by --overwrite"):
        synthetic_world.generate_world(folder.parent, folder.name, overwrite=True, **MICRO)
    assert (snapshot(folder) if folder.is_dir() else folder.read_bytes()) == before
    assert not [p for p in folder.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_synthetic_command_line_says_what_is_there(tmp_path, capsys):
    _user_folder(tmp_path)
    with pytest.raises(SystemExit):
        synthetic_cli.main(["--out", str(tmp_path), "--name", "mine", "--overwrite", "--preset", "tiny"])
    assert f"has no {MARKER}" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# demo.py reuses only the world it would generate


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


# 7. interrupted and concurrent runs of make_vg_dataset.py

_SLOW_MAKE_VG = """
import shutil, sys, time
copyfile = shutil.copyfile
def slow(*args, **kwargs):
    result = copyfile(*args, **kwargs)
    open({started!r}, "w").close()
    time.sleep(60)
    return result
shutil.copyfile = slow  # make_vg_dataset.py copies the JPEGs with it
sys.path.insert(0, {root!r})
sys.argv = ["make_vg_dataset.py", *{argv!r}]
exec(compile(open({script!r}).read(), {script!r}, "exec"), {{"__name__": "__main__", "__file__": {script!r}}})
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["INT", "TERM", "HUP"])
def test_make_vg_interrupted_by_a_signal_leaves_nothing(inputs, tmp_path, signum):
    photos, csv_path = inputs
    started = tmp_path / "started"
    argv = ["--photos", str(photos), "--csv", str(csv_path), "--out", str(tmp_path / "out"), "--name", "v"]
    script = _SLOW_MAKE_VG.format(
        root=str(ROOT), started=str(started), argv=argv, script=str(ROOT / "make_vg_dataset.py")
    )
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    try:
        while not started.exists() and process.poll() is None:
            time.sleep(0.05)
        assert process.poll() is None, process.stderr.read()
        assert [p.name for p in (tmp_path / "out").iterdir()] == [f".v.partial-{process.pid}"]
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signum and "Traceback" not in stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_make_vg_removes_the_leftover_of_a_killed_run(inputs, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "out" / f".v.partial-{dead.pid}"
    (stale / "images").mkdir(parents=True)
    make_vg_dataset.make_vg_dataset(*inputs, tmp_path / "out", "v")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["v"]


def test_make_vg_second_run_on_one_name_refuses(inputs, tmp_path, monkeypatch):
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / "out" / f".v.partial-{running.pid}"
        busy.mkdir(parents=True)
        with pytest.raises(FileExistsError, match=f"another run \\(process {running.pid}\\) is writing"):
            make_vg_dataset.make_vg_dataset(*inputs, tmp_path / "out", "v")
        assert busy.exists()
    finally:
        running.kill()
        running.wait()
    # another run finishes while this one writes: this one refuses rather than deleting the other's dataset
    copy_photo = make_vg_dataset._copy_photo

    def meanwhile(*args):
        (tmp_path / "out2" / "v" / "theirs").mkdir(parents=True, exist_ok=True)
        return copy_photo(*args)

    monkeypatch.setattr(make_vg_dataset, "_copy_photo", meanwhile)
    with pytest.raises(FileExistsError, match="was written by another run meanwhile"):
        make_vg_dataset.make_vg_dataset(*inputs, tmp_path / "out2", "v")
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["v"]
    assert (tmp_path / "out2" / "v" / "theirs").is_dir()


# 7. every bad CSV row: file, line, what was expected; one line, exit 1, nothing written

BAD_ROWS = {
    "easting-1e308": ("path,role,easting,northing,zone,band", "a.jpg,database,1e308,5000000,33,T", "easting"),
    "northing-1e308": ("path,role,easting,northing,zone,band", "a.jpg,database,500000,1e308,33,T", "northing"),
    "northing-negative": ("path,role,easting,northing,zone,band", "a.jpg,database,500000,-1,33,T", "northing"),
    "zone-superscript": ("path,role,easting,northing,zone,band", "a.jpg,database,500000,5000000,²,T", "zone '²'"),
    "heading-1e308": ("path,role,lat,lon,heading", f"a.jpg,database,{LAT},{LON},1e308", "heading '1e308'"),
    "timestamp-newline": ("path,role,lat,lon,timestamp", f'a.jpg,database,{LAT},{LON},"20\n19"', "timestamp"),
    "timestamp-long": ("path,role,lat,lon,timestamp", f"a.jpg,database,{LAT},{LON},{'1' * 300}", "timestamp"),
    "timestamp-backslash": ("path,role,lat,lon,timestamp", f"a.jpg,database,{LAT},{LON},a\\b", "timestamp"),
    "empty-path": ("path,role,lat,lon", f",database,{LAT},{LON}", "path ''"),
    "folder-path": ("path,role,lat,lon", f"sub,database,{LAT},{LON}", "is a folder"),
    "not-an-image": ("path,role,lat,lon", f"notes.jpg,database,{LAT},{LON}", "cannot read photo"),
}


@pytest.mark.parametrize("case", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_make_vg_bad_row_names_file_line_and_what_was_expected(tmp_path, case):
    header, bad_row, expected = case
    photos = make_photos(tmp_path / "photos", ["a.jpg", "q.jpg"])
    (photos / "sub").mkdir()
    (photos / "notes.jpg").write_text("not a JPEG")
    good_row = ",".join(["q.jpg", "queries", *(f"{LAT},{LON}", "500000,5000000,33,T")["easting" in header].split(",")])
    good_row += "," * (header.count(",") - good_row.count(","))
    csv_path = tmp_path / "photos.csv"
    csv_path.write_text(f"{header}\n{good_row}\n\n{bad_row}\n")  # a blank line before the bad row
    argv = ["--photos", str(photos), "--csv", str(csv_path), "--out", str(tmp_path / "out"), "--name", "v"]
    with pytest.raises(SystemExit) as stop:
        make_vg_dataset_script.main(argv)
    message = stop.value.code
    assert isinstance(message, str) and f"{csv_path}, line 4" in message and expected in message
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_make_vg_line_numbers_count_blank_lines(tmp_path):
    photos = make_photos(tmp_path / "photos", ["a.jpg", "q.jpg"])
    csv_path = photo_csv(tmp_path / "photos.csv", "\n\nmissing.jpg,database,45,12\n")
    with pytest.raises(FileNotFoundError, match=f"{csv_path}, line 6: photo"):
        make_vg_dataset.read_photo_table(csv_path, photos)


def test_make_vg_refuses_a_column_named_twice(tmp_path):
    """csv.DictReader keeps the last of two columns of one name: the positions would silently be the wrong ones."""
    photos = make_photos(tmp_path / "photos", ["a.jpg", "q.jpg"])
    (csv_path := tmp_path / "photos.csv").write_text(
        f"path,role,lat,lon,lat\na.jpg,database,{LAT},{LON},1\nq.jpg,queries,{LAT},{LON},2\n"
    )
    with pytest.raises(ValueError, match="the header names 'lat' more than once"):
        make_vg_dataset.read_photo_table(csv_path, photos)


def test_make_vg_csv_that_is_not_utf8(tmp_path):
    photos = make_photos(tmp_path / "photos", ["a.jpg"])
    (csv_path := tmp_path / "photos.csv").write_bytes(b"path,role,lat,lon\n\xff\xfe,database,45,12\n")
    with pytest.raises(ValueError, match=f"{csv_path} is not UTF-8 text"):
        make_vg_dataset.read_photo_table(csv_path, photos)


def test_make_vg_equator_refusal_names_the_lines(tmp_path):
    photos = make_photos(tmp_path / "photos", ["a.jpg", "q.jpg"])
    (csv_path := tmp_path / "photos.csv").write_text("path,role,lat,lon\na.jpg,database,1,12\nq.jpg,queries,-1,12\n")
    with pytest.raises(ValueError, match="line 2 is at latitude 1.0000000, line 3 at -1.0000000"):
        make_vg_dataset.make_vg_dataset(photos, csv_path, tmp_path / "out", "v")


def test_make_vg_long_photo_names_still_fit_a_file_name(tmp_path):
    name = "x" * 240 + ".jpg"
    photos = make_photos(tmp_path / "photos", [name, "q.jpg"])
    (csv_path := tmp_path / "photos.csv").write_text(
        f"path,role,lat,lon\n{name},database,{LAT},{LON}\nq.jpg,queries,{LAT},{LON}\n"
    )
    folder = make_vg_dataset.make_vg_dataset(photos, csv_path, tmp_path / "out", "v")
    (written,) = (folder / "images" / "test" / "database").iterdir()
    assert written.name.split("@")[14] == "x" * make_vg_dataset.MAX_NOTE


def test_make_vg_headings_are_normalised_to_0_360(tmp_path):
    photos = make_photos(tmp_path / "photos", ["a.jpg", "q.jpg"])
    (csv_path := tmp_path / "photos.csv").write_text(
        f"path,role,lat,lon,heading\na.jpg,database,{LAT},{LON},-90\nq.jpg,queries,{LAT},{LON},360\n"
    )
    assert [p.heading for p in make_vg_dataset.read_photo_table(csv_path, photos)] == ["270.0", "0.0"]


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def test_leftovers_of_other_names_are_left_alone(tmp_path):
    """A name with glob characters ("w*") matched the temporary folders of every name starting with w."""
    other = tmp_path / f".wx.partial-{_dead_pid()}"
    (other / "images").mkdir(parents=True)
    synthetic_world.generate_world(tmp_path, "w*", **MICRO)
    assert other.is_dir()


def test_the_old_dataset_of_a_run_killed_during_its_swap_is_put_back(inputs, tmp_path):
    """Killed between renaming the old dataset away and renaming the new one in: the old one is the only copy."""
    first = make_vg_dataset.make_vg_dataset(*inputs, tmp_path / "out", "v")
    before = snapshot(first)
    first.rename(tmp_path / "out" / f".v.old-{_dead_pid()}")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        make_vg_dataset.make_vg_dataset(*inputs, tmp_path / "out", "v")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["v"] and snapshot(first) == before


def test_a_running_run_is_not_raced_even_with_overwrite(tmp_path):
    synthetic_world.generate_world(tmp_path, "w", **MICRO)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".w.partial-{running.pid}").mkdir()
        with pytest.raises(FileExistsError, match=f"another run \\(process {running.pid}\\) is writing"):
            synthetic_world.generate_world(tmp_path, "w", overwrite=True, **MICRO)
    finally:
        running.kill()
        running.wait()


def test_overwrite_refuses_a_symbolic_link(inputs, tmp_path):
    world = synthetic_world.generate_world(tmp_path / "worlds", "w", **MICRO)
    (tmp_path / "link").symlink_to(world)
    with pytest.raises(FileExistsError, match="symbolic link"):
        synthetic_world.generate_world(tmp_path, "link", overwrite=True, **MICRO)
    assert (tmp_path / "link").is_symlink() and (world / MARKER).is_file()


def test_synthetic_command_line_refuses_a_world_written_meanwhile_in_one_line(tmp_path, monkeypatch):
    generate_split = synthetic_world._generate_split

    def meanwhile(split_dir, *args):
        (tmp_path / "w" / "theirs").mkdir(parents=True, exist_ok=True)
        return generate_split(split_dir, *args)

    monkeypatch.setattr(synthetic_world, "_generate_split", meanwhile)
    sizes = ["--image_size", "48", "64", "--database_per_split", "2", "2", "2", "--queries_per_split", "1", "1", "1"]
    with pytest.raises(SystemExit) as stop:
        synthetic_cli.main(["--out", str(tmp_path), "--name", "w", *sizes, "--images_per_street", "2"])
    assert isinstance(stop.value.code, str) and "was written by another run meanwhile" in stop.value.code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"] and (tmp_path / "w" / "theirs").is_dir()


def test_make_vg_command_line_missing_photos_folder_is_one_line(tmp_path):
    csv_path = photo_csv(tmp_path / "photos.csv")
    with pytest.raises(SystemExit) as stop:
        make_vg_dataset_script.main(
            ["--photos", str(tmp_path / "nowhere"), "--csv", str(csv_path), "--out", str(tmp_path), "--name", "v"]
        )
    assert stop.value.code == f"make_vg_dataset.py: photos folder {tmp_path / 'nowhere'} does not exist"
