"""Datasets in the VG layout: evaluation, triplet mining for fine-tuning, and query-positive pairs for the DHE head.

Every dataset lives at::

    <datasets_folder>/<dataset_name>/images/<split>/database/**/*.jpg   ("gallery" is accepted instead of "database")
    <datasets_folder>/<dataset_name>/images/<split>/queries/**/*.jpg    (.jpg, .jpeg and .png, in any sub-folder)

and each file is named ``@utm_east@utm_north@utm_zone@zone_letter@lat@lon@pano_id@tile@heading@pitch@roll@height
@timestamp@note@.jpg``, of which only the first two fields are required.

Global indexes follow the benchmark: database images are ``0 .. database_num - 1`` and query ``q`` is
``database_num + q`` in ``images_paths``. Images are ImageNet-normalised float tensors (3, H, W) where
(H, W) = ``resize``.

Random choices of the mining (which queries, which database samples) come from a ``numpy.random.Generator`` seeded
with ``MiningSettings.seed``; image augmentations draw from torch's global generator, which ``torch.manual_seed``
(and, per worker, the DataLoader) seeds.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from sklearn.neighbors import NearestNeighbors
from torch import Tensor, nn
from torch.utils.data import Dataset

from evaluation.retrieval import search
from model.features_extractor import PATCH_SIZE
from tools.vg_names import NAME_PATTERN, parse_note, parse_utm
from util import extract_features

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# The original searched each training query's top 100 predictions for predicted query-positive pairs.
QP_NUM_PREDICTIONS = 100
QP_CROP_SCALE = (0.7, 1.0)

EXPECTED_LAYOUT = (
    "expected layout:\n"
    "  <datasets_folder>/<dataset_name>/images/<split>/database/**/*.jpg  (or gallery/ instead of database/)\n"
    "  <datasets_folder>/<dataset_name>/images/<split>/queries/**/*.jpg\n"
    f"with files named {NAME_PATTERN} (only utm_east and utm_north are required)"
)

_normalize = T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)


# ------------------------------------------------------------------------------------------------------------ images
def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB.

    16-bit greyscale (modes I;16* and I, which is read as 16-bit) is scaled by 255/65535 rather than clipped;
    palette images with transparency go through RGBA; the alpha channel is dropped.
    """
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        eight_bit = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit, mode="L").convert("RGB")
    if image.mode == "PA" or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")  # going through RGBA keeps PIL from warning about the transparency
    return image.convert("RGB")


EXIF_ORIENTATION = 0x0112


