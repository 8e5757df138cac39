"""Pictures of what retrieval and re-ranking did, one PNG per query (drawn with Pillow).

Each picture shows the query, its top-N predictions before re-ranking (global descriptors) and after (DHE inlier
count), each framed green (a positive: within the evaluation distance), red (not one) or grey (no labels), with its
distance to the query in metres and its inlier score; below, the match picture of the top candidate after
re-ranking: query and candidate side by side as the model sees them (hard-resized), the inlier matches as lines,
the query's border projected onto the candidate by the DHE homography (magenta) and, on the synthetic world when
the candidate is the query's nearest database image listed in homographies.json, by the true homography (yellow).

`eval.py --num_preds_to_save N` (`evaluation.pipeline`) calls `top_match_geometries` while the local features are
still on disk (for the saved queries only, so the normal path is not slowed down) and `save_prediction_pictures` at
the end.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn
from tqdm import tqdm

from datasets_ws import BaseDataset, open_rgb_image
from evaluation.local_features import LocalFeatureStore
from model.files import replaced_atomically
from model.geometry import reprojection_distances
from model.matching import SCORE_THRESHOLD, matched_keypoints
from model.rerank import predict_homographies

__all__ = [
    "CORRECT_COLOUR",
    "WRONG_COLOUR",
    "NEUTRAL_COLOUR",
    "DHE_COLOUR",
    "TRUE_COLOUR",
    "MatchGeometry",
    "match_geometry",
    "top_match_geometries",
    "queries_to_save",
    "load_true_homographies",
    "resized_homography",
    "Layout",
    "Candidate",
    "prediction_picture",
    "picture_name",
    "query_picture",
    "save_prediction_pictures",
    "validation_picture",
]

CORRECT_COLOUR = (0, 200, 0)
WRONG_COLOUR = (230, 0, 0)
NEUTRAL_COLOUR = (150, 150, 150)  # predictions when there are no labels
QUERY_COLOUR = (30, 30, 30)
DHE_COLOUR = (255, 0, 255)
TRUE_COLOUR = (255, 220, 0)
MATCH_COLOURS = ((0, 220, 255), (255, 140, 0), (120, 255, 120), (255, 90, 160), (90, 150, 255), (255, 255, 255))
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)
BORDER = 4  # px of the coloured frame around a tile
PAD = 8
LINE_HEIGHT = 14
FONT_SIZE = 12
MATCH_LEGEND_LINES = 3
MARGIN_COLOUR = (225, 225, 225)


# ----------------------------------------------------------------------------------------------------------- geometry
@dataclass
class MatchGeometry:
    """What the DHE head and the matching say about one query-candidate pair, in pixels of the resized images.

    Attributes:
        homography: (3, 3) float64, query px -> candidate px, predicted by the DHE head (DLT of its 4 points).
        query_points: (M, 2) float64 (x, y) query keypoints of the M mutual nearest-neighbour matches.
        candidate_points: (M, 2) float64 their matched candidate keypoints.
        inliers: (M,) bool, the matches that `homography` maps within the 48-px inlier radius.
    """

    homography: np.ndarray
    query_points: np.ndarray
    candidate_points: np.ndarray
    inliers: np.ndarray

    @property
    def num_inliers(self) -> int:
        return int(self.inliers.sum())


def match_geometry(
    homography_regression: nn.Module,
    local_q: Tensor,
    local_c: Tensor,
    amp: bool = False,
    image_hw: tuple[int, int] | None = None,
) -> list[MatchGeometry]:
    """The DHE homography, the mutual matches and their inliers of P pairs, as the re-ranking score sees them.

    Args:
        homography_regression: the DHE head, in eval mode.
        local_q: (P, C, h, w) query local features (any float dtype; computed in float32).
        local_c: (P, C, h, w) candidate local features.
        amp: run the head under autocast, as `--amp` does when re-ranking.
        image_hw: (H, W) pixels of the resized images; defaults to the grid times the patch size.

    Returns:
        P MatchGeometry; `num_inliers` equals the re-ranking score when the pair has 4 mutual matches or more.
    """
    if local_q.shape != local_c.shape or local_q.dim() != 4:
        raise ValueError(
            f"expected query and candidate features (P, C, h, w) of one shape, got {tuple(local_q.shape)} and "
            f"{tuple(local_c.shape)}"
        )
    with torch.inference_mode():
        local_q, local_c = local_q.float(), local_c.float()
        H = predict_homographies(homography_regression, local_q, local_c, amp)
        query_points, candidate_points, valid = matched_keypoints(local_q, local_c, image_hw)
        inliers = valid & (reprojection_distances(H, query_points, candidate_points) < SCORE_THRESHOLD)
    H, query_points = H.double().cpu().numpy(), query_points[0].double().cpu().numpy()
    candidate_points, valid, inliers = (
        candidate_points.double().cpu().numpy(),
        valid.cpu().numpy(),
        inliers.cpu().numpy(),
    )
    return [
        MatchGeometry(H[i], query_points[valid[i]], candidate_points[i][valid[i]], inliers[i][valid[i]])
        for i in range(len(H))
    ]


def top_match_geometries(
    homography_regression: nn.Module,
    store: LocalFeatureStore,
    query_indexes: Sequence[int],
    candidate_indexes: Sequence[int],
    batch_size: int,
    device: torch.device,
    amp: bool = False,
) -> list[MatchGeometry]:
    """`match_geometry` of the pairs (query_indexes[i], candidate_indexes[i]), read from a `LocalFeatureStore`,
    `batch_size` pairs at a time."""
    homography_regression.eval()
    geometries: list[MatchGeometry] = []
    for start in range(0, len(query_indexes), batch_size):
        queries = store.read([int(i) for i in query_indexes[start : start + batch_size]]).to(device)
        candidates = store.read([int(i) for i in candidate_indexes[start : start + batch_size]]).to(device)
        geometries += match_geometry(homography_regression, queries, candidates, amp)
    return geometries


def queries_to_save(
    reranked: np.ndarray, positives: Sequence[np.ndarray] | None, only_wrong: bool = False
) -> np.ndarray:
    """Query positions (int64) to draw: all of them, or with `only_wrong` those whose top prediction after
    re-ranking is not a positive (`positives` is then required)."""
    if not only_wrong:
        return np.arange(len(reranked), dtype=np.int64)
    if positives is None:
        raise ValueError("only_wrong needs labels (positives); there are none")
    wrong = [q for q, top in enumerate(reranked[:, 0]) if not np.isin(top, positives[q])]
    return np.array(wrong, dtype=np.int64)


def load_true_homographies(split_folder: str | Path) -> dict[str, tuple[str, np.ndarray]]:
    """`tools.synthetic.world.load_homographies` of the split, or {} when it has no homographies.json."""
    if not (Path(split_folder) / "homographies.json").is_file():
        return {}
    from tools.synthetic.world import load_homographies

    return load_homographies(split_folder)


def _pixel_scale(original_wh: tuple[int, int], resized_wh: tuple[int, int]) -> np.ndarray:
    """(3, 3) map of pixel centres (at integers) of an image to those of its resized copy."""
    sx, sy = resized_wh[0] / original_wh[0], resized_wh[1] / original_wh[1]
    return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1.0]])


def resized_homography(
    H: np.ndarray,
    query_wh: tuple[int, int],
    candidate_wh: tuple[int, int],
    resized_wh: tuple[int, int],
) -> np.ndarray:
    """A homography between the original images (query px -> candidate px, sizes (W, H)) as one between their
    copies resized to `resized_wh`: (3, 3), normalised so that [2, 2] = 1."""
    resized = _pixel_scale(candidate_wh, resized_wh) @ H @ np.linalg.inv(_pixel_scale(query_wh, resized_wh))
    return resized / resized[2, 2]


def _project_border(H: np.ndarray, wh: tuple[int, int], scale: float) -> list[tuple[float, float]] | None:
    """The image border (W, H) mapped by H and scaled to display pixels, or None when a corner goes to infinity or
    behind the camera (H of a poorly trained head) or H is not finite."""
    width, height = wh
    corners = np.array([[0, 0, 1], [width - 1, 0, 1], [width - 1, height - 1, 1], [0, height - 1, 1]], dtype=float)
    if not np.isfinite(H).all():
        return None
    projected = corners @ H.T
    if (projected[:, 2] <= 1e-9).any():
        return None
    points = np.clip(projected[:, :2] / projected[:, 2:] * scale, -1e5, 1e5)
    return [tuple(p) for p in points]


# ------------------------------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class Layout:
    """Where things go in a prediction picture, in pixels.

    Args:
        resize_hw: (H, W) of the model's input; tiles keep its aspect ratio.
        num_preds: predictions shown per row.
        tile_height: height of a prediction tile's image; the match picture's images are twice as high.
    """

    resize_hw: tuple[int, int]
    num_preds: int
    tile_height: int = 128

    @property
    def tile_wh(self) -> tuple[int, int]:
        return max(1, round(self.tile_height * self.resize_hw[1] / self.resize_hw[0])), self.tile_height

    @property
    def match_wh(self) -> tuple[int, int]:
        width, height = self.tile_wh
        return 2 * width, 2 * height

    @property
    def _cell_w(self) -> int:
        return self.tile_wh[0] + 2 * BORDER + PAD

    @property
    def _row_h(self) -> int:
        return LINE_HEIGHT + self.tile_wh[1] + 2 * BORDER + 2 * LINE_HEIGHT + PAD

    def tile_box(self, stage: int, rank: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the frame of prediction `rank` (0-based) of `stage` (0: before, 1: after
        re-ranking); its border is `BORDER` pixels wide inside the box; x1, y1 exclusive."""
        x0 = PAD + self._cell_w + 2 * PAD + rank * self._cell_w
        y0 = LINE_HEIGHT + PAD + stage * self._row_h + LINE_HEIGHT
        return x0, y0, x0 + self.tile_wh[0] + 2 * BORDER, y0 + self.tile_wh[1] + 2 * BORDER

    def query_box(self) -> tuple[int, int, int, int]:
        _, y0, _, y1 = self.tile_box(0, 0)
        return PAD, y0, PAD + self.tile_wh[0] + 2 * BORDER, y1

    @property
    def match_margin(self) -> int:
        """Grey margin around the match picture's candidate, where a projected border may run out of the image."""
        return self.match_wh[0] // 4

    def match_origin(self) -> tuple[int, int]:
        """Top-left corner of the match picture's query image."""
        return PAD, LINE_HEIGHT + PAD + 2 * self._row_h + MATCH_LEGEND_LINES * LINE_HEIGHT + self.match_margin

    def match_candidate_origin(self) -> tuple[int, int]:
        """Top-left corner of the match picture's candidate image (its margin starts `match_margin` px before)."""
        x, y = self.match_origin()
        return x + self.match_wh[0] + PAD + self.match_margin, y

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the picture."""
        rankings_w = self.tile_box(0, self.num_preds - 1)[2] + PAD
        match_w = self.match_candidate_origin()[0] + self.match_wh[0] + self.match_margin + PAD
        return max(rankings_w, match_w), self.match_origin()[1] + self.match_wh[1] + self.match_margin + PAD


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


@dataclass(frozen=True)
class Candidate:
    """One prediction as drawn: its image, and what is known about it (None: unknown)."""

    path: str
    correct: bool | None
    metres: float | None
    inliers: float | None


def _frame_colour(correct: bool | None) -> tuple[int, int, int]:
    return NEUTRAL_COLOUR if correct is None else CORRECT_COLOUR if correct else WRONG_COLOUR


def _paste_tile(
    canvas: Image.Image, image: Image.Image, box: tuple[int, int, int, int], colour: tuple[int, int, int]
) -> None:
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=colour)
    canvas.paste(image, (box[0] + BORDER, box[1] + BORDER))


def _candidate_text(rank: int, candidate: Candidate) -> tuple[str, str]:
    metres = "" if candidate.metres is None else f"  {candidate.metres:.1f} m"
    inliers = "inliers -" if candidate.inliers is None else f"inliers {candidate.inliers:.0f}"
    return f"#{rank + 1}{metres}", inliers


def prediction_picture(
    query_path: str,
    before: Sequence[Candidate],
    after: Sequence[Candidate],
    geometry: MatchGeometry,
    resize_hw: tuple[int, int],
    title: str,
    true_homography: np.ndarray | None = None,
    note: str = "",
    tile_height: int = 128,
) -> Image.Image:
    """The picture of one query (see the module's docstring).

    Args:
        query_path: the query image.
        before, after: its top-N predictions before and after re-ranking (same N).
        geometry: `match_geometry` of the query and after[0], in pixels of images resized to `resize_hw`.
        resize_hw: (H, W) of the model's input.
        title: first line of the picture.
        true_homography: (3, 3) true query px -> after[0] px in resized pixels, or None.
        note: why there is no true homography, if there is none (shown in the legend).
        tile_height: see `Layout`.
    """
    if len(before) != len(after) or not before:
        raise ValueError(
            f"expected the same number (> 0) of predictions before and after, got {len(before)}, {len(after)}"
        )
    layout = Layout(tuple(resize_hw), len(before), tile_height)
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    draw.text((PAD, PAD // 2), _fit(title, canvas.width - 2 * PAD, font), fill=TEXT_COLOUR, font=font)
    resized_wh = (resize_hw[1], resize_hw[0])
    query = open_rgb_image(query_path).resize(resized_wh, Image.Resampling.BILINEAR)
    _draw_rankings(canvas, draw, layout, font, query, before, after)
    _draw_top_match(canvas, draw, layout, font, query, after[0].path, geometry, true_homography, note)
    return canvas


def _draw_rankings(
    canvas: Image.Image,
    draw: ImageDraw.ImageDraw,
    layout: Layout,
    font: ImageFont.ImageFont,
    query: Image.Image,
    before: Sequence[Candidate],
    after: Sequence[Candidate],
) -> None:
    """The query's tile and the two rows of candidates (before and after re-ranking), framed and labelled."""
    tile_wh = layout.tile_wh
    query_box = layout.query_box()
    draw.text((query_box[0], query_box[1] - LINE_HEIGHT), "query", fill=TEXT_COLOUR, font=font)
    _paste_tile(canvas, query.resize(tile_wh, Image.Resampling.BILINEAR), query_box, QUERY_COLOUR)
    for stage, (label, candidates) in enumerate((("before re-ranking", before), ("after DHE re-ranking", after))):
        x0, y0, _, _ = layout.tile_box(stage, 0)
        draw.text((x0, y0 - LINE_HEIGHT), label, fill=TEXT_COLOUR, font=font)
        for rank, candidate in enumerate(candidates):
            box = layout.tile_box(stage, rank)
            image = open_rgb_image(candidate.path).resize(tile_wh, Image.Resampling.BILINEAR)
            _paste_tile(canvas, image, box, _frame_colour(candidate.correct))
            for line, text in enumerate(_candidate_text(rank, candidate)):
                draw.text((box[0], box[3] + 1 + line * LINE_HEIGHT), text, fill=TEXT_COLOUR, font=font)


def _draw_top_match(
    canvas: Image.Image,
    draw: ImageDraw.ImageDraw,
    layout: Layout,
    font: ImageFont.ImageFont,
    query: Image.Image,
    candidate_path: str,
    geometry: MatchGeometry,
    true_homography: np.ndarray | None,
    note: str,
) -> None:
    """The match picture of the top candidate after re-ranking: `query` (already resized to the model's input)
    and the candidate side by side, the projected borders, the legend and the inlier matches."""
    resized_wh = query.size
    match_wh, margin = layout.match_wh, layout.match_margin
    scale = match_wh[0] / resized_wh[0]
    left = query.resize(match_wh, Image.Resampling.BILINEAR)
    ImageDraw.Draw(left).rectangle((0, 0, match_wh[0] - 1, match_wh[1] - 1), outline=DHE_COLOUR, width=3)
    right = Image.new("RGB", (match_wh[0] + 2 * margin, match_wh[1] + 2 * margin), MARGIN_COLOUR)
    candidate = open_rgb_image(candidate_path).resize(resized_wh, Image.Resampling.BILINEAR)
    right.paste(candidate.resize(match_wh, Image.Resampling.BILINEAR), (margin, margin))
    legend = [
        f"top-1 after re-ranking: {geometry.num_inliers} inliers (lines) of {len(geometry.inliers)} mutual matches",
        "magenta: the query's border mapped onto the candidate by the DHE homography",
        "yellow: by the true homography" if true_homography is not None else note,
    ]
    # the true border first and wider, so that the DHE border stays visible on top of it where they agree
    for H, colour, width, line in ((true_homography, TRUE_COLOUR, 5, 2), (geometry.homography, DHE_COLOUR, 2, 1)):
        if H is None:
            continue
        polygon = _project_border(H, resized_wh, scale)
        if polygon is None:
            legend[line] += " (it sends the border to infinity)"
            continue
        polygon = [(x + margin, y + margin) for x, y in polygon]
        ImageDraw.Draw(right).line(polygon + [polygon[0]], fill=colour, width=width)
    origin, right_origin = layout.match_origin(), layout.match_candidate_origin()
    for line, text in enumerate(legend):
        y = origin[1] - margin - (MATCH_LEGEND_LINES - line) * LINE_HEIGHT
        draw.text((PAD, y), _fit(text, canvas.width - 2 * PAD, font), fill=TEXT_COLOUR, font=font)
    canvas.paste(left, origin)
    canvas.paste(right, (right_origin[0] - margin, right_origin[1] - margin))
    inliers = geometry.inliers
    for k, (q, c) in enumerate(zip(geometry.query_points[inliers], geometry.candidate_points[inliers])):
        start = (origin[0] + q[0] * scale, origin[1] + q[1] * scale)
        end = (right_origin[0] + c[0] * scale, right_origin[1] + c[1] * scale)
        colour = MATCH_COLOURS[k % len(MATCH_COLOURS)]
        draw.line([start, end], fill=colour, width=1)
        for x, y in (start, end):
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), outline=colour)


