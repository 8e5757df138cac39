"""Tests of datasets_ws on tiny hand-made datasets (12x16 solid-colour images with chosen UTM names), on copies of
the tiny synthetic world made odd (links, FIFOs, EXIF orientation), and the query augmentations on odd images."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import eval_argv
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

import datasets_ws
import parser
from datasets_ws import BaseDataset

RED, REDDISH, DARK_RED = (200, 30, 30), (185, 38, 38), (190, 34, 34)
GREEN, BLUE, BLUISH, GREY = (30, 200, 30), (30, 30, 200), (40, 40, 185), (128, 128, 128)

# name: (east, north, colour). Distances from query qa (1000, 1000): d0 1 m, d1 10 m, d2 25 m, d3 26 m;
# from qb (1100, 1000): d4 3 m, d5 12 m; from qsoft (1300, 1000): d6 15 m; qfar has nothing within 25 m and its
# file name sorts first, so that dropping it shifts the indexes of the other queries.
DATABASE = {
    "d0": (1000, 1001, GREEN),
    "d1": (1006, 1008, RED),
    "d2": (1015, 1020, RED),
    "d3": (1000, 1026, REDDISH),
    "d4": (1100, 1003, BLUE),
    "d5": (1112, 1000, BLUE),
    "d6": (1315, 1000, GREY),
    "far0": (2000, 3000, GREY),
    "far1": (2100, 3000, GREEN),
    "far2": (2200, 3000, DARK_RED),
    "far3": (2300, 3000, BLUISH),
    "far4": (2400, 3000, (200, 200, 30)),
    "far5": (2500, 3000, (30, 200, 200)),
}
QUERIES = {"qa": (1000, 1000, RED), "qb": (1100, 1000, BLUE), "qfar": (10000, 5000, GREY), "qsoft": (1300, 1000, GREEN)}


def utm_name(east: float, north: float, note: str | None = None, extension: str = ".jpg") -> str:
    if note is None:
        return f"@{east}@{north}@{extension}"
    return f"@{east}@{north}@17@T@40.44@-79.99@pano@00@000@000@@@20200101@{note}@{extension}"


def save_image(path: Path, colour=GREY, mode: str = "RGB", size: tuple[int, int] = (16, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def build_split(root: Path, database: dict, queries: dict, database_folder: str = "database") -> Path:
    for folder, images in ((database_folder, database), ("queries", queries)):
        for east, north, colour in images.values():
            save_image(root / folder / utm_name(east, north), colour)
    return root


def make_args(tmp_path: Path, *extra: str, script: str = "finetune"):
    argv = ["--datasets_folder", str(tmp_path), "--dataset_name", "toy", "--resize", "32", "32"]
    argv += ["--num_workers", "0", "--device", "cpu", "--infer_batch_size", "4"]
    if script == "finetune":
        argv += ["--cache_refresh_rate", "2", "--queries_per_epoch", "2", "--negs_num_per_query", "2"]
        argv += ["--neg_samples_num", str(len(DATABASE))]
    return parser.parse_arguments(script, [*argv, *extra])


def base_dataset(args, folder: Path, name: str, split: str) -> datasets_ws.BaseDataset:
    return datasets_ws.BaseDataset(str(folder), name, split, **parser.dataset_options(args))


def triplets_dataset(args, folder: Path) -> datasets_ws.TripletsDataset:
    return datasets_ws.TripletsDataset(
        str(folder),
        "toy",
        "train",
        **parser.dataset_options(args),
        mining=parser.mining_settings(args),
        augmentation=parser.query_augmentation(args),
    )


def inference(args) -> datasets_ws.InferenceSettings:
    return parser.inference_settings(args, torch.device("cpu"))


def database_index(dataset: datasets_ws.BaseDataset, name: str) -> int:
    east, north, _ = DATABASE[name]
    return int(np.flatnonzero((dataset.database_utms == (east, north)).all(axis=1))[0])


def query_index(dataset: datasets_ws.BaseDataset, name: str) -> int:
    east, north, _ = QUERIES[name]
    return int(np.flatnonzero((dataset.queries_utms == (east, north)).all(axis=1))[0])


class MeanColourModel(nn.Module):
    """Global descriptor = mean colour (B, 3); local features = a (B, 3, h, w) subsampling of the image."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images.mean(dim=(2, 3)), images[:, :, ::8, ::8]


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    build_split(tmp_path / "toy" / "images" / "train", DATABASE, QUERIES)
    return tmp_path


