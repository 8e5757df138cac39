"""The library of `make_vg_dataset.py`: a folder of your own photos and a CSV of their positions into a VG dataset.

    python make_vg_dataset.py --photos my_photos --csv my_photos.csv --out datasets_vg/datasets --name my_street
    python eval.py --datasets_folder datasets_vg/datasets --dataset_name my_street --resume_fe ... --resume_hr ...

The CSV has a header row and one row per photo:

    path,role,lat,lon                      (WGS84 degrees)
    IMG_0001.jpg,database,45.4371,12.3326
    IMG_0107.jpg,queries,45.4372,12.3330

or UTM positions instead of latitude/longitude (`easting,northing,zone,band` with the latitude band letter C..X, or
`hemisphere` N/S instead of `band`). `path` is relative to --photos (or absolute); `role` is `database` (photos of
known position to search) or `queries` (photos to localise; their positions are the ground truth of the recalls).
Optional columns: `heading` (degrees) and `timestamp` (e.g. 201906), written into the file name. Any other column
is an error (a typo would otherwise be ignored silently).

Every photo is projected into ONE UTM zone (--zone, default: the zone of the median position), so that distances
between photos are plain Euclidean distances in metres, as eval.py computes them; the Krüger series used
(`tools.geodesy`) stays exact to nanometres far beyond a zone's edge. Photos on both sides of the equator cannot share a
UTM frame and are refused.

Written: ``<out>/<name>/images/<split>/{database,queries}/@east@north@zone@band@lat@lon@@@heading@@@@timestamp@
<original name>@.jpg``. JPEG and PNG files are copied byte for byte, except JPEGs whose EXIF orientation says they
are stored rotated: those are turned upright and re-encoded (quality 95), since the datasets ignore EXIF. Other
formats Pillow reads are converted to JPEG. The dataset is written to a temporary folder `.<name>.partial-<pid>`
renamed at the end, so a bad row, an error or a signal (Ctrl-C, SIGTERM, SIGHUP) leaves nothing behind; the
temporary folder of a killed run is removed by the next run, and a second run on the same name refuses. With it goes
a marker, `.dataset_tool.json`: --overwrite replaces only a dataset that this tool wrote, with nothing else in it and
holding none of the photos or the CSV (see `tools.outputs`).
"""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from tools import geodesy, outputs, vg_names

TOOL = "make_vg_dataset.py"  # the name in the marker of the datasets it writes (see tools.outputs)
ROLES = ("database", "queries")
LATLON_COLUMNS = ("lat", "lon")
UTM_COLUMNS = ("easting", "northing", "zone")
OPTIONAL_COLUMNS = ("heading", "timestamp")
MAX_EASTING, MAX_NORTHING = 1_000_000, 10_000_000  # UTM's false easting is 500 km, the southern false northing 10000 km
TIMESTAMP = re.compile(r"[0-9A-Za-z_:.+-]{1,32}")  # a field of the file name: no @, /, \\, spaces nor controls
MAX_NOTE = 64  # characters of the photo's own name kept in the written name (a file name has at most 255 bytes)
EXIF_ORIENTATION = 0x0112
JPEG_QUALITY = 95


@dataclass(frozen=True)
class Photo:
    """One row of the CSV, checked: the photo's file, its role, and its WGS84 position."""

    line: int  # line of the CSV (the header is line 1)
    path: Path
    role: str
    lat: float
    lon: float
    heading: str = ""
    timestamp: str = ""


