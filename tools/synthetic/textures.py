"""Textures of the synthetic world, drawn with numpy and Pillow from a seed: building facades (walls of plaster,
brick, stone, siding or panels, windows, shop fronts with signs of random glyphs, posters), the ground of a street
and the tileable noise of the clouds. A texture is defined entirely by its generator's draws, in a fixed order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

FACADE_PPM = 32  # texels per metre of the facade textures
GROUND_PPM = 16  # texels per metre of the ground textures
GROUND_DEPTH_M = 24.0  # the ground texture covers 0 > y > -GROUND_DEPTH_M
SIDEWALK_M = 3.5  # the sidewalk runs from the facades to the curb at y = -SIDEWALK_M

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
CLOTH_COLOURS = (
    (30, 30, 40), (60, 80, 140), (150, 30, 40), (200, 200, 200), (90, 110, 60), (120, 90, 60), (230, 160, 40),
    (40, 120, 150), (200, 90, 140),
)  # fmt: skip


def pick_colour(
    rng: np.random.Generator, palette: Sequence[tuple[int, int, int]], jitter: float = 0.0
) -> tuple[int, ...]:
    """A colour of ``palette``, its brightness and channels jittered by up to ``jitter`` (relative)."""
    colour = np.asarray(palette[rng.integers(len(palette))], dtype=np.float64)
    colour = colour * (1 + jitter * rng.uniform(-1, 1)) + rng.uniform(-jitter, jitter, 3) * 60
    return tuple(int(c) for c in np.clip(colour, 0, 255))


def shaded(colour: tuple[int, ...], factor: float) -> tuple[int, ...]:
    """``colour`` with every channel multiplied by ``factor`` and clipped to 0..255 (integers)."""
    return tuple(int(min(255, max(0, c * factor))) for c in colour)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell_px: float) -> np.ndarray:
    """Smooth noise of roughly unit amplitude and feature size ``cell_px``, (H, W) float32."""
    small = rng.standard_normal((max(2, round(shape[0] / cell_px) + 2), max(2, round(shape[1] / cell_px) + 2)))
    image = Image.fromarray(small.astype(np.float32), mode="F").resize((shape[1], shape[0]), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float32)


def periodic_noise(rng: np.random.Generator, size: int, exponent: float) -> np.ndarray:
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
        base = np.array(pick_colour(rng, BRICK_COLOURS, 0.08), dtype=np.float32)
        shade, joints, _ = _block_pattern(rng, shape, (0.42 * ppm, 0.16 * ppm), True, 1.2)
        wall = base * (1 + 0.09 * shade[..., None])
        wall[joints] = np.array(pick_colour(rng, ((190, 185, 175), (120, 115, 110))), dtype=np.float32)
    elif kind == "stone":
        base = np.array(pick_colour(rng, STONE_COLOURS, 0.05), dtype=np.float32)
        block = (rng.uniform(0.8, 1.3) * ppm, rng.uniform(0.35, 0.55) * ppm)
        shade, joints, _ = _block_pattern(rng, shape, block, True, 1.5)
        wall = base * (1 + 0.06 * shade[..., None])
        wall[joints] *= 0.72
    elif kind == "siding":
        base = np.array(pick_colour(rng, PLASTER_COLOURS, 0.05), dtype=np.float32)
        shade, joints, within = _block_pattern(rng, shape, (width + 1.0, rng.uniform(0.2, 0.3) * ppm), False, 1.0)
        wall = base * (1 + 0.02 * shade[..., None] - 0.12 * within[..., None])
        wall[joints] *= 0.7
    elif kind == "panels":
        base = np.array(pick_colour(rng, PLASTER_COLOURS + STONE_COLOURS, 0.05), dtype=np.float32)
        block = (rng.uniform(1.2, 1.8) * ppm, rng.uniform(0.9, 1.3) * ppm)
        shade, joints, _ = _block_pattern(rng, shape, block, False, 1.5)
        wall = base * (1 + 0.04 * shade[..., None])
        wall[joints] *= 0.6
    else:
        base = np.array(pick_colour(rng, PLASTER_COLOURS, 0.06), dtype=np.float32)
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
    board = pick_colour(rng, SIGN_COLOURS)
    ink = pick_colour(rng, [c for c in SIGN_COLOURS if sum(abs(a - b) for a, b in zip(c, board)) > 250])
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
    glass = shaded(style["glass"], rng.uniform(0.8, 1.25))
    if style["shutters"]:
        shutter_w = (u1 - u0) / 2
        for su in (u0 - shutter_w - 0.05, u1 + 0.05):
            draw.rectangle(box(su, v0, su + shutter_w, v1), fill=style["shutter"])
            for k in range(1, 9):
                v = v0 + (v1 - v0) * k / 9
                draw.line(box.line(su + 0.04, v, su + shutter_w - 0.04, v), fill=shaded(style["shutter"], 0.7))
    if style["arched"]:
        arch_h = (u1 - u0) / 2
        draw.ellipse(box(u0 - f, v1 - arch_h - f, u1 + f, v1 + arch_h + f), fill=style["frame"])
        draw.ellipse(box(u0, v1 - arch_h, u1, v1 + arch_h), fill=glass)
    draw.rectangle(box(u0 - f, v0 - f, u1 + f, v1 + f), fill=style["frame"])
    draw.rectangle(box(u0, v0, u1, v1), fill=glass)
    if rng.random() < 0.45:  # curtains
        curtain = shaded((230, 226, 214), rng.uniform(0.75, 1.0))
        draw.rectangle(box(u0, v1 - (v1 - v0) * rng.uniform(0.2, 0.6), u1, v1), fill=curtain)
    reflection = (u1 - u0) * rng.uniform(0.1, 0.5)
    corners = [(u0, v0), (u0 + reflection, v0), (u0 + 2 * reflection, v1), (u0 + reflection, v1)]
    draw.polygon([box.point(u, v) for u, v in corners], fill=shaded(glass, 1.35))
    bar = max(1, round(0.05 * FACADE_PPM))
    um, vm = (u0 + u1) / 2, v0 + (v1 - v0) * style["transom"]
    draw.line(box.line(um, v0, um, v1), fill=style["frame"], width=bar)
    if style["transom"] < 1:
        draw.line(box.line(u0, vm, u1, vm), fill=style["frame"], width=bar)
    draw.rectangle(box(u0 - 0.15, v0 - 0.14, u1 + 0.15, v0 - f), fill=style["sill"])
    if style["lintel"]:
        draw.rectangle(box(u0 - 0.12, v1 + f, u1 + 0.12, v1 + 0.3), fill=style["sill"])


@dataclass(frozen=True)
class _Proportions:
    """The measures of a building, in metres: ``bays`` bays of ``bay_w`` side by side, a ground floor of ``ground_h``,
    ``floors`` upper floors of ``floor_h`` and a roof of ``roof_h``."""

    bays: int
    bay_w: float
    ground_h: float
    floors: int
    floor_h: float
    roof: str  # "parapet", "tiles", "gable" or "flat"
    roof_h: float

    @property
    def width_m(self) -> float:
        return self.bays * self.bay_w

    @property
    def eaves(self) -> float:
        """Height of the cornice: the top of the walls."""
        return self.ground_h + self.floors * self.floor_h

    @property
    def height_m(self) -> float:
        return self.eaves + self.roof_h

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the texture in texels."""
        return round(self.width_m * FACADE_PPM), round(self.height_m * FACADE_PPM)