# ------------------------------------------------------------------------------------------------- layout and names
def test_parse_utm_reads_the_file_name_only():
    assert datasets_ws.parse_utm("/data/a@1@2@/@583.5@4477.25@17@T@.jpg") == (583.5, 4477.25)
    assert datasets_ws.parse_utm(utm_name(-3, 7, note="night_sideways_x")) == (-3.0, 7.0)
    assert datasets_ws.parse_note(utm_name(1, 2, note="night_sideways_x")) == "night_sideways_x"
    for bad in ("photo.jpg", "@abc@10@.jpg", "@10@.jpg", "x@1@2@.jpg", "@nan@2@.jpg"):
        with pytest.raises(ValueError, match="@utm_east@utm_north"):
            datasets_ws.parse_utm(f"/data/{bad}")
    with pytest.raises(ValueError, match="note"):
        datasets_ws.parse_note(utm_name(1, 2))


def test_layout_counts_and_nested_folders(tmp_path: Path):
    split = tmp_path / "toy" / "images" / "val"
    save_image(split / "database" / "sub@9@9@" / utm_name(10, 20))
    save_image(split / "database" / "a" / "b" / utm_name(30, 40, extension=".png"))
    save_image(split / "database" / utm_name(50, 60, extension=".jpeg"))
    (split / "database" / "notes.txt").write_text("not an image")
    save_image(split / "queries" / utm_name(11, 21))
    dataset = base_dataset(make_args(tmp_path), tmp_path, "toy", "val")

    assert (dataset.database_num, dataset.queries_num, len(dataset)) == (3, 1, 4)
    assert dataset.database_paths == sorted(dataset.database_paths)
    assert dataset.images_paths == dataset.database_paths + dataset.queries_paths
    assert sorted(map(tuple, dataset.database_utms.tolist())) == [(10, 20), (30, 40), (50, 60)]
    assert dataset.queries_utms.shape == (1, 2) and dataset.queries_utms.dtype == np.float64
    assert "#database: 3; #queries: 1" in repr(dataset)
    assert dataset.test_method == "hard_resize"
    image, index = dataset[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and index == 3


def test_gallery_is_an_alias_of_database(tmp_path: Path):
    build_split(tmp_path / "toy" / "images" / "test", DATABASE, QUERIES, database_folder="gallery")
    dataset = base_dataset(make_args(tmp_path), tmp_path, "toy", "test")
    assert dataset.database_num == len(DATABASE)
    assert all("/gallery/" in p for p in dataset.database_paths)


# -------------------------------------------------------------------------------------------------------- positives
def test_soft_positives_against_hand_computed_distances(toy: Path):
    dataset = base_dataset(make_args(toy), toy, "toy", "train")
    positives = dataset.get_positives()
    assert positives[query_index(dataset, "qa")].tolist() == [database_index(dataset, n) for n in ("d0", "d1", "d2")]
    assert positives[query_index(dataset, "qb")].tolist() == [database_index(dataset, n) for n in ("d4", "d5")]
    assert positives[query_index(dataset, "qsoft")].tolist() == [database_index(dataset, "d6")]
    assert positives[query_index(dataset, "qfar")].tolist() == []


def test_training_queries_without_hard_positive_are_dropped(toy: Path, caplog):
    with caplog.at_level(logging.INFO, logger="datasets_ws"):
        dataset = triplets_dataset(make_args(toy), toy)
    assert "2 of 4 training queries" in caplog.text
    assert dataset.queries_num == 2 and len(dataset.queries_paths) == 2 and dataset.queries_utms.shape == (2, 2)
    assert dataset.images_paths == dataset.database_paths + dataset.queries_paths
    qa, qb = query_index(dataset, "qa"), query_index(dataset, "qb")
    assert dataset.hard_positives_per_query[qa].tolist() == [database_index(dataset, n) for n in ("d0", "d1")]
    assert dataset.hard_positives_per_query[qb].tolist() == [database_index(dataset, "d4")]
    # soft positives stay aligned with the kept queries
    assert dataset.soft_positives_per_query[qb].tolist() == [database_index(dataset, n) for n in ("d4", "d5")]


# ----------------------------------------------------------------------------------------------------------- mining
def assert_valid_triplets(dataset: datasets_ws.TripletsDataset, negatives_num: int = 2) -> None:
    triplets = dataset.triplets_global_indexes
    assert triplets.dtype == torch.int64 and triplets.shape == (2, 2 + negatives_num)
    for query, positive, *negatives in triplets.tolist():
        query_utm = dataset.queries_utms[query]
        assert np.linalg.norm(dataset.database_utms[positive] - query_utm) <= 10
        assert all(np.linalg.norm(dataset.database_utms[n] - query_utm) > 25 for n in negatives)
        assert len(set(negatives)) == len(negatives)


@pytest.mark.parametrize("mining", ["partial", "full", "random"])
def test_mining_yields_valid_triplets(toy: Path, mining: str):
    args = make_args(toy, "--mining", mining)
    dataset = triplets_dataset(args, toy)
    for _ in range(2):  # full mining reuses its negative cache the second time
        dataset.compute_triplets(MeanColourModel(), inference(args))
        assert_valid_triplets(dataset)
    by_query = {row[0]: row for row in dataset.triplets_global_indexes.tolist()}
    qa, qb = query_index(dataset, "qa"), query_index(dataset, "qb")
    # best positive: the hard positive nearest in descriptor space (d1 is red like qa; d0, nearer in metres, is green)
    assert by_query[qa][1] == database_index(dataset, "d1")
    assert by_query[qb][1] == database_index(dataset, "d4")
    if mining != "random":  # every database image was sampled, so the hardest negatives are known
        assert by_query[qa][2:] == [database_index(dataset, "far2"), database_index(dataset, "d3")]
        assert by_query[qb][2] == database_index(dataset, "far3")
    if mining == "full":
        assert dataset.neg_cache[qa].tolist() == by_query[qa][2:]


def test_triplet_items_and_collate(toy: Path):
    args = make_args(toy, "--horizontal_flip", "--brightness", "0.3", "--random_resized_crop", "0.6")
    args.random_rotation, args.rand_perspective, args.hue = 5.0, 0.2, 0.1
    dataset = triplets_dataset(args, toy)
    with pytest.raises(RuntimeError, match="compute_triplets"):
        dataset[0]
    dataset.compute_triplets(MeanColourModel(), inference(args))
    images, local_indexes, global_indexes = dataset[0]
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert local_indexes.tolist() == [[0, 1, 2], [0, 1, 3]]
    assert torch.equal(global_indexes, dataset.triplets_global_indexes[0])
    torch.manual_seed(3)
    first = dataset[1][0]
    torch.manual_seed(3)
    assert torch.equal(first, dataset[1][0])

    loader = DataLoader(dataset, batch_size=2, collate_fn=datasets_ws.collate_fn)
    images, local_indexes, global_indexes = next(iter(loader))
    assert images.shape == (8, 3, 32, 32)
    assert local_indexes.tolist() == [[0, 1, 2], [0, 1, 3], [4, 5, 6], [4, 5, 7]]
    assert torch.equal(global_indexes, dataset.triplets_global_indexes)


def test_mining_is_deterministic_given_the_seed(toy: Path):
    args = make_args(toy, "--mining", "random", "--seed", "7")
    results = []
    for _ in range(2):
        dataset = triplets_dataset(args, toy)
        dataset.compute_triplets(MeanColourModel(), inference(args))
        results.append(dataset.triplets_global_indexes)
    assert torch.equal(*results)


def build_msls_split(root: Path, with_notes: bool = True) -> None:
    notes = ["night_forward_x", "day_sideways_x", "day_forward_x", "day_forward_x"]
    for i in range(6):
        save_image(root / "database" / utm_name(0, 100 * i), GREY)
    for i, note in enumerate(notes):
        save_image(root / "queries" / utm_name(1, 100 * i, note=note if with_notes else None), RED)


def test_msls_weighted_mining(tmp_path: Path):
    build_msls_split(tmp_path / "toy" / "images" / "train")
    args = make_args(tmp_path, "--mining", "msls_weighted", "--neg_samples_num", "6")
    dataset = triplets_dataset(args, tmp_path)
    weights = {
        datasets_ws.parse_note(p) + str(i): w
        for i, (p, w) in enumerate(zip(dataset.queries_paths, dataset.query_weights))
    }
    expected = {
        "night_forward_x0": 5 / 12,
        "day_sideways_x1": 5 / 12,
        "day_forward_x2": 1 / 12,
        "day_forward_x3": 1 / 12,
    }
    assert weights == pytest.approx(expected)
    dataset.compute_triplets(MeanColourModel(), inference(args))
    assert_valid_triplets(dataset)


def test_msls_weighted_needs_the_note_field(toy: Path):
    with pytest.raises(ValueError, match="msls_weighted.*note"):
        triplets_dataset(make_args(toy, "--mining", "msls_weighted"), toy)


def test_asking_for_more_negatives_than_exist(toy: Path):
    with pytest.raises(ValueError, match="negs_num_per_query 20"):
        triplets_dataset(make_args(toy, "--negs_num_per_query", "20"), toy)
    with pytest.raises(ValueError, match=f"neg_samples_num 50 is more than the {len(DATABASE)}"):
        triplets_dataset(make_args(toy, "--neg_samples_num", "50"), toy)
    args = make_args(toy, "--neg_samples_num", "1")
    dataset = triplets_dataset(args, toy)
    with pytest.raises(ValueError, match="fewer than --negs_num_per_query 2"):
        dataset.compute_triplets(MeanColourModel(), inference(args))
    args = make_args(toy, "--cache_refresh_rate", "3", "--queries_per_epoch", "3")
    with pytest.raises(ValueError, match="cache_refresh_rate 3 is more than the 2"):
        triplets_dataset(args, toy).compute_triplets(MeanColourModel(), inference(args))


# ----------------------------------------------------------------------------------------------------------- pairs
def test_query_positive_pairs_ground_truth(toy: Path):
    args = make_args(toy, "--qp_mode", "gt", script="train_dhe")
    dataset = base_dataset(args, toy, "toy", "train")
    pairs = datasets_ws.QueryPositivePairs(dataset, args.qp_mode, args.qp_threshold)
    qa, qb = query_index(dataset, "qa"), query_index(dataset, "qb")
    qsoft = query_index(dataset, "qsoft")
    # every database image within 25 m (inclusive): qa d0 1 m, d1 10 m, d2 25 m (not d3, 26 m); qb d4, d5; qsoft d6
    expected = {(qa, database_index(dataset, n)) for n in ("d0", "d1", "d2")}
    expected |= {(qb, database_index(dataset, n)) for n in ("d4", "d5")} | {(qsoft, database_index(dataset, "d6"))}
    assert set(map(tuple, pairs.pairs.tolist())) == expected and len(pairs) == 6
    torch.manual_seed(0)
    query, positive = pairs[0]
    assert query.shape == positive.shape == (3, 32, 32)
    torch.manual_seed(0)
    assert torch.equal(pairs[0][0], query)


def test_query_positive_pairs_predicted(toy: Path):
    args = make_args(toy, script="train_dhe")
    assert args.qp_mode == "predicted"
    dataset = base_dataset(args, toy, "toy", "train")
    pairs = datasets_ws.QueryPositivePairs(dataset, args.qp_mode, args.qp_threshold, MeanColourModel(), inference(args))
    qa, qb = query_index(dataset, "qa"), query_index(dataset, "qb")
    # within 25 m and of the same colour: d0 (green) is too far in descriptor space, d3 too far in metres
    expected = {(qa, database_index(dataset, n)) for n in ("d1", "d2")}
    expected |= {(qb, database_index(dataset, n)) for n in ("d4", "d5")}
    assert set(map(tuple, pairs.pairs.tolist())) == expected
    assert (pairs.distances < args.qp_threshold).all()
    with pytest.raises(ValueError, match="needs a model"):
        datasets_ws.QueryPositivePairs(dataset, args.qp_mode, args.qp_threshold)


def test_query_positive_pairs_none_found(toy: Path):
    class FarApartModel(nn.Module):
        def forward(self, images: torch.Tensor):
            return torch.arange(len(images) * 4, dtype=torch.float32).reshape(-1, 4) * 100 + 1e4 * torch.rand(
                ()
            ), images

    args = make_args(toy, script="train_dhe")
    dataset = base_dataset(args, toy, "toy", "train")
    with pytest.raises(ValueError, match="no query-positive pair"):
        datasets_ws.QueryPositivePairs(dataset, args.qp_mode, args.qp_threshold, FarApartModel(), inference(args))


# ----------------------------------------------------------------------------------------------------------- errors
def test_missing_folders(tmp_path: Path):
    args = make_args(tmp_path)
    with pytest.raises(FileNotFoundError, match="dataset folder .*nope does not exist.*expected layout"):
        base_dataset(args, tmp_path, "nope", "train")
    save_image(tmp_path / "toy" / "images" / "train" / "queries" / utm_name(0, 0))
    with pytest.raises(FileNotFoundError, match=r"split folder .*test does not exist \(splits found: \['train'\]\)"):
        base_dataset(args, tmp_path, "toy", "test")
    with pytest.raises(FileNotFoundError, match="database folder .*train/database"):
        base_dataset(args, tmp_path, "toy", "train")
    save_image(tmp_path / "toy" / "images" / "val" / "database" / utm_name(0, 0))
    with pytest.raises(FileNotFoundError, match="queries folder .*val/queries does not exist"):
        base_dataset(args, tmp_path, "toy", "val")


def test_database_and_gallery_together(tmp_path: Path):
    split = tmp_path / "toy" / "images" / "train"
    for folder in ("database", "gallery", "queries"):
        save_image(split / folder / utm_name(0, 0))
    dataset = base_dataset(make_args(tmp_path), tmp_path, "toy", "train")
    assert all("/database/" in p for p in dataset.database_paths)
    save_image(split / "gallery" / utm_name(5, 0))
    with pytest.raises(ValueError, match="both database/ and gallery/ with different images"):
        base_dataset(make_args(tmp_path), tmp_path, "toy", "train")


def test_database_linked_as_gallery(tmp_path: Path):
    split = tmp_path / "toy" / "images" / "train"
    for folder in ("database", "queries"):
        save_image(split / folder / utm_name(0, 0))
    (split / "gallery").symlink_to(split / "database")
    assert base_dataset(make_args(tmp_path), tmp_path, "toy", "train").database_num == 1


def test_empty_folder(tmp_path: Path):
    split = tmp_path / "toy" / "images" / "train"
    save_image(split / "queries" / utm_name(0, 0))
    (split / "database").mkdir()
    (split / "database" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="no .jpg/.jpeg/.png images found in .*database"):
        base_dataset(make_args(tmp_path), tmp_path, "toy", "train")


def test_bad_name(tmp_path: Path):
    split = tmp_path / "toy" / "images" / "train"
    save_image(split / "queries" / utm_name(0, 0))
    save_image(split / "database" / "IMG_0001.jpg")
    with pytest.raises(ValueError, match="IMG_0001.jpg.*@utm_east@utm_north"):
        base_dataset(make_args(tmp_path), tmp_path, "toy", "train")


def test_corrupt_image(tmp_path: Path):
    split = tmp_path / "toy" / "images" / "train"
    save_image(split / "queries" / utm_name(0, 0))
    corrupt = split / "database" / utm_name(1, 1)
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"this is not a jpeg at all")
    dataset = base_dataset(make_args(tmp_path), tmp_path, "toy", "train")
    with pytest.raises(OSError, match=f"cannot read image {corrupt}"):
        dataset[0]


