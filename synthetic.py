"""A procedural street-view world for visual place recognition, written in the visual geo-localization benchmark layout.

Each split (train, val, test) is a set of straight streets, kilometres apart in UTM. Along each street stands a row of
planar building facades drawn with numpy and Pillow: walls of plaster, brick, stone or panels, window grids with
frames, shutters and balconies, doors, shop fronts with awnings and signs of random glyphs, posters. A small library
of buildings and shop signs is reused at far-apart places, so that global descriptors get confused and geometry has
to decide. Database images are taken every ``database_spacing`` metres from a car driving along the street and
looking at the facades; queries are taken from other positions, distances and headings, in other light, with blur,
noise, parked cars and passers-by in front.

Geometry. Each street has its own frame: x along the street, y towards the facades (the facades are the plane
y = 0), z up, in metres. A camera is a pinhole at (x, y, height) with a yaw (positive turns towards +x), a pitch
(positive looks up) and a roll. A view is rendered by casting the ray of every pixel onto the facade plane, the ground
plane z = 0 or the sky, so on the facades two views are related exactly by the plane-induced homography; for every
query the sidecar stores the one onto its nearest database image. Pixel coordinates are x right, y down, in pixels of
the saved image, with the centre of the pixel in row r and column c at (x, y) = (c, r).

Layout written under ``<out>/<name>/``::

    images/<split>/database/@east@north@33@T@lat@lon@pano_id@@heading@pitch@roll@height@yyyymm@street@.jpg
    images/<split>/queries/...same naming...
    images/<split>/homographies.json

The sidecar holds ``{"homographies": {<query file name>: {"database": <nearest database file name>, "homography":
<3 x 3 rows, query pixels to database pixels, H[2][2] = 1>}}, "image_size": [H, W], "pixel_convention": ...,
"description": ...}``; `load_homographies` reads it.

Usage::

    python synthetic.py --out datasets_vg/datasets --name synthetic --seed 0
    python synthetic.py --out /tmp/worlds --name tiny --preset tiny
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

import tool_outputs
from interrupts import Interrupted, install_signal_handlers

TOOL = "synthetic.py"  # the name in the marker of the worlds it writes (see tool_outputs)
SPLITS = ("train", "val", "test")
UTM_ZONE = 33
UTM_LETTER = "T"
BASE_EAST, BASE_NORTH = 500_000.0, 5_000_000.0  # zone 33T, near 45.1 N 15 E
SPLIT_GAP_M = 2_000.0  # empty land between the regions of two splits
STREET_GAP_M = 300.0  # at least this much between two streets of one split

FACADE_PPM = 32  # texels per metre of the facade textures
GROUND_PPM = 16  # texels per metre of the ground textures
GROUND_DEPTH_M = 24.0  # the ground texture covers 0 > y > -GROUND_DEPTH_M
SIDEWALK_M = 3.5  # the sidewalk runs from the facades to the curb at y = -SIDEWALK_M
FIELD_OF_VIEW_DEG = 80.0  # horizontal
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

# Palettes (RGB). Drawn from with the generator of the building, sign or image they colour.
PLASTER_COLOURS = (
    (236, 224, 196), (214, 172, 102), (190, 112, 80), (222, 162, 140), (238, 218, 140), (200, 200, 194),
    (150, 165, 182), (170, 186, 150), (242, 240, 232), (230, 190, 190), (182, 212, 192), (120, 122, 128),
    (205, 140, 95), (160, 190, 210), (225, 205, 170),
)  # fmt: skip
BRICK_COLOURS = ((158, 72, 52), (136, 58, 44), (176, 104, 70), (196, 160, 110), (112, 70, 56), (150, 120, 100))
STONE_COLOURS = ((186, 180, 166), (160, 156, 148), (206, 196, 170), (140, 132, 120), (196, 176, 146))
GLASS_COLOURS = ((58, 72, 88), (40, 46, 52), (62, 90, 96), (78, 82, 96), (96, 110, 120))
FRAME_COLOURS = ((236, 236, 230), (40, 72, 52), (84, 58, 42), (50, 50, 56), (150, 150, 150), (120, 40, 36))
SHUTTER_COLOURS = ((62, 112, 72), (70, 100, 142), (122, 82, 50), (110, 126, 132), (140, 54, 44), (196, 180, 120))
SIGN_COLOURS = (
    (200, 30, 36), (24, 70, 160), (20, 120, 60), (240, 196, 20), (24, 24, 28), (245, 245, 240), (236, 110, 20),
    (110, 40, 130), (0, 140, 160), (160, 20, 80),
)  # fmt: skip
CAR_COLOURS = (
    (190, 20, 30), (230, 230, 232), (30, 30, 34), (120, 124, 130), (30, 60, 140), (170, 170, 175), (20, 90, 60),
    (220, 180, 40), (90, 30, 30),
)  # fmt: skip
CLOTH_COLOURS = (
    (30, 30, 40), (60, 80, 140), (150, 30, 40), (200, 200, 200), (90, 110, 60), (120, 90, 60), (230, 160, 40),
    (40, 120, 150), (200, 90, 140),
)  # fmt: skip
SKIES = {  # zenith colour, horizon colour, cloud colour
    "clear": ((66, 118, 200), (178, 204, 232), (250, 250, 252)),
    "hazy": ((120, 154, 196), (212, 218, 222), (240, 240, 240)),
    "overcast": ((150, 154, 162), (200, 202, 206), (226, 226, 228)),
    "dusk": ((52, 62, 118), (236, 168, 118), (250, 200, 170)),
}


# --------------------------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Camera:
    """A pinhole camera in the frame of a street: x along it, y towards the facades (plane y = 0), z up; metres.

    Angles are in radians: ``yaw`` > 0 turns towards +x, ``pitch`` > 0 looks up, ``roll`` > 0 dips the camera's right
    side (the scene turns anticlockwise in the image).
    """

    x: float
    y: float
    height: float
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0

    @property
    def centre(self) -> np.ndarray:
        """Position in the street frame, (3,)."""
        return np.array([self.x, self.y, self.height])

    def rotation(self) -> np.ndarray:
        """World-to-camera rotation, (3, 3): its rows are the camera's right, down and forward axes."""
        forward = np.array(
            [
                math.sin(self.yaw) * math.cos(self.pitch),
                math.cos(self.yaw) * math.cos(self.pitch),
                math.sin(self.pitch),
            ]
        )
        right = np.array([math.cos(self.yaw), -math.sin(self.yaw), 0.0])
        down = np.cross(forward, right)
        cos_roll, sin_roll = math.cos(self.roll), math.sin(self.roll)
        return np.stack([cos_roll * right + sin_roll * down, -sin_roll * right + cos_roll * down, forward])


def intrinsics(image_size: tuple[int, int], fov_deg: float = FIELD_OF_VIEW_DEG) -> np.ndarray:
    """Pinhole matrix K, (3, 3), for an (H, W) image with horizontal field of view ``fov_deg`` and square pixels.

    The principal point is the image centre, ((W - 1) / 2, (H - 1) / 2), with pixel centres at integer coordinates.
    """
    height, width = image_size
    focal = width / 2 / math.tan(math.radians(fov_deg) / 2)
    return np.array([[focal, 0.0, (width - 1) / 2], [0.0, focal, (height - 1) / 2], [0.0, 0.0, 1.0]])


def facade_homography(K: np.ndarray, camera: Camera) -> np.ndarray:
    """Homography (3, 3) from facade coordinates (u, v, 1) to pixels (x, y, 1) of ``camera``.

    u is the position along the street and v the height above the ground, in metres, of a point of the plane y = 0.
    """
    R = camera.rotation()
    return K @ R @ np.column_stack([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], -camera.centre])


def view_homography(K: np.ndarray, source: Camera, target: Camera) -> np.ndarray:
    """Homography (3, 3), normalised so that H[2, 2] = 1, from pixels of ``source`` to pixels of ``target``.

    It is exact for the points of the facade plane; both cameras share the intrinsics ``K``.
    """
    H = facade_homography(K, target) @ np.linalg.inv(facade_homography(K, source))
    return H / H[2, 2]


