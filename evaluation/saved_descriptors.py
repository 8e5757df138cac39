"""The database's global descriptors saved to a run folder and reused by a later run, so that evaluating another set
of queries against the same (large) database costs the queries only.

Two files: `database_descriptors.npy`, the descriptors (N, D) float32 in the database's order, and
`database_descriptors.json`, what they were made from (`DescriptorsProvenance`) plus their count, dim, dtype and the
SHA-256 of their bytes. A reused file is checked against this run before it is used:

- the images: the database images' paths *relative to the database folder*, in order (row i is image i). The folder
  itself is recorded but not compared, so a datasets folder that was moved or mounted elsewhere still matches; the
  images' contents are not hashed (re-extracting would cost what reuse saves).
- the size the images are resized to (`resize`).
- the features extractor: the SHA-256 of its weights (`distributed.weights_digest`) is the truth; the checkpoint path
  is only recorded and named in messages (the same weights under another path match). Of the model flags only
  `DESCRIPTOR_FLAGS` (trunc_te) are compared: truncating removes blocks, so the digest differs too, but the flag
  makes the clearer message. The others (freeze_te, pretrained_cct, ...) are recorded for the reader: they change
  the descriptors only through the weights, which the digest covers.

Every difference is named in one ValueError; nothing falls back to extracting silently.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import numpy as np
from torch import nn

from distributed import weights_digest
from model.files import replaced_atomically

__all__ = [
    "DESCRIPTORS_JSON",
    "DESCRIPTORS_NPY",
    "DESCRIPTOR_FLAGS",
    "FORMAT_VERSION",
    "DescriptorsProvenance",
    "load_database_descriptors",
    "provenance_differences",
    "provenance_of",
    "read_provenance",
    "save_database_descriptors",
]

DESCRIPTORS_NPY = "database_descriptors.npy"
DESCRIPTORS_JSON = "database_descriptors.json"
FORMAT_VERSION = 1
DESCRIPTOR_FLAGS = ("trunc_te",)  # model flags compared on reuse (the weights' digest covers the others)

FlagValue = int | float | str | bool | None


@dataclass(frozen=True)
class DescriptorsProvenance:
    """What a database's global descriptors were made from.

    database_folder: the folder the images were listed under (absolute; recorded, not compared).
    image_paths: the images' paths relative to `database_folder`, with "/" separators, in the descriptors' order.
    resize: (H, W) the images were resized to.
    checkpoint: the features extractor's checkpoint (--resume_fe), None for random or ImageNet (pretrained) weights;
        recorded and named in messages, not compared.
    weights_digest: SHA-256 (hex) of the features extractor's parameters and buffers; compared.
    descriptors_dim: D, the length of a descriptor.
    model_flags: the model's flags (JSON scalars); those in `DESCRIPTOR_FLAGS` are compared.
    """

    database_folder: str
    image_paths: tuple[str, ...]
    resize: tuple[int, int]
    checkpoint: str | None
    weights_digest: str
    descriptors_dim: int
    model_flags: Mapping[str, FlagValue] = field(default_factory=dict, hash=False)


def provenance_of(
    database_paths: Sequence[str | os.PathLike],
    database_folder: str | os.PathLike,
    resize: Sequence[int],
    checkpoint: str | os.PathLike | None,
    features_extractor: nn.Module,
    trunc_te: int,
    other_flags: Mapping[str, FlagValue | os.PathLike] | None = None,
) -> DescriptorsProvenance:
    """The provenance of descriptors made by `features_extractor` (which has `features_dim`) from the images
    `database_paths` (as the dataset lists them, e.g. `BaseDataset.database_paths`), which lie under
    `database_folder` (e.g. `BaseDataset.dataset_folder`), resized to `resize` (H, W). `other_flags` (freeze_te,
    pretrained_cct, ...) are recorded, not compared. Raises ValueError for a path outside `database_folder`."""
    folder = os.path.abspath(database_folder)
    relative = []
    for path in database_paths:
        inside = os.path.relpath(os.path.abspath(path), folder)
        if inside == os.pardir or inside.startswith(os.pardir + os.sep) or os.path.isabs(inside):
            raise ValueError(f"database image {path} is not inside the database folder {folder}")
        relative.append(PurePath(inside).as_posix())
    if len(resize) != 2:
        raise ValueError(f"resize must be (H, W), got {tuple(resize)}")
    dim = getattr(features_extractor, "features_dim", None)
    if not isinstance(dim, int):
        raise ValueError(f"the features extractor ({type(features_extractor).__name__}) has no int `features_dim`")
    flags: dict[str, FlagValue] = {"trunc_te": int(trunc_te)}
    for name, value in (other_flags or {}).items():
        flags[name] = os.fspath(value) if isinstance(value, os.PathLike) else value
    return DescriptorsProvenance(
        database_folder=folder,
        image_paths=tuple(relative),
        resize=(int(resize[0]), int(resize[1])),
        checkpoint=None if checkpoint is None else os.fspath(checkpoint),
        weights_digest=weights_digest(features_extractor),
        descriptors_dim=dim,
        model_flags=flags,
    )


def _sha256(descriptors: np.ndarray) -> str:
    """SHA-256 (hex) of the bytes of C-contiguous `descriptors`."""
    return hashlib.sha256(memoryview(descriptors).cast("B")).hexdigest()


def save_database_descriptors(
    folder: str | Path, descriptors: np.ndarray, provenance: DescriptorsProvenance
) -> tuple[Path, Path]:
    """Write `descriptors` (N, D) float32, finite, N = len(provenance.image_paths), D = provenance.descriptors_dim,
    to `folder`/database_descriptors.npy and their provenance to `folder`/database_descriptors.json (creating
    `folder`); returns (npy path, json path).

    Both are written to temporary files first and renamed when both are complete, the .npy first: an interruption
    leaves neither (nor a temporary file), and the JSON's SHA-256 of the descriptors tells a later load if the pair
    was ever mixed. Raises ValueError for descriptors of the wrong shape, dtype or with non-finite values.
    """
    if not isinstance(descriptors, np.ndarray) or descriptors.ndim != 2:
        shape = getattr(descriptors, "shape", type(descriptors).__name__)
        raise ValueError(f"database descriptors must be a (N, D) array, got {shape}")
    if descriptors.dtype != np.float32:
        raise ValueError(f"database descriptors must be float32, got {descriptors.dtype}")
    count, dim = descriptors.shape
    if count != len(provenance.image_paths) or dim != provenance.descriptors_dim:
        raise ValueError(
            f"database descriptors are ({count}, {dim}); expected ({len(provenance.image_paths)}, "
            f"{provenance.descriptors_dim}): one {provenance.descriptors_dim}-d row per database image"
        )
    if not np.isfinite(descriptors).all():
        rows = np.flatnonzero(~np.isfinite(descriptors).all(axis=1))
        raise ValueError(
            f"database descriptors hold non-finite values (NaN or inf) in {len(rows)} rows, first row {rows[0]} "
            f"({provenance.image_paths[rows[0]]}); not saved"
        )
    descriptors = np.ascontiguousarray(descriptors)
    record = {
        "format": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "count": count,
        "dim": dim,
        "dtype": "float32",
        "sha256": _sha256(descriptors),
        "resize": list(provenance.resize),
        "checkpoint": provenance.checkpoint,
        "weights_digest": provenance.weights_digest,
        "model_flags": dict(provenance.model_flags),
        "database_folder": provenance.database_folder,
        "image_paths": list(provenance.image_paths),
    }
    text = json.dumps(record, indent=2) + "\n"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    npy_path, json_path = folder / DESCRIPTORS_NPY, folder / DESCRIPTORS_JSON
    # the inner block's file is renamed first: the .npy, then the JSON that describes it
    with (
        replaced_atomically(json_path, len(text.encode())) as json_temporary,
        replaced_atomically(npy_path, descriptors.nbytes + 128) as npy_temporary,
    ):
        with open(npy_temporary, "wb") as file:  # a file object: np.save would append ".npy" to a name
            np.save(file, descriptors, allow_pickle=False)
        json_temporary.write_text(text)
    return npy_path, json_path


def _files_of(path: str | Path) -> tuple[Path, Path]:
    """(the .npy, its JSON) for `path`: the .npy itself or a folder holding database_descriptors.npy."""
    path = Path(path)
    if path.is_dir():
        npy_path = path / DESCRIPTORS_NPY
        if not npy_path.is_file():
            raise FileNotFoundError(
                f"{path} holds no {DESCRIPTORS_NPY}: expected a run folder of --save_database_descriptors or the "
                f".npy file itself"
            )
    else:
        npy_path = path
        if not npy_path.is_file():
            raise FileNotFoundError(f"database descriptors {npy_path} do not exist (expected a .npy file or a folder)")
    json_path = npy_path.with_suffix(".json")
    if not json_path.is_file():
        raise FileNotFoundError(
            f"{json_path} does not exist: it records what {npy_path.name} was made from, and without it the "
            f"descriptors cannot be checked against this database and model; save them again"
        )
    return npy_path, json_path


def _field(record: dict, key: str, kind: type | tuple[type, ...], json_path: Path) -> object:
    """record[key], checked to be a `kind`; ValueError naming `json_path` and the key otherwise."""
    if key not in record:
        raise ValueError(f"{json_path} has no {key!r}: not a database descriptors record, or a damaged one")
    value = record[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ValueError(f"{json_path}: {key!r} is {value!r}, not a valid value; the file is damaged")
    return value


def read_provenance(json_path: str | Path) -> tuple[DescriptorsProvenance, dict]:
    """The provenance recorded in `json_path` and the whole record (count, dim, dtype, sha256, created, ...).
    Raises ValueError naming the file when it is not a readable record of this format."""
    json_path = Path(json_path)
    try:
        record = json.loads(json_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{json_path} is not valid JSON ({error}); the file is damaged") from None
    if not isinstance(record, dict):
        raise ValueError(f"{json_path} does not hold a JSON object; not a database descriptors record")
    version = record.get("format")
    if version != FORMAT_VERSION:
        raise ValueError(f"{json_path} has format {version!r}; this version reads format {FORMAT_VERSION}")
    paths = _field(record, "image_paths", list, json_path)
    resize = _field(record, "resize", list, json_path)
    checkpoint = _field(record, "checkpoint", (str, type(None)), json_path)
    flags = _field(record, "model_flags", dict, json_path)
    if not all(isinstance(p, str) for p in paths):
        raise ValueError(f"{json_path}: 'image_paths' must be a list of strings; the file is damaged")
    if len(resize) != 2 or not all(isinstance(s, int) for s in resize):
        raise ValueError(f"{json_path}: 'resize' is {resize!r}, not [H, W]; the file is damaged")
    for key in ("count", "dim"):
        _field(record, key, int, json_path)
    if _field(record, "dtype", str, json_path) != "float32":
        raise ValueError(f"{json_path}: 'dtype' is {record['dtype']!r}; database descriptors are float32")
    _field(record, "sha256", str, json_path)
    provenance = DescriptorsProvenance(
        database_folder=str(_field(record, "database_folder", str, json_path)),
        image_paths=tuple(paths),
        resize=(resize[0], resize[1]),
        checkpoint=checkpoint,  # type: ignore[arg-type]
        weights_digest=str(_field(record, "weights_digest", str, json_path)),
        descriptors_dim=int(record["dim"]),
        model_flags=flags,  # type: ignore[arg-type]
    )
    if record["count"] != len(paths):
        raise ValueError(f"{json_path} says 'count' {record['count']} but lists {len(paths)} image paths; damaged")
    return provenance, record


def _weights(checkpoint: str | None, digest: str) -> str:
    """A features extractor's weights in a message: its checkpoint and the start of its digest."""
    source = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint (random or pretrained weights)"
    return f"{source} (weights sha256 {digest[:12]}…)"


