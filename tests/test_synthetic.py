"""Tests of synthetic.py: the layout it writes, its geometry, the stored homographies, determinism and safe writing."""

from __future__ import annotations

import hashlib
import math
import signal
import subprocess
import sys
from pathlib import Path

import kornia
import numpy as np
import pytest
import torch
from helpers import MARKER, MICRO, a_file, dead_pid, snapshot, user_folder, wait_for
from PIL import Image

from tools import geodesy, make_vg_dataset
from tools.synthetic import cli as synthetic_cli
from tools.synthetic import scene, textures
from tools.synthetic import world as synthetic_world

ROOT = Path(__file__).resolve().parent.parent
TINY = synthetic_world.PRESETS["tiny"]


def _images(world: Path, split: str, kind: str) -> list[Path]:
    return sorted((world / "images" / split / kind).glob("*.jpg"))


def _utm(path: Path | str) -> tuple[float, float]:
    east, north = Path(path).name.split("@")[1:3]
    return float(east), float(north)


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# ---------------------------------------------------------------------------------------------------------------------
# Layout


def test_layout_counts_and_file_names(tiny_world: Path) -> None:
    height, width = TINY["image_size"]
    expected_files = set()
    for split, num_database, num_queries in zip(
        synthetic_world.SPLITS, TINY["database_per_split"], TINY["queries_per_split"]
    ):
        database, queries = _images(tiny_world, split, "database"), _images(tiny_world, split, "queries")
        assert (len(database), len(queries)) == (num_database, num_queries)
        for path in database + queries:
            fields = path.name.split("@")
            assert fields[0] == "" and fields[-1] == ".jpg" and len(fields) == 16, path.name
            east, north = float(fields[1]), float(fields[2])
            assert fields[1] == f"{east:.2f}" and fields[2] == f"{north:.2f}"
            assert (fields[3], fields[4]) == ("33", "T")
            with Image.open(path) as image:
                assert image.size == (width, height) and image.mode == "RGB"
        homographies = synthetic_world.load_homographies(tiny_world / "images" / split)
        assert set(homographies) == {path.name for path in queries}
        for database_name, H in homographies.values():
            assert (tiny_world / "images" / split / "database" / database_name).is_file()
            assert H.shape == (3, 3) and H[2, 2] == pytest.approx(1.0)
        expected_files |= {path.relative_to(tiny_world) for path in database + queries}
        expected_files.add(Path("images", split, "homographies.json"))
    expected_files.add(Path(".dataset_tool.json"))  # the marker that lets --overwrite recognise the world
    assert {path.relative_to(tiny_world) for path in tiny_world.rglob("*") if path.is_file()} == expected_files


def test_every_query_has_a_positive_within_10_m_and_the_sidecar_names_the_nearest(tiny_world: Path) -> None:
    for split in synthetic_world.SPLITS:
        database_names = [path.name for path in _images(tiny_world, split, "database")]
        database_utm = np.array([_utm(name) for name in database_names])
        homographies = synthetic_world.load_homographies(tiny_world / "images" / split)
        for query in _images(tiny_world, split, "queries"):
            distances = np.linalg.norm(database_utm - np.array(_utm(query)), axis=1)
            assert distances.min() < 10.0, query.name
            assert distances[database_names.index(homographies[query.name][0])] == distances.min()


def test_splits_are_kilometres_apart(tiny_world: Path) -> None:
    positions = {
        split: np.array([_utm(path) for kind in ("database", "queries") for path in _images(tiny_world, split, kind)])
        for split in synthetic_world.SPLITS
    }
    for i, first in enumerate(synthetic_world.SPLITS):
        for second in synthetic_world.SPLITS[i + 1 :]:
            gaps = np.linalg.norm(positions[first][:, None] - positions[second][None], axis=2)
            assert gaps.min() > 1000.0, (first, second)


# ---------------------------------------------------------------------------------------------------------------------
# Geometry


def test_facade_homography_projects_known_points() -> None:
    K = scene.intrinsics((96, 128))
    focal = 64 / math.tan(math.radians(scene.FIELD_OF_VIEW_DEG) / 2)
    assert K[0, 0] == pytest.approx(focal) and (K[0, 2], K[1, 2]) == (63.5, 47.5)
    camera = scene.Camera(x=5.0, y=-10.0, height=2.0)  # looking straight at the facades
    H = scene.facade_homography(K, camera)
    known = {(5.0, 2.0): (63.5, 47.5), (6.0, 2.0): (63.5 + focal / 10, 47.5), (5.0, 3.0): (63.5, 47.5 - focal / 10)}
    for (u, v), expected in known.items():
        projected = H @ np.array([u, v, 1.0])
        np.testing.assert_allclose(projected[:2] / projected[2], expected, atol=1e-9)


