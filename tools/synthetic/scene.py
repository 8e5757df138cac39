"""The scene of the synthetic world and its pictures: pinhole cameras in the frame of a street, the homographies of
the facade plane between views, streets lined with facades, the rendering of a view (facades, ground, sky and
clouds) and the cars and people that stand in front of a query.

Geometry. Each street has its own frame: x along it, y towards the facades (the facades are the plane y = 0), z up,
in metres. A camera is a pinhole at (x, y, height) with a yaw (positive turns towards +x), a pitch (positive looks
up) and a roll. A view is rendered by casting the ray of every pixel onto the facade plane, the ground plane z = 0 or
the sky, so on the facades two views are related exactly by the plane-induced homography. Pixel coordinates are x
right, y down, in pixels of the image, with the centre of the pixel in row r and column c at (x, y) = (c, r).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from tools.synthetic.textures import (
    CLOTH_COLOURS,
    FACADE_PPM,
    GROUND_PPM,
    SIDEWALK_M,
    draw_building,
    draw_ground,
    pick_colour,
    shaded,
)

FIELD_OF_VIEW_DEG = 80.0  # horizontal
CAR_COLOURS = (
    (190, 20, 30), (230, 230, 232), (30, 30, 34), (120, 124, 130), (30, 60, 140), (170, 170, 175), (20, 90, 60),
    (220, 180, 40), (90, 30, 30),
)  # fmt: skip
SKIES = {  # zenith colour, horizon colour, cloud colour
    "clear": ((66, 118, 200), (178, 204, 232), (250, 250, 252)),
    "hazy": ((120, 154, 196), (212, 218, 222), (240, 240, 240)),
    "overcast": ((150, 154, 162), (200, 202, 206), (226, 226, 228)),
    "dusk": ((52, 62, 118), (236, 168, 118), (250, 200, 170)),
}


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
        ground=[draw_ground(rng, facade.shape[1] / FACADE_PPM)],
        sky=str(rng.choice(["clear", "clear", "hazy"])),
        buildings=seeds,
    )


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
    paint = pick_colour(rng, CAR_COLOURS, 0.05)
    length = rng.uniform(3.8, 4.8)
    roof_h = rng.uniform(1.4, 1.7)
    body = [(0, 0.3), (length, 0.3), (length, 0.85), (length - 0.2, 1.0), (0.72 * length, 1.05), (0.6 * length, roof_h),
            (0.28 * length, roof_h), (0.18 * length, 1.05), (0.05, 0.95), (0, 0.75)]  # fmt: skip
    cabin_top = roof_h - 0.08
    window = [(0.21 * length, 1.08), (0.68 * length, 1.08), (0.58 * length, cabin_top), (0.3 * length, cabin_top)]
    pillar = [(0.44 * length, 1.08), (0.46 * length, 1.08), (0.46 * length, cabin_top), (0.44 * length, cabin_top)]
    bumper = [(0, 0.3), (length, 0.3), (length, 0.45), (0, 0.45)]
    parts = [(body, paint), (window, (40, 50, 60)), (pillar, paint), (bumper, shaded(paint, 0.6))]
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
    top = pick_colour(rng, CLOTH_COLOURS, 0.1)
    trousers = pick_colour(rng, CLOTH_COLOURS, 0.1)
    skin = pick_colour(rng, ((230, 190, 160), (190, 140, 100), (120, 80, 60)), 0.05)
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


def draw_occluders(image: Image.Image, rng: np.random.Generator, K: np.ndarray, camera: Camera, light: float) -> None:
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
                draw.polygon([tuple(p) for p in pixels], fill=shaded(colour, light))