# ----------------------------------------------------------------------------------------------------------- images
def test_image_modes_become_rgb(tmp_path: Path):
    database = tmp_path / "toy" / "images" / "train" / "database"
    save_image(database / utm_name(0, 0), 90, mode="L")
    save_image(database / utm_name(0, 1, extension=".png"), (10, 200, 30, 0), mode="RGBA")
    palette = Image.new("P", (16, 12), 1)
    palette.putpalette([0, 0, 0, 250, 20, 20] + [0, 0, 0] * 254)
    palette.info["transparency"] = 0
    palette.save(database / utm_name(0, 2, extension=".png"))
    sixteen_bit = database / utm_name(0, 3, extension=".png")
    Image.fromarray(np.full((12, 16), 128 * 257, dtype=np.uint16)).save(sixteen_bit)
    save_image(tmp_path / "toy" / "images" / "train" / "queries" / utm_name(0, 0), 90, mode="L")
    dataset = base_dataset(make_args(tmp_path, "--resize", "48", "64"), tmp_path, "toy", "train")
    for index in range(len(dataset)):
        image, _ = dataset[index]
        assert image.shape == (3, 48, 64) and image.dtype == torch.float32
    assert Image.open(sixteen_bit).mode == "I;16"
    assert np.asarray(datasets_ws.open_rgb_image(str(sixteen_bit))).tolist() == [[[128] * 3] * 16] * 12
    palette_rgb = np.asarray(datasets_ws.open_rgb_image(str(database / utm_name(0, 2, extension=".png"))))
    assert palette_rgb[0, 0].tolist() == [250, 20, 20]
    thirty_two_bit = Image.fromarray(np.array([[0, 65535, 257 * 10]], dtype=np.int32), mode="I")
    assert np.asarray(datasets_ws.to_rgb(thirty_two_bit))[0, :, 0].tolist() == [0, 255, 10]


