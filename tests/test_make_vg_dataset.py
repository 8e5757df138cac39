"""`make_vg_dataset.py`: own photos + a CSV of positions -> the VG layout, on made-up photos and coordinates."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datasets_ws
import eval as eval_script
import make_vg_dataset as make_vg_dataset_script
import parser as project_parser
from model import FeaturesExtractor
from model.checkpoints import save_state_dict
from tools import geodesy, make_vg_dataset

# made-up photos on a street of Venice, in degrees (1e-4 degrees of latitude is about 11 m)
LAT, LON = 45.4371, 12.3326


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
    result = eval_script.cli(
        [
            "--datasets_folder", str(tmp_path / "out"), "--dataset_name", "utm", "--resize", "64", "64",
            "--trunc_te", "1", "--resume_fe", str(tmp_path / "fe.torch"), "--device", "cpu", "--num_workers", "0",
            "--recall_values", "1", "2",
        ]
    )  # fmt: skip
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