def test_view_homography_maps_facade_points_between_views() -> None:
    K = scene.intrinsics((96, 96))
    source = scene.Camera(x=12.0, y=-8.0, height=1.7, yaw=0.3, pitch=0.1, roll=-0.04)
    target = scene.Camera(x=14.0, y=-10.0, height=2.5, yaw=-0.02, pitch=0.1)
    facade_points = np.array([[10.0, 3.0, 1.0], [15.0, 8.0, 1.0], [13.0, 1.0, 1.0]]).T  # (u, v, 1)
    in_source = scene.facade_homography(K, source) @ facade_points
    in_target = scene.facade_homography(K, target) @ facade_points
    mapped = scene.view_homography(K, source, target) @ in_source
    np.testing.assert_allclose(mapped[:2] / mapped[2], in_target[:2] / in_target[2], atol=1e-8)


def test_camera_rotation_is_a_rotation_with_forward_towards_the_facades() -> None:
    R = scene.Camera(x=0.0, y=-10.0, height=2.0, yaw=0.2, pitch=0.1, roll=0.05).rotation()
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(R) == pytest.approx(1.0)
    np.testing.assert_allclose(scene.Camera(x=0.0, y=-10.0, height=2.0).rotation()[2], [0.0, 1.0, 0.0])


def test_utm_to_latlon_known_answer() -> None:
    lat, lon = geodesy.utm_to_latlon(500_000.0, 4_982_950.4, 33, "N")  # 45 N on the central meridian, 15 E
    assert lat == pytest.approx(45.0, abs=1e-5) and lon == pytest.approx(15.0, abs=1e-9)


def _grey(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.mean(axis=2, dtype=np.float32))[None, None]


def test_rendered_views_agree_on_the_facades_through_view_homography() -> None:
    rng = np.random.default_rng(3)
    street = scene.build_street(rng, 60.0, (0.0, 0.0), 0.0, shared_buildings=[11], shared_signs=[12])
    size, clouds = (96, 128), textures.periodic_noise(rng, 64, 1.6)
    K = scene.intrinsics(size)
    source = scene.Camera(x=28.0, y=-7.0, height=1.8, yaw=0.25, pitch=0.12, roll=0.03)
    target = scene.Camera(x=31.0, y=-10.0, height=2.5, pitch=0.1)
    source_image, _ = scene.render_view(street, source, K, size, scene.Lighting(), clouds)
    target_image, facade = scene.render_view(street, target, K, size, scene.Lighting(), clouds)
    assert source_image.shape == (96, 128, 3) and facade.shape == (96, 128) and 0.3 < facade.mean() < 1

    def error(H: np.ndarray) -> float:
        H = torch.from_numpy(H).float()[None]
        warped = kornia.geometry.transform.warp_perspective(_grey(source_image), H, size, align_corners=True)
        covered = kornia.geometry.transform.warp_perspective(torch.ones(1, 1, *size), H, size, align_corners=True)
        region = (covered[0, 0] > 0.999) & torch.from_numpy(facade)
        assert region.float().mean() > 0.2
        return (warped[0, 0] - _grey(target_image)[0, 0])[region].abs().mean().item()

    H = scene.view_homography(K, source, target)
    half_a_pixel_off = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ H
    # grey levels in 0..255; what is left at the right H comes from resampling the textures at other scales
    assert error(H) < 6.0 and error(H) < 0.75 * error(half_a_pixel_off), (error(H), error(half_a_pixel_off))


def test_shared_buildings_recur_identically_on_distant_streets() -> None:
    shared = [101, 202, 303]
    first, second = (
        scene.build_street(np.random.default_rng(seed), 150.0, (0.0, 0.0), 0.0, shared, [7, 8]) for seed in (1, 2)
    )
    assert set(first.buildings) & set(shared) and set(second.buildings) & set(shared)
    assert len(first.buildings) > 5 and first.length_m >= 150.0
    np.testing.assert_array_equal(textures.draw_building(101, None), textures.draw_building(101, None))
    assert not np.array_equal(textures.draw_building(101, 7)[..., :3], textures.draw_building(102, 7)[..., :3])