def utm_to_latlon(east: float, north: float, zone: int = UTM_ZONE) -> tuple[float, float]:
    """Latitude and longitude (degrees, WGS84) of a point of the northern hemisphere given in UTM ``zone``.

    Snyder's series for the inverse transverse Mercator projection, good to well under a metre within a zone.
    """
    a, e2, k0 = 6_378_137.0, 0.00669438, 0.9996
    ep2 = e2 / (1 - e2)
    e1 = (1 - math.sqrt(1 - e2)) / (1 + math.sqrt(1 - e2))
    mu = north / k0 / (a * (1 - e2 / 4 - 3 * e2**2 / 64 - 5 * e2**3 / 256))
    phi1 = (
        mu
        + (3 * e1 / 2 - 27 * e1**3 / 32) * math.sin(2 * mu)
        + (21 * e1**2 / 16 - 55 * e1**4 / 32) * math.sin(4 * mu)
        + (151 * e1**3 / 96) * math.sin(6 * mu)
        + (1097 * e1**4 / 512) * math.sin(8 * mu)
    )
    c1, t1 = ep2 * math.cos(phi1) ** 2, math.tan(phi1) ** 2
    n1 = a / math.sqrt(1 - e2 * math.sin(phi1) ** 2)
    r1 = a * (1 - e2) / (1 - e2 * math.sin(phi1) ** 2) ** 1.5
    d = (east - 500_000.0) / (n1 * k0)
    lat = phi1 - (n1 * math.tan(phi1) / r1) * (
        d**2 / 2
        - (5 + 3 * t1 + 10 * c1 - 4 * c1**2 - 9 * ep2) * d**4 / 24
        + (61 + 90 * t1 + 298 * c1 + 45 * t1**2 - 252 * ep2 - 3 * c1**2) * d**6 / 720
    )
    lon = (
        d - (1 + 2 * t1 + c1) * d**3 / 6 + (5 - 2 * c1 + 28 * t1 - 3 * c1**2 + 8 * ep2 + 24 * t1**2) * d**5 / 120
    ) / math.cos(phi1)
    return math.degrees(lat), zone * 6 - 183 + math.degrees(lon)


# --------------------------------------------------------------------------------------------------------------------
# Textures: facades, signs, ground, clouds
# --------------------------------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, palette: Sequence[tuple[int, int, int]], jitter: float = 0.0) -> tuple[int, ...]:
    """A colour of ``palette``, its brightness and channels jittered by up to ``jitter`` (relative)."""
    colour = np.asarray(palette[rng.integers(len(palette))], dtype=np.float64)
    colour = colour * (1 + jitter * rng.uniform(-1, 1)) + rng.uniform(-jitter, jitter, 3) * 60
    return tuple(int(c) for c in np.clip(colour, 0, 255))


def _shade(colour: tuple[int, ...], factor: float) -> tuple[int, ...]:
    return tuple(int(min(255, max(0, c * factor))) for c in colour)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell_px: float) -> np.ndarray:
    """Smooth noise of roughly unit amplitude and feature size ``cell_px``, (H, W) float32."""
    small = rng.standard_normal((max(2, round(shape[0] / cell_px) + 2), max(2, round(shape[1] / cell_px) + 2)))
    image = Image.fromarray(small.astype(np.float32), mode="F").resize((shape[1], shape[0]), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float32)


def _periodic_noise(rng: np.random.Generator, size: int, exponent: float) -> np.ndarray:
    """Tileable noise with a 1/f**exponent spectrum, (size, size) float32 scaled to [0, 1]."""
    frequencies = np.fft.fftfreq(size)
    radius = np.hypot(frequencies[:, None], frequencies[None, :])
    radius[0, 0] = 1.0
    spectrum = np.fft.fft2(rng.standard_normal((size, size))) / radius**exponent
    spectrum[0, 0] = 0.0
    noise = np.fft.ifft2(spectrum).real
    return ((noise - noise.min()) / (noise.max() - noise.min())).astype(np.float32)


