"""The synthetic world: splits of streets kilometres apart in UTM, their database images and queries written in the
visual geo-localization benchmark layout, with each query's true homography onto its nearest database image.

Database images are taken every ``database_spacing`` metres from a car driving along the street and looking at the
facades; queries are taken from other positions, distances and headings, in other light, with blur, noise, parked
cars and passers-by in front. A small library of buildings and shop signs is reused at far-apart places, so that
global descriptors get confused and geometry has to decide.

Layout written under ``<out>/<name>/``::

    images/<split>/database/@east@north@33@T@lat@lon@pano_id@@heading@pitch@roll@height@yyyymm@street@.jpg
    images/<split>/queries/...same naming...
    images/<split>/homographies.json

The sidecar holds ``{"homographies": {<query file name>: {"database": <nearest database file name>, "homography":
<3 x 3 rows, query pixels to database pixels, H[2][2] = 1>}}, "image_size": [H, W], "pixel_convention": ...,
"description": ...}``; `load_homographies` reads it. Pixel coordinates: see `tools.synthetic.scene`.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from tools import geodesy, outputs, vg_names
from tools.synthetic.scene import (
    SKIES,
    Camera,
    Lighting,
    Street,
    build_street,
    draw_occluders,
    intrinsics,
    render_view,
    view_homography,
)
from tools.synthetic.textures import periodic_noise

TOOL = "synthetic.py"  # the name in the marker of the worlds it writes (see tools.outputs)
SPLITS = ("train", "val", "test")
UTM_ZONE = 33
UTM_LETTER = "T"
BASE_EAST, BASE_NORTH = 500_000.0, 5_000_000.0  # zone 33T, near 45.1 N 15 E
SPLIT_GAP_M = 2_000.0  # empty land between the regions of two splits
STREET_GAP_M = 300.0  # at least this much between two streets of one split

STREET_MARGIN_M = 30.0  # facades continue this far beyond the first and last database image
JPEG_QUALITY = 90
SHARED_FRACTION = 0.25  # of the buildings, drawn from a library that recurs all over the world
NUM_SHARED_BUILDINGS = 6  # buildings in that library

DATABASE_DISTANCE_M = 10.0  # from the facades to the database camera (driving in the middle of the road)
DATABASE_HEIGHT_M = 2.5
DATABASE_PITCH_DEG = 6.0
QUERY_DISTANCE_RANGE_M = (6.5, 12.5)
QUERY_HEIGHT_RANGE_M = (1.5, 2.6)
QUERY_MAX_YAW_DEG = 20.0
QUERY_PITCH_RANGE_DEG = (-2.0, 14.0)
QUERY_MAX_ROLL_DEG = 3.0

DEFAULT_WORLD = {
    "image_size": (384, 384),
    "database_per_split": (200, 40, 160),
    "queries_per_split": (100, 20, 80),
    "images_per_street": 40,
    "database_spacing": 5.0,
}
PRESETS = {
    "default": DEFAULT_WORLD,
    "tiny": {
        "image_size": (96, 96),
        "database_per_split": (16, 8, 16),
        "queries_per_split": (6, 4, 6),
        "images_per_street": 8,
        "database_spacing": 5.0,
    },
}


def _photometric(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Exposure, white balance, gamma, contrast and saturation of another camera at another time; float32 0..255."""
    gains = rng.uniform(0.65, 1.3) * (1 + rng.normal(0, 0.06, 3))
    image = 255 * np.clip(image * gains.astype(np.float32) / 255, 0, 1) ** rng.uniform(0.8, 1.25)
    grey = image.mean(axis=2, keepdims=True)
    image = grey + (image - grey) * rng.uniform(0.6, 1.3)
    mean = image.mean()
    return (image - mean) * rng.uniform(0.75, 1.15) + mean


# --------------------------------------------------------------------------------------------------------------------
# World
# --------------------------------------------------------------------------------------------------------------------


