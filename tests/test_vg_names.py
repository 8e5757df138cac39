"""`tools.vg_names`: the one writer and parser of the VG file names, their round trip and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools import vg_names


def _name(**overrides) -> str:
    fields = dict(
        utm_east=500123.456,
        utm_north=5000987.654,
        utm_zone=33,
        zone_letter="T",
        lat=45.1234567891,
        lon=15.0123456789,
        latlon_decimals=6,
        extension=".jpg",
        pano_id="s0001d0002",
        heading="12.5",
        pitch="6.0",
        roll="-0.3",
        height="2.50",
        timestamp="201906",
        note="train-street001",
    )
    return vg_names.format_name(**{**fields, **overrides})


def test_format_name_writes_fourteen_fields_in_order() -> None:
    assert _name() == (
        "@500123.46@5000987.65@33@T@45.123457@15.012346@s0001d0002@@12.5@6.0@-0.3@2.50@201906@train-street001@.jpg"
    )
    assert vg_names.NAME_PATTERN == (
        "@utm_east@utm_north@utm_zone@zone_letter@lat@lon@pano_id@tile@heading@pitch@roll@height@timestamp@note@.jpg"
    )


def test_round_trip() -> None:
    name = _name(latlon_decimals=7, extension=".png", tile="t3")
    path = Path("/data/a@b/images/test/database") / name
    assert vg_names.parse_utm(path) == (500123.46, 5000987.65)
    assert vg_names.parse_note(path) == "train-street001"
    expected = {
        "utm_east": "500123.46", "utm_north": "5000987.65", "utm_zone": "33", "zone_letter": "T",
        "lat": "45.1234568", "lon": "15.0123457", "pano_id": "s0001d0002", "tile": "t3", "heading": "12.5",
        "pitch": "6.0", "roll": "-0.3", "height": "2.50", "timestamp": "201906", "note": "train-street001",
    }  # fmt: skip
    assert {field: vg_names.parse_field(path, field) for field in vg_names.FIELDS} == expected
    assert vg_names.name_fields(path)[-1] == ".png"


def test_missing_text_fields_are_empty() -> None:
    name = vg_names.format_name(1.0, 2.0, 31, "U", 0.5, 0.25, latlon_decimals=7, extension="")
    assert name == "@1.00@2.00@31@U@0.5000000@0.2500000@@@@@@@@@"
    assert vg_names.parse_note(name + ".jpg") == ""


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"note": "a@b"}, "note cannot hold '@'"),
        ({"timestamp": "2019/06"}, "timestamp cannot hold"),
        ({"zone_letter": "T\\"}, "zone_letter cannot hold"),
        ({"street": "x"}, r"unknown VG name fields \['street'\]"),
    ],
)
def test_format_name_refuses_fields_that_would_break_the_name(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _name(**overrides)


@pytest.mark.parametrize("bad", ["photo.jpg", "@abc@10@.jpg", "@10@.jpg", "x@1@2@.jpg", "@nan@2@.jpg", "@1@inf@.jpg"])
def test_parse_utm_says_what_name_it_expected(bad: str) -> None:
    with pytest.raises(ValueError, match=f"cannot read UTM coordinates from the file name of /data/{bad} .*@utm_east"):
        vg_names.parse_utm(f"/data/{bad}")


def test_parse_utm_reads_the_file_name_only() -> None:
    assert vg_names.parse_utm("/data/a@1@2@/@583.5@4477.25@17@T@.jpg") == (583.5, 4477.25)


def test_parse_field_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="has no note field .*number 14.*@utm_east"):
        vg_names.parse_note("@1@2@33@T@.jpg")
    with pytest.raises(ValueError, match="has no utm_zone field"):
        vg_names.parse_field("@1@2@.jpg", "utm_zone")
    with pytest.raises(ValueError, match="unknown VG name field 'zone'"):
        vg_names.parse_field(_name(), "zone")