def _block_pattern(
    rng: np.random.Generator,
    shape: tuple[int, int],
    block_px: tuple[float, float],
    stagger: bool,
    joint_px: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Courses of blocks over (H, W) texels.

    Returns each texel's block shade (H, W), ~N(0, 1) per block; the joints (H, W) bool; and each row's position
    within its course (H, 1), from 0 at the top to 1 at the bottom.
    """
    rows = np.arange(shape[0], dtype=np.float32)[:, None]
    cols = np.arange(shape[1], dtype=np.float32)[None, :]
    block_w, block_h = block_px
    course = np.floor(rows / block_h)
    shifted = cols + (course % 2) * (block_w / 2 if stagger else 0.0)
    column = np.floor(shifted / block_w)
    shades = rng.standard_normal((64, 64)).astype(np.float32)
    shade = shades[(course % 64).astype(np.intp), (column % 64).astype(np.intp)]
    joints = (rows % block_h < joint_px) | (shifted % block_w < joint_px)
    return shade, joints, (rows % block_h) / block_h


def _wall(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A wall material filling (H, W): plaster, brick, stone, siding or panels; float32 (H, W, 3) in 0..255."""
    height, width = shape
    kind = rng.choice(["plaster", "brick", "stone", "siding", "panels"], p=[0.42, 0.22, 0.14, 0.1, 0.12])
    ppm = FACADE_PPM
    if kind == "brick":
        base = np.array(_pick(rng, BRICK_COLOURS, 0.08), dtype=np.float32)
        shade, joints, _ = _block_pattern(rng, shape, (0.42 * ppm, 0.16 * ppm), True, 1.2)
        wall = base * (1 + 0.09 * shade[..., None])
        wall[joints] = np.array(_pick(rng, ((190, 185, 175), (120, 115, 110))), dtype=np.float32)
    elif kind == "stone":
        base = np.array(_pick(rng, STONE_COLOURS, 0.05), dtype=np.float32)
        block = (rng.uniform(0.8, 1.3) * ppm, rng.uniform(0.35, 0.55) * ppm)
        shade, joints, _ = _block_pattern(rng, shape, block, True, 1.5)
        wall = base * (1 + 0.06 * shade[..., None])
        wall[joints] *= 0.72
    elif kind == "siding":
        base = np.array(_pick(rng, PLASTER_COLOURS, 0.05), dtype=np.float32)
        shade, joints, within = _block_pattern(rng, shape, (width + 1.0, rng.uniform(0.2, 0.3) * ppm), False, 1.0)
        wall = base * (1 + 0.02 * shade[..., None] - 0.12 * within[..., None])
        wall[joints] *= 0.7
    elif kind == "panels":
        base = np.array(_pick(rng, PLASTER_COLOURS + STONE_COLOURS, 0.05), dtype=np.float32)
        block = (rng.uniform(1.2, 1.8) * ppm, rng.uniform(0.9, 1.3) * ppm)
        shade, joints, _ = _block_pattern(rng, shape, block, False, 1.5)
        wall = base * (1 + 0.04 * shade[..., None])
        wall[joints] *= 0.6
    else:
        base = np.array(_pick(rng, PLASTER_COLOURS, 0.06), dtype=np.float32)
        wall = np.broadcast_to(base, (height, width, 3)).copy()
    # weathering: large soft blotches and fine grain
    wall *= 1 + 0.07 * _smooth_noise(rng, shape, 2.5 * ppm)[..., None]
    wall += 4 * rng.standard_normal((height, width, 1), dtype=np.float32)
    return wall


def _glyph_strokes(rng: np.random.Generator) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Two to four strokes between the points of a 3 x 4 grid in the unit square: one random glyph."""
    points = [(i / 2, j / 3) for i in range(3) for j in range(4)]
    strokes = []
    for _ in range(rng.integers(2, 5)):
        a, b = rng.choice(len(points), 2, replace=False)
        strokes.append((points[a], points[b]))
    return strokes


def _draw_text(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    box: tuple[float, float, float, float],
    count: int,
    colour: tuple[int, ...],
) -> None:
    """Write ``count`` random glyphs across the pixel box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    cell = (x1 - x0) / count
    glyph_w, glyph_h = cell * 0.7, y1 - y0
    stroke = max(1, round(min(glyph_w, glyph_h) * 0.16))
    for i in range(count):
        gx = x0 + i * cell + (cell - glyph_w) / 2
        for (ax, ay), (bx, by) in _glyph_strokes(rng):
            draw.line(
                [(gx + ax * glyph_w, y0 + ay * glyph_h), (gx + bx * glyph_w, y0 + by * glyph_h)],
                fill=colour,
                width=stroke,
            )


def _draw_sign(seed: int) -> Image.Image:
    """A shop sign (board, logo, random glyphs) defined entirely by ``seed``; its size is part of its identity."""
    rng = np.random.default_rng(seed)
    ppm = FACADE_PPM
    count = int(rng.integers(3, 9))
    height = round(rng.uniform(0.6, 0.85) * ppm)
    logo = rng.random() < 0.6
    width = round((count * 0.42 * height / ppm + 0.5 + (0.8 if logo else 0)) * ppm)
    board = _pick(rng, SIGN_COLOURS)
    ink = _pick(rng, [c for c in SIGN_COLOURS if sum(abs(a - b) for a, b in zip(c, board)) > 250])
    image = Image.new("RGB", (width, height), board)
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.5:
        draw.rectangle([1, 1, width - 2, height - 2], outline=ink, width=max(1, height // 14))
    left = round(0.25 * ppm)
    if logo:
        size = height * 0.7
        centre = (left + size / 2, height / 2)
        shape = rng.integers(3)
        if shape == 0:
            draw.ellipse([left, height * 0.15, left + size, height * 0.85], fill=ink)
        elif shape == 1:
            draw.polygon(
                [(centre[0], height * 0.1), (left + size, centre[1]), (centre[0], height * 0.9), (left, centre[1])],
                fill=ink,
            )
        else:
            draw.rectangle([left, height * 0.18, left + size, height * 0.82], fill=ink)
        draw.ellipse(
            [centre[0] - size / 5, centre[1] - size / 5, centre[0] + size / 5, centre[1] + size / 5], fill=board
        )
        left += round(0.8 * ppm)
    _draw_text(draw, rng, (left, height * 0.22, width - 0.25 * ppm, height * 0.78), count, ink)
    return image


@dataclass(frozen=True)
class _Box:
    """Converts facade metres (u right, v up) of a building of height ``height_m`` to its texture pixels."""

    height_m: float

    def __call__(self, u0: float, v0: float, u1: float, v1: float) -> list[float]:
        """Pixel rectangle [x0, y0, x1, y1] (inclusive, as Pillow draws it) of the facade rectangle u0..u1, v0..v1."""
        ppm = FACADE_PPM
        x0, y0 = u0 * ppm, (self.height_m - v1) * ppm
        return [x0, y0, max(x0, u1 * ppm - 1), max(y0, (self.height_m - v0) * ppm - 1)]

    def point(self, u: float, v: float) -> tuple[float, float]:
        """Pixel (x, y) of the facade point (u, v)."""
        return u * FACADE_PPM, (self.height_m - v) * FACADE_PPM

    def line(self, u0: float, v0: float, u1: float, v1: float) -> list[tuple[float, float]]:
        """Pixel end points of the facade segment (u0, v0)-(u1, v1)."""
        return [self.point(u0, v0), self.point(u1, v1)]


def _draw_window(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: _Box, rect: tuple, style: dict) -> None:
    """Draw a window whose glass fills the facade rectangle ``rect`` = (u0, v0, u1, v1), in the building's ``style``;
    the shade of the glass, curtains and reflection change from window to window."""
    u0, v0, u1, v1 = rect
    f = 0.09  # frame width, metres
    glass = _shade(style["glass"], rng.uniform(0.8, 1.25))
    if style["shutters"]:
        shutter_w = (u1 - u0) / 2
        for su in (u0 - shutter_w - 0.05, u1 + 0.05):
            draw.rectangle(box(su, v0, su + shutter_w, v1), fill=style["shutter"])
            for k in range(1, 9):
                v = v0 + (v1 - v0) * k / 9
                draw.line(box.line(su + 0.04, v, su + shutter_w - 0.04, v), fill=_shade(style["shutter"], 0.7))
    if style["arched"]:
        arch_h = (u1 - u0) / 2
        draw.ellipse(box(u0 - f, v1 - arch_h - f, u1 + f, v1 + arch_h + f), fill=style["frame"])
        draw.ellipse(box(u0, v1 - arch_h, u1, v1 + arch_h), fill=glass)
    draw.rectangle(box(u0 - f, v0 - f, u1 + f, v1 + f), fill=style["frame"])
    draw.rectangle(box(u0, v0, u1, v1), fill=glass)
    if rng.random() < 0.45:  # curtains
        curtain = _shade((230, 226, 214), rng.uniform(0.75, 1.0))
        draw.rectangle(box(u0, v1 - (v1 - v0) * rng.uniform(0.2, 0.6), u1, v1), fill=curtain)
    reflection = (u1 - u0) * rng.uniform(0.1, 0.5)
    corners = [(u0, v0), (u0 + reflection, v0), (u0 + 2 * reflection, v1), (u0 + reflection, v1)]
    draw.polygon([box.point(u, v) for u, v in corners], fill=_shade(glass, 1.35))
    bar = max(1, round(0.05 * FACADE_PPM))
    um, vm = (u0 + u1) / 2, v0 + (v1 - v0) * style["transom"]
    draw.line(box.line(um, v0, um, v1), fill=style["frame"], width=bar)
    if style["transom"] < 1:
        draw.line(box.line(u0, vm, u1, vm), fill=style["frame"], width=bar)
    draw.rectangle(box(u0 - 0.15, v0 - 0.14, u1 + 0.15, v0 - f), fill=style["sill"])
    if style["lintel"]:
        draw.rectangle(box(u0 - 0.12, v1 + f, u1 + 0.12, v1 + 0.3), fill=style["sill"])


def draw_building(seed: int, sign_seed: int | None) -> np.ndarray:
    """Texture of one building facade, (H, W, 4) uint8 premultiplied RGBA at FACADE_PPM texels per metre.

    The texture is transparent above the roofline. The building is defined by ``seed``; its shop, if it has one,
    carries the sign ``sign_seed`` (None: a sign of its own).
    """
    rng = np.random.default_rng(seed)
    ppm = FACADE_PPM
    bays = int(rng.integers(2, 6))
    bay_w = rng.uniform(2.6, 3.8)
    width_m = bays * bay_w
    ground_h = rng.uniform(3.8, 4.8)
    floors = int(rng.choice([1, 2, 3, 4, 5], p=[0.15, 0.3, 0.3, 0.15, 0.1]))
    floor_h = rng.uniform(2.9, 3.5)
    eaves = ground_h + floors * floor_h
    roof = rng.choice(["parapet", "tiles", "gable", "flat"], p=[0.35, 0.3, 0.15, 0.2])
    roof_h = {"parapet": rng.uniform(0.6, 1.2), "tiles": rng.uniform(1.6, 3.0), "gable": rng.uniform(2.0, 4.0)}.get(
        roof, 0.4
    )
    height_m = eaves + roof_h
    width, height = round(width_m * ppm), round(height_m * ppm)
    box = _Box(height_m)

    image = Image.fromarray(np.clip(_wall(rng, (height, width)), 0, 255).astype(np.uint8))
    alpha = Image.new("L", (width, height), 255)
    draw, alpha_draw = ImageDraw.Draw(image), ImageDraw.Draw(alpha)
    trim = _pick(rng, ((236, 232, 222), (200, 196, 186), (120, 116, 110), (180, 150, 120)), 0.04)

    # roof and skyline
    if roof == "tiles":
        tile = _pick(rng, ((150, 70, 50), (90, 90, 96), (60, 62, 70), (120, 80, 60)), 0.05)
        draw.rectangle(box(0, eaves, width_m, height_m), fill=tile)
        for k, v in enumerate(np.arange(eaves, height_m, 0.3)):
            draw.line(box.line(0, v, width_m, v), fill=_shade(tile, 0.75 if k % 2 else 0.85), width=2)
        inset = rng.uniform(0.3, 1.2)
        alpha_draw.polygon([(0, 0), (inset * ppm, 0), (0, (height_m - eaves) * ppm)], fill=0)
        alpha_draw.polygon([(width, 0), (width - inset * ppm, 0), (width, (height_m - eaves) * ppm)], fill=0)
        for _ in range(rng.integers(0, 3)):  # chimneys stand above the tiles: cut them out of the sky band
            cu = rng.uniform(1.0, width_m - 1.5)
            draw.rectangle(box(cu, eaves + 0.6 * roof_h, cu + 0.6, height_m), fill=_shade(trim, 0.7))
        alpha_draw.rectangle([0, 0, width, 2], fill=0)
    elif roof == "gable":
        draw.rectangle(box(0, eaves, width_m, height_m), fill=_shade(trim, 0.9))
        alpha_draw.polygon([(0, 0), (width / 2, 0), (0, (height_m - eaves) * ppm)], fill=0)
        alpha_draw.polygon([(width, 0), (width / 2, 0), (width, (height_m - eaves) * ppm)], fill=0)
        draw.ellipse(box(width_m / 2 - 0.45, eaves + 0.4, width_m / 2 + 0.45, eaves + 1.3), fill=(40, 44, 50))
    elif roof == "parapet":
        draw.rectangle(box(0, eaves, width_m, height_m), fill=trim)
        draw.rectangle(box(0, eaves, width_m, eaves + 0.12), fill=_shade(trim, 0.7))
    draw.rectangle(box(0, eaves - 0.35, width_m, eaves), fill=trim)  # cornice
    draw.rectangle(box(0, eaves - 0.45, width_m, eaves - 0.35), fill=_shade(trim, 0.6))

    # upper floors: a window per bay, the same style on the whole building, small variations per window
    style = {
        "frame": _pick(rng, FRAME_COLOURS, 0.03),
        "glass": _pick(rng, GLASS_COLOURS, 0.05),
        "shutter": _pick(rng, SHUTTER_COLOURS, 0.05),
        "shutters": rng.random() < 0.3,
        "arched": rng.random() < 0.2,
        "lintel": rng.random() < 0.5,
        "transom": rng.choice([0.7, 0.75, 1.0]),
        "sill": _shade(trim, 0.95),
    }
    window_w = bay_w * rng.uniform(0.36, 0.5) * (0.75 if style["shutters"] else 1.0)
    window_h = floor_h * rng.uniform(0.45, 0.6)
    balcony_floors = {f for f in range(floors) if rng.random() < 0.25}
    for floor in range(floors):
        v_floor = ground_h + floor * floor_h
        if rng.random() < 0.5 or floor == 0:
            draw.rectangle(box(0, v_floor - 0.08, width_m, v_floor + 0.08), fill=_shade(trim, 0.92))
        for bay in range(bays):
            uc = (bay + 0.5) * bay_w
            rect = (uc - window_w / 2, v_floor + 0.9, uc + window_w / 2, v_floor + 0.9 + window_h)
            _draw_window(draw, rng, box, rect, style)
            if rng.random() < 0.06:  # an air conditioner below the window
                draw.rectangle(box(uc + 0.1, v_floor + 0.25, uc + 0.9, v_floor + 0.75), fill=(210, 210, 206))
                draw.ellipse(box(uc + 0.3, v_floor + 0.32, uc + 0.68, v_floor + 0.68), fill=(120, 120, 120))
        if floor in balcony_floors:
            rail = _shade(style["frame"], 0.6)
            for bay in range(bays):
                uc = (bay + 0.5) * bay_w
                u0, u1 = uc - window_w / 2 - 0.4, uc + window_w / 2 + 0.4
                draw.rectangle(box(u0, v_floor + 0.05, u1, v_floor + 0.25), fill=_shade(trim, 0.8))
                draw.rectangle(box(u0, v_floor + 1.0, u1, v_floor + 1.08), fill=rail)
                for u in np.arange(u0 + 0.05, u1, 0.14):
                    draw.line(box.line(u, v_floor + 0.25, u, v_floor + 1.0), fill=rail)

    # ground floor: a shop, a house entrance or a garage
    kind = rng.choice(["shop", "house", "garage"], p=[0.6, 0.28, 0.12])
    plinth = _pick(rng, STONE_COLOURS, 0.05)
    draw.rectangle(box(0, 0, width_m, 0.5), fill=plinth)
    door_bay = int(rng.integers(bays))
    if kind == "shop":
        band = _pick(rng, SIGN_COLOURS + ((40, 40, 44),), 0.03)
        draw.rectangle(box(0, ground_h - 1.15, width_m, ground_h - 0.25), fill=band)
        sign = _draw_sign(int(rng.integers(2**31)) if sign_seed is None else sign_seed)
        if sign.width > width - 2:
            sign = sign.crop((0, 0, width - 2, sign.height))
        sign_x = round(rng.uniform(0.05, 0.95) * (width - sign.width))
        image.paste(sign, (sign_x, round((height_m - ground_h + 0.32) * ppm)))
        shop_frame = _pick(rng, FRAME_COLOURS, 0.03)
        display_glass = _pick(rng, GLASS_COLOURS, 0.05)
        for bay in range(bays):
            u0, u1 = bay * bay_w + 0.25, (bay + 1) * bay_w - 0.25
            draw.rectangle(box(u0 - 0.1, 0.5, u1 + 0.1, ground_h - 1.25), fill=shop_frame)
            if bay == door_bay:
                uc = (u0 + u1) / 2
                draw.rectangle(box(uc - 0.55, 0.0, uc + 0.55, ground_h - 1.35), fill=_shade(display_glass, 0.7))
                draw.rectangle(box(uc - 0.05, 0.0, uc + 0.05, ground_h - 1.35), fill=shop_frame)
                draw.rectangle(box(uc - 0.35, 0.9, uc - 0.15, 1.1), fill=(200, 200, 190))
                continue
            draw.rectangle(box(u0, 0.6, u1, ground_h - 1.35), fill=display_glass)
            for _ in range(rng.integers(1, 4)):  # goods on display: small coloured blocks
                gu = rng.uniform(u0, u1 - 0.4)
                draw.rectangle(
                    box(gu, 0.6, gu + rng.uniform(0.2, 0.6), rng.uniform(0.9, 1.8)),
                    fill=_pick(rng, SIGN_COLOURS + CLOTH_COLOURS, 0.1),
                )
            top = ground_h - 1.35
            corners = [(u0, 0.6), (u0 + 0.6, 0.6), (u0 + 1.4, top), (u0 + 0.8, top)]
            draw.polygon([box.point(u, v) for u, v in corners], fill=_shade(display_glass, 1.3))
        if rng.random() < 0.45:  # a striped awning over the windows
            stripes = (_pick(rng, SIGN_COLOURS), (240, 238, 230))
            top, bottom = ground_h - 1.25, ground_h - 1.95
            stripe_w = 0.35
            for k, u in enumerate(np.arange(0.1, width_m - 0.1, stripe_w)):
                draw.rectangle(box(u, bottom, min(u + stripe_w, width_m - 0.1), top), fill=stripes[k % 2])
                draw.pieslice(
                    box(u, bottom - stripe_w / 2, min(u + stripe_w, width_m - 0.1), bottom + stripe_w / 2),
                    0,
                    180,
                    fill=stripes[k % 2],
                )
    else:
        for bay in range(bays):
            uc = (bay + 0.5) * bay_w
            if bay == door_bay:
                if kind == "garage":
                    door = _pick(rng, ((180, 180, 176), (120, 90, 60), (80, 86, 90)), 0.05)
                    draw.rectangle(box(uc - 1.3, 0.0, uc + 1.3, 2.4), fill=door)
                    for v in np.arange(0.2, 2.4, 0.25):
                        draw.line(box.line(uc - 1.3, v, uc + 1.3, v), fill=_shade(door, 0.75), width=2)
                else:
                    door = _pick(rng, ((110, 70, 40), (60, 40, 30), (40, 70, 60), (140, 40, 40), (50, 60, 90)), 0.05)
                    draw.rectangle(box(uc - 0.75, 0.0, uc + 0.75, 2.9), fill=trim)
                    draw.rectangle(box(uc - 0.6, 0.15, uc + 0.6, 2.75), fill=door)
                    for du in (-0.45, 0.05):
                        draw.rectangle(box(uc + du, 0.4, uc + du + 0.4, 1.3), outline=_shade(door, 0.7), width=2)
                        draw.rectangle(box(uc + du, 1.5, uc + du + 0.4, 2.5), outline=_shade(door, 0.7), width=2)
                    draw.rectangle(box(uc - 0.9, 0.0, uc + 0.9, 0.15), fill=plinth)
                    draw.ellipse(box(uc + 0.75, 2.2, uc + 0.95, 2.5), fill=(240, 210, 120))
                continue
            rect = (uc - window_w / 2, 1.2, uc + window_w / 2, 1.2 + window_h * 0.9)
            _draw_window(draw, rng, box, rect, style)

    for _ in range(rng.poisson(0.8)):  # posters and coloured panels near the ground
        pw, ph = rng.uniform(0.5, 1.2), rng.uniform(0.7, 1.4)
        pu, pv = rng.uniform(0, width_m - pw), rng.uniform(0.6, 2.4)
        colour = _pick(rng, SIGN_COLOURS + CLOTH_COLOURS, 0.1)
        draw.rectangle(box(pu, pv, pu + pw, pv + ph), fill=colour)
        draw.ellipse(box(pu + 0.1, pv + 0.2, pu + pw * 0.7, pv + ph * 0.6), fill=_pick(rng, SIGN_COLOURS))
        ink = _pick(rng, ((20, 20, 20), (250, 250, 250)))
        _draw_text(draw, rng, tuple(box(pu + 0.08, pv + ph * 0.7, pu + pw - 0.08, pv + ph * 0.88)), 4, ink)
    if rng.random() < 0.2:  # a graffiti tag: a few scrawls in a small box near the ground
        tag_w, tag_h = rng.uniform(0.8, 2.2), rng.uniform(0.4, 0.9)
        tag_u, tag_v = rng.uniform(0, max(0.1, width_m - tag_w)), rng.uniform(0.2, 1.4)
        colour = _pick(rng, SIGN_COLOURS + CLOTH_COLOURS)
        for _ in range(rng.integers(2, 4)):
            scrawl = [box.point(tag_u + rng.uniform(0, tag_w), tag_v + rng.uniform(0, tag_h)) for _ in range(5)]
            draw.line(scrawl, fill=colour, width=round(rng.uniform(0.04, 0.09) * ppm), joint="curve")
    if rng.random() < 0.5:  # a drain pipe at one edge
        u = rng.choice([0.12, width_m - 0.2])
        draw.rectangle(box(u, 0, u + 0.1, eaves - 0.35), fill=(110, 112, 116))

    rgba = np.dstack([np.asarray(image), np.asarray(alpha)])
    # soot and shade near the ground and under the cornice
    rows = np.arange(height, dtype=np.float32) / ppm
    darkening = 1 - 0.18 * np.exp(-(height_m - rows) / 0.6) - 0.1 * np.exp(-np.abs(rows - (height_m - eaves)) / 0.3)
    rgba[..., :3] = np.clip(rgba[..., :3] * darkening[:, None, None], 0, 255).astype(np.uint8)
    roof_rows = rgba[: round((height_m - eaves) * ppm)]  # the only rows with transparent texels
    roof_rows[..., :3] = roof_rows[..., :3].astype(np.uint16) * roof_rows[..., 3:] // 255
    return rgba


def _draw_ground(rng: np.random.Generator, length_m: float) -> np.ndarray:
    """Opaque ground texture (H, W, 4) uint8 RGBA at GROUND_PPM: columns along the street, rows away from the walls."""
    ppm = GROUND_PPM
    height, width = round(GROUND_DEPTH_M * ppm), round(length_m * ppm)
    shape = (height, width)
    depth = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / ppm  # metres from the facades
    along = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / ppm
    asphalt = np.array(_pick(rng, ((78, 78, 82), (92, 90, 88), (64, 66, 70)), 0.04), dtype=np.float32)
    ground = np.broadcast_to(asphalt, (height, width, 3)).copy()
    ground *= 1 + 0.1 * _smooth_noise(rng, shape, 1.5 * ppm)[..., None]
    ground += 7 * rng.standard_normal((height, width, 1), dtype=np.float32)
    # sidewalk slabs
    slab = np.array(_pick(rng, ((176, 172, 164), (150, 146, 140), (190, 170, 150)), 0.04), dtype=np.float32)
    slab_m = rng.uniform(0.4, 0.8)
    rows = round(SIDEWALK_M * ppm)
    shade, joints, _ = _block_pattern(rng, (rows, width), (slab_m * ppm, slab_m * ppm), rng.random() < 0.5, 1.0)
    sidewalk = slab * (1 + 0.05 * shade[..., None]) + 5 * rng.standard_normal((rows, width, 1), dtype=np.float32)
    sidewalk[joints] *= 0.75
    ground[:rows] = sidewalk
    # curb, gutter, lane markings
    curb = (depth >= SIDEWALK_M) & (depth < SIDEWALK_M + 0.2)
    ground[np.broadcast_to(curb, shape)] = 196
    gutter = (depth >= SIDEWALK_M + 0.2) & (depth < SIDEWALK_M + 0.5)
    ground *= np.where(gutter, 0.8, 1.0)[..., None]
    dash = rng.uniform(2.0, 4.0)
    centre_line = (np.abs(depth - (SIDEWALK_M + 8.0)) < 0.07) & (along % (3 * dash) < dash)
    ground[np.broadcast_to(centre_line, shape)] = 225
    parking = (np.abs(depth - (SIDEWALK_M + 2.2)) < 0.05) & (along % 6.0 < 4.5)
    ground[np.broadcast_to(parking, shape)] = 210
    for _ in range(int(length_m / 12)):  # manholes and asphalt patches, each drawn in its own window
        cu, cd = rng.uniform(0, length_m), rng.uniform(SIDEWALK_M + 1, GROUND_DEPTH_M - 1)
        manhole = rng.random() < 0.5
        half_u, half_d = (0.3, 0.3) if manhole else (rng.uniform(0.5, 2.5), rng.uniform(0.3, 1.2))
        cols = slice(max(0, int((cu - half_u) * ppm)), int((cu + half_u) * ppm) + 1)
        rows = slice(max(0, int((cd - half_d) * ppm)), int((cd + half_d) * ppm) + 1)
        window = ground[rows, cols]
        if manhole:
            window[(along[:, cols] - cu) ** 2 + (depth[rows] - cd) ** 2 < 0.3**2] = 55
        else:
            window *= 0.8
    rgba = np.full((height, width, 4), 255, dtype=np.uint8)
    rgba[..., :3] = np.clip(ground, 0, 255)
    return rgba


def _downsample(texture: np.ndarray) -> np.ndarray:
    """Halve a texture (H, W, C) uint8 by 2 x 2 averaging (premultiplied colours stay premultiplied)."""
    height, width = texture.shape[0] // 2 * 2, texture.shape[1] // 2 * 2
    blocks = texture[:height, :width].astype(np.uint16)
    summed = blocks[0::2, 0::2] + blocks[1::2, 0::2] + blocks[0::2, 1::2] + blocks[1::2, 1::2]
    return ((summed + 2) // 4).astype(np.uint8)


def _mip_level(levels: list[np.ndarray], level: int) -> np.ndarray:
    while len(levels) <= level:
        levels.append(_downsample(levels[-1]))
    return levels[level]


@dataclass
class Street:
    """One straight street: a row of facades at y = 0 along x in [0, length_m], the ground, and its place in UTM.

    ``facade`` is premultiplied RGBA (H, W, 4) uint8 at FACADE_PPM, its top row at ``facade_height_m`` above the
    ground; ``ground`` is opaque RGBA (H, W, 4) uint8 at GROUND_PPM. Coarser levels of both are built on demand.
    """

    origin: tuple[float, float]  # UTM east, north of x = y = 0
    angle: float  # direction of +x, radians counter-clockwise from east
    length_m: float
    facade_height_m: float
    facade: list[np.ndarray]
    ground: list[np.ndarray]
    sky: str
    buildings: list[int] = field(default_factory=list)  # building seeds, in order along the street

    def facade_level(self, level: int) -> np.ndarray:
        """The facade texture halved ``level`` times."""
        return _mip_level(self.facade, level)

    def ground_level(self, level: int) -> np.ndarray:
        """The ground texture halved ``level`` times."""
        return _mip_level(self.ground, level)

    def to_utm(self, x: float, y: float) -> tuple[float, float]:
        """UTM (east, north) of the street-frame point (x, y)."""
        cos_a, sin_a = math.cos(self.angle), math.sin(self.angle)
        return self.origin[0] + x * cos_a - y * sin_a, self.origin[1] + x * sin_a + y * cos_a

    def heading(self, camera: Camera) -> float:
        """Compass heading of the camera's optical axis, degrees clockwise from north."""
        forward = camera.rotation()[2]
        cos_a, sin_a = math.cos(self.angle), math.sin(self.angle)
        east, north = forward[0] * cos_a - forward[1] * sin_a, forward[0] * sin_a + forward[1] * cos_a
        return math.degrees(math.atan2(east, north)) % 360


def build_street(
    rng: np.random.Generator,
    length_m: float,
    origin: tuple[float, float],
    angle: float,
    shared_buildings: Sequence[int],
    shared_signs: Sequence[int],
    shared_fraction: float = 0.25,
) -> Street:
    """Line a street of ``length_m`` metres with buildings; a ``shared_fraction`` of them (about a quarter by
    default) come from ``shared_buildings`` and a third of the others' shops carry one of ``shared_signs``, so that
    the same motifs recur far apart."""
    textures, seeds, total = [], [], 0.0
    while total < length_m:
        if rng.random() < shared_fraction:
            seed, sign = int(rng.choice(shared_buildings)), None
        else:
            seed = int(rng.integers(2**31))
            sign = int(rng.choice(shared_signs)) if rng.random() < 0.35 else None
        texture = draw_building(seed, sign)
        textures.append(texture)
        seeds.append(seed)
        total += texture.shape[1] / FACADE_PPM
    tallest = max(t.shape[0] for t in textures)
    facade = np.zeros((tallest, sum(t.shape[1] for t in textures), 4), dtype=np.uint8)
    column = 0
    for texture in textures:
        facade[tallest - texture.shape[0] :, column : column + texture.shape[1]] = texture
        column += texture.shape[1]
    return Street(
        origin=origin,
        angle=angle,
        length_m=facade.shape[1] / FACADE_PPM,
        facade_height_m=tallest / FACADE_PPM,
        facade=[facade],
        ground=[_draw_ground(rng, facade.shape[1] / FACADE_PPM)],
        sky=str(rng.choice(["clear", "clear", "hazy"])),
        buildings=seeds,
    )


# --------------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------------


def _bilinear(texture: np.ndarray, tx: np.ndarray, ty: np.ndarray, wrap: bool = False) -> np.ndarray:
    """Sample ``texture`` at texel coordinates ``tx``, ``ty`` (N,) float32, texel centres at integers.

    ``texture`` is (H, W, 4) uint8, gathered four bytes at a time, giving (N, 4) float32; or (H, W) float32, giving
    (N,). Outside the texture the border texels repeat (within a texel of the border, approximately), or, with
    ``wrap``, the texture tiles the plane.
    """
    height, width = texture.shape[:2]
    x0, y0 = np.floor(tx), np.floor(ty)
    fx, fy = tx - x0, ty - y0
    x0, y0 = x0.astype(np.intp), y0.astype(np.intp)
    if wrap:
        x0, y0 = x0 % width, y0 % height
        x1, y1 = (x0 + 1) % width, (y0 + 1) % height
        corners = (y0 * width + x0, y0 * width + x1, y1 * width + x0, y1 * width + x1)
    else:
        base = np.clip(y0, 0, height - 2) * width + np.clip(x0, 0, width - 2)
        corners = (base, base + 1, base + width, base + width + 1)
    packed = texture.dtype == np.uint8
    flat = texture.reshape(-1).view(np.uint32) if packed else texture.reshape(-1)
    out = None
    for index, weight in zip(corners, ((1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy)):
        values = flat.take(index)
        if packed:
            values, weight = values.view(np.uint8).reshape(-1, 4), weight[:, None]
        out = values * weight if out is None else out + values * weight
    return out


@lru_cache(maxsize=4)
def _pixel_grid(height: int, width: int) -> np.ndarray:
    """Homogeneous pixel coordinates (3, H * W) float32, row-major: (x, y, 1) = (column, row, 1)."""
    columns, rows = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    return np.stack([columns.ravel(), rows.ravel(), np.ones(height * width, dtype=np.float32)])


@dataclass(frozen=True)
class Lighting:
    """What changes with the time of the capture: the sky, cloud cover and a cast shadow on the street.

    Shadow: facade points below the line v = shadow_height + shadow_slope * (u - shadow_origin), and all the ground,
    are darkened by ``shadow`` (1: no shadow).
    """

    sky: str = "clear"
    clouds: float = 0.3  # cover in [0, 1]
    cloud_offset: tuple[float, float] = (0.0, 0.0)
    shadow: float = 1.0
    shadow_height: float = 0.0
    shadow_slope: float = 0.0
    shadow_origin: float = 0.0


def render_view(
    street: Street, camera: Camera, K: np.ndarray, image_size: tuple[int, int], lighting: Lighting, clouds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Render what ``camera`` sees of ``street``: RGB (H, W, 3) float32 in 0..255 and the facade mask (H, W) bool.

    ``clouds`` is a tileable (S, S) float32 cloud density in [0, 1]. The facade mask holds the pixels where the facade
    covers more than half the pixel, the region where views are related by `view_homography`.
    """
    height, width = image_size
    pixels_to_rays = (camera.rotation().T @ np.linalg.inv(K)).astype(np.float32)
    grid = _pixel_grid(height, width)
    # (3, H * W) in the street frame; written out because a threaded BLAS product is slower here on a busy machine
    rays = pixels_to_rays[:, :1] * grid[0] + pixels_to_rays[:, 1:2] * grid[1] + pixels_to_rays[:, 2:]
    image = np.zeros((height * width, 3), dtype=np.float32)

    # facade plane y = 0, at the mip level whose texels are about the size of a pixel
    focal = K[0, 0]
    level = int(np.clip(math.floor(math.log2(max(1.0, FACADE_PPM * abs(camera.y) / focal))), 0, 4))
    texture = street.facade_level(level)
    ppm = FACADE_PPM / 2**level
    coverage = np.zeros(height * width, dtype=np.float32)
    hits = np.flatnonzero(rays[1] > 1e-6)
    t = -camera.y / rays[1, hits]
    u, v = camera.x + t * rays[0, hits], camera.height + t * rays[2, hits]
    inside = (v >= 0) & (v <= street.facade_height_m) & (u >= 0) & (u <= street.length_m)
    hits, u, v = hits[inside], u[inside], v[inside]
    premultiplied = _bilinear(texture, u * ppm - 0.5, (street.facade_height_m - v) * ppm - 0.5)
    if lighting.shadow < 1:
        in_shadow = v < lighting.shadow_height + lighting.shadow_slope * (u - lighting.shadow_origin)
        premultiplied[in_shadow, :3] *= lighting.shadow
    image[hits] = premultiplied[:, :3]
    coverage[hits] = premultiplied[:, 3] / 255
    background = np.flatnonzero(coverage < 1)

    # ground plane z = 0 below the horizon, sky above
    below = background[rays[2, background] < -1e-6]
    t = camera.height / -rays[2, below]
    ground_level = int(np.clip(math.floor(math.log2(max(1.0, GROUND_PPM * 0.6 * abs(camera.y) / focal))), 0, 3))
    ground = street.ground_level(ground_level)
    gppm = GROUND_PPM / 2**ground_level
    gu, gd = camera.x + t * rays[0, below], -(camera.y + t * rays[1, below])
    colour = _bilinear(ground, gu * gppm - 0.5, gd * gppm - 0.5)[:, :3] * lighting.shadow
    zenith, horizon, cloud_colour = (np.array(c, dtype=np.float32) for c in SKIES[lighting.sky])
    haze = 1 - np.exp(-t / 150)[:, None]
    image[below] += (1 - coverage[below, None]) * (colour * (1 - haze) + horizon * haze)

    above = background[rays[2, background] >= -1e-6]
    direction = rays[:, above] / np.linalg.norm(rays[:, above], axis=0)
    elevation = np.clip(direction[2] / 0.7, 0, 1)[:, None]
    sky = horizon * (1 - elevation) + zenith * elevation
    if lighting.clouds > 0:  # clouds on a plane 1 km up, fading towards the horizon
        t = 1000.0 / np.maximum(direction[2], 0.02)
        cx = (camera.x + t * direction[0]) / 8 + lighting.cloud_offset[0]
        cy = (camera.y + t * direction[1]) / 8 + lighting.cloud_offset[1]
        density = _bilinear(clouds, cx, cy, wrap=True)[:, None]
        cover = np.clip((density - (1 - lighting.clouds)) * 4, 0, 1) * np.clip(direction[2:3].T / 0.15, 0, 1)
        sky = sky * (1 - cover) + cloud_colour * (0.85 + 0.15 * density) * cover
    image[above] += (1 - coverage[above, None]) * sky
    return image.reshape(height, width, 3), (coverage > 0.5).reshape(height, width)


def _project(K: np.ndarray, camera: Camera, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (N, 2) and depths (N,) of street-frame points (N, 3)."""
    in_camera = (points - camera.centre) @ camera.rotation().T
    pixels = in_camera @ K.T
    return pixels[:, :2] / pixels[:, 2:], in_camera[:, 2]


def _car_parts(rng: np.random.Generator) -> list[tuple[list[tuple[float, float]], tuple]]:
    """A car seen from the side, as (polygon in metres (along, up), colour) parts, drawn in order."""
    paint = _pick(rng, CAR_COLOURS, 0.05)
    length = rng.uniform(3.8, 4.8)
    roof_h = rng.uniform(1.4, 1.7)
    body = [(0, 0.3), (length, 0.3), (length, 0.85), (length - 0.2, 1.0), (0.72 * length, 1.05), (0.6 * length, roof_h),
            (0.28 * length, roof_h), (0.18 * length, 1.05), (0.05, 0.95), (0, 0.75)]  # fmt: skip
    cabin_top = roof_h - 0.08
    window = [(0.21 * length, 1.08), (0.68 * length, 1.08), (0.58 * length, cabin_top), (0.3 * length, cabin_top)]
    pillar = [(0.44 * length, 1.08), (0.46 * length, 1.08), (0.46 * length, cabin_top), (0.44 * length, cabin_top)]
    bumper = [(0, 0.3), (length, 0.3), (length, 0.45), (0, 0.45)]
    parts = [(body, paint), (window, (40, 50, 60)), (pillar, paint), (bumper, _shade(paint, 0.6))]
    for centre in (0.2 * length, 0.8 * length):
        angles = np.linspace(0, 2 * np.pi, 14, endpoint=False)
        parts.append(([(centre + 0.34 * math.cos(a), 0.34 + 0.34 * math.sin(a)) for a in angles], (25, 25, 25)))
        parts.append(([(centre + 0.18 * math.cos(a), 0.34 + 0.18 * math.sin(a)) for a in angles], (160, 160, 165)))
    if rng.random() < 0.5:
        parts = [([(length - x, z) for x, z in polygon], colour) for polygon, colour in parts]
    return parts


def _person_parts(rng: np.random.Generator) -> list[tuple[list[tuple[float, float]], tuple]]:
    """A person standing or walking, as (polygon in metres (along, up), colour) parts, drawn in order."""
    tall = rng.uniform(1.55, 1.95)
    top = _pick(rng, CLOTH_COLOURS, 0.1)
    trousers = _pick(rng, CLOTH_COLOURS, 0.1)
    skin = _pick(rng, ((230, 190, 160), (190, 140, 100), (120, 80, 60)), 0.05)
    hip, shoulder, stride = 0.5 * tall, 0.82 * tall, rng.uniform(0.0, 0.25)
    head_r = 0.065 * tall
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    return [
        ([(-0.12, hip), (-0.02, hip), (-stride, 0), (-stride - 0.1, 0)], trousers),
        ([(0.02, hip), (0.12, hip), (stride + 0.1, 0), (stride, 0)], trousers),
        ([(-0.2, shoulder), (0.2, shoulder), (0.16, hip - 0.05), (-0.16, hip - 0.05)], top),
        ([(-0.2, shoulder), (-0.13, shoulder), (-0.2 - stride / 2, hip), (-0.27 - stride / 2, hip)], top),
        ([(0.13, shoulder), (0.2, shoulder), (0.27 + stride / 2, hip), (0.2 + stride / 2, hip)], top),
        ([(head_r * math.cos(a), shoulder + 0.03 + head_r * (1 + math.sin(a))) for a in angles], skin),
    ]


def _draw_occluders(image: Image.Image, rng: np.random.Generator, K: np.ndarray, camera: Camera, light: float) -> None:
    """Park cars along the curb and put people on the sidewalk in front of ``camera``, far ones first."""
    things = []
    look_ahead = math.tan(camera.yaw)
    offset = rng.uniform(-12, -2)  # parked cars, one behind the other
    for _ in range(rng.poisson(1.2)):
        depth = rng.uniform(SIDEWALK_M + 0.4, SIDEWALK_M + 1.2)
        parts = _car_parts(rng)
        things.append((depth, offset, parts))
        offset += max(x for polygon, _ in parts for x, _ in polygon) + rng.uniform(0.6, 4.0)
    for _ in range(rng.poisson(1.5)):
        depth = rng.uniform(0.5, SIDEWALK_M - 0.3)
        things.append((depth, rng.uniform(-6, 6), _person_parts(rng)))
    draw = ImageDraw.Draw(image)
    for depth, offset, parts in sorted(things, key=lambda thing: thing[0]):
        if -camera.y - depth < 1.5:  # too close to (or behind) the camera
            continue
        along = camera.x + (-camera.y - depth) * look_ahead + offset
        for polygon, colour in parts:
            points = np.array([(along + x, -depth, z) for x, z in polygon])
            pixels, depths = _project(K, camera, points)
            if (depths > 0.5).all():
                draw.polygon([tuple(p) for p in pixels], fill=_shade(colour, light))


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
    lat, lon = utm_to_latlon(east, north)
    fields = [
        f"{east:.2f}", f"{north:.2f}", str(UTM_ZONE), UTM_LETTER, f"{lat:.6f}", f"{lon:.6f}", pano_id, "",
        f"{street.heading(camera):.1f}", f"{math.degrees(camera.pitch):.1f}", f"{math.degrees(camera.roll):.1f}",
        f"{camera.height:.2f}", timestamp, note,
    ]  # fmt: skip
    return "@" + "@".join(fields) + "@.jpg", (float(f"{east:.2f}"), float(f"{north:.2f}"))


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
    _draw_occluders(picture, rng, K, camera, light=lighting.shadow**0.5)
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


def _check_destination(out_dir: Path, name: str, overwrite: bool) -> None:
    """Raise ValueError for a ``name`` that is not a plain folder name or an ``out_dir`` that is (or lies inside)
    a file, FileExistsError for an occupied name (see `tool_outputs.check_destination`)."""
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"name must be a plain folder name, got {name!r}")
    existing = Path(out_dir)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is" if existing == Path(out_dir) else f"lies inside {existing}, which is"
        raise ValueError(f"the output folder {out_dir} (--out) {where} a file, not a folder")
    tool_outputs.check_destination(Path(out_dir) / name, TOOL, overwrite)


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
    """The arguments of `generate_world` as its marker records them (`tool_outputs.read_marker`: "settings")."""
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


def _sizes(args: argparse.Namespace) -> dict:
    """The world's sizes: the preset's, with the flags given on the command line instead."""
    sizes = dict(PRESETS[args.preset])
    for key in sizes:
        if getattr(args, key) is not None:
            sizes[key] = tuple(getattr(args, key)) if isinstance(sizes[key], tuple) else getattr(args, key)
    return sizes


def settings_of_flags(argv: Sequence[str]) -> dict:
    """The `world_settings` of the world that ``synthetic.py argv`` writes (to recognise it, e.g. in demo.py)."""
    args = build_parser().parse_args(argv)
    return world_settings(
        seed=args.seed,
        shared_fraction=args.shared_fraction,
        num_shared_buildings=args.shared_buildings,
        **_sizes(args),
    )


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
    `tool_outputs`), and so does another run writing the same name (seen at the start by its temporary
    folder, or at the end by the rename). Temporary folders of runs that were killed before they could clean up
    are removed.
    """
    check_world_arguments(image_size, database_per_split, queries_per_split, images_per_street, database_spacing)
    check_repetition_arguments(shared_fraction, num_shared_buildings)
    out_dir = Path(out_dir)
    _check_destination(out_dir, name, overwrite)
    final = out_dir / name
    out_dir.mkdir(parents=True, exist_ok=True)
    tool_outputs.handle_leftovers(out_dir, name, overwrite)
    staging = tool_outputs.staging_folder(out_dir, name)
    try:
        world_rng = np.random.default_rng([seed, 1_000])
        shared_buildings = [int(s) for s in world_rng.integers(2**31, size=NUM_SHARED_BUILDINGS)]
        shared_signs = [int(s) for s in world_rng.integers(2**31, size=5)]
        # a larger library draws its extra buildings from another stream, so that the default world stays the same
        extra = max(0, num_shared_buildings - NUM_SHARED_BUILDINGS)
        shared_buildings += [int(s) for s in np.random.default_rng([seed, 1_001]).integers(2**31, size=extra)]
        shared_buildings = shared_buildings[:num_shared_buildings]
        clouds = _periodic_noise(world_rng, 256, 1.6)
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
        tool_outputs.write_marker(staging, TOOL, settings)
        tool_outputs.publish(staging, final, TOOL, overwrite)
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
        east_q, north_q = (float(s) for s in query_name.split("@")[1:3])
        east_d, north_d = (float(s) for s in database_name.split("@")[1:3])
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


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def _preset_help(key: str) -> str:
    """'(default: 384 384; tiny: 96 96)': what each preset sets ``key`` to."""
    values = {name: sizes[key] for name, sizes in PRESETS.items()}
    text = {name: " ".join(map(str, v)) if isinstance(v, tuple) else str(v) for name, v in values.items()}
    return "(" + "; ".join(f"{name}: {value}" for name, value in text.items()) + ")"


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags of `main`; the size flags default to the values of ``--preset``."""
    parser = argparse.ArgumentParser(
        description="Generate a synthetic street-view world for visual place recognition in the visual "
        "geo-localization benchmark layout: <out>/<name>/images/{train,val,test}/{database,queries}/*.jpg, plus "
        "images/<split>/homographies.json with each query's true homography onto its nearest database image.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("datasets_vg/datasets"),
        help="Folder that receives the world (default: datasets_vg/datasets).",
    )
    parser.add_argument("--name", default="synthetic", help="Folder of the world inside --out (default: synthetic).")
    parser.add_argument(
        "--seed", type=int, default=0, help="Random seed; the same seed gives byte-identical files (default: 0)."
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="Sizes to start from: 'default' (384 x 384 images, a few hundred of them) or 'tiny' (96 x 96, a few "
        "dozen, for tests). The size flags below override the preset's values (default: default).",
    )
    parser.add_argument(
        "--image_size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help=f"Image height and width in pixels, 32 to 4096 {_preset_help('image_size')}.",
    )
    parser.add_argument(
        "--database_per_split",
        type=int,
        nargs=3,
        metavar=("TRAIN", "VAL", "TEST"),
        help=f"Database images of each split, at least 2 {_preset_help('database_per_split')}.",
    )
    parser.add_argument(
        "--queries_per_split",
        type=int,
        nargs=3,
        metavar=("TRAIN", "VAL", "TEST"),
        help=f"Queries of each split, at least 1 {_preset_help('queries_per_split')}.",
    )
    parser.add_argument(
        "--images_per_street",
        type=int,
        metavar="N",
        help="Database images per street at most; a split has ceil(database / N) streets, each N * spacing metres "
        f"long {_preset_help('images_per_street')}.",
    )
    parser.add_argument(
        "--database_spacing",
        type=float,
        metavar="METRES",
        help="Metres between consecutive database images along a street, 1 to 12, so that every query has a "
        f"database image within 10 m {_preset_help('database_spacing')}.",
    )
    parser.add_argument(
        "--shared_fraction",
        type=float,
        default=SHARED_FRACTION,
        metavar="F",
        help="Fraction (0 to 1) of the buildings taken from a library that recurs all over the world, the rest being "
        "unique. Raising it (with --shared_buildings about 12) makes places that only the arrangement of their "
        f"facades tells apart: hard for a global descriptor, not for geometry (default: {SHARED_FRACTION}).",
    )
    parser.add_argument(
        "--shared_buildings",
        type=int,
        default=NUM_SHARED_BUILDINGS,
        metavar="N",
        help=f"Buildings in that library, 1 to 1000 (default: {NUM_SHARED_BUILDINGS}).",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an existing <out>/<name> that synthetic.py wrote, with nothing else in it (default: refuse).",
    )
    parser.add_argument(
        "--contact_sheet",
        type=Path,
        default=None,
        metavar="PNG",
        help="Also save a PNG of a few test queries next to their nearest database images (default: none).",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    """Generate the world that the flags ``argv`` describe, print its counts and the time it took; return its folder."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sizes = _sizes(args)
    try:
        check_world_arguments(**sizes)
        check_repetition_arguments(args.shared_fraction, args.shared_buildings)
        _check_destination(args.out, args.name, args.overwrite)
        if args.contact_sheet is not None:
            check_contact_sheet_path(args.contact_sheet)
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    start = time.perf_counter()
    # SIGTERM and SIGHUP clean up like Ctrl-C: the temporary folder is removed
    restore_signal_handlers = install_signal_handlers()
    try:
        world = generate_world(
            args.out,
            args.name,
            seed=args.seed,
            overwrite=args.overwrite,
            shared_fraction=args.shared_fraction,
            num_shared_buildings=args.shared_buildings,
            **sizes,
        )
    except OSError as error:  # another run on the same name seen once this one had started, a full disk: one line
        raise SystemExit(f"synthetic.py: {error}") from None
    finally:
        restore_signal_handlers()
    elapsed = time.perf_counter() - start
    counts = []
    for split in SPLITS:
        database = len(list((world / "images" / split / "database").glob("*.jpg")))
        queries = len(list((world / "images" / split / "queries").glob("*.jpg")))
        counts.append(f"{split} {database} database / {queries} queries")
    print(f"Wrote {world} in {elapsed:.1f} s: {', '.join(counts)}")
    if args.contact_sheet is not None:
        print(f"Contact sheet: {make_contact_sheet(world, args.contact_sheet)}")
    return world


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main(sys.argv[1:])
    except Interrupted as interrupted:
        sys.exit(128 + interrupted.signum)  # the shell's convention for a process ended by a signal
