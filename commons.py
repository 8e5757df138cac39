"""What every script shares: seeding, the device, the run folder and its logs, the models built from a ModelConfig."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from interrupts import Interrupted, install_signal_handlers, pipe_safe, raise_if_interrupted, worker_init

_RUN_HANDLER = "dhe_vpr_run"

__all__ = [
    "Interrupted",
    "install_signal_handlers",
    "raise_if_interrupted",
    "worker_init",
    "make_deterministic",
    "process_seed",
    "resolve_device",
    "check_exp_name",
    "make_run_folder",
    "remove_run_folder",
    "end_failed_run",
    "setup_logging",
    "close_logging",
    "describe_flags",
    "log_run_header",
    "library_versions",
    "ModelConfig",
    "log_random_weights",
    "build_models",
]


def make_deterministic(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA), and ask cuDNN for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - the legacy global generator, for code that still draws from it
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def process_seed(seed: int, rank: int) -> int:
    """The seed of process `rank` under torchrun: `seed + rank` wrapped into numpy's range 0 .. 2**32 - 1, so that a
    `--seed` near 2**32 - 1 stays valid and the processes (fewer than 2**32) still get distinct seeds."""
    return (seed + rank) % 2**32


def resolve_device(name: str) -> torch.device:
    """`--device` to a torch.device: "auto" is cuda when available, else cpu; "cuda" without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    if name not in ("cuda", "cpu"):
        raise ValueError(f"--device {name!r}: expected auto, cuda or cpu")
    return torch.device(name)


_MAX_EXP_NAME_BYTES = 200  # room for the date-time and the local-features file name within a 255-byte file name


def check_exp_name(exp_name: str) -> str:
    """`exp_name` if it is one plain folder name, so that the run folder stays inside `logs/`; else ValueError.

    Refused: empty, `.`, `..`, a path (a separator, or absolute), control characters (NUL, newline, ...), and names
    over 200 bytes.
    """
    if exp_name in ("", ".", ".."):
        problem = "is not a folder name"
    elif any(ord(c) < 32 or ord(c) == 127 for c in exp_name):
        problem = "holds control characters (NUL, newline, tab, ...)"
    elif "/" in exp_name or os.sep in exp_name or (os.altsep and os.altsep in exp_name):
        problem = "is a path, not a folder name"
    elif len(os.fsencode(exp_name)) > _MAX_EXP_NAME_BYTES:
        problem = f"is longer than {_MAX_EXP_NAME_BYTES} bytes"
    else:
        return exp_name
    raise ValueError(
        f"--exp_name {exp_name!r} {problem}: give one folder name (no '/', not empty, '.' or '..'); the run goes to "
        "logs/<exp_name>/<date_time>/"
    )


def _run_folder_error(folder: Path, error: OSError) -> OSError:
    """`error` (creating `folder`) with a message that names the part of the path in the way."""
    for part in reversed([folder, *folder.parents]):
        if part.exists() and not part.is_dir():
            return type(error)(f"cannot create the run folder {folder}: {part} is a file, not a folder")
    reason = error.strerror or str(error)
    blocked = Path(error.filename).parent if error.filename else folder.parent
    return type(error)(f"cannot create the run folder {folder}: {reason}; check that {blocked} is writable")


def make_run_folder(exp_name: str, root: str | Path = "logs") -> Path:
    """Create and return a new `<root>/<exp_name>/<YYYY-MM-DD_HH-MM-SS>/`.

    Runs started in the same second get `<YYYY-MM-DD_HH-MM-SS>_1`, `_2`, ...: each name is taken by an atomic
    `mkdir`, so concurrent runs (several processes, or several machines on a shared disk) never share a folder.

    Raises:
        ValueError: `exp_name` is not one plain folder name (see `check_exp_name`).
        OSError: the folder cannot be created (a part of its path is a file, no permission, ...), saying why.
    """
    parent = Path(root) / check_exp_name(exp_name)
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    attempt = 0
    for _ in range(20_000):  # bounded, even if the parent kept vanishing
        if attempt == 10_000:
            break
        folder = parent / (stamp if attempt == 0 else f"{stamp}_{attempt}")
        try:
            folder.mkdir()
        except FileExistsError:
            attempt += 1
            continue
        except FileNotFoundError:  # no parent yet, or a failed run just removed the empty one: (re)create it
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise _run_folder_error(folder, error) from None
            continue
        except OSError as error:
            raise _run_folder_error(folder, error) from None
        return folder
    raise FileExistsError(f"cannot create a new run folder in {parent}: {stamp} and its numbered variants are taken")