def _fit(text: str, width: int, font: ImageFont.ImageFont) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def picture_name(query_position: int, queries_num: int) -> str:
    """`<zero-padded query index>.png`, at least 4 digits."""
    return f"{query_position:0{max(4, len(str(max(queries_num - 1, 0))))}d}.png"


def query_picture(
    dataset: BaseDataset,
    position: int,
    predictions: np.ndarray,
    reranked: np.ndarray,
    rerank_scores: np.ndarray | None,
    num_preds: int,
    geometry: MatchGeometry,
    positives: Sequence[np.ndarray] | None = None,
    homographies: dict[str, tuple[str, np.ndarray]] | None = None,
    tile_height: int = 128,
) -> Image.Image:
    """The picture of the query at `position` (see `save_prediction_pictures` for the arguments; `homographies`:
    `load_true_homographies` of the split, None to read it; `rerank_scores` None: no inlier counts shown)."""
    homographies = load_true_homographies(dataset.dataset_folder) if homographies is None else homographies
    resize_hw = tuple(dataset.resize)
    labelled = positives is not None and getattr(dataset, "queries_utms", None) is not None
    scores = {} if rerank_scores is None else dict(zip(reranked[position].tolist(), rerank_scores[position].tolist()))

    def candidate(database_index: int) -> Candidate:
        database_index = int(database_index)
        if not labelled:
            return Candidate(dataset.database_paths[database_index], None, None, scores.get(database_index))
        metres = float(np.linalg.norm(dataset.queries_utms[position] - dataset.database_utms[database_index]))
        correct = bool(np.isin(database_index, positives[position]))
        return Candidate(dataset.database_paths[database_index], correct, metres, scores.get(database_index))

    num_preds = min(num_preds, predictions.shape[1])
    before = [candidate(d) for d in predictions[position, :num_preds]]
    after = [candidate(d) for d in reranked[position, :num_preds]]
    query_path = dataset.queries_paths[position]
    true_H, note = _true_homography(homographies, query_path, after[0].path, resize_hw)
    title = f"query {position}: {os.path.basename(query_path)}"
    return prediction_picture(query_path, before, after, geometry, resize_hw, title, true_H, note, tile_height)


