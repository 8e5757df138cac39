"""The file names of the visual geo-localization (VG) benchmark: the one writer and the one parser of the format.

A dataset image is named ``@utm_east@utm_north@utm_zone@zone_letter@lat@lon@pano_id@tile@heading@pitch@roll@height
@timestamp@note@.jpg``: 14 fields between "@"s, then the extension. Only ``utm_east`` and ``utm_north`` are required
to read a name (eval.py's distances are between those); empty fields are allowed anywhere. Only the file name is
parsed, never the folders above it.
"""

from __future__ import annotations

import math
import os

FIELDS = (
    "utm_east", "utm_north", "utm_zone", "zone_letter", "lat", "lon", "pano_id", "tile", "heading", "pitch", "roll",
    "height", "timestamp", "note",
)  # fmt: skip
NAME_PATTERN = "@" + "@".join(FIELDS) + "@.jpg"
TEXT_FIELDS = FIELDS[FIELDS.index("pano_id") :]  # written as the caller formatted them
UTM_DECIMALS = 2  # centimetres
_FORBIDDEN = ("@", "/", "\\")  # a field holding one of them would change the name's fields or folders


def format_name(
    utm_east: float,
    utm_north: float,
    utm_zone: int,
    zone_letter: str,
    lat: float,
    lon: float,
    *,
    latlon_decimals: int,
    extension: str,
    **text_fields: str,
) -> str:
    """The VG file name of an image at UTM (``utm_east``, ``utm_north``) metres, i.e. latitude ``lat`` and longitude
    ``lon`` degrees, written with ``latlon_decimals`` decimals (UTM with `UTM_DECIMALS`).

    ``text_fields`` are the `TEXT_FIELDS` as written (``pano_id``, ``tile``, ``heading``, ``pitch``, ``roll``,
    ``height``, ``timestamp``, ``note``; missing ones are empty). ``extension`` follows the last "@" (e.g.
    ".jpg", or "" to add it later). Raises ValueError for an unknown field or a field holding "@", "/" or "\\".
    """
    unknown = sorted(set(text_fields) - set(TEXT_FIELDS))
    if unknown:
        raise ValueError(f"unknown VG name fields {unknown}; the text fields are {list(TEXT_FIELDS)}")
    values = {
        "utm_east": f"{utm_east:.{UTM_DECIMALS}f}",
        "utm_north": f"{utm_north:.{UTM_DECIMALS}f}",
        "utm_zone": str(utm_zone),
        "zone_letter": zone_letter,
        "lat": f"{lat:.{latlon_decimals}f}",
        "lon": f"{lon:.{latlon_decimals}f}",
        **text_fields,
    }
    for field, value in values.items():
        if any(character in value for character in _FORBIDDEN):
            raise ValueError(f"the VG name field {field} cannot hold '@', '/' or '\\', got {value!r}")
    return "@" + "@".join(values.get(field, "") for field in FIELDS) + "@" + extension


def name_fields(path: str | os.PathLike) -> list[str]:
    """The @-separated fields of the file name of ``path`` (not of the folders above it); field 0 is what precedes
    the first "@" (empty in a VG name) and the last one is the extension, so ``FIELDS[i]`` is field ``i + 1``."""
    return os.path.basename(path).split("@")


def parse_field(path: str | os.PathLike, field: str) -> str:
    """The text of ``field`` (one of `FIELDS`, e.g. "utm_zone") in the file name of ``path``.

    Raises ValueError for an unknown field or a name with too few fields to hold it.
    """
    if field not in FIELDS:
        raise ValueError(f"unknown VG name field {field!r}; the fields are {list(FIELDS)}")
    position = FIELDS.index(field) + 1
    fields = name_fields(path)
    if len(fields) < position + 2:  # leading "" and trailing extension around the fields
        raise ValueError(
            f"the file name of {path} has no {field} field (@-separated field number {position}); "
            f"expected a name like {NAME_PATTERN}"
        )
    return fields[position]


def parse_utm(path: str | os.PathLike) -> tuple[float, float]:
    """(utm_east, utm_north) in metres, read from the file name of ``path``.

    Raises ValueError naming the file and the expected pattern when the name does not start with
    ``@<east>@<north>@`` with two finite numbers.
    """
    fields = name_fields(path)
    try:
        if len(fields) < 4 or fields[0] != "":
            raise ValueError("too few @-separated fields")
        east, north = float(fields[1]), float(fields[2])
        if not (math.isfinite(east) and math.isfinite(north)):
            raise ValueError("coordinates are not finite")
    except ValueError as error:
        raise ValueError(
            f"cannot read UTM coordinates from the file name of {path} ({error}); expected a name like {NAME_PATTERN}"
        ) from None
    return east, north


def parse_note(path: str | os.PathLike) -> str:
    """The note (14th @-field) of the file name of ``path``, e.g. ``night_sideways_tokyo`` on MSLS.

    Raises ValueError when the name has fewer than 14 fields.
    """
    return parse_field(path, "note")