def _number(value: str, column: str, where: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{where}: {column} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: {column} {value!r} is not a finite number")
    return number


def _position(row: dict[str, str], where: str) -> tuple[float, float]:
    """(lat, lon) of a row given as lat/lon or as UTM easting/northing/zone/band (or hemisphere)."""
    if "lat" in row:
        lat, lon = _number(row["lat"], "lat", where), _number(row["lon"], "lon", where)
    else:
        easting = _number(row["easting"], "easting", where)
        northing = _number(row["northing"], "northing", where)
        if not 0 <= easting <= MAX_EASTING or not 0 <= northing <= MAX_NORTHING:
            raise ValueError(
                f"{where}: easting {easting:g}, northing {northing:g} is not a UTM position (expected an easting "
                f"from 0 to {MAX_EASTING:,} m and a northing from 0 to {MAX_NORTHING:,} m)"
            )
        zone = row["zone"].strip()
        if not (zone.isascii() and zone.isdigit()) or not 1 <= int(zone) <= 60:
            raise ValueError(f"{where}: zone {zone!r} is not a UTM zone (an integer from 1 to 60)")
        try:
            if "band" in row:
                hemisphere = geodesy.band_hemisphere(row["band"].strip())
            else:
                hemisphere = row["hemisphere"].strip().upper()
            lat, lon = geodesy.utm_to_latlon(easting, northing, int(zone), hemisphere)
        except (ValueError, OverflowError) as error:
            raise ValueError(f"{where}: {error}") from None
    try:
        geodesy.utm_zone(lat, lon)  # checks the ranges
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    return lat, lon


def _check_columns(columns: Sequence[str], csv_path: Path) -> None:
    repeated = sorted({column for column in columns if columns.count(column) > 1})
    if repeated:
        raise ValueError(f"{csv_path}: the header names {', '.join(map(repr, repeated))} more than once")
    columns = set(columns)
    has_latlon = set(LATLON_COLUMNS) <= columns
    has_utm = set(UTM_COLUMNS) <= columns and bool(columns & {"band", "hemisphere"})
    problems = []
    if not {"path", "role"} <= columns:
        problems.append("the columns path and role are required")
    if has_latlon == has_utm:
        problems.append(
            "give either lat,lon (WGS84 degrees) or easting,northing,zone and band (or hemisphere), not both"
            if has_latlon
            else "positions are missing: give lat,lon or easting,northing,zone,band (or hemisphere)"
        )
    known = {
        "path",
        "role",
        *OPTIONAL_COLUMNS,
        *(LATLON_COLUMNS if has_latlon else (*UTM_COLUMNS, "band", "hemisphere")),
    }
    unknown = sorted(columns - known)
    if unknown:
        problems.append(f"unknown columns {unknown}")
    if "band" in columns and "hemisphere" in columns:
        problems.append("give band or hemisphere, not both")
    if problems:
        raise ValueError(f"{csv_path}: {'; '.join(problems)} (header found: {sorted(columns)})")


def read_photo_table(csv_path: str | Path, photos_dir: str | Path) -> list[Photo]:
    """Read and check the CSV (see the module's docstring); errors name the file and the line."""
    csv_path, photos_dir = Path(csv_path), Path(photos_dir)
    if not csv_path.is_file():
        raise FileNotFoundError(f"CSV {csv_path} does not exist")
    if not photos_dir.is_dir():
        raise FileNotFoundError(f"photos folder {photos_dir} does not exist")
    try:
        return _read_rows(csv_path, photos_dir)
    except UnicodeDecodeError as error:
        raise ValueError(f"{csv_path} is not UTF-8 text ({error}); save it as UTF-8 CSV") from None


def _read_rows(csv_path: Path, photos_dir: Path) -> list[Photo]:
    with open(csv_path, newline="", encoding="utf-8-sig") as file:
        reader = csv.reader(file)
        try:
            return _read_photos(reader, csv_path, photos_dir)
        except csv.Error as error:
            raise ValueError(f"{csv_path}, line {reader.line_num}: not valid CSV ({error})") from None


def _read_photos(reader, csv_path: Path, photos_dir: Path) -> list[Photo]:
    """The checked rows of ``reader`` (a `csv.reader`, whose ``line_num`` gives the lines of the errors)."""
    header = next(reader, None)
    while header is not None and not any(name.strip() for name in header):
        header = next(reader, None)  # blank lines before the header
    if header is None:
        raise ValueError(f"{csv_path} is empty; expected a header such as path,role,lat,lon")
    columns = [name.strip().lower() for name in header]
    _check_columns(columns, csv_path)
    photos, seen = [], {}
    first_line = reader.line_num + 1  # where the next record starts: a quoted field may span several lines
    for fields in reader:
        line, first_line = first_line, reader.line_num + 1
        where = f"{csv_path}, line {line}"
        if not any(field.strip() for field in fields):
            continue  # a blank line
        if len(fields) != len(columns):
            raise ValueError(f"{where}: expected {len(columns)} fields ({','.join(columns)}), got {len(fields)}")
        row = {column: value.strip() for column, value in zip(columns, fields)}
        role = row["role"].lower()
        if role not in ROLES:
            raise ValueError(f"{where}: role {row['role']!r} must be one of {', '.join(ROLES)}")
        if not row["path"] or "\0" in row["path"]:
            raise ValueError(f"{where}: path {row['path']!r} is not a file name (relative to {photos_dir} or absolute)")
        path = Path(row["path"])
        path = path if path.is_absolute() else photos_dir / path
        if not path.is_file():
            problem = "is a folder, not a photo" if path.is_dir() else "does not exist"
            raise FileNotFoundError(f"{where}: photo {path} {problem}")
        if path.resolve() in seen:
            raise ValueError(f"{where}: photo {path} is already listed on line {seen[path.resolve()]}")
        seen[path.resolve()] = line
        lat, lon = _position(row, where)
        heading = row.get("heading", "")
        if heading:
            degrees = _number(heading, "heading", where)
            if not -360 <= degrees <= 360:
                raise ValueError(f"{where}: heading {heading!r} is not an angle from -360 to 360 degrees")
            heading = f"{degrees % 360:.1f}"
        timestamp = row.get("timestamp", "")
        if timestamp and not TIMESTAMP.fullmatch(timestamp):
            raise ValueError(
                f"{where}: timestamp {timestamp!r} must be 1 to 32 letters, digits or _:.+- (e.g. 201906); it goes "
                "into the file name"
            )
        photos.append(Photo(line, path, role, lat, lon, heading, timestamp))
    missing = [role for role in ROLES if not any(photo.role == role for photo in photos)]
    if missing:
        raise ValueError(f"{csv_path}: no photo has the role {' or '.join(missing)}; both are needed")
    return photos


def common_zone(photos: Sequence[Photo]) -> int:
    """The UTM zone of the median position of `photos`."""
    lats = sorted(photo.lat for photo in photos)
    lons = sorted(photo.lon for photo in photos)
    return geodesy.utm_zone(lats[len(lats) // 2], lons[len(lons) // 2])


def _note(path: Path) -> str:
    """The photo's file name without extension, made safe for a VG name field."""
    return re.sub(r"[@/\\\s]+", "_", path.stem)[:MAX_NOTE] or "photo"


def vg_file_name(photo: Photo, utm: geodesy.UTM, extension: str) -> str:
    """`@east@north@zone@band@lat@lon@@@heading@@@@timestamp@note@<extension>` (14 fields, as the benchmark)."""
    return vg_names.format_name(
        utm.easting,
        utm.northing,
        utm.zone,
        geodesy.latitude_band(photo.lat),
        photo.lat,
        photo.lon,
        latlon_decimals=7,
        extension=extension,
        heading=photo.heading,
        timestamp=photo.timestamp,
        note=_note(photo.path),
    )


def _copy_photo(source: Path, destination_stem: Path, where: str) -> Path:
    """Copy (or convert) one photo to `destination_stem` + ".jpg" or ".png"; return the written path."""
    try:
        with Image.open(source) as image:
            image_format = image.format
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
            if image_format == "PNG":
                image.load()
                destination = destination_stem.with_name(destination_stem.name + ".png")
                shutil.copyfile(source, destination)
            elif image_format == "JPEG" and orientation in (1, None):
                image.load()
                destination = destination_stem.with_name(destination_stem.name + ".jpg")
                shutil.copyfile(source, destination)
            else:  # rotated JPEG or another format: upright RGB JPEG
                upright = ImageOps.exif_transpose(image).convert("RGB")
                destination = destination_stem.with_name(destination_stem.name + ".jpg")
                upright.save(destination, quality=JPEG_QUALITY)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise OSError(f"{where}: cannot read photo {source}: {error}") from error
    return destination


def make_vg_dataset(
    photos_dir: str | Path,
    csv_path: str | Path,
    out_dir: str | Path,
    name: str,
    split: str = "test",
    zone: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the dataset `<out_dir>/<name>/images/<split>/{database,queries}/` and return `<out_dir>/<name>`.

    Args:
        photos_dir: folder the CSV's relative paths start from.
        csv_path: the table of photos (see the module's docstring).
        out_dir, name: where the dataset goes (eval.py's --datasets_folder and --dataset_name).
        split: the split folder (eval.py reads "test").
        zone: UTM zone of every photo (default: `common_zone`).
        overwrite: replace an existing `<out_dir>/<name>` that this tool wrote, with nothing else in it and holding
            none of the inputs (default: refuse; `tools.outputs.check_replaceable`).
    """
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"name must be a plain folder name, got {name!r}")
    if not split or "/" in split or os.sep in split or split in (".", ".."):
        raise ValueError(f"split must be a plain folder name, got {split!r}")
    out_dir = Path(out_dir)
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is" if existing == out_dir else f"lies inside {existing}, which is"
        raise ValueError(f"the output folder {out_dir} (--out) {where} a file, not a folder")
    final = out_dir / name
    photos = read_photo_table(csv_path, photos_dir)
    inputs = [Path(photos_dir), Path(csv_path), *(photo.path for photo in photos)]
    outputs.check_destination(final, TOOL, overwrite, inputs)
    if len({photo.lat >= 0 for photo in photos}) > 1:
        north = next(photo for photo in photos if photo.lat >= 0)
        south = next(photo for photo in photos if photo.lat < 0)
        raise ValueError(
            f"{csv_path}: photos on both sides of the equator cannot share one UTM frame (line {north.line} is at "
            f"latitude {north.lat:.7f}, line {south.line} at {south.lat:.7f})"
        )
    zone = common_zone(photos) if zone is None else zone
    utms = []
    for photo in photos:
        try:
            utms.append(geodesy.latlon_to_utm(photo.lat, photo.lon, zone))
        except ValueError as error:
            raise ValueError(f"{csv_path}, line {photo.line}: {error}") from None

    out_dir.mkdir(parents=True, exist_ok=True)
    outputs.handle_leftovers(out_dir, name, overwrite)
    staging = outputs.staging_folder(out_dir, name)
    try:
        written: dict[str, int] = {}
        for role in ROLES:
            (staging / "images" / split / role).mkdir(parents=True)
        for photo, utm in zip(photos, utms):
            destination = _copy_photo(
                photo.path,
                staging / "images" / split / photo.role / vg_file_name(photo, utm, ""),
                f"{csv_path}, line {photo.line}",
            )
            key = f"{photo.role}/{destination.name}"
            if key in written:
                raise ValueError(
                    f"{csv_path}, line {photo.line}: same position and file name as line {written[key]} ({key})"
                )
            written[key] = photo.line
        settings = {"photos": str(Path(photos_dir).resolve()), "csv": str(Path(csv_path).resolve()), "zone": zone}
        outputs.write_marker(staging, TOOL, {**settings, "split": split})
        outputs.publish(staging, final, TOOL, overwrite, inputs)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final