def save_prediction_pictures(
    folder: str | Path,
    dataset: BaseDataset,
    query_positions: Sequence[int],
    predictions: np.ndarray,
    reranked: np.ndarray,
    rerank_scores: np.ndarray,
    num_preds: int,
    geometries: Sequence[MatchGeometry],
    positives: Sequence[np.ndarray] | None = None,
    tile_height: int = 128,
) -> list[Path]:
    """Write one PNG per query of `query_positions` into `folder` (created), named `picture_name`; return the paths.

    Args:
        dataset: the evaluated dataset (paths, UTM positions unless it has no labels, its split folder).
        query_positions: (S,) query positions (0-based among the queries).
        predictions, reranked: (Q, k) database indexes before and after re-ranking.
        rerank_scores: (Q, K) inlier scores of reranked[:, :K].
        num_preds: predictions shown per row (at most k).
        geometries: (S,) `match_geometry` of each saved query and its top prediction after re-ranking.
        positives: per query, its positives' database indexes, or None (no labels: grey frames, no metres).
    """
    if len(geometries) != len(query_positions):
        raise ValueError(f"{len(query_positions)} queries to save but {len(geometries)} match geometries")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    homographies = load_true_homographies(dataset.dataset_folder)
    paths = []
    for position, geometry in tqdm(
        list(zip(query_positions, geometries)), desc="saving pictures", ncols=100, leave=False
    ):
        picture = query_picture(
            dataset, int(position), predictions, reranked, rerank_scores, num_preds, geometry, positives,
            homographies, tile_height,
        )  # fmt: skip
        path = folder / picture_name(int(position), dataset.queries_num)
        with replaced_atomically(path) as temporary:
            picture.save(temporary, format="PNG", optimize=True)
        paths.append(path)
    return paths