def check_world_arguments(
    image_size: Sequence[int],
    database_per_split: Sequence[int],
    queries_per_split: Sequence[int],
    images_per_street: int,
    database_spacing: float,
) -> None:
    """Raise ValueError, naming the value, for sizes that cannot make a sensible world."""
    if len(image_size) != 2 or not all(32 <= s <= 4096 for s in image_size):
        raise ValueError(f"image_size must be two sides (H W) between 32 and 4096 pixels, got {list(image_size)}")
    for what, counts, least in (
        ("database_per_split", database_per_split, 2),
        ("queries_per_split", queries_per_split, 1),
    ):
        if len(counts) != len(SPLITS) or not all(least <= c <= 100_000 for c in counts):
            raise ValueError(
                f"{what} must be {len(SPLITS)} counts ({' '.join(SPLITS)}) between {least} and 100000, "
                f"got {list(counts)}"
            )
    if not 2 <= images_per_street <= 10_000:
        raise ValueError(f"images_per_street must be between 2 and 10000, got {images_per_street}")
    if not 1.0 <= database_spacing <= 12.0:
        # beyond 12 m a query could be more than 10 m from every database image
        raise ValueError(f"database_spacing must be between 1 and 12 metres, got {database_spacing}")


def check_repetition_arguments(shared_fraction: float, num_shared_buildings: int) -> None:
    """Raise ValueError, naming the value, for a shared fraction outside [0, 1] or a library outside 1..1000."""
    if not (isinstance(shared_fraction, (int, float)) and 0.0 <= shared_fraction <= 1.0):
        raise ValueError(f"shared_fraction must be between 0 and 1, got {shared_fraction!r}")
    if isinstance(num_shared_buildings, bool) or not isinstance(num_shared_buildings, int):
        raise ValueError(f"num_shared_buildings must be an integer, got {num_shared_buildings!r}")
    if not 1 <= num_shared_buildings <= 1000:
        raise ValueError(f"num_shared_buildings must be between 1 and 1000, got {num_shared_buildings}")


def _file_name(
    street: Street, camera: Camera, pano_id: str, timestamp: str, note: str
) -> tuple[str, tuple[float, float]]:
    """The benchmark's file name for a picture taken by ``camera``, and the UTM position it states."""
    east, north = street.to_utm(camera.x, camera.y)
    lat, lon = geodesy.utm_to_latlon(east, north, UTM_ZONE, geodesy.band_hemisphere(UTM_LETTER))
    name = vg_names.format_name(
        east,
        north,
        UTM_ZONE,
        UTM_LETTER,
        lat,
        lon,
        latlon_decimals=6,
        extension=".jpg",
        pano_id=pano_id,
        heading=f"{street.heading(camera):.1f}",
        pitch=f"{math.degrees(camera.pitch):.1f}",
        roll=f"{math.degrees(camera.roll):.1f}",
        height=f"{camera.height:.2f}",
        timestamp=timestamp,
        note=note,
    )
    return name, vg_names.parse_utm(name)


def _save_jpeg(image: np.ndarray, path: Path) -> None:
    """Round an (H, W, 3) float image into 0..255 and save it with the fixed JPEG quality (no metadata, no time)."""
    Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8)).save(path, quality=JPEG_QUALITY)


def _database_camera(rng: np.random.Generator, x: float, spacing: float) -> Camera:
    """The camera of a car in the middle of the road, about at ``x``, looking at the facades and a little up."""
    return Camera(
        x=x + rng.uniform(-0.1, 0.1) * spacing,
        y=-DATABASE_DISTANCE_M + rng.uniform(-0.3, 0.3),
        height=DATABASE_HEIGHT_M + rng.uniform(-0.05, 0.05),
        yaw=math.radians(rng.uniform(-2, 2)),
        pitch=math.radians(DATABASE_PITCH_DEG + rng.uniform(-1, 1)),
        roll=math.radians(rng.uniform(-0.5, 0.5)),
    )