def _draw_proportions(rng: np.random.Generator) -> _Proportions:
    """The measures of a new building: the first draws of its generator."""
    bays = int(rng.integers(2, 6))
    bay_w = rng.uniform(2.6, 3.8)
    ground_h = rng.uniform(3.8, 4.8)
    floors = int(rng.choice([1, 2, 3, 4, 5], p=[0.15, 0.3, 0.3, 0.15, 0.1]))
    floor_h = rng.uniform(2.9, 3.5)
    roof = str(rng.choice(["parapet", "tiles", "gable", "flat"], p=[0.35, 0.3, 0.15, 0.2]))
    # the three heights are drawn whatever the roof, so that the draws that follow do not depend on it
    roof_h = {"parapet": rng.uniform(0.6, 1.2), "tiles": rng.uniform(1.6, 3.0), "gable": rng.uniform(2.0, 4.0)}.get(
        roof, 0.4
    )
    return _Proportions(bays, bay_w, ground_h, floors, floor_h, roof, roof_h)


def _draw_roof(
    draw: ImageDraw.ImageDraw,
    alpha_draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    building: _Proportions,
    box: _Box,
    trim: tuple[int, ...],
) -> None:
    """The roof and the skyline (cut out of ``alpha_draw``'s mask), then the cornice."""
    ppm = FACADE_PPM
    width_m, height_m, eaves, roof_h = building.width_m, building.height_m, building.eaves, building.roof_h
    width = building.size[0]
    if building.roof == "tiles":
        tile = pick_colour(rng, ((150, 70, 50), (90, 90, 96), (60, 62, 70), (120, 80, 60)), 0.05)
        draw.rectangle(box(0, eaves, width_m, height_m), fill=tile)
        for k, v in enumerate(np.arange(eaves, height_m, 0.3)):
            draw.line(box.line(0, v, width_m, v), fill=shaded(tile, 0.75 if k % 2 else 0.85), width=2)
        inset = rng.uniform(0.3, 1.2)
        alpha_draw.polygon([(0, 0), (inset * ppm, 0), (0, (height_m - eaves) * ppm)], fill=0)
        alpha_draw.polygon([(width, 0), (width - inset * ppm, 0), (width, (height_m - eaves) * ppm)], fill=0)
        for _ in range(rng.integers(0, 3)):  # chimneys stand above the tiles: cut them out of the sky band
            cu = rng.uniform(1.0, width_m - 1.5)
            draw.rectangle(box(cu, eaves + 0.6 * roof_h, cu + 0.6, height_m), fill=shaded(trim, 0.7))
        alpha_draw.rectangle([0, 0, width, 2], fill=0)
    elif building.roof == "gable":
        draw.rectangle(box(0, eaves, width_m, height_m), fill=shaded(trim, 0.9))
        alpha_draw.polygon([(0, 0), (width / 2, 0), (0, (height_m - eaves) * ppm)], fill=0)
        alpha_draw.polygon([(width, 0), (width / 2, 0), (width, (height_m - eaves) * ppm)], fill=0)
        draw.ellipse(box(width_m / 2 - 0.45, eaves + 0.4, width_m / 2 + 0.45, eaves + 1.3), fill=(40, 44, 50))
    elif building.roof == "parapet":
        draw.rectangle(box(0, eaves, width_m, height_m), fill=trim)
        draw.rectangle(box(0, eaves, width_m, eaves + 0.12), fill=shaded(trim, 0.7))
    draw.rectangle(box(0, eaves - 0.35, width_m, eaves), fill=trim)  # cornice
    draw.rectangle(box(0, eaves - 0.45, width_m, eaves - 0.35), fill=shaded(trim, 0.6))


