"""Fine-tune the backbone and the DHE head together: a metric loss on global descriptors + REI on the head.

    python finetune.py --resume_fe CCT14_pitts30k.pth --resume_hr initializedDHE.torch \
        --datasets_folder datasets_vg/datasets --dataset_name pitts30k --epochs_num 40

As the original: an epoch is queries_per_epoch / cache_refresh_rate loops; each loop mines one triplet for each of
`--cache_refresh_rate` queries (model in eval mode), then trains over them in order, `--train_batch_size` triplets a
batch, whole model in train mode; loss = triplet (sum / (batch x negatives)) + `--rei_weight` x REI (sum / batch);
after each epoch `features_extractor_{e:03d}.torch` and `homography_regression_{e:03d}.torch`, then validation
(re-ranked from `--rerank_val_from_epoch`). New: the best model by val R@5, `--criterion sare_ind|sare_joint`,
opt-in `--patience`. Several processes: `torchrun --nproc_per_node N finetune.py ...`.
The training itself is `training.finetuning` driven by `training.loop`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import parser as flags
from training.finetuning import Finetuning
from training.loop import run, run_script
from training.task import Task

SCRIPT = "finetune"


def build_task(run_flags: dict[str, Any], device: torch.device, output_folder: Path, resume: dict | None) -> Task:
    """The task of the run's flags (those of the checkpoint where a resumed run takes them), for `training.loop.run`."""
    settings = flags.finetune_settings(argparse.Namespace(**run_flags), device)
    return Finetuning(settings, device, output_folder, resume)


def main(args: argparse.Namespace, given_flags: set[str] | None = None) -> dict:
    """Fine-tune as the flags say; returns {"output_folder", "metrics" (rows), "results" (results.json)}.
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
