"""WGS84 <-> UTM (`geodesy`) against published coordinates.

Tolerances. The references of KNOWN_GRS80 were computed with GeographicLib (Karney's transverse Mercator, exact to
nanometres) and are given to the nanometre (utm package, tests/test_utm.py, class KnownValuesGRS80). Our 6th-order
Krüger series has a truncation error below 5 nm within 3,900 km of the central meridian (Karney 2011), and double
precision rounds coordinates of ~1e7 m to ~2e-9 m, so a tolerance of 1 micrometre holds on any CPU and libm, while a
mistake in the zone, false northing, scale or the series' terms down to the 4th order (alpha_4 * A ~ 16 micrometres;
alpha_3 * A ~ 8 mm) fails it. (The 5th and 6th-order terms, below 0.1 micrometre, are beyond what a test can see.)
The WGS84 reference (the Eiffel Tower in pygeodesy's tests) is published
rounded to the millimetre: its tolerance is half a millimetre plus the same 1 micrometre.
"""

from __future__ import annotations

import math

import pytest

from tools import geodesy

# (lat, lon) -> (easting, northing, zone, band), GRS80
KNOWN_GRS80 = [
    ((50.77534556, 6.08388667), (294408.662941387, 5628897.512984829, 32, "U")),  # Aachen
    ((40.71435000, -74.00597000), (583959.959045332, 4507523.086854665, 18, "T")),  # New York
    ((-41.28646000, 174.77623611), (313783.980049117, 5427057.313755062, 60, "G")),  # Wellington
    ((-33.92486889, 18.42405500), (261877.350976653, 6243185.700844696, 34, "H")),  # Cape Town
    ((-32.89018000, -68.84405000), (514586.227836383, 6360876.825073616, 19, "H")),  # Mendoza
    ((64.83777806, -147.71638889), (466013.322449279, 7190567.781669118, 6, "W")),  # Fairbanks
    ((56.79680000, -5.00601000), (377485.765670114, 6296561.854117111, 30, "V")),  # Ben Nevis
    ((84.0, -5.00601), (476594.34011230164, 9328501.361833721, 30, "X")),  # latitude 84
]
MICROMETRE = 1e-6


@pytest.mark.parametrize(("latlon", "expected"), KNOWN_GRS80)
def test_latlon_to_utm_matches_geographiclib(latlon, expected):
    easting, northing, zone, band = expected
    utm = geodesy.latlon_to_utm(*latlon, ellipsoid=geodesy.GRS80)
    assert utm.zone == zone and geodesy.latitude_band(latlon[0]) == band
    assert utm.hemisphere == ("N" if latlon[0] >= 0 else "S")
    assert abs(utm.easting - easting) < MICROMETRE and abs(utm.northing - northing) < MICROMETRE


@pytest.mark.parametrize(("latlon", "expected"), KNOWN_GRS80)
def test_utm_to_latlon_matches_geographiclib(latlon, expected):
    easting, northing, zone, band = expected
    lat, lon = geodesy.utm_to_latlon(easting, northing, zone, geodesy.band_hemisphere(band), geodesy.GRS80)
    # 1e-9 degrees is 0.1 mm: the references' latitudes and longitudes are given to 1e-8 degrees or better
    assert abs(lat - latlon[0]) < 1e-9 and abs(lon - latlon[1]) < 1e-9


def test_wgs84_eiffel_tower_to_the_millimetre():
    utm = geodesy.latlon_to_utm(48.8582, 2.2945)
    assert (utm.zone, utm.hemisphere) == (31, "N")
    assert abs(utm.easting - 448251.795) < 0.0005 + MICROMETRE
    assert abs(utm.northing - 5411932.678) < 0.0005 + MICROMETRE


def test_central_meridian_and_equator():
    # on the central meridian the northing is 0.9996 times the meridian arc: 0 at the equator, and at 45 N
    # 0.9996 * 4,984,944.378 m (the WGS84 meridian arc to 45 degrees)
    assert geodesy.latlon_to_utm(0.0, 9.0) == geodesy.UTM(500000.0, 0.0, 32, "N")
    assert abs(geodesy.latlon_to_utm(45.0, 9.0).northing - 0.9996 * 4_984_944.378) < 0.001
    south = geodesy.latlon_to_utm(-1e-9, 9.0)
    assert south.hemisphere == "S" and abs(south.northing - 10_000_000.0) < 0.001


@pytest.mark.parametrize("latlon", [(45.1, 15.07), (-33.9, 151.2), (0.5, -0.3), (83.9, 100.0), (-79.9, -179.9)])
def test_round_trip_is_exact_to_a_micrometre(latlon):
    utm = geodesy.latlon_to_utm(*latlon)
    lat, lon = geodesy.utm_to_latlon(utm.easting, utm.northing, utm.zone, utm.hemisphere)
    # 1e-11 degrees is about 1 micrometre on the ground
    assert abs(lat - latlon[0]) < 1e-11 and abs((lon - latlon[1] + 180) % 360 - 180) < 1e-11


def test_neighbouring_zone_keeps_distances():
    # two points 100 m apart across the 12 E boundary, both in zone 32 (where the first one is): ~100 m apart,
    # up to the UTM scale there (about 1.0004 at 12 E, 45 N)
    a = geodesy.latlon_to_utm(45.0, 11.9994, zone=32)
    b = geodesy.latlon_to_utm(45.0, 12.0006, zone=32)
    metres = math.hypot(b.easting - a.easting, b.northing - a.northing)
    assert 94.0 < metres < 95.0  # 0.0012 degrees of longitude at 45 N is 94.6 m


@pytest.mark.parametrize(
    ("latlon", "zone", "band"),
    [
        ((56.0, 3.0), 32, "V"),
        ((55.99, 3.0), 31, "U"),
        ((72.0, 9.0), 33, "X"),
        ((72.0, 8.99), 31, "X"),
        ((-80, 0), 31, "C"),
    ],
)
def test_zones_and_bands(latlon, zone, band):
    assert geodesy.utm_zone(*latlon) == zone and geodesy.latitude_band(latlon[0]) == band


def test_bad_input():
    with pytest.raises(ValueError, match="latitude 85"):
        geodesy.latlon_to_utm(85.0, 0.0)
    with pytest.raises(ValueError, match="longitude 190"):
        geodesy.latlon_to_utm(0.0, 190.0)
    with pytest.raises(ValueError, match="from the central meridian of zone 1"):
        geodesy.latlon_to_utm(0.0, 60.0, zone=1)
    with pytest.raises(ValueError, match="zone"):
        geodesy.utm_to_latlon(500000.0, 0.0, 61, "N")
    with pytest.raises(ValueError, match="hemisphere"):
        geodesy.utm_to_latlon(500000.0, 0.0, 32, "T")
    with pytest.raises(ValueError, match="band"):
        geodesy.band_hemisphere("I")
    assert geodesy.band_hemisphere("S") == "N" and geodesy.band_hemisphere("M") == "S"