def _query_capture(rng: np.random.Generator, first_x: float, last_x: float) -> tuple[Camera, Lighting]:
    """A hand-held camera somewhere between ``first_x`` and ``last_x``, and the light of another day."""
    camera = Camera(
        x=rng.uniform(first_x, last_x),
        y=-rng.uniform(*QUERY_DISTANCE_RANGE_M),
        height=rng.uniform(*QUERY_HEIGHT_RANGE_M),
        yaw=math.radians(rng.uniform(-QUERY_MAX_YAW_DEG, QUERY_MAX_YAW_DEG)),
        pitch=math.radians(rng.uniform(*QUERY_PITCH_RANGE_DEG)),
        roll=math.radians(rng.uniform(-QUERY_MAX_ROLL_DEG, QUERY_MAX_ROLL_DEG)),
    )
    shadowed = rng.random() < 0.4
    lighting = Lighting(
        sky=str(rng.choice(list(SKIES))),
        clouds=rng.uniform(0.0, 0.8),
        cloud_offset=tuple(rng.uniform(0, 256, 2)),
        shadow=rng.uniform(0.5, 0.75) if shadowed else 1.0,
        shadow_height=rng.uniform(2, 14),
        shadow_slope=rng.uniform(-0.6, 0.6),
        shadow_origin=camera.x,
    )
    return camera, lighting


def _degrade_query(
    rng: np.random.Generator, rendered: np.ndarray, K: np.ndarray, camera: Camera, lighting: Lighting
) -> np.ndarray:
    """Put cars and people in front of a rendered view (H, W, 3), then change its colours, blur it and add noise."""
    picture = Image.fromarray(np.clip(rendered, 0, 255).astype(np.uint8))
    draw_occluders(picture, rng, K, camera, light=lighting.shadow**0.5)
    image = _photometric(rng, np.asarray(picture, dtype=np.float32))
    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    blur = rng.uniform(0, 1.3) * picture.width / 384  # radius in pixels of a 384-pixel-wide image
    if blur > 0.3:
        picture = picture.filter(ImageFilter.GaussianBlur(blur))
    image = np.asarray(picture, dtype=np.float32)
    return image + rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(1, 6)