def provenance_differences(saved: DescriptorsProvenance, expected: DescriptorsProvenance) -> list[str]:
    """Each way `saved` differs from `expected` that makes the descriptors unusable, as a phrase completing
    "the descriptors were ..." / "... ; ..."; empty when they fit."""
    differences = []
    if saved.image_paths != expected.image_paths:
        first = next(
            (i for i, (a, b) in enumerate(zip(saved.image_paths, expected.image_paths, strict=False)) if a != b),
            min(len(saved.image_paths), len(expected.image_paths)),
        )

        def at(paths: tuple[str, ...]) -> str:
            return repr(paths[first]) if first < len(paths) else "(none)"

        where = (
            ""
            if saved.database_folder == expected.database_folder
            else f" (listed under {saved.database_folder}; this database is {expected.database_folder})"
        )
        differences.append(
            f"made from other images: {len(saved.image_paths)} paths listed, this database has "
            f"{len(expected.image_paths)}; first difference at #{first}: {at(saved.image_paths)} vs "
            f"{at(expected.image_paths)}{where}"
        )
    if tuple(saved.resize) != tuple(expected.resize):
        differences.append(
            f"made at --resize {saved.resize[0]} {saved.resize[1]}, this run uses "
            f"{expected.resize[0]} {expected.resize[1]}"
        )
    if saved.weights_digest != expected.weights_digest:
        differences.append(
            f"made with another features extractor: {_weights(saved.checkpoint, saved.weights_digest)} vs this "
            f"run's {_weights(expected.checkpoint, expected.weights_digest)}"
        )
    for flag in DESCRIPTOR_FLAGS:
        if flag in expected.model_flags and saved.model_flags.get(flag) != expected.model_flags[flag]:
            recorded = saved.model_flags[flag] if flag in saved.model_flags else "(not recorded)"
            differences.append(f"made with --{flag} {recorded}, this run uses {expected.model_flags[flag]}")
    if saved.descriptors_dim != expected.descriptors_dim:
        differences.append(
            f"made of {saved.descriptors_dim}-d descriptors, this features extractor gives "
            f"{expected.descriptors_dim}-d ones"
        )
    return differences