def _local_contrast(image: torch.Tensor, size: int = 9) -> torch.Tensor:
    """Subtract the local mean and divide by the local deviation, so that exposure, tint and shadows cancel."""
    mean = kornia.filters.box_blur(image, (size, size))
    deviation = kornia.filters.box_blur((image - mean) ** 2, (size, size)).sqrt()
    return (image - mean) / (deviation + 0.02)


def _alignment_error(query: torch.Tensor, database: torch.Tensor, H: np.ndarray) -> tuple[float, float]:
    """Median local-contrast difference between ``database`` and ``query`` warped by H where they overlap well, and
    the fraction of the database image where they do."""
    size = tuple(database.shape[-2:])
    H = torch.from_numpy(H).float()[None]
    warped = kornia.geometry.transform.warp_perspective(query, H, size, align_corners=True)
    covered = kornia.geometry.transform.warp_perspective(torch.ones_like(query), H, size, align_corners=True)
    overlap = kornia.morphology.erosion((covered > 0.999).float(), torch.ones(9, 9)) > 0.5
    error = (_local_contrast(warped) - _local_contrast(database)).abs()[overlap].median().item()
    return error, overlap.float().mean().item()


def test_stored_homographies_align_queries_onto_their_database_images(tiny_world: Path) -> None:
    def grey(path: Path) -> torch.Tensor:
        return torch.from_numpy(np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255)[None, None]

    shift = np.array([[1.0, 0.0, 40.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    ratios = []
    for split in synthetic_world.SPLITS:
        split_dir = tiny_world / "images" / split
        for query_name, (database_name, H) in synthetic_world.load_homographies(split_dir).items():
            query, database = grey(split_dir / "queries" / query_name), grey(split_dir / "database" / database_name)
            right, overlap = _alignment_error(query, database, H)
            assert overlap > 0.25, f"{query_name} hardly overlaps {database_name}"
            ratios.append(right / _alignment_error(query, database, shift @ H)[0])
    # the facades hold most of the overlap; ground, occluders and blur keep the right error above zero
    assert max(ratios) < 0.75, ratios
    assert np.median(ratios) < 0.6, ratios


# ---------------------------------------------------------------------------------------------------------------------
# Determinism and writing


def test_same_seed_gives_the_same_bytes_and_another_seed_other_bytes(tiny_world: Path, tmp_path: Path) -> None:
    again = synthetic_world.generate_world(tmp_path, "again", seed=0, **TINY)
    assert _hashes(again) == _hashes(tiny_world)
    other = synthetic_world.generate_world(tmp_path, "other", seed=1, **TINY)
    other_hashes = _hashes(other)
    assert set(other_hashes.values()).isdisjoint(_hashes(tiny_world).values())


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    world = tmp_path / "world"
    world.mkdir()
    (world / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        synthetic_world.generate_world(tmp_path, "world", **MICRO)
    with pytest.raises(FileExistsError, match="no .dataset_tool.json"):
        synthetic_world.generate_world(tmp_path, "world", overwrite=True, **MICRO)  # not a world synthetic.py wrote
    assert (world / "notes.txt").read_text() == "keep me"
    (world / "notes.txt").unlink()
    synthetic_world.generate_world(tmp_path, "world", seed=1, **MICRO)
    assert synthetic_world.generate_world(tmp_path, "world", overwrite=True, **MICRO) == world
    assert len(list(world.rglob("*.jpg"))) == 9
    assert sorted(path.name for path in tmp_path.iterdir()) == ["world"]  # no temporary folder left


def test_an_empty_existing_folder_is_filled(tmp_path: Path) -> None:
    (tmp_path / "world").mkdir()
    synthetic_world.generate_world(tmp_path, "world", **MICRO)
    assert len(list((tmp_path / "world").rglob("*.jpg"))) == 9


def test_a_failure_leaves_nothing_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    previous = synthetic_world.generate_world(tmp_path, "world", **MICRO)
    before = _hashes(previous)
    save_jpeg, calls = synthetic_world._save_jpeg, []

    def failing_save(image: np.ndarray, path: Path) -> None:
        calls.append(path)
        if len(calls) == 5:
            raise OSError("disk full")
        save_jpeg(image, path)

    monkeypatch.setattr(synthetic_world, "_save_jpeg", failing_save)
    with pytest.raises(OSError, match="disk full"):
        synthetic_world.generate_world(tmp_path, "fresh", **MICRO)
    with pytest.raises(OSError, match="disk full"):
        calls.clear()
        synthetic_world.generate_world(tmp_path, "world", overwrite=True, **MICRO)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["world"]
    assert _hashes(previous) == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--image_size", "8", "8"], "image_size must be two sides (H W) between 32 and 4096 pixels, got [8, 8]"),
        (["--queries_per_split", "5", "0", "5"], "got [5, 0, 5]"),
        (["--database_spacing", "30"], "database_spacing must be between 1 and 12 metres, got 30.0"),
        (["--images_per_street", "1"], "images_per_street must be between 2 and 10000, got 1"),
        (["--preset", "huge"], "invalid choice: 'huge'"),
        (["--name", "a/b"], "name must be a plain folder name, got 'a/b'"),
    ],
)
def test_bad_flags_stop_with_a_clear_message(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as stop:
        synthetic_cli.main(["--out", str(tmp_path), *argv])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_of_generate_world(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="database_per_split"):
        synthetic_world.generate_world(tmp_path, "world", **{**MICRO, "database_per_split": (2, 2)})
    with pytest.raises(ValueError, match="plain folder name"):
        synthetic_world.generate_world(tmp_path, "a/b", **MICRO)


def test_command_line_writes_a_world_and_a_contact_sheet(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sheet = tmp_path / "sheet.png"
    sizes = ["--image_size", "48", "64", "--database_per_split", "2", "2", "2", "--queries_per_split", "1", "1", "2"]
    argv = ["--out", str(tmp_path), "--name", "cli", "--preset", "tiny", *sizes, "--images_per_street", "2"]
    world = synthetic_cli.main([*argv, "--contact_sheet", str(sheet)])
    assert world == tmp_path / "cli"
    assert "test 2 database / 2 queries" in capsys.readouterr().out
    assert len(_images(world, "test", "queries")) == 2
    with Image.open(sheet) as image:
        assert image.format == "PNG" and image.width > image.height
    with pytest.raises(SystemExit):
        synthetic_cli.main(argv)  # the world is there now
    assert "--overwrite" in capsys.readouterr().err


def test_the_script_writes_what_the_library_writes(tmp_path: Path) -> None:
    """`python synthetic.py` is the thin entry point of `tools.synthetic.cli`: the same world, byte for byte."""
    sizes = ["--image_size", "48", "64", "--database_per_split", "2", "2", "2", "--queries_per_split", "1", "1", "1"]
    argv = ["--out", str(tmp_path), "--name", "script", "--seed", "3", *sizes, "--images_per_street", "2"]
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "synthetic.py", *argv], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"Wrote {tmp_path / 'script'}" in result.stdout
    library = synthetic_world.generate_world(tmp_path, "library", seed=3, **MICRO)
    assert _hashes(tmp_path / "script") == _hashes(library)


def test_shared_fraction_one_builds_streets_from_the_library_only() -> None:
    shared = [101, 202, 303, 404]
    street = scene.build_street(np.random.default_rng(3), 120.0, (0.0, 0.0), 0.0, shared, [7], shared_fraction=1.0)
    assert set(street.buildings) <= set(shared) and len(street.buildings) > 3
    street = scene.build_street(np.random.default_rng(3), 120.0, (0.0, 0.0), 0.0, shared, [7], shared_fraction=0.0)
    assert not set(street.buildings) & set(shared)


def test_repetition_flags_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for argv, message in (
        (["--shared_fraction", "1.5"], "shared_fraction must be between 0 and 1"),
        (["--shared_buildings", "0"], "num_shared_buildings must be between 1 and 1000"),
    ):
        with pytest.raises(SystemExit):
            synthetic_cli.main(["--out", str(tmp_path), *argv])
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="shared_fraction"):
        synthetic_world.generate_world(tmp_path, "world", shared_fraction=-0.1, **MICRO)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------------
# Interrupted, concurrent and refused runs


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


@pytest.mark.parametrize("target", [user_folder, a_file, "vg"], ids=["user-folder", "file", "vg-dataset"])
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
    user_folder(tmp_path)
    with pytest.raises(SystemExit):
        synthetic_cli.main(["--out", str(tmp_path), "--name", "mine", "--overwrite", "--preset", "tiny"])
    assert f"has no {MARKER}" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_leftovers_of_other_names_are_left_alone(tmp_path):
    """A name with glob characters ("w*") matched the temporary folders of every name starting with w."""
    other = tmp_path / f".wx.partial-{dead_pid()}"
    (other / "images").mkdir(parents=True)
    synthetic_world.generate_world(tmp_path, "w*", **MICRO)
    assert other.is_dir()


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
