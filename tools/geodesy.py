"""WGS84 latitude/longitude <-> UTM, with Krüger's series of the transverse Mercator projection to order n^6.

The series (Krüger 1912, in the form of Karney 2011, "Transverse Mercator with an accuracy of a few nanometers",
J. Geodesy 85:475-485, eqs. 35-36) is accurate to a few nanometres within 3,900 km of the central meridian, far
beyond a UTM zone, so points of one dataset may be projected into one common zone even when a few of them lie in
the next one. UTM: scale 0.9996 on the central meridian, false easting 500 km, false northing 10,000 km south of
the equator; zones of 6 degrees with the exceptions of Norway (32V) and Svalbard (31X-37X); latitude bands C to X
of 8 degrees (X: 12 degrees), UTM being defined from 80 S to 84 N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "Ellipsoid",
    "WGS84",
    "GRS80",
    "UTM",
    "utm_zone",
    "latitude_band",
    "band_hemisphere",
    "latlon_to_utm",
    "utm_to_latlon",
]

SCALE_FACTOR = 0.9996
FALSE_EASTING = 500_000.0
FALSE_NORTHING_SOUTH = 10_000_000.0
MIN_LATITUDE, MAX_LATITUDE = -80.0, 84.0
BANDS = "CDEFGHJKLMNPQRSTUVWX"  # 8-degree bands from 80 S; X covers 72-84 N


@dataclass(frozen=True)
class Ellipsoid:
    """Semi-major axis `a` (metres) and flattening `f`."""

    a: float
    f: float


WGS84 = Ellipsoid(6_378_137.0, 1 / 298.257223563)
GRS80 = Ellipsoid(6_378_137.0, 1 / 298.257222101)


@dataclass(frozen=True)
class UTM:
    """A UTM position: easting and northing in metres, zone 1..60, and the hemisphere ("N" or "S")."""

    easting: float
    northing: float
    zone: int
    hemisphere: str


def _series(ellipsoid: Ellipsoid) -> tuple[float, list[float], list[float]]:
    """(rectifying radius A, Krüger's alpha_1..6 (forward), beta_1..6 (inverse)) of `ellipsoid`."""
    n = ellipsoid.f / (2 - ellipsoid.f)
    n2, n3, n4, n5, n6 = n**2, n**3, n**4, n**5, n**6
    radius = ellipsoid.a / (1 + n) * (1 + n2 / 4 + n4 / 64 + n6 / 256)
    alpha = [
        n / 2 - 2 * n2 / 3 + 5 * n3 / 16 + 41 * n4 / 180 - 127 * n5 / 288 + 7891 * n6 / 37800,
        13 * n2 / 48 - 3 * n3 / 5 + 557 * n4 / 1440 + 281 * n5 / 630 - 1983433 * n6 / 1935360,
        61 * n3 / 240 - 103 * n4 / 140 + 15061 * n5 / 26880 + 167603 * n6 / 181440,
        49561 * n4 / 161280 - 179 * n5 / 168 + 6601661 * n6 / 7257600,
        34729 * n5 / 80640 - 3418889 * n6 / 1995840,
        212378941 * n6 / 319334400,
    ]
    beta = [
        n / 2 - 2 * n2 / 3 + 37 * n3 / 96 - n4 / 360 - 81 * n5 / 512 + 96199 * n6 / 604800,
        n2 / 48 + n3 / 15 - 437 * n4 / 1440 + 46 * n5 / 105 - 1118711 * n6 / 3870720,
        17 * n3 / 480 - 37 * n4 / 840 - 209 * n5 / 4480 + 5569 * n6 / 90720,
        4397 * n4 / 161280 - 11 * n5 / 504 - 830251 * n6 / 7257600,
        4583 * n5 / 161280 - 108847 * n6 / 3991680,
        20648693 * n6 / 638668800,
    ]
    return radius, alpha, beta


def _check_latlon(lat: float, lon: float) -> None:
    if not (math.isfinite(lat) and math.isfinite(lon)):
        raise ValueError(f"latitude {lat} and longitude {lon} must be finite numbers")
    if not MIN_LATITUDE <= lat <= MAX_LATITUDE:
        raise ValueError(f"latitude {lat} is outside UTM's range [{MIN_LATITUDE}, {MAX_LATITUDE}] degrees")
    if not -180.0 <= lon <= 180.0:
        raise ValueError(f"longitude {lon} is outside [-180, 180] degrees")


def utm_zone(lat: float, lon: float) -> int:
    """The UTM zone (1..60) of a point, with the Norway and Svalbard exceptions."""
    _check_latlon(lat, lon)
    zone = int((lon + 180) // 6) % 60 + 1
    if 56 <= lat < 64 and 3 <= lon < 12:
        return 32
    if lat >= 72 and 0 <= lon < 42:
        return 31 if lon < 9 else 33 if lon < 21 else 35 if lon < 33 else 37
    return zone


def latitude_band(lat: float) -> str:
    """The UTM latitude band letter (C..X) of a latitude in degrees."""
    if not (math.isfinite(lat) and MIN_LATITUDE <= lat <= MAX_LATITUDE):
        raise ValueError(f"latitude {lat} is outside UTM's range [{MIN_LATITUDE}, {MAX_LATITUDE}] degrees")
    return BANDS[min(int((lat - MIN_LATITUDE) // 8), len(BANDS) - 1)]


def band_hemisphere(band: str) -> str:
    """ "N" or "S" for a latitude band letter: C..M are southern, N..X northern."""
    if len(band) != 1 or band.upper() not in BANDS:
        raise ValueError(f"latitude band must be one letter of {BANDS}, got {band!r}")
    return "N" if band.upper() >= "N" else "S"


def latlon_to_utm(lat: float, lon: float, zone: int | None = None, ellipsoid: Ellipsoid = WGS84) -> UTM:
    """Project latitude and longitude (degrees) to UTM, in `zone` (default: the point's own zone).

    A point may be projected into a neighbouring zone (to keep a dataset in one zone); the series stays exact to
    nanometres within 3,900 km of the central meridian, and farther than that is refused.
    """
    _check_latlon(lat, lon)
    zone = utm_zone(lat, lon) if zone is None else zone
    if not (isinstance(zone, int) and 1 <= zone <= 60):
        raise ValueError(f"UTM zone must be an integer from 1 to 60, got {zone!r}")
    central_meridian = zone * 6 - 183
    delta_lon = (lon - central_meridian + 180) % 360 - 180
    if abs(delta_lon) > 30:
        raise ValueError(f"longitude {lon} is {abs(delta_lon):.1f} degrees from the central meridian of zone {zone}")
    radius, alpha, _ = _series(ellipsoid)
    e = math.sqrt(ellipsoid.f * (2 - ellipsoid.f))
    phi, lam = math.radians(lat), math.radians(delta_lon)
    # conformal latitude (as its tangent), then the Gauss-Schreiber transverse Mercator of the sphere
    tau = math.tan(phi)
    sigma = math.sinh(e * math.atanh(e * tau / math.sqrt(1 + tau**2)))
    tau_prime = tau * math.sqrt(1 + sigma**2) - sigma * math.sqrt(1 + tau**2)
    xi_prime = math.atan2(tau_prime, math.cos(lam))
    eta_prime = math.asinh(math.sin(lam) / math.hypot(tau_prime, math.cos(lam)))
    xi, eta = xi_prime, eta_prime
    for j, a_j in enumerate(alpha, start=1):
        xi += a_j * math.sin(2 * j * xi_prime) * math.cosh(2 * j * eta_prime)
        eta += a_j * math.cos(2 * j * xi_prime) * math.sinh(2 * j * eta_prime)
    easting = FALSE_EASTING + SCALE_FACTOR * radius * eta
    northing = SCALE_FACTOR * radius * xi
    hemisphere = "N" if lat >= 0 else "S"
    if hemisphere == "S":
        northing += FALSE_NORTHING_SOUTH
    return UTM(easting, northing, zone, hemisphere)


def utm_to_latlon(
    easting: float, northing: float, zone: int, hemisphere: str, ellipsoid: Ellipsoid = WGS84
) -> tuple[float, float]:
    """Latitude and longitude (degrees) of a UTM position; `hemisphere` is "N" or "S" (for a latitude band letter,
    see `band_hemisphere`: band S is northern)."""
    if not (isinstance(zone, int) and 1 <= zone <= 60):
        raise ValueError(f"UTM zone must be an integer from 1 to 60, got {zone!r}")
    if hemisphere not in ("N", "S"):
        raise ValueError(f"hemisphere must be N or S, got {hemisphere!r}")
    if not (math.isfinite(easting) and math.isfinite(northing)):
        raise ValueError(f"easting {easting} and northing {northing} must be finite numbers")
    radius, _, beta = _series(ellipsoid)
    e = math.sqrt(ellipsoid.f * (2 - ellipsoid.f))
    xi = (northing - (FALSE_NORTHING_SOUTH if hemisphere == "S" else 0.0)) / (SCALE_FACTOR * radius)
    eta = (easting - FALSE_EASTING) / (SCALE_FACTOR * radius)
    xi_prime, eta_prime = xi, eta
    for j, b_j in enumerate(beta, start=1):
        xi_prime -= b_j * math.sin(2 * j * xi) * math.cosh(2 * j * eta)
        eta_prime -= b_j * math.cos(2 * j * xi) * math.sinh(2 * j * eta)
    tau_prime = math.sin(xi_prime) / math.hypot(math.sinh(eta_prime), math.cos(xi_prime))
    lam = math.atan2(math.sinh(eta_prime), math.cos(xi_prime))
    # from the conformal latitude back to the geodetic one by Newton's method (Karney 2011, eqs. 19-21)
    tau = tau_prime
    for _ in range(8):
        sigma = math.sinh(e * math.atanh(e * tau / math.sqrt(1 + tau**2)))
        tau_i = tau * math.sqrt(1 + sigma**2) - sigma * math.sqrt(1 + tau**2)
        step = (
            (tau_prime - tau_i)
            / math.sqrt(1 + tau_i**2)
            * (1 + (1 - e**2) * tau**2)
            / ((1 - e**2) * math.sqrt(1 + tau**2))
        )
        tau += step
        if abs(step) < 1e-15:
            break
    lat = math.degrees(math.atan(tau))
    lon = (zone * 6 - 183 + math.degrees(lam) + 180) % 360 - 180
    return lat, lon
