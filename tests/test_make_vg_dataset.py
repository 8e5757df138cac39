"""`make_vg_dataset.py`: own photos + a CSV of positions -> the VG layout, on made-up photos and coordinates."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import LAT, LON, MARKER, MICRO, a_file, dead_pid, eval_argv, photo_csv, small_photos, snapshot, user_folder
from PIL import Image

import datasets_ws
import eval as eval_script
import make_vg_dataset as make_vg_dataset_script
import parser as project_parser
from model import FeaturesExtractor
from model.checkpoints import save_state_dict
from tools import geodesy, make_vg_dataset
from tools.synthetic import world as synthetic_world

ROOT = Path(__file__).resolve().parents[1]


def make_photos(folder: Path, names: list[str], size: tuple[int, int] = (80, 64)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    make_photos(folder, ["a.jpg", "b.jpg", "c.png", "q1.jpg", "query 2.jpg"])
    return folder


def test_latlon_csv_to_vg_layout(photos, tmp_path):
    utm_b = geodesy.latlon_to_utm(LAT + 0.0001, LON)
    csv_path = write_csv(
        tmp_path / "photos.csv",
        f"""
path,role,lat,lon,heading
a.jpg,database,{LAT},{LON},90
c.png,database,{LAT + 0.001},{LON},
q1.jpg,queries,{LAT + 0.00002},{LON},
query 2.jpg,queries,{LAT + 0.00102},{LON + 0.00001},270
""",
    )
    folder = make_vg_dataset.make_vg_dataset(photos, csv_path, tmp_path / "out", "venice")
    assert folder == tmp_path / "out" / "venice"
    database = sorted((folder / "images" / "test" / "database").iterdir())
    queries = sorted((folder / "images" / "test" / "queries").iterdir())
    assert len(database) == 2 and len(queries) == 2
    a = next(p for p in database if p.name.endswith("@a@.jpg"))
    fields = a.name.split("@")
    assert len(fields) == 16  # "" + 14 fields + ".jpg"
    utm = geodesy.latlon_to_utm(LAT, LON)
    assert fields[1:5] == [f"{utm.easting:.2f}", f"{utm.northing:.2f}", "33", "T"]
    assert float(fields[5]) == LAT and float(fields[6]) == LON and fields[9] == "90.0"
    assert a.read_bytes() == (photos / "a.jpg").read_bytes()  # copied as is
    assert any(p.name.endswith("@c@.png") for p in database)
    assert any(p.name.endswith("@query_2@.jpg") for p in queries)
    assert utm_b.zone == 33

    # the project's dataset reads it, and the positives are the photos within 25 m
    args = project_parser.parse_arguments("eval", ["--datasets_folder", str(tmp_path / "out"), "--resize", "64", "64"])
    dataset = datasets_ws.BaseDataset(str(tmp_path / "out"), "venice", "test", **project_parser.dataset_options(args))
    assert dataset.database_num == 2 and dataset.queries_num == 2
    positives = [
        sorted(Path(dataset.database_paths[i]).name.split("@")[14] for i in p) for p in dataset.get_positives()
    ]
    by_query = dict(zip((Path(p).name.split("@")[14] for p in dataset.queries_paths), positives))
    assert by_query == {"q1": ["a"], "query_2": ["c"]}
    # 0.00002 degrees of latitude: 2.2 m
    assert math.isclose(np.linalg.norm(dataset.queries_utms[0] - dataset.database_utms[0]), 2.22, abs_tol=0.01)


def test_utm_csv_and_end_to_end_eval(photos, tmp_path, monkeypatch):
    utm = geodesy.latlon_to_utm(LAT, LON)
    csv_path = write_csv(
        tmp_path / "utm.csv",
        f"""