def test_query_test_methods(toy: Path):
    dataset = base_dataset(make_args(toy, "--resize", "32", "48"), toy, "toy", "train")
    query = dataset.database_num  # images are 12 x 16 (H x W)
    # single_query: 32 x 42 with the ratio kept, the longer side trimmed to a multiple of 16
    expected = {"hard_resize": (3, 32, 48), "central_crop": (3, 32, 48), "single_query": (3, 32, 32)}
    expected |= {method: (5, 3, 32, 32) for method in ("five_crops", "nearest_crop", "maj_voting")}
    for method, shape in expected.items():
        dataset.test_method = method
        assert dataset[query][0].shape == shape, method
        assert dataset[0][0].shape == (3, 32, 48), "database images are always hard-resized"
        assert dataset.hard_resized(query).shape == (3, 32, 48)
    images = dataset.hard_resized_images([0, query])
    assert len(images) == 2 and images[1][1] == query and images[1][0].shape == (3, 32, 48)


def test_hard_resize_is_the_originals_bilinear_resize_without_antialiasing(tmp_path: Path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    split = tmp_path / "toy" / "images" / "test"
    for folder in ("database", "queries"):
        (split / folder).mkdir(parents=True)
        Image.fromarray(pixels).save(split / folder / utm_name(0, 0, extension=".png"))
    args = make_args(tmp_path, "--resize", "32", "48")
    dataset = base_dataset(args, tmp_path, "toy", "test")
    image = torch.from_numpy(pixels).permute(2, 0, 1).float().unsqueeze(0) / 255
    expected = torch.nn.functional.interpolate(image, size=(32, 48), mode="bilinear", align_corners=False)[0]
    mean = torch.tensor(datasets_ws.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(datasets_ws.IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(dataset.hard_resized(0), (expected - mean) / std)
    torch.testing.assert_close(dataset[1][0], (expected - mean) / std)  # the query, test_method hard_resize


# --------------------------------------------------------------------- odd datasets: copies of the tiny synthetic world
@pytest.fixture
def world_copy(tiny_world, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(tiny_world, tmp_path / "worlds" / "tiny"))


def open_split(world: Path, split: str = "test") -> BaseDataset:
    """A split of `world` as eval.py opens it."""
    args = parser.parse_arguments("eval", eval_argv(world))
    return BaseDataset(str(world.parent), world.name, split, **parser.dataset_options(args))


def test_symlink_loops_and_links_back_do_not_duplicate_images(world_copy, caplog):
    count = len(open_split(world_copy).database_paths)
    database = world_copy / "images" / "test" / "database"
    (database / "loop").symlink_to(".")  # a loop: database/loop/loop/...
    (database / "again").symlink_to(database)  # a link back to the same folder
    first = sorted(database.glob("*.jpg"))[0]
    (database / "link.jpg").symlink_to(first)  # a second name for one image
    dataset = open_split(world_copy)
    assert dataset.database_num == count
    assert str(first) in dataset.database_paths  # the plain path is the one kept
    assert "a symlink loop" in caplog.text and "reached twice (through links) and used once" in caplog.text


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
def test_a_fifo_named_like_an_image_is_skipped_and_never_opened(world_copy, caplog):
    from datasets_ws import open_rgb_image

    queries = world_copy / "images" / "test" / "queries"
    fifo = queries / "@500000.00@4000000.00@33@T@@@fifo@@@@@@@@.jpg"
    os.mkfifo(fifo)
    dataset = open_split(world_copy)
    assert str(fifo) not in dataset.queries_paths
    assert f"{fifo} (a FIFO)" in caplog.text
    with pytest.raises(OSError, match="not a regular file"):
        open_rgb_image(str(fifo))  # returns at once instead of blocking on open()


def test_exif_orientation_turns_photos_upright(world_copy):
    from PIL import Image

    queries = world_copy / "images" / "test" / "queries"
    upright_jpg = sorted(queries.glob("*.jpg"))[0]
    with Image.open(upright_jpg) as image:
        upright = image.convert("RGB").crop((0, 0, image.width, image.height * 3 // 4))  # not square
    upright_jpg.unlink()
    upright.save(upright_jpg.with_suffix(".png"))
    # a camera held sideways stores the pixels turned, with orientation 6: "rotate 90 degrees clockwise to show"
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = queries / upright_jpg.name.replace("@.jpg", "sideways@.png")
    upright.transpose(Image.Transpose.ROTATE_90).save(sideways, exif=exif)
    dataset = open_split(world_copy)
    index = dataset.database_num + dataset.queries_paths.index(str(sideways))
    reference = dataset.database_num + dataset.queries_paths.index(str(upright_jpg.with_suffix(".png")))
    assert torch.equal(dataset.hard_resized(index), dataset.hard_resized(reference))


def test_a_query_that_is_a_database_image_through_a_link_is_refused(world_copy):
    split = world_copy / "images" / "test"
    image = sorted((split / "database").glob("*.jpg"))[0]
    (split / "queries" / image.name).symlink_to(image)
    with pytest.raises(ValueError, match=f"query {split / 'queries' / image.name} is the same file as database"):
        open_split(world_copy)


def test_a_training_split_linked_into_the_test_split_is_refused(world_copy):
    test_database = world_copy / "images" / "test" / "database"
    (test_database / "from_train").symlink_to(world_copy / "images" / "train" / "database")
    with pytest.raises(ValueError, match=r"the test split .* are the same files as images of the train split"):
        open_split(world_copy)
    with pytest.raises(ValueError, match=r"the train split .* the test split"):
        open_split(world_copy, "train")


# ------------------------------------------------------------------------------------ query augmentations on odd images
SIZE = 64  # the --resize of the augmentation tests
AUGMENTATION_LIMITS = [
    {"brightness": 1e38},
    {"contrast": 1e38},
    {"saturation": 1e38},
    {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0},
    {"hue": 0.5},
    {"rand_perspective": 0.0},
    {"rand_perspective": 0.5},
    {"rand_perspective": 1.0},
    {"random_resized_crop": 0.0},
    {"random_resized_crop": 0.999999},
    {"random_rotation": 180.0},
]
ODD_SIZES = [(1, 1), (1, 300), (300, 1), (2, 500), (500, 2), (3, 3), (17, 9)]  # (width, height), all below --resize


@pytest.mark.parametrize("flags", AUGMENTATION_LIMITS, ids=lambda flags: ",".join(f"{k}={v}" for k, v in flags.items()))
def test_query_augmentation_at_its_limits_on_odd_images(flags):
    """Every augmentation flag at the ends of what the parser accepts, on images 1 pixel wide or high, thin, tiny:
    a finite (3, H, W) query, draw after draw."""
    from PIL import Image

    import datasets_ws

    augmentation = datasets_ws.query_augmentation(datasets_ws.QueryAugmentation(**flags), (SIZE, SIZE))
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    for width, height in ODD_SIZES:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        for _ in range(20):
            query = augmentation(image)
            assert query.shape == (3, SIZE, SIZE) and query.isfinite().all(), (width, height)


def test_random_perspective_draws_as_torchvision_on_ordinary_images():
    """The perspective that copes with thin images gives torchvision's result, draw for draw, where torchvision's
    works (the same random numbers, the same transform)."""
    import torchvision.transforms as T
    from PIL import Image

    import datasets_ws

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    for seed in range(10):
        torch.manual_seed(seed)
        ours = np.asarray(datasets_ws._RandomPerspective(distortion_scale=0.5)(image))
        torch.manual_seed(seed)
        theirs = np.asarray(T.RandomPerspective(distortion_scale=0.5)(image))
        np.testing.assert_array_equal(ours, theirs)