def remove_run_folder(folder: str | Path) -> None:
    """Delete a failed run's folder, and its `<exp_name>` parent when nothing else is left in it."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.parent.rmdir()


def end_failed_run(folder: str | Path, error: BaseException, keep: bool) -> None:
    """Log what stopped a run, then close its logs and delete its folder, unless `keep` (it holds results).

    An interruption (Ctrl-C, SIGTERM, SIGHUP) is logged as such. With `keep`, the folder and its `info.log` (with
    whatever results were logged) stay, and the log says that the run did not finish.
    """
    if isinstance(error, KeyboardInterrupt):
        what = f"The run was interrupted ({error.signal_name if isinstance(error, Interrupted) else 'Ctrl-C'})"
    else:
        what = f"The run failed: {type(error).__name__}: {error}"
    if keep:
        logging.error(f"{what}; {folder} is kept with the results logged so far (info.log)")
    else:
        logging.error(f"{what}; nothing was produced, so {folder} is removed")
    close_logging()
    if not keep:
        remove_run_folder(folder)


def setup_logging(output_folder: str | Path, console: str = "info") -> None:
    """Log to `info.log` (INFO and above) and `debug.log` (everything) in `output_folder`, and to stderr.

    Replaces the handlers of an earlier call, so calling it twice in one process (tests) does not duplicate lines.
    """
    output_folder = Path(output_folder)
    output_folder.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter("%(asctime)s   %(message)s", "%Y-%m-%d %H:%M:%S")
    close_logging()
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    # A file name that is not valid UTF-8 (a surrogate-escaped str) is logged with backslash escapes, not an error.
    handlers: list[logging.Handler] = [
        logging.FileHandler(output_folder / "info.log", errors="backslashreplace"),
        logging.FileHandler(output_folder / "debug.log", errors="backslashreplace"),
        logging.StreamHandler(pipe_safe(sys.stderr)),
    ]
    for handler, level in zip(handlers, (logging.INFO, logging.DEBUG, getattr(logging, console.upper()))):
        handler.setLevel(level)
        handler.setFormatter(formatter)
        handler.set_name(_RUN_HANDLER)
        root.addHandler(handler)
    for noisy in ("PIL", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def close_logging() -> None:
    """Detach and close the handlers `setup_logging` added (the run's log files), e.g. before deleting its folder."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _RUN_HANDLER:
            root.removeHandler(handler)
            handler.close()


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries whose numerics matter."""
    import faiss
    import kornia
    import sklearn
    import timm
    import torchvision

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "kornia": kornia.__version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }


def describe_flags(flags: Mapping[str, Any]) -> str:
    """A script's flags ({dest: value}, in the parser's order) as the logs show them: as argparse prints its
    Namespace, the form the logs of every run have had."""
    return "Namespace(" + ", ".join(f"{name}={value!r}" for name, value in flags.items()) + ")"


def log_run_header(flags: Mapping[str, Any], output_folder: Path) -> None:
    """The first lines of every log: command, arguments (`flags`, {dest: value}), library versions, output folder."""
    logging.info("python " + " ".join(sys.argv))
    logging.info(f"Arguments: {describe_flags(flags)}")
    logging.info("Versions: " + ", ".join(f"{k} {v}" for k, v in library_versions().items()))
    logging.info(f"The outputs are being saved in {output_folder}")
    logging.debug(f"Process id {os.getpid()}, {torch.get_num_threads()} torch threads")


@dataclass(frozen=True)
class ModelConfig:
    """What the models are built from (the flags of the same names; `parser.model_config(args)`).

    resize: (H, W) of the input images, multiples of 16. trunc_te: CCT blocks kept; freeze_te: blocks with index <=
    it stay frozen (-1: none). pretrained_cct: a local file of ImageNet CCT-14 weights, loaded when given.
    resume_fe, resume_hr: checkpoints of the features extractor and of the DHE head (None: random weights, with a
    warning). resume_train: the training checkpoint named when its weights are used instead (`build_models`'s
    `from_checkpoint`).
    """

    resize: tuple[int, int] = (384, 384)
    trunc_te: int = 8
    freeze_te: int = 5
    pretrained_cct: str | os.PathLike | None = None
    resume_fe: str | os.PathLike | None = None
    resume_hr: str | os.PathLike | None = None
    resume_train: str | None = None


def log_random_weights(flag: str, part: str) -> None:
    """The original's warning for a part built without a checkpoint (`flag`: "resume_fe" or "resume_hr")."""
    logging.warning(f"WARNING: --{flag} is not set, meaning that the {part} is not initialised (random weights)!")


def build_models(
    config: ModelConfig,
    device: torch.device,
    from_checkpoint: tuple[str, ...] = (),
    map_location: str | torch.device = "cpu",
    on_random_weights: Callable[[str, str], None] = log_random_weights,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The features extractor and DHE head of `config`, on `device`.

    A part without a checkpoint (`resume_fe` / `resume_hr`, and for the features extractor no `pretrained_cct`)
    gets `on_random_weights(flag, part)`: by default the original's warning in the log. The parts named in
    `from_checkpoint` ("features_extractor", "homography_regression") get their weights from the caller's
    `resume_train` checkpoint: they are neither loaded nor warned about here. Checkpoints are loaded onto
    `map_location`.
    """
    from model import FeaturesExtractor, HomographyRegression
    from model.checkpoints import load_features_extractor, load_homography_regression

    features_extractor = FeaturesExtractor(
        resize=config.resize, trunc_te=config.trunc_te, freeze_te=config.freeze_te, pretrained_cct=config.pretrained_cct
    )
    if "features_extractor" in from_checkpoint:
        logging.info(f"The features extractor's weights come from --resume_train {config.resume_train}")
    elif config.resume_fe is not None:
        load_features_extractor(features_extractor, config.resume_fe, map_location)
        logging.info(f"Loaded the features extractor from {config.resume_fe}")
    elif config.pretrained_cct is None:
        on_random_weights("resume_fe", "features extractor")
    homography_regression = HomographyRegression(resize=config.resize)
    if "homography_regression" in from_checkpoint:
        logging.info(f"The DHE head's weights come from --resume_train {config.resume_train}")
    elif config.resume_hr is not None:
        load_homography_regression(homography_regression, config.resume_hr, map_location)
        logging.info(f"Loaded the DHE head from {config.resume_hr}")
    else:
        on_random_weights("resume_hr", "DHE head")
    return features_extractor.to(device), homography_regression.to(device)