path,role,easting,northing,zone,band
a.jpg,database,{utm.easting},{utm.northing},33,T
b.jpg,database,{utm.easting + 200},{utm.northing},33,T
q1.jpg,queries,{utm.easting + 3},{utm.northing},33,T
""",
    )
    folder = make_vg_dataset_script.main(
        ["--photos", str(photos), "--csv", str(csv_path), "--out", str(tmp_path / "out"), "--name", "utm"]
    )
    names = sorted(p.name for p in (folder / "images" / "test" / "database").iterdir())
    # UTM in, the same UTM out (through latitude/longitude and back, exact to micrometres)
    assert [n.split("@")[1:3] for n in names] == [
        [f"{utm.easting:.2f}", f"{utm.northing:.2f}"],
        [f"{utm.easting + 200:.2f}", f"{utm.northing:.2f}"],
    ]

    save_state_dict(FeaturesExtractor(resize=(64, 64), trunc_te=1), tmp_path / "fe.torch")
    monkeypatch.chdir(tmp_path)
    result = eval_script.cli(eval_argv(folder, "--resume_fe", str(tmp_path / "fe.torch"), "--recall_values", "1", "2"))
    assert result["baseline_recalls"][1] == 100.0  # 2 database photos: the one 3 m away is in the top 2


def test_exif_rotated_jpeg_is_stored_upright(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[make_vg_dataset.EXIF_ORIENTATION] = 6  # stored rotated: show it turned 90 degrees clockwise
    image.save(photos / "rotated.jpg", exif=exif)
    make_photos(photos, ["q.jpg"])
    csv_path = write_csv(
        tmp_path / "p.csv", f"path,role,lat,lon\nrotated.jpg,database,{LAT},{LON}\nq.jpg,queries,{LAT},{LON}"
    )
    folder = make_vg_dataset.make_vg_dataset(photos, csv_path, tmp_path / "out", "exif")
    (written,) = (folder / "images" / "test" / "database").iterdir()
    with Image.open(written) as upright:
        assert upright.size == (20, 40)


@pytest.mark.parametrize(
    ("rows", "error", "message"),
    [
        ("path,role,lat\na.jpg,database,1", ValueError, "positions are missing"),
        ("path,role,lat,lon,colour\na.jpg,database,1,2,red", ValueError, r"unknown columns \['colour'\]"),
        (
            f"path,role,lat,lon\na.jpg,database,{LAT},{LON}\nq1.jpg,query,{LAT},{LON}",
            ValueError,
            "line 3: role 'query'",
        ),
        (f"path,role,lat,lon\na.jpg,database,{LAT},{LON}\nq1.jpg,queries,91,{LON}", ValueError, "line 3: latitude 91"),
        (f"path,role,lat,lon\na.jpg,database,north,{LON}\nq1.jpg,queries,1,2", ValueError, "line 2: lat 'north'"),
        (f"path,role,lat,lon\nnope.jpg,database,{LAT},{LON}", FileNotFoundError, "line 2: photo .*nope.jpg"),
        (
            f"path,role,lat,lon\na.jpg,database,{LAT},{LON}\na.jpg,queries,{LAT},{LON}",
            ValueError,
            "already listed on line 2",
        ),
        (f"path,role,lat,lon\na.jpg,database,{LAT},{LON}", ValueError, "no photo has the role queries"),
        (
            f"path,role,lat,lon\na.jpg,database,{LAT},{LON}\nq1.jpg,queries,-1,{LON}",
            ValueError,
            "both sides of the equator",
        ),
        (
            "path,role,easting,northing,zone,band\na.jpg,database,500000,5000000,61,T",
            ValueError,
            "line 2: zone '61'",
        ),
        (
            f"path,role,lat,lon\nbroken.jpg,database,{LAT},{LON}\nq1.jpg,queries,{LAT},{LON}",
            OSError,
            "line 2: cannot read photo",
        ),
    ],
)
def test_bad_tables_name_the_line_and_leave_nothing(photos, tmp_path, rows, error, message):
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    csv_path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(error, match=message):
        make_vg_dataset.make_vg_dataset(photos, csv_path, tmp_path / "out", "bad")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_existing_dataset_is_kept_unless_overwrite(photos, tmp_path):
    csv_path = write_csv(
        tmp_path / "p.csv", f"path,role,lat,lon\na.jpg,database,{LAT},{LON}\nq1.jpg,queries,{LAT},{LON}"
    )
    make_vg_dataset.make_vg_dataset(photos, csv_path, tmp_path / "out", "twice")
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_vg_dataset.make_vg_dataset(photos, csv_path, tmp_path / "out", "twice")
    make_vg_dataset.make_vg_dataset(photos, csv_path, tmp_path / "out", "twice", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["twice"]


# ------------------------------------------------------------------------ --overwrite replaces only what the tool wrote
def _old_vg_dataset(tmp_path: Path) -> Path:
    """A dataset as make_vg_dataset.py wrote it before the marker: no way to tell it from a user's folder."""
    folder = tmp_path / "old" / "images" / "test" / "database"
    folder.mkdir(parents=True)
    (folder / "@1@2@33@T@45@12@@@@@@@@a@.jpg").write_bytes(b"jpeg")
    return tmp_path / "old"


def _synthetic_world(tmp_path: Path) -> Path:
    return synthetic_world.generate_world(tmp_path, "world", **MICRO)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (lambda tmp_path: tmp_path / "data" / "photos", "holds the input"),  # the photos folder
        (lambda tmp_path: tmp_path / "data", "holds the input"),  # the parent of the photos and the CSV
        (user_folder, f"has no {MARKER}"),
        (_old_vg_dataset, "delete it by hand (rm -r"),
        (_synthetic_world, "written by synthetic.py, not by make_vg_dataset.py"),
        (a_file, "it is a file"),
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
    photos, csv_path = small_photos(tmp_path / "p", ["a.jpg", "q.jpg"]), photo_csv(tmp_path / "photos.csv")
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