def validation_picture(
    dataset: BaseDataset,
    results: dict,
    features_extractor: nn.Module,
    homography_regression: nn.Module,
    device: torch.device,
    num_preds: int = 3,
    position: int = 0,
    tile_height: int = 96,
) -> Image.Image:
    """The picture of one query (`position`) from `evaluation.pipeline.evaluate_split`'s `results` after its local
    feature store is gone: the local features of the query and of its top prediction are computed again (two
    images), so it stays cheap. Without re-ranking (reranked_predictions None) both rows show the global ranking."""
    predictions = results["predictions"]
    reranked = results["reranked_predictions"]
    scores = results["rerank_scores"]
    if reranked is None:
        reranked = predictions
    query_index = dataset.database_num + position
    images = torch.stack([dataset.hard_resized(query_index), dataset.hard_resized(int(reranked[position, 0]))])
    features_extractor.eval()
    with torch.inference_mode():
        local = features_extractor(images.to(device))[1]
    homography_regression.eval()
    geometry = match_geometry(homography_regression, local[:1], local[1:])[0]
    return query_picture(
        dataset, position, predictions, reranked, scores, num_preds, geometry, dataset.get_positives(),
        tile_height=tile_height,
    )  # fmt: skip


def _true_homography(
    homographies: dict[str, tuple[str, np.ndarray]], query_path: str, candidate_path: str, resize_hw: tuple[int, int]
) -> tuple[np.ndarray | None, str]:
    """The true homography (resized pixels) from the query to the candidate, or (None, why not)."""
    if not homographies:
        return None, ""
    entry = homographies.get(os.path.basename(query_path))
    if entry is None:
        return None, "no true homography: the query is not in homographies.json"
    nearest, H = entry
    if nearest != os.path.basename(candidate_path):
        # homographies.json only relates each query to its nearest database image; the others' are unknown
        return (
            None,
            "no true homography: the top candidate is not the query's nearest database image (see homographies.json)",
        )
    with Image.open(query_path) as query, Image.open(candidate_path) as database:
        query_wh, database_wh = query.size, database.size
    return resized_homography(H, query_wh, database_wh, (resize_hw[1], resize_hw[0])), ""