def open_rgb_image(path: str) -> Image.Image:
    """Read the image at `path` as 8-bit RGB, turned upright by its EXIF orientation as photo viewers do (the
    benchmark datasets have none); an unreadable or corrupt file, or one that is not a regular file (a FIFO, whose
    opening would block), raises OSError naming `path`."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise OSError("not a regular file")
        with Image.open(path) as image:
            image.load()
            if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
                image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise OSError(f"cannot read image {path}: {error}. Check that it is a valid JPEG/PNG file.") from error


def normalized_tensor(image: Image.Image, resize: Sequence[int] | int | None = None) -> Tensor:
    """(3, H, W) ImageNet-normalised tensor; `resize` as in `TF.resize` (a (H, W) pair, or the shorter side).

    The resize is bilinear without antialiasing, as the original's evaluation did (torchvision 0.9 resized tensors
    so), so that the same weights give the same descriptors.
    """
    tensor = TF.to_tensor(image)
    if resize is not None:
        size = [resize] if isinstance(resize, int) else list(resize)
        tensor = TF.resize(tensor, size, antialias=False)
    return _normalize(tensor)


def query_test_transform(image: Image.Image, test_method: str, resize: tuple[int, int]) -> Tensor:
    """A query prepared for global retrieval as the benchmark did, for each `test_method`.

    Returns (3, H, W) for hard_resize and central_crop (the largest central crop of ratio H:W, resized);
    (3, s, ~s * w / h) for single_query (shorter side resized to s = min(resize), ratio kept, the longer side
    centre-cropped down to a multiple of 16 for the CCT);
    (5, 3, s, s) for five_crops, nearest_crop and maj_voting (five square crops of the image whose shorter side
    was resized to s).
    """
    height, width = resize
    shorter_side = min(resize)
    if test_method == "hard_resize":
        return normalized_tensor(image, resize)
    if test_method == "single_query":
        tensor = normalized_tensor(image, shorter_side)
        # the CCT tokenizer needs sides that are multiples of its stride: trim the few extra pixels, centred
        trimmed = [size - size % PATCH_SIZE for size in tensor.shape[-2:]]
        return TF.center_crop(tensor, trimmed)
    if test_method == "central_crop":
        scale = max(height / image.height, width / image.width)
        scaled_size = (max(height, round(image.height * scale)), max(width, round(image.width * scale)))
        return TF.center_crop(normalized_tensor(image, scaled_size), [height, width])
    if test_method in ("five_crops", "nearest_crop", "maj_voting"):
        tensor = normalized_tensor(image, shorter_side)
        return torch.stack(TF.five_crop(tensor, [shorter_side, shorter_side]))
    raise ValueError(f"unknown test_method {test_method!r}")


# ----------------------------------------------------------------------------------------------------------- folders
FileIdentity = tuple[int, int]  # (st_dev, st_ino): the same file, whatever links lead to it


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "a socket" if stat.S_ISSOCK(mode) else "not a regular file"


def scan_images(folder: str, quiet: bool = False) -> dict[str, FileIdentity]:
    """Every .jpg/.jpeg/.png file under `folder` (recursive, symlinks followed) -> its identity, each file once.

    Odd trees are handled rather than followed blindly, with one warning per kind (unless `quiet`):
    a link back to a folder above it (a symlink loop) is not followed; a file reached twice (through links, or
    hard links) is kept once, under its first path in sorted order; an entry that is not a regular file (a FIFO,
    a device, a socket) or a broken link is skipped, since opening a FIFO would block forever. A folder that
    cannot be listed raises PermissionError/OSError naming it.
    """
    found: list[tuple[str, FileIdentity]] = []
    loops: list[str] = []
    skipped: list[str] = []

    def walk(directory: str, ancestors: frozenset[FileIdentity]) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as error:
            raise type(error)(error.errno, f"cannot list the dataset folder {directory}: {error.strerror}") from None
        for entry in entries:
            try:
                info = entry.stat()  # follows links (and is free for plain files on most file systems)
            except OSError:
                if entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    skipped.append(f"{entry.path} (a broken link)")
                continue
            identity = (info.st_dev, info.st_ino)
            if stat.S_ISDIR(info.st_mode):
                if identity in ancestors:
                    loops.append(entry.path)
                else:
                    walk(entry.path, ancestors | {identity})
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                if stat.S_ISREG(info.st_mode):
                    found.append((entry.path, identity))
                else:
                    skipped.append(f"{entry.path} ({_file_kind(info.st_mode)})")

    root = os.stat(folder)
    walk(folder, frozenset({(root.st_dev, root.st_ino)}))
    images: dict[str, FileIdentity] = {}
    first_path: dict[FileIdentity, str] = {}
    duplicates = []
    for path, identity in sorted(found):
        if identity in first_path:
            duplicates.append(f"{path} (the same file as {first_path[identity]})")
        else:
            first_path[identity] = path
            images[path] = identity
    if not quiet:
        if loops:
            logger.warning(
                f"{folder}: {len(loops)} link(s) lead back to a folder above them (a symlink loop) and are not "
                f"followed, e.g. {loops[0]}"
            )
        if duplicates:
            logger.warning(
                f"{folder}: {len(duplicates)} image(s) are reached twice (through links) and used once, e.g. "
                f"{duplicates[0]}"
            )
        if skipped:
            logger.warning(
                f"{folder}: {len(skipped)} entries named like images are skipped because they are not regular "
                f"files, e.g. {skipped[0]}"
            )
    return images


def _list_images(folder: str) -> dict[str, FileIdentity]:
    """Every .jpg/.jpeg/.png under `folder` (recursive, symlinks followed), each file once, in sorted order, with
    its identity (see `scan_images`); none is an error."""
    images = scan_images(folder)
    if not images:
        raise FileNotFoundError(f"no .jpg/.jpeg/.png images found in {folder}; {EXPECTED_LAYOUT}")
    return dict(sorted(images.items()))


def check_no_shared_files(
    split_folder: str, split: str, images: dict[str, FileIdentity], other_split_folders: dict[str, str]
) -> None:
    """Raise ValueError when a file of `images` (path -> identity, of `split`) is also an image of another split
    (through links, or hard links): training images in the evaluation split inflate its recalls."""
    where = {identity: path for path, identity in images.items()}
    for other, other_folder in other_split_folders.items():
        for path, identity in scan_images(other_folder, quiet=True).items():
            if identity in where:
                shared = sum(1 for i in scan_images(other_folder, quiet=True).values() if i in where)
                raise ValueError(
                    f"{shared} image(s) of the {split} split ({split_folder}) are the same files as images of the "
                    f"{other} split (through links), e.g. {where[identity]} is {path}: the {split} and {other} "
                    f"splits must not share images; remove the links"
                )


def _split_folder(datasets_folder: str, dataset_name: str, split: str) -> str:
    dataset_folder = os.path.join(datasets_folder, dataset_name)
    if not os.path.isdir(dataset_folder):
        raise FileNotFoundError(
            f"dataset folder {dataset_folder} does not exist: check --datasets_folder and --dataset_name; "
            f"{EXPECTED_LAYOUT}"
        )
    split_folder = os.path.join(dataset_folder, "images", split)
    if not os.path.isdir(split_folder):
        images_folder = os.path.join(dataset_folder, "images")
        found = sorted(os.listdir(images_folder)) if os.path.isdir(images_folder) else []
        raise FileNotFoundError(
            f"split folder {split_folder} does not exist (splits found: {found or 'none'}); {EXPECTED_LAYOUT}"
        )
    return split_folder


def _database_folder(split_folder: str) -> str:
    database_folder = os.path.join(split_folder, "database")
    gallery_folder = os.path.join(split_folder, "gallery")
    has_database, has_gallery = os.path.isdir(database_folder), os.path.isdir(gallery_folder)
    if has_database and has_gallery:
        # The original's data had both, one a link to (or a copy of) the other: accept that, refuse two databases.
        if not _same_images(database_folder, gallery_folder):
            raise ValueError(
                f"{split_folder} holds both database/ and gallery/ with different images; they are two names for "
                "the same thing: keep one"
            )
        logger.info(f"{split_folder} holds database/ and gallery/ with the same images: using database/")
        return database_folder
    if not (has_database or has_gallery):
        raise FileNotFoundError(f"database folder {database_folder} (or gallery/) does not exist; {EXPECTED_LAYOUT}")
    return database_folder if has_database else gallery_folder


def _same_images(folder_a: str, folder_b: str) -> bool:
    """Whether two folders are one (a link) or hold the same image files (same relative names and sizes)."""
    if os.path.realpath(folder_a) == os.path.realpath(folder_b):
        return True

    def listing(folder: str) -> list[tuple[str, int]]:
        return sorted((os.path.relpath(p, folder), os.path.getsize(p)) for p in _list_images(folder))

    return listing(folder_a) == listing(folder_b)


@dataclass(frozen=True)
class InferenceSettings:
    """How descriptors are computed for the mining and the predicted pairs: on `device`, `batch_size` images a
    batch (`--infer_batch_size`), with `num_workers` loader processes."""

    device: torch.device
    batch_size: int = 32
    num_workers: int = 8


@dataclass(frozen=True)
class MiningSettings:
    """The triplet mining of `TripletsDataset` (the flags of the same names; `parser.mining_settings(args)`).

    mining: "partial", "full", "random" or "msls_weighted". neg_samples_num: database images sampled to find the
    hardest negatives. negs_num_per_query: negatives per triplet. cache_refresh_rate: queries mined by each
    `compute_triplets`. train_positives_dist_threshold: metres within which a database image is a training positive.
    seed: of the mining's random generator.
    """

    mining: str = "partial"
    neg_samples_num: int = 1000
    negs_num_per_query: int = 2
    cache_refresh_rate: int = 1000
    train_positives_dist_threshold: int = 10
    seed: int = 0


@dataclass(frozen=True)
class QueryAugmentation:
    """Augmentations of the training queries (the flags of the same names; None: not applied).

    brightness, contrast, saturation, hue: ColorJitter; rand_perspective: RandomPerspective distortion scale;
    random_resized_crop: RandomResizedCrop with scale (1 - value, 1); random_rotation: RandomRotation in degrees.
    """

    brightness: float | None = None
    contrast: float | None = None
    saturation: float | None = None
    hue: float | None = None
    rand_perspective: float | None = None
    random_resized_crop: float | None = None
    random_rotation: float | None = None


def _global_descriptors(inference: InferenceSettings, model: nn.Module, images: Dataset) -> np.ndarray:
    """Global descriptors (N, D) of `images` with `model`, as `inference` says."""
    return extract_features(
        model, images, inference.device, inference.batch_size, inference.num_workers, desc="mining cache"
    )


def _squared_distances(query_descriptor: np.ndarray, descriptors: np.ndarray) -> np.ndarray:
    """Squared L2 distances (N,) from one descriptor (D,) to descriptors (N, D)."""
    return ((descriptors - query_descriptor[None]) ** 2).sum(axis=1)


# ---------------------------------------------------------------------------------------------------------- datasets
class BaseDataset(Dataset):
    """Database and query images of one split, for evaluation and for computing descriptors.

    `dataset[i]` is (image, i): database images (i < database_num) are always resized to `resize` (H, W); queries
    are prepared according to `self.test_method` (see `query_test_transform`), which starts as `test_method` and
    may be changed. The re-ranking stage needs hard-resized images whatever the test method:
    `hard_resized(i)` gives one, `hard_resized_images(indexes)` a Dataset of them for a DataLoader.

    Attributes: database_paths, queries_paths, images_paths (database then queries), database_num, queries_num,
    database_utms (database_num, 2), queries_utms (queries_num, 2), soft_positives_per_query (for each query the
    database indexes within `positive_dist_threshold` metres, nearest first), labelled.

    Without `labelled` (eval.py --no_labels) file names need not carry a position: `labelled` is False and
    database_utms, queries_utms and soft_positives_per_query are None. Otherwise every name must parse.
    """

    def __init__(
        self,
        datasets_folder: str,
        dataset_name: str,
        split: str,
        resize: Sequence[int] = (384, 384),
        positive_dist_threshold: float = 25,
        test_method: str = "hard_resize",
        labelled: bool = True,
    ) -> None:
        super().__init__()
        self.dataset_name = dataset_name
        self.split = split
        self.resize = tuple(resize)
        self.positive_dist_threshold = positive_dist_threshold
        self.test_method = test_method
        self.dataset_folder = _split_folder(datasets_folder, dataset_name, split)
        queries_folder = os.path.join(self.dataset_folder, "queries")
        database_folder = _database_folder(self.dataset_folder)
        if not os.path.isdir(queries_folder):
            raise FileNotFoundError(f"queries folder {queries_folder} does not exist; {EXPECTED_LAYOUT}")

        database_images, query_images = _list_images(database_folder), _list_images(queries_folder)
        self.database_paths, self.queries_paths = list(database_images), list(query_images)
        self._check_images_are_not_shared(database_images, query_images, split)
        self.images_paths = self.database_paths + self.queries_paths
        self.database_num = len(self.database_paths)
        self.queries_num = len(self.queries_paths)
        self.labelled = labelled
        if self.labelled:
            self.database_utms = np.array([parse_utm(p) for p in self.database_paths], dtype=np.float64)
            self.queries_utms = np.array([parse_utm(p) for p in self.queries_paths], dtype=np.float64)
            self.soft_positives_per_query = self.positives_within(positive_dist_threshold)
        else:  # --no_labels: any file name; positions, and so positives, are unknown
            self.database_utms = self.queries_utms = self.soft_positives_per_query = None

    def _check_images_are_not_shared(
        self, database_images: dict[str, FileIdentity], query_images: dict[str, FileIdentity], split: str
    ) -> None:
        """No file is both a database image and a query, and the training split shares no file with another split
        (val and test may share files: some datasets use one for the other)."""
        database_files = {identity: path for path, identity in database_images.items()}
        for path, identity in query_images.items():
            if identity in database_files:
                raise ValueError(
                    f"query {path} is the same file as database image {database_files[identity]} (through links): "
                    "queries and database images must be distinct files"
                )
        identities = {**database_images, **query_images}
        images_folder = os.path.dirname(self.dataset_folder)
        splits = sorted(d for d in os.listdir(images_folder) if os.path.isdir(os.path.join(images_folder, d)))
        others = [s for s in splits if s != split] if split == "train" else [s for s in splits if s == "train"]
        other_folders = {other: os.path.join(images_folder, other) for other in others}
        check_no_shared_files(self.dataset_folder, split, identities, other_folders)

    def positives_within(self, radius: float) -> list[np.ndarray]:
        """For each query, the int64 database indexes within `radius` metres (inclusive), nearest first."""
        if not self.labelled:
            raise ValueError(f"{self.dataset_folder} was opened without labels (--no_labels): it has no positives")
        # kd_tree measures exact distances; brute force on UTM-sized numbers loses precision to cancellation
        knn = NearestNeighbors(algorithm="kd_tree").fit(self.database_utms)
        distances, indexes = knn.radius_neighbors(self.queries_utms, radius=radius, return_distance=True)
        # lexsort: by distance, then by index, so that ties come out the same on every run
        return [i[np.lexsort((i, d))].astype(np.int64) for d, i in zip(distances, indexes)]

    def get_positives(self) -> list[np.ndarray] | None:
        """`soft_positives_per_query`: for each query the database indexes within the evaluation threshold (None
        without labels)."""
        return self.soft_positives_per_query

    def hard_resized(self, index: int) -> Tensor:
        """Image `index` (database or query) resized to `resize`: (3, H, W), whatever the test method."""
        return normalized_tensor(open_rgb_image(self.images_paths[index]), self.resize)

    def hard_resized_images(self, indexes: Sequence[int] | None = None) -> Dataset:
        """A Dataset of (hard-resized image (3, H, W), global index) over `indexes` (default: every image)."""
        return _HardResizedImages(self, range(len(self.images_paths)) if indexes is None else indexes)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if index < self.database_num:
            return self.hard_resized(index), index
        image = open_rgb_image(self.images_paths[index])
        return query_test_transform(image, self.test_method, self.resize), index

    def __len__(self) -> int:
        return len(self.images_paths)

    def __repr__(self) -> str:
        counts = f"#database: {self.database_num}; #queries: {self.queries_num}"
        return f"< {self.__class__.__name__}, {self.dataset_name} - {counts} >"


class _HardResizedImages(Dataset):
    """(hard-resized image, global index) for some images of a BaseDataset."""

    def __init__(self, dataset: BaseDataset, indexes: Sequence[int]) -> None:
        self.dataset = dataset
        self.indexes = [int(i) for i in indexes]

    def __getitem__(self, position: int) -> tuple[Tensor, int]:
        index = self.indexes[position]
        return self.dataset.hard_resized(index), index

    def __len__(self) -> int:
        return len(self.indexes)


def collate_fn(batch: Sequence[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """Join B items of a TripletsDataset, each (images (2+N, 3, H, W), local (N, 3), global (2+N,)).

    Returns images (B*(2+N), 3, H, W); triplets_local_indexes (B*N, 3), rows (query, positive, negative) that
    index the returned images; triplets_global_indexes (B, 2+N).
    """
    images = torch.cat([item[0] for item in batch])
    local_indexes = [item[1] + i * item[0].shape[0] for i, item in enumerate(batch)]
    global_indexes = torch.stack([item[2] for item in batch])
    return images, torch.cat(local_indexes), global_indexes


class TripletsDataset(BaseDataset):
    """Training triplets (query, best positive, hardest negatives), mined as `mining` says (`MiningSettings`).

    Queries with no database image within `mining.train_positives_dist_threshold` metres are dropped (logged); every
    attribute about queries (paths, utms, soft and hard positives) covers the kept ones only.
    `hard_positives_per_query[q]` are the database indexes within that threshold, nearest first.

    Call `compute_triplets(model, inference)` before iterating: it samples `cache_refresh_rate` queries. Then
    `dataset[i]` is (images (2+N, 3, H, W) = query, positive, N negatives; triplets_local_indexes (N, 3) int64 rows
    (0, 1, 2+n); triplets_global_indexes (2+N,) int64 = query index, database indexes of positive and negatives),
    with N = negs_num_per_query. The query gets the `augmentation`, then PIL's (antialiased) resize;
    positives and negatives PIL's resize, as the original. `--horizontal_flip` is applied by the training loop to a
    whole batch, as the original.
    """

    def __init__(
        self,
        datasets_folder: str,
        dataset_name: str,
        split: str,
        resize: Sequence[int] = (384, 384),
        positive_dist_threshold: float = 25,
        mining: MiningSettings = MiningSettings(),
        augmentation: QueryAugmentation = QueryAugmentation(),
    ) -> None:
        super().__init__(datasets_folder, dataset_name, split, resize, positive_dist_threshold)
        self.mining = mining.mining
        self.neg_samples_num = mining.neg_samples_num
        self.negs_num_per_query = mining.negs_num_per_query
        self.cache_refresh_rate = mining.cache_refresh_rate
        self.rng = np.random.default_rng(mining.seed)
        self.query_augmentation = query_augmentation(augmentation, self.resize)

        threshold = mining.train_positives_dist_threshold
        self.hard_positives_per_query = self.positives_within(threshold)
        keep = np.array([len(p) > 0 for p in self.hard_positives_per_query], dtype=bool)
        if not keep.all():
            logger.info(
                f"{int((~keep).sum())} of {len(keep)} training queries have no database image within "
                f"{threshold} m and are left out"
            )
        if not keep.any():
            raise ValueError(
                f"no query of {self.dataset_folder} has a database image within "
                f"{threshold} m (--train_positives_dist_threshold): nothing to train on"
            )
        kept = np.flatnonzero(keep)
        self.queries_paths = [self.queries_paths[q] for q in kept]
        self.queries_utms = self.queries_utms[kept]
        self.soft_positives_per_query = [self.soft_positives_per_query[q] for q in kept]
        self.hard_positives_per_query = [self.hard_positives_per_query[q] for q in kept]
        self.images_paths = self.database_paths + self.queries_paths
        self.queries_num = len(self.queries_paths)

        if self.cache_refresh_rate > self.queries_num:
            raise ValueError(
                f"--cache_refresh_rate {self.cache_refresh_rate} is more than the {self.queries_num} training queries "
                "that have a positive"
            )
        self._check_negatives_exist()
        if self.mining == "full":  # the hardest negatives of each query so far, mined again next time
            self.neg_cache = [np.empty((0,), dtype=np.int64) for _ in range(self.queries_num)]
        if self.mining == "msls_weighted":
            self.query_weights = self._msls_query_weights()
        self.triplets_global_indexes = torch.empty((0, 2 + self.negs_num_per_query), dtype=torch.int64)

    def _check_negatives_exist(self) -> None:
        if self.mining != "random" and self.neg_samples_num > self.database_num:
            raise ValueError(
                f"--neg_samples_num {self.neg_samples_num} is more than the {self.database_num} database images "
                f"of {self.dataset_folder}"
            )
        negatives_num = np.array([self.database_num - len(p) for p in self.soft_positives_per_query])
        fewest = int(negatives_num.argmin())
        if negatives_num[fewest] < self.negs_num_per_query:
            raise ValueError(
                f"--negs_num_per_query {self.negs_num_per_query} negatives are asked, but query "
                f"{self.queries_paths[fewest]} has only {negatives_num[fewest]} database images farther than "
                f"{self.positive_dist_threshold} m"
            )

    def _msls_query_weights(self) -> np.ndarray:
        """Sampling probabilities (queries_num,) that favour night and sideways queries, as MSLS's supplementary."""
        try:
            notes = [parse_note(p).split("_") for p in self.queries_paths]
        except ValueError as error:
            raise ValueError(
                f"--mining msls_weighted needs MSLS-style notes (e.g. night_sideways_city): {error}"
            ) from None
        malformed = [p for p, n in zip(self.queries_paths, notes) if len(n) < 2]
        if malformed:
            raise ValueError(
                f"--mining msls_weighted needs notes like <day|night>_<view direction>_..., but {malformed[0]} "
                f"has note {parse_note(malformed[0])!r}"
            )
        is_night = np.array([n[0] == "night" for n in notes])
        is_sideways = np.array([n[1] == "sideways" for n in notes])
        if not is_night.any() or not is_sideways.any():
            raise ValueError(
                f"--mining msls_weighted needs night and sideways queries, but {self.dataset_folder} has "
                f"{int(is_night.sum())} night and {int(is_sideways.sum())} sideways queries"
            )
        weights = np.ones(self.queries_num)
        weights[is_night] += self.queries_num / is_night.sum()
        weights[is_sideways] += self.queries_num / is_sideways.sum()
        logger.info(
            f"msls_weighted: {int(is_sideways.sum())}/{self.queries_num} sideways and "
            f"{int(is_night.sum())}/{self.queries_num} night queries"
        )
        return weights / weights.sum()

    def compute_triplets(self, model: nn.Module, inference: InferenceSettings) -> None:
        """Sample `cache_refresh_rate` queries and mine one triplet each into `triplets_global_indexes`.

        Descriptors come from `model` (`util.extract_features`, as `inference` says), for the sampled queries and the
        database images the mining looks at: partial and msls_weighted sample `neg_samples_num` database images
        once and take each query's hardest negatives among them; full computes the whole database and takes the
        hardest among `neg_samples_num` fresh samples plus the query's previous hardest; random takes random
        negatives. The best positive is always the hard positive nearest in descriptor space; negatives are never
        soft positives. Result: `triplets_global_indexes` (cache_refresh_rate, 2 + negs_num_per_query) int64.
        """
        queries_num, database_num = self.queries_num, self.database_num
        weights = self.query_weights if self.mining == "msls_weighted" else None
        sampled_queries = self.rng.choice(queries_num, self.cache_refresh_rate, replace=False, p=weights)
        positives = np.concatenate([self.hard_positives_per_query[q] for q in sampled_queries])
        sampled_database = None
        if self.mining == "full":
            database_indexes = np.arange(database_num)
        elif self.mining == "random":
            database_indexes = np.unique(positives)
        else:
            sampled_database = self.rng.choice(database_num, self.neg_samples_num, replace=False)
            database_indexes = np.union1d(sampled_database, positives)
        global_indexes = np.concatenate([database_indexes, sampled_queries + database_num])
        descriptors = _global_descriptors(inference, model, self.hard_resized_images(global_indexes))
        row_of = np.full(len(self.images_paths), -1, dtype=np.int64)
        row_of[global_indexes] = np.arange(len(global_indexes))

        triplets = []
        for query_index in sampled_queries:
            query_descriptor = descriptors[row_of[database_num + query_index]]
            hard_positives = self.hard_positives_per_query[query_index]
            positive_distances = _squared_distances(query_descriptor, descriptors[row_of[hard_positives]])
            best_positive = hard_positives[positive_distances.argmin()]
            soft_positives = self.soft_positives_per_query[query_index]
            if self.mining == "random":
                # drawing as many extra images as there are soft positives leaves enough after removing them,
                # without listing the whole database for every query
                drawn = self.rng.choice(database_num, self.negs_num_per_query + len(soft_positives), replace=False)
                negatives = drawn[~np.isin(drawn, soft_positives)][: self.negs_num_per_query]
            else:
                if self.mining == "full":
                    samples = self.rng.choice(database_num, self.neg_samples_num, replace=False)
                    candidates = np.union1d(self.neg_cache[query_index], np.setdiff1d(samples, soft_positives))
                else:
                    candidates = np.setdiff1d(sampled_database, soft_positives)
                if len(candidates) < self.negs_num_per_query:
                    raise ValueError(
                        f"query {self.queries_paths[query_index]} has {len(candidates)} negatives among the "
                        f"{self.neg_samples_num} sampled database images, fewer than --negs_num_per_query "
                        f"{self.negs_num_per_query}: raise --neg_samples_num"
                    )
                negative_distances = _squared_distances(query_descriptor, descriptors[row_of[candidates]])
                negatives = candidates[np.argsort(negative_distances, kind="stable")[: self.negs_num_per_query]]
                if self.mining == "full":
                    self.neg_cache[query_index] = negatives
            triplets.append([query_index, best_positive, *negatives])
        self.triplets_global_indexes = torch.tensor(np.array(triplets, dtype=np.int64))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        if len(self.triplets_global_indexes) == 0:
            raise RuntimeError("no triplets yet: call compute_triplets(model, inference) first")
        global_indexes = self.triplets_global_indexes[index]
        query_index, positive_index = int(global_indexes[0]), int(global_indexes[1])
        query = self.query_augmentation(open_rgb_image(self.queries_paths[query_index]))
        others = [self.training_resized(int(i)) for i in (positive_index, *global_indexes[2:])]
        images = torch.stack([query, *others])
        negatives = torch.arange(2, len(global_indexes))
        local_indexes = torch.stack([torch.zeros_like(negatives), torch.ones_like(negatives), negatives], dim=1)
        return images, local_indexes, global_indexes

    def training_resized(self, database_index: int) -> Tensor:
        """Database image (3, H, W) for a training triplet: PIL's antialiased bilinear resize, as the original's
        `T.Resize` on PIL images (the descriptors for mining use `hard_resized`, without antialiasing)."""
        image = open_rgb_image(self.database_paths[database_index])
        return _normalize(TF.to_tensor(TF.resize(image, list(self.resize), antialias=True)))

    def __len__(self) -> int:
        return len(self.triplets_global_indexes)