def _draw_upper_floors(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, building: _Proportions, box: _Box, trim: tuple[int, ...]
) -> tuple[dict, float, float]:
    """A window per bay on every upper floor, some balconies; returns the windows' style, width and height (metres),
    which the ground floor's windows share."""
    bays, bay_w, floor_h, width_m = building.bays, building.bay_w, building.floor_h, building.width_m
    # the same style on the whole building, small variations per window
    style = {
        "frame": pick_colour(rng, FRAME_COLOURS, 0.03),
        "glass": pick_colour(rng, GLASS_COLOURS, 0.05),
        "shutter": pick_colour(rng, SHUTTER_COLOURS, 0.05),
        "shutters": rng.random() < 0.3,
        "arched": rng.random() < 0.2,
        "lintel": rng.random() < 0.5,
        "transom": rng.choice([0.7, 0.75, 1.0]),
        "sill": shaded(trim, 0.95),
    }
    window_w = bay_w * rng.uniform(0.36, 0.5) * (0.75 if style["shutters"] else 1.0)
    window_h = floor_h * rng.uniform(0.45, 0.6)
    balcony_floors = {f for f in range(building.floors) if rng.random() < 0.25}
    for floor in range(building.floors):
        v_floor = building.ground_h + floor * floor_h
        if rng.random() < 0.5 or floor == 0:
            draw.rectangle(box(0, v_floor - 0.08, width_m, v_floor + 0.08), fill=shaded(trim, 0.92))
        for bay in range(bays):
            uc = (bay + 0.5) * bay_w
            rect = (uc - window_w / 2, v_floor + 0.9, uc + window_w / 2, v_floor + 0.9 + window_h)
            _draw_window(draw, rng, box, rect, style)
            if rng.random() < 0.06:  # an air conditioner below the window
                draw.rectangle(box(uc + 0.1, v_floor + 0.25, uc + 0.9, v_floor + 0.75), fill=(210, 210, 206))
                draw.ellipse(box(uc + 0.3, v_floor + 0.32, uc + 0.68, v_floor + 0.68), fill=(120, 120, 120))
        if floor in balcony_floors:
            rail = shaded(style["frame"], 0.6)
            for bay in range(bays):
                uc = (bay + 0.5) * bay_w
                u0, u1 = uc - window_w / 2 - 0.4, uc + window_w / 2 + 0.4
                draw.rectangle(box(u0, v_floor + 0.05, u1, v_floor + 0.25), fill=shaded(trim, 0.8))
                draw.rectangle(box(u0, v_floor + 1.0, u1, v_floor + 1.08), fill=rail)
                for u in np.arange(u0 + 0.05, u1, 0.14):
                    draw.line(box.line(u, v_floor + 0.25, u, v_floor + 1.0), fill=rail)
    return style, window_w, window_h