def load_database_descriptors(path: str | Path, expected: DescriptorsProvenance) -> np.ndarray:
    """The database descriptors (N, D) float32, C-contiguous, saved by `save_database_descriptors` at `path` (the
    .npy, or a folder holding database_descriptors.npy; the JSON is the .npy's name with .json), checked against
    `expected`, this run's provenance.

    Raises FileNotFoundError naming a missing .npy or JSON; ValueError naming the file when one is damaged, when the
    .npy disagrees with its JSON (truncated, or replaced), and, naming every difference, when the descriptors were
    made from other images, at another size or with another features extractor.
    """
    npy_path, json_path = _files_of(path)
    saved, record = read_provenance(json_path)
    differences = provenance_differences(saved, expected)
    if differences:
        raise ValueError(
            f"{npy_path} does not fit this run: it was " + "; it was ".join(differences) + ". Extract the database "
            "descriptors again (without --database_descriptors), or pass the ones saved for this database and model"
        )
    try:
        descriptors = np.load(npy_path, mmap_mode=None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{npy_path} is not a readable .npy file ({error}); it is damaged or truncated") from None
    if not isinstance(descriptors, np.ndarray):
        raise ValueError(f"{npy_path} holds no single array; not a database descriptors file")
    shape = (record["count"], record["dim"])
    if descriptors.shape != shape or descriptors.dtype.kind != "f" or descriptors.dtype.itemsize != 4:
        raise ValueError(
            f"{npy_path} holds {descriptors.shape} {descriptors.dtype} but {json_path.name} says {shape} float32: "
            f"the .npy was truncated or replaced; save the descriptors again"
        )
    descriptors = np.ascontiguousarray(descriptors, dtype=np.float32)
    if _sha256(descriptors) != record["sha256"]:
        raise ValueError(
            f"{npy_path} does not hold the descriptors {json_path.name} describes (their SHA-256 differs): the .npy "
            f"was modified or replaced; save the descriptors again"
        )
    return descriptors