# -------------------------------------------------------------------------------------- interrupted and concurrent runs
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


# --------------------------------------------------------------------- every bad CSV row: file, line, what was expected
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
    photos = small_photos(tmp_path / "photos", ["a.jpg", "q.jpg"])
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
    photos = small_photos(tmp_path / "photos", ["a.jpg", "q.jpg"])
    csv_path = photo_csv(tmp_path / "photos.csv", "\n\nmissing.jpg,database,45,12\n")
    with pytest.raises(FileNotFoundError, match=f"{csv_path}, line 6: photo"):
        make_vg_dataset.read_photo_table(csv_path, photos)


def test_make_vg_refuses_a_column_named_twice(tmp_path):
    """csv.DictReader keeps the last of two columns of one name: the positions would silently be the wrong ones."""
    photos = small_photos(tmp_path / "photos", ["a.jpg", "q.jpg"])
    (csv_path := tmp_path / "photos.csv").write_text(
        f"path,role,lat,lon,lat\na.jpg,database,{LAT},{LON},1\nq.jpg,queries,{LAT},{LON},2\n"
    )
    with pytest.raises(ValueError, match="the header names 'lat' more than once"):
        make_vg_dataset.read_photo_table(csv_path, photos)


def test_make_vg_csv_that_is_not_utf8(tmp_path):
    photos = small_photos(tmp_path / "photos", ["a.jpg"])
    (csv_path := tmp_path / "photos.csv").write_bytes(b"path,role,lat,lon\n\xff\xfe,database,45,12\n")
    with pytest.raises(ValueError, match=f"{csv_path} is not UTF-8 text"):
        make_vg_dataset.read_photo_table(csv_path, photos)


def test_make_vg_equator_refusal_names_the_lines(tmp_path):
    photos = small_photos(tmp_path / "photos", ["a.jpg", "q.jpg"])
    (csv_path := tmp_path / "photos.csv").write_text("path,role,lat,lon\na.jpg,database,1,12\nq.jpg,queries,-1,12\n")
    with pytest.raises(ValueError, match="line 2 is at latitude 1.0000000, line 3 at -1.0000000"):
        make_vg_dataset.make_vg_dataset(photos, csv_path, tmp_path / "out", "v")


def test_make_vg_long_photo_names_still_fit_a_file_name(tmp_path):
    name = "x" * 240 + ".jpg"
    photos = small_photos(tmp_path / "photos", [name, "q.jpg"])
    (csv_path := tmp_path / "photos.csv").write_text(
        f"path,role,lat,lon\n{name},database,{LAT},{LON}\nq.jpg,queries,{LAT},{LON}\n"
    )
    folder = make_vg_dataset.make_vg_dataset(photos, csv_path, tmp_path / "out", "v")
    (written,) = (folder / "images" / "test" / "database").iterdir()
    assert written.name.split("@")[14] == "x" * make_vg_dataset.MAX_NOTE


def test_make_vg_headings_are_normalised_to_0_360(tmp_path):
    photos = small_photos(tmp_path / "photos", ["a.jpg", "q.jpg"])
    (csv_path := tmp_path / "photos.csv").write_text(
        f"path,role,lat,lon,heading\na.jpg,database,{LAT},{LON},-90\nq.jpg,queries,{LAT},{LON},360\n"
    )
    assert [p.heading for p in make_vg_dataset.read_photo_table(csv_path, photos)] == ["270.0", "0.0"]


def test_the_old_dataset_of_a_run_killed_during_its_swap_is_put_back(inputs, tmp_path):
    """Killed between renaming the old dataset away and renaming the new one in: the old one is the only copy."""
    first = make_vg_dataset.make_vg_dataset(*inputs, tmp_path / "out", "v")
    before = snapshot(first)
    first.rename(tmp_path / "out" / f".v.old-{dead_pid()}")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        make_vg_dataset.make_vg_dataset(*inputs, tmp_path / "out", "v")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["v"] and snapshot(first) == before


def test_make_vg_command_line_missing_photos_folder_is_one_line(tmp_path):
    csv_path = photo_csv(tmp_path / "photos.csv")
    with pytest.raises(SystemExit) as stop:
        make_vg_dataset_script.main(
            ["--photos", str(tmp_path / "nowhere"), "--csv", str(csv_path), "--out", str(tmp_path), "--name", "v"]
        )
    assert stop.value.code == f"make_vg_dataset.py: photos folder {tmp_path / 'nowhere'} does not exist"