def _draw_shop(
    image: Image.Image,
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    building: _Proportions,
    box: _Box,
    door_bay: int,
    sign_seed: int | None,
) -> None:
    """A shop front: a band with the sign ``sign_seed`` (None: a sign of its own), display windows, a glass door in
    the bay ``door_bay``, maybe an awning."""
    ppm = FACADE_PPM
    bay_w, ground_h, width_m, width = building.bay_w, building.ground_h, building.width_m, building.size[0]
    band = pick_colour(rng, SIGN_COLOURS + ((40, 40, 44),), 0.03)
    draw.rectangle(box(0, ground_h - 1.15, width_m, ground_h - 0.25), fill=band)
    sign = _draw_sign(int(rng.integers(2**31)) if sign_seed is None else sign_seed)
    if sign.width > width - 2:
        sign = sign.crop((0, 0, width - 2, sign.height))
    sign_x = round(rng.uniform(0.05, 0.95) * (width - sign.width))
    image.paste(sign, (sign_x, round((building.height_m - ground_h + 0.32) * ppm)))
    shop_frame = pick_colour(rng, FRAME_COLOURS, 0.03)
    display_glass = pick_colour(rng, GLASS_COLOURS, 0.05)
    for bay in range(building.bays):
        u0, u1 = bay * bay_w + 0.25, (bay + 1) * bay_w - 0.25
        draw.rectangle(box(u0 - 0.1, 0.5, u1 + 0.1, ground_h - 1.25), fill=shop_frame)
        if bay == door_bay:
            uc = (u0 + u1) / 2
            draw.rectangle(box(uc - 0.55, 0.0, uc + 0.55, ground_h - 1.35), fill=shaded(display_glass, 0.7))
            draw.rectangle(box(uc - 0.05, 0.0, uc + 0.05, ground_h - 1.35), fill=shop_frame)
            draw.rectangle(box(uc - 0.35, 0.9, uc - 0.15, 1.1), fill=(200, 200, 190))
            continue
        draw.rectangle(box(u0, 0.6, u1, ground_h - 1.35), fill=display_glass)
        for _ in range(rng.integers(1, 4)):  # goods on display: small coloured blocks
            gu = rng.uniform(u0, u1 - 0.4)
            draw.rectangle(
                box(gu, 0.6, gu + rng.uniform(0.2, 0.6), rng.uniform(0.9, 1.8)),
                fill=pick_colour(rng, SIGN_COLOURS + CLOTH_COLOURS, 0.1),
            )
        top = ground_h - 1.35
        corners = [(u0, 0.6), (u0 + 0.6, 0.6), (u0 + 1.4, top), (u0 + 0.8, top)]
        draw.polygon([box.point(u, v) for u, v in corners], fill=shaded(display_glass, 1.3))
    if rng.random() < 0.45:  # a striped awning over the windows
        stripes = (pick_colour(rng, SIGN_COLOURS), (240, 238, 230))
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