class _RandomPerspective(T.RandomPerspective):
    """`T.RandomPerspective` (PIL images) that works on images of any size and at any distortion.

    torchvision's solver fails when three of the four corners are collinear: always for an image one pixel wide or
    high (left as it is: no other map exists), and for some draws on thin images or at a large distortion (redrawn:
    such corners define no perspective transform).
    """

    def forward(self, image: Image.Image) -> Image.Image:
        if torch.rand(1) >= self.p:
            return image
        width, height = TF.get_image_size(image)
        if min(width, height) < 2:
            return image
        for _ in range(1000):
            start, end = self.get_params(width, height, self.distortion_scale)
            if _no_three_collinear(end):
                return TF.perspective(image, start, end, self.interpolation, self.fill)
        raise RuntimeError(
            f"--rand_perspective {self.distortion_scale}: no valid distortion of a {width}x{height} image"
        )


def _no_three_collinear(points: list[list[int]]) -> bool:
    for a, b, c in ((0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)):
        (xa, ya), (xb, yb), (xc, yc) = points[a], points[b], points[c]
        if (xb - xa) * (yc - ya) - (yb - ya) * (xc - xa) == 0:
            return False
    return True


def query_augmentation(augmentation: QueryAugmentation, resize: Sequence[int]) -> T.Compose:
    """PIL image -> (3, H, W) tensor, (H, W) = `resize`: the training-query augmentations, then resize and
    normalise."""
    steps: list[nn.Module] = []
    for name in ("brightness", "contrast", "saturation", "hue"):
        value = getattr(augmentation, name)
        if value is not None:
            steps.append(T.ColorJitter(**{name: value}))
    if augmentation.rand_perspective is not None:
        steps.append(_RandomPerspective(distortion_scale=augmentation.rand_perspective))
    crop_scale = augmentation.random_resized_crop
    if crop_scale is not None:
        if not 0 <= crop_scale < 1:
            raise ValueError(f"--random_resized_crop {crop_scale}: must be in [0, 1) (crops of scale 1 - value to 1)")
        steps.append(T.RandomResizedCrop(size=list(resize), scale=(1 - crop_scale, 1.0)))
    if augmentation.random_rotation is not None:
        steps.append(T.RandomRotation(degrees=augmentation.random_rotation))
    steps += [T.Resize(list(resize)), T.ToTensor(), _normalize]
    return T.Compose(steps)