def _split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def _generate_split(
    split_dir: Path,
    split_index: int,
    region_origin: tuple[float, float],
    num_database: int,
    num_queries: int,
    images_per_street: int,
    spacing: float,
    image_size: tuple[int, int],
    seed: int,
    shared_buildings: Sequence[int],
    shared_signs: Sequence[int],
    clouds: np.ndarray,
    shared_fraction: float = 0.25,
) -> float:
    """Write one split's images and homographies.json; return the east extent of its region in metres."""
    K = intrinsics(image_size)
    num_streets = math.ceil(num_database / images_per_street)
    database_counts = _split_evenly(num_database, num_streets)
    query_counts = _split_evenly(num_queries, num_streets)
    longest = (max(database_counts) - 1) * spacing + 2 * STREET_MARGIN_M + 30.0  # + the last building's overhang
    cell = longest + STREET_GAP_M
    columns = math.ceil(math.sqrt(num_streets))
    (split_dir / "database").mkdir(parents=True)
    (split_dir / "queries").mkdir()
    database_positions, database_names, database_cameras = [], [], []
    queries = []  # (name, utm, camera)
    progress = tqdm(total=num_database + num_queries, desc=SPLITS[split_index], unit="image", leave=False)
    for street_index in range(num_streets):
        rng = np.random.default_rng([seed, split_index, street_index])
        centre = (
            region_origin[0] + (street_index % columns + 0.5) * cell,
            region_origin[1] + (street_index // columns + 0.5) * cell,
        )
        angle = rng.uniform(0, 2 * math.pi)
        length = (database_counts[street_index] - 1) * spacing + 2 * STREET_MARGIN_M
        origin = (centre[0] - length / 2 * math.cos(angle), centre[1] - length / 2 * math.sin(angle))
        street = build_street(rng, length, origin, angle, shared_buildings, shared_signs, shared_fraction)
        note = f"{SPLITS[split_index]}-street{street_index:03d}"

        db_lighting = Lighting(sky=street.sky, clouds=rng.uniform(0.0, 0.5), cloud_offset=tuple(rng.uniform(0, 256, 2)))
        street_cameras = []
        for i in range(database_counts[street_index]):
            camera = _database_camera(rng, STREET_MARGIN_M + i * spacing, spacing)
            image, _ = render_view(street, camera, K, image_size, db_lighting, clouds)
            image = image * rng.uniform(0.95, 1.05) + rng.standard_normal(image.shape, dtype=np.float32) * 1.5
            name, utm = _file_name(street, camera, f"s{split_index}{street_index:03d}d{i:04d}", "201906", note)
            _save_jpeg(image, split_dir / "database" / name)
            progress.update()
            database_positions.append(utm)
            database_names.append(name)
            database_cameras.append(camera)
            street_cameras.append(camera)

        first, last = street_cameras[0].x, street_cameras[-1].x
        for i in range(query_counts[street_index]):
            camera, lighting = _query_capture(rng, first, last)
            rendered, _ = render_view(street, camera, K, image_size, lighting, clouds)
            image = _degrade_query(rng, rendered, K, camera, lighting)
            year_month = f"20{rng.integers(20, 25)}{rng.integers(1, 13):02d}"
            name, utm = _file_name(street, camera, f"s{split_index}{street_index:03d}q{i:04d}", year_month, note)
            _save_jpeg(image, split_dir / "queries" / name)
            progress.update()
            queries.append((name, utm, camera))

    progress.close()
    database_positions = np.array(database_positions)
    homographies = {}
    for name, utm, camera in queries:
        nearest = int(np.argmin(np.linalg.norm(database_positions - np.array(utm), axis=1)))
        H = view_homography(K, camera, database_cameras[nearest])
        homographies[name] = {"database": database_names[nearest], "homography": H.tolist()}
    sidecar = {
        "description": "For each query, its nearest database image (UTM distance) and the homography of the facade "
        "plane from query pixels to that database image's pixels; exact on the facades.",
        "pixel_convention": "x right, y down, in pixels of the saved images; the centre of the pixel in row r and "
        "column c is at (x, y) = (c, r)",
        "image_size": list(image_size),
        "homographies": homographies,
    }
    (split_dir / "homographies.json").write_text(json.dumps(sidecar, indent=1, sort_keys=True) + "\n")
    return columns * cell


def check_destination(out_dir: Path, name: str, overwrite: bool) -> None:
    """Raise ValueError for a ``name`` that is not a plain folder name or an ``out_dir`` that is (or lies inside)
    a file, FileExistsError for an occupied name (see `tools.outputs.check_destination`)."""
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"name must be a plain folder name, got {name!r}")
    existing = Path(out_dir)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is" if existing == Path(out_dir) else f"lies inside {existing}, which is"
        raise ValueError(f"the output folder {out_dir} (--out) {where} a file, not a folder")
    outputs.check_destination(Path(out_dir) / name, TOOL, overwrite)