def _draw_entrance_floor(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    building: _Proportions,
    box: _Box,
    door_bay: int,
    garage: bool,
    style: dict,
    window_size: tuple[float, float],
    trim: tuple[int, ...],
    plinth: tuple[int, ...],
) -> None:
    """A house's ground floor: a front door (or, for a ``garage``, a garage door) in the bay ``door_bay`` and a
    window of the upper floors' ``style`` and ``window_size`` (width, height) in every other bay."""
    window_w, window_h = window_size
    for bay in range(building.bays):
        uc = (bay + 0.5) * building.bay_w
        if bay == door_bay:
            if garage:
                door = pick_colour(rng, ((180, 180, 176), (120, 90, 60), (80, 86, 90)), 0.05)
                draw.rectangle(box(uc - 1.3, 0.0, uc + 1.3, 2.4), fill=door)
                for v in np.arange(0.2, 2.4, 0.25):
                    draw.line(box.line(uc - 1.3, v, uc + 1.3, v), fill=shaded(door, 0.75), width=2)
            else:
                door = pick_colour(rng, ((110, 70, 40), (60, 40, 30), (40, 70, 60), (140, 40, 40), (50, 60, 90)), 0.05)
                draw.rectangle(box(uc - 0.75, 0.0, uc + 0.75, 2.9), fill=trim)
                draw.rectangle(box(uc - 0.6, 0.15, uc + 0.6, 2.75), fill=door)
                for du in (-0.45, 0.05):
                    draw.rectangle(box(uc + du, 0.4, uc + du + 0.4, 1.3), outline=shaded(door, 0.7), width=2)
                    draw.rectangle(box(uc + du, 1.5, uc + du + 0.4, 2.5), outline=shaded(door, 0.7), width=2)
                draw.rectangle(box(uc - 0.9, 0.0, uc + 0.9, 0.15), fill=plinth)
                draw.ellipse(box(uc + 0.75, 2.2, uc + 0.95, 2.5), fill=(240, 210, 120))
            continue
        rect = (uc - window_w / 2, 1.2, uc + window_w / 2, 1.2 + window_h * 0.9)
        _draw_window(draw, rng, box, rect, style)


def _draw_street_level_details(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, building: _Proportions, box: _Box
) -> None:
    """Posters and coloured panels, maybe a graffiti tag near the ground, maybe a drain pipe at one edge."""
    width_m = building.width_m
    for _ in range(rng.poisson(0.8)):  # posters and coloured panels near the ground
        pw, ph = rng.uniform(0.5, 1.2), rng.uniform(0.7, 1.4)
        pu, pv = rng.uniform(0, width_m - pw), rng.uniform(0.6, 2.4)
        colour = pick_colour(rng, SIGN_COLOURS + CLOTH_COLOURS, 0.1)
        draw.rectangle(box(pu, pv, pu + pw, pv + ph), fill=colour)
        draw.ellipse(box(pu + 0.1, pv + 0.2, pu + pw * 0.7, pv + ph * 0.6), fill=pick_colour(rng, SIGN_COLOURS))
        ink = pick_colour(rng, ((20, 20, 20), (250, 250, 250)))
        _draw_text(draw, rng, tuple(box(pu + 0.08, pv + ph * 0.7, pu + pw - 0.08, pv + ph * 0.88)), 4, ink)
    if rng.random() < 0.2:  # a graffiti tag: a few scrawls in a small box near the ground
        tag_w, tag_h = rng.uniform(0.8, 2.2), rng.uniform(0.4, 0.9)
        tag_u, tag_v = rng.uniform(0, max(0.1, width_m - tag_w)), rng.uniform(0.2, 1.4)
        colour = pick_colour(rng, SIGN_COLOURS + CLOTH_COLOURS)
        for _ in range(rng.integers(2, 4)):
            scrawl = [box.point(tag_u + rng.uniform(0, tag_w), tag_v + rng.uniform(0, tag_h)) for _ in range(5)]
            draw.line(scrawl, fill=colour, width=round(rng.uniform(0.04, 0.09) * FACADE_PPM), joint="curve")
    if rng.random() < 0.5:  # a drain pipe at one edge
        u = rng.choice([0.12, width_m - 0.2])
        draw.rectangle(box(u, 0, u + 0.1, building.eaves - 0.35), fill=(110, 112, 116))