class QueryPositivePairs(Dataset):
    """Query-positive pairs of a training split, to train the DHE head (`train_dhe.py`).

    `qp_mode` "gt" (as the original on msls): every query with each database image within the dataset's
    `positive_dist_threshold` metres (the evaluation positives).
    "predicted" (as the original on pitts30k): the model's top-100 predictions (faiss IndexFlatL2 on the global
    descriptors of hard-resized images, computed as `inference` says) that are within that threshold and whose
    faiss distance, the squared L2 distance between descriptors, is below `qp_threshold`.

    Attributes: `pairs` (P, 2) int64 rows (query index, database index); `distances` (P,) float32 (the squared
    descriptor distances; NaN in gt mode). `dataset[i]` is (query (3, H, W), positive (3, H, W)), each an independent
    RandomResizedCrop(dataset.resize, scale=(0.7, 1)) of the image without antialiasing (as the original), normalised;
    the crops draw from torch's global RNG. `pairs` (P, 2), when given, are used as they are (nothing computed).
    """

    def __init__(
        self,
        dataset: BaseDataset,
        qp_mode: str = "predicted",
        qp_threshold: float = 0.14,
        model: nn.Module | None = None,
        inference: InferenceSettings | None = None,
        pairs: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.qp_mode = qp_mode
        # on tensors and without antialiasing, as the original's crops (torchvision 0.9 resized tensors so)
        self.crop = T.RandomResizedCrop(size=list(dataset.resize), scale=QP_CROP_SCALE, antialias=False)
        if pairs is not None:  # pairs made earlier (by another process, or before a resumed run)
            self.pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
            if (
                len(self.pairs) == 0
                or self.pairs[:, 0].max() >= dataset.queries_num
                or (self.pairs[:, 1].max() >= dataset.database_num)
            ):
                raise ValueError(f"the {len(self.pairs)} given query-positive pairs do not fit {dataset}")
            self.distances = np.full(len(self.pairs), np.nan, dtype=np.float32)
            return
        if self.qp_mode == "gt":
            # as the original's msls mode: the evaluation positives (soft, 25 m by default)
            positives = dataset.get_positives()
            pairs = [(q, p) for q, query_positives in enumerate(positives) for p in query_positives]
            distances = np.full(len(pairs), np.nan, dtype=np.float32)
            where = f"within {dataset.positive_dist_threshold} m (--val_positive_dist_threshold)"
        elif self.qp_mode == "predicted":
            if model is None or inference is None:
                raise ValueError("qp_mode 'predicted' needs a model and inference settings to compute descriptors")
            pairs, distances = self._predicted_pairs(dataset, qp_threshold, model, inference)
            where = (
                f"within {dataset.positive_dist_threshold} m among the top {QP_NUM_PREDICTIONS} predictions and "
                f"closer than --qp_threshold {qp_threshold} in descriptor space"
            )
        else:
            raise ValueError(f"unknown qp_mode {self.qp_mode!r}; expected 'gt' or 'predicted'")
        if not pairs:
            raise ValueError(f"no query-positive pair in {dataset.dataset_folder}: no database image {where}")
        self.pairs = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        self.distances = np.asarray(distances, dtype=np.float32)
        logger.info(f"{len(self.pairs)} query-positive pairs ({self.qp_mode}) in {dataset}")

    @staticmethod
    def _predicted_pairs(
        dataset: BaseDataset, qp_threshold: float, model: nn.Module, inference: InferenceSettings
    ) -> tuple[list[tuple[int, int]], list[float]]:
        descriptors = _global_descriptors(inference, model, dataset.hard_resized_images())
        squared_distances, predictions = search(
            descriptors[: dataset.database_num],
            descriptors[dataset.database_num :],
            min(QP_NUM_PREDICTIONS, dataset.database_num),
        )
        pairs, distances = [], []
        for query_index, soft_positives in enumerate(dataset.get_positives()):
            is_positive = np.isin(predictions[query_index], soft_positives)
            is_close = squared_distances[query_index] < qp_threshold
            for rank in np.flatnonzero(is_positive & is_close):
                pairs.append((query_index, int(predictions[query_index, rank])))
                distances.append(float(squared_distances[query_index, rank]))
        return pairs, distances

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        query_index, database_index = self.pairs[index]
        query = self.crop(TF.to_tensor(open_rgb_image(self.dataset.queries_paths[query_index])))
        positive = self.crop(TF.to_tensor(open_rgb_image(self.dataset.database_paths[database_index])))
        return _normalize(query), _normalize(positive)

    def __len__(self) -> int:
        return len(self.pairs)