def check_contact_sheet_path(path: Path | str) -> None:
    """Raise ValueError when a contact sheet cannot be written to ``path`` (a folder, a file as its parent, or an
    extension whose image format Pillow cannot write as a palette image), before any time is spent."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"contact sheet {path} is a folder; give a file name such as {path / 'samples.png'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"contact sheet {path}: {parent} is a file, not a folder")
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None or image_format not in Image.SAVE:
        raise ValueError(
            f"contact sheet {path}: Pillow cannot write {path.suffix or 'files without an extension'}; use .png"
        )
    try:
        Image.new("P", (2, 2)).save(io.BytesIO(), format=image_format)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"contact sheet {path}: cannot write a {image_format} sheet ({error}); use .png") from None


def world_settings(
    seed: int,
    image_size: Sequence[int],
    database_per_split: Sequence[int],
    queries_per_split: Sequence[int],
    images_per_street: int,
    database_spacing: float,
    shared_fraction: float,
    num_shared_buildings: int,
) -> dict:
    """The arguments of `generate_world` as its marker records them (`tools.outputs.read_marker`: "settings")."""
    return {
        "seed": int(seed),
        "image_size": [int(side) for side in image_size],
        "database_per_split": [int(count) for count in database_per_split],
        "queries_per_split": [int(count) for count in queries_per_split],
        "images_per_street": int(images_per_street),
        "database_spacing": float(database_spacing),
        "shared_fraction": float(shared_fraction),
        "num_shared_buildings": int(num_shared_buildings),
    }


def generate_world(
    out_dir: Path | str,
    name: str,
    seed: int = 0,
    image_size: Sequence[int] = DEFAULT_WORLD["image_size"],
    database_per_split: Sequence[int] = DEFAULT_WORLD["database_per_split"],
    queries_per_split: Sequence[int] = DEFAULT_WORLD["queries_per_split"],
    images_per_street: int = DEFAULT_WORLD["images_per_street"],
    database_spacing: float = DEFAULT_WORLD["database_spacing"],
    overwrite: bool = False,
    shared_fraction: float = SHARED_FRACTION,
    num_shared_buildings: int = NUM_SHARED_BUILDINGS,
) -> Path:
    """Generate a synthetic world into ``out_dir / name`` and return that folder.

    ``image_size`` is (H, W); ``database_per_split`` and ``queries_per_split`` give the (train, val, test) counts;
    each street carries at most ``images_per_street`` database images, ``database_spacing`` metres apart. The same
    arguments give byte-identical files. ``shared_fraction`` of the buildings come from a library of
    ``num_shared_buildings`` that recur all over the world (the defaults, 0.25 and 6, give the default world; more
    of them, and a library of a dozen, make places that only the arrangement of their facades tells apart). The
    world is written into a temporary sibling folder that is renamed at
    the end, so a failure leaves nothing behind; an existing non-empty ``out_dir / name`` raises FileExistsError
    unless ``overwrite`` and it is a world that this tool wrote with nothing else in it (its marker says so, see
    `tools.outputs`), and so does another run writing the same name (seen at the start by its temporary
    folder, or at the end by the rename). Temporary folders of runs that were killed before they could clean up
    are removed.
    """
    check_world_arguments(image_size, database_per_split, queries_per_split, images_per_street, database_spacing)
    check_repetition_arguments(shared_fraction, num_shared_buildings)
    out_dir = Path(out_dir)
    check_destination(out_dir, name, overwrite)
    final = out_dir / name
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs.handle_leftovers(out_dir, name, overwrite)
    staging = outputs.staging_folder(out_dir, name)
    try:
        world_rng = np.random.default_rng([seed, 1_000])
        shared_buildings = [int(s) for s in world_rng.integers(2**31, size=NUM_SHARED_BUILDINGS)]
        shared_signs = [int(s) for s in world_rng.integers(2**31, size=5)]
        # a larger library draws its extra buildings from another stream, so that the default world stays the same
        extra = max(0, num_shared_buildings - NUM_SHARED_BUILDINGS)
        shared_buildings += [int(s) for s in np.random.default_rng([seed, 1_001]).integers(2**31, size=extra)]
        shared_buildings = shared_buildings[:num_shared_buildings]
        clouds = periodic_noise(world_rng, 256, 1.6)
        region_east = BASE_EAST
        for split_index, split in enumerate(SPLITS):
            extent = _generate_split(
                staging / "images" / split,
                split_index,
                (region_east, BASE_NORTH),
                database_per_split[split_index],
                queries_per_split[split_index],
                images_per_street,
                database_spacing,
                (int(image_size[0]), int(image_size[1])),
                seed,
                shared_buildings,
                shared_signs,
                clouds,
                shared_fraction,
            )
            region_east += extent + SPLIT_GAP_M
        settings = world_settings(
            seed=seed,
            image_size=image_size,
            database_per_split=database_per_split,
            queries_per_split=queries_per_split,
            images_per_street=images_per_street,
            database_spacing=database_spacing,
            shared_fraction=shared_fraction,
            num_shared_buildings=num_shared_buildings,
        )
        outputs.write_marker(staging, TOOL, settings)
        outputs.publish(staging, final, TOOL, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def load_homographies(split_dir: Path | str) -> dict[str, tuple[str, np.ndarray]]:
    """Read ``<split_dir>/homographies.json``: query file name -> (nearest database file name, H (3, 3) float64).

    H maps pixel coordinates (x right, y down, pixel centres at integers) of the query to those of the database
    image, exactly for the points of the facades.
    """
    path = Path(split_dir) / "homographies.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {split_dir} a split folder of a world made by synthetic.py?")
    entries = json.loads(path.read_text())["homographies"]
    return {query: (entry["database"], np.array(entry["homography"])) for query, entry in entries.items()}


def make_contact_sheet(
    world_dir: Path | str, out_path: Path | str, split: str = "test", num_pairs: int = 6, thumb_size: int = 192
) -> Path:
    """Save a PNG grid of ``num_pairs`` queries of ``split``, each next to its nearest database image on which the
    query's frame, mapped by the stored homography, is outlined in green; returns ``out_path``.

    ``docs/synthetic_samples.png`` is made with
    ``python synthetic.py --out /tmp/worlds --contact_sheet docs/synthetic_samples.png``.
    """
    split_dir = Path(world_dir) / "images" / split
    homographies = load_homographies(split_dir)
    queries = sorted(homographies)
    num_pairs = min(num_pairs, len(queries))
    chosen = [queries[round(i * (len(queries) - 1) / max(1, num_pairs - 1))] for i in range(num_pairs)]
    with Image.open(split_dir / "queries" / chosen[0]) as first:
        thumb = (thumb_size, round(thumb_size * first.height / first.width))  # (width, height)
    pairs_per_row = min(2, num_pairs)
    rows = math.ceil(num_pairs / pairs_per_row)
    label_h = 16
    sheet = Image.new("RGB", (pairs_per_row * (2 * thumb[0] + 6), rows * (thumb[1] + label_h) + 2), "white")
    draw = ImageDraw.Draw(sheet)
    for k, query_name in enumerate(chosen):
        database_name, H = homographies[query_name]
        query = Image.open(split_dir / "queries" / query_name).convert("RGB")
        database = Image.open(split_dir / "database" / database_name).convert("RGB")
        width, height = query.size
        corners = np.array([[0, 0, 1], [width - 1, 0, 1], [width - 1, height - 1, 1], [0, height - 1, 1]]) @ H.T
        outline = corners[:, :2] / corners[:, 2:]
        database_draw = ImageDraw.Draw(database)
        database_draw.line([tuple(p) for p in outline] + [tuple(outline[0])], fill=(0, 255, 0), width=3)
        x = (k % pairs_per_row) * (2 * thumb[0] + 6)
        y = (k // pairs_per_row) * (thumb[1] + label_h)
        sheet.paste(query.resize(thumb, Image.Resampling.LANCZOS), (x, y + label_h))
        sheet.paste(database.resize(thumb, Image.Resampling.LANCZOS), (x + thumb[0], y + label_h))
        east_q, north_q = vg_names.parse_utm(query_name)
        east_d, north_d = vg_names.parse_utm(database_name)
        draw.text((x + 4, y + 2), "query", fill="black")
        draw.text(
            (x + thumb[0] + 4, y + 2),
            f"database, {math.hypot(east_q - east_d, north_q - north_d):.1f} m",
            fill="black",
        )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out_path, optimize=True)
    return out_path