def _weathered_rgba(image: Image.Image, alpha: Image.Image, building: _Proportions) -> np.ndarray:
    """The premultiplied RGBA texture (H, W, 4) uint8 of ``image`` and ``alpha``, with soot and shade near the ground
    and under the cornice."""
    ppm = FACADE_PPM
    height_m, eaves = building.height_m, building.eaves
    rgba = np.dstack([np.asarray(image), np.asarray(alpha)])
    rows = np.arange(building.size[1], dtype=np.float32) / ppm
    darkening = 1 - 0.18 * np.exp(-(height_m - rows) / 0.6) - 0.1 * np.exp(-np.abs(rows - (height_m - eaves)) / 0.3)
    rgba[..., :3] = np.clip(rgba[..., :3] * darkening[:, None, None], 0, 255).astype(np.uint8)
    roof_rows = rgba[: round((height_m - eaves) * ppm)]  # the only rows with transparent texels
    roof_rows[..., :3] = roof_rows[..., :3].astype(np.uint16) * roof_rows[..., 3:] // 255
    return rgba


def draw_building(seed: int, sign_seed: int | None) -> np.ndarray:
    """Texture of one building facade, (H, W, 4) uint8 premultiplied RGBA at FACADE_PPM texels per metre.

    The texture is transparent above the roofline. The building is defined by ``seed``; its shop, if it has one,
    carries the sign ``sign_seed`` (None: a sign of its own).
    """
    rng = np.random.default_rng(seed)
    building = _draw_proportions(rng)
    width, height = building.size
    box = _Box(building.height_m)
    image = Image.fromarray(np.clip(_wall(rng, (height, width)), 0, 255).astype(np.uint8))
    alpha = Image.new("L", (width, height), 255)
    draw, alpha_draw = ImageDraw.Draw(image), ImageDraw.Draw(alpha)
    trim = pick_colour(rng, ((236, 232, 222), (200, 196, 186), (120, 116, 110), (180, 150, 120)), 0.04)
    _draw_roof(draw, alpha_draw, rng, building, box, trim)
    style, window_w, window_h = _draw_upper_floors(draw, rng, building, box, trim)

    # ground floor: a shop, a house entrance or a garage
    kind = rng.choice(["shop", "house", "garage"], p=[0.6, 0.28, 0.12])
    plinth = pick_colour(rng, STONE_COLOURS, 0.05)
    draw.rectangle(box(0, 0, building.width_m, 0.5), fill=plinth)
    door_bay = int(rng.integers(building.bays))
    if kind == "shop":
        _draw_shop(image, draw, rng, building, box, door_bay, sign_seed)
    else:
        garage = kind == "garage"
        _draw_entrance_floor(draw, rng, building, box, door_bay, garage, style, (window_w, window_h), trim, plinth)
    _draw_street_level_details(draw, rng, building, box)
    return _weathered_rgba(image, alpha, building)


def draw_ground(rng: np.random.Generator, length_m: float) -> np.ndarray:
    """Opaque ground texture (H, W, 4) uint8 RGBA at GROUND_PPM: columns along the street, rows away from the walls."""
    ppm = GROUND_PPM
    height, width = round(GROUND_DEPTH_M * ppm), round(length_m * ppm)
    shape = (height, width)
    depth = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / ppm  # metres from the facades
    along = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / ppm
    asphalt = np.array(pick_colour(rng, ((78, 78, 82), (92, 90, 88), (64, 66, 70)), 0.04), dtype=np.float32)
    ground = np.broadcast_to(asphalt, (height, width, 3)).copy()
    ground *= 1 + 0.1 * _smooth_noise(rng, shape, 1.5 * ppm)[..., None]
    ground += 7 * rng.standard_normal((height, width, 1), dtype=np.float32)
    # sidewalk slabs
    slab = np.array(pick_colour(rng, ((176, 172, 164), (150, 146, 140), (190, 170, 150)), 0.04), dtype=np.float32)
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
