"""Initialise the DHE head: train it on query-positive pairs with the REI loss, the backbone frozen.

    python train_dhe.py --resume_fe finetunedCCT14_pitts30k.torch \
        --datasets_folder datasets_vg/datasets --dataset_name pitts30k

As the original: pairs built once with the initial backbone (`--qp_mode`), each image of a pair an independent
random crop; loss = mean REI of the pairs with random DLT weights; Adam (or SGD) with StepLR(10000, 0.8) stepped every
iteration; `homography_regression_{epoch:03d}.torch` every 10 epochs (and at the last); at the end the test split's
recalls before and after re-ranking. Several processes: `torchrun --nproc_per_node N train_dhe.py ...`.
The training itself is `training.dhe_init` driven by `training.loop`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import parser as flags
from training.dhe_init import DHEInitialisation
from training.loop import run, run_script
from training.task import Task

SCRIPT = "train_dhe"


def build_task(run_flags: dict[str, Any], device: torch.device, output_folder: Path, resume: dict | None) -> Task:
    """The task of the run's flags (those of the checkpoint where a resumed run takes them), for `training.loop.run`."""
    settings = flags.dhe_init_settings(argparse.Namespace(**run_flags), device)
    return DHEInitialisation(settings, device, output_folder, resume)


def main(args: argparse.Namespace, given_flags: set[str] | None = None) -> dict:
    """Train the head as the flags say; returns {"output_folder", "metrics" (rows), "results" (results.json)}.
    `given_flags`: the flags given on the command line, which a resumed run checks against its checkpoint's (None:
    every flag whose value differs from the checkpoint's counts as given)."""
    return run(flags.run_options(args), dict(vars(args)), SCRIPT, build_task, given_flags)


def cli(argv: Sequence[str] | None = None) -> dict:
    """Parse `argv` (default: the command line) and run `main`; bad input exits with a one-line error."""
    args = flags.parse_arguments(SCRIPT, argv)
    given_flags = flags.given_flags(SCRIPT, argv)
    return run_script(SCRIPT, lambda: main(args, given_flags))


if __name__ == "__main__":
    cli()
