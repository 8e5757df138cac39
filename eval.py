"""Evaluate DHE-VPR: global retrieval (GeM descriptors + faiss), then DHE re-ranking of the top candidates.

    python eval.py --resume_fe finetunedCCT14_pitts30k.torch --resume_hr finetunedDHE_pitts30k.torch \
        --datasets_folder datasets_vg/datasets --dataset_name pitts30k

Logs Recall@N before ("baseline") and after re-ranking, and the time of each stage, to logs/<exp_name>/<time>/.
Several processes share the work with `torchrun --nproc_per_node N eval.py ...` (one result, rank 0 writes).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import commons
import distributed
import parser
from evaluation.pipeline import evaluate


def main(args: argparse.Namespace) -> dict:
    """Run the evaluation; returns recalls before/after re-ranking, predictions and the run folder.

    Under torchrun (`torchrun --nproc_per_node N eval.py ...`) every process runs it: they share the extraction and
    the re-ranking, rank 0 makes the one run folder, logs and writes. A run that fails (a bad folder, image or
    checkpoint, an interruption) before its recalls are known leaves no run folder behind; once they are logged, a
    later failure (writing the predictions, a full disk, Ctrl-C) keeps the folder with its logs, which say what
    failed.
    """
    device = distributed.init(args.device)
    try:
        commons.make_deterministic(args.seed)  # the same in every process: the same random weights, if any
        is_main = distributed.is_main_process()
        output_folder = commons.make_run_folder(args.exp_name) if is_main else None
        output_folder = Path(distributed.broadcast_object(str(output_folder) if is_main else None))
        results: dict = {"output_folder": output_folder}
        try:
            if is_main:
                commons.setup_logging(output_folder)
                commons.log_run_header(vars(args), output_folder)
            else:  # rank 0 speaks for every process; the others report errors only
                logging.getLogger().setLevel(logging.ERROR)
            return evaluate(
                parser.eval_settings(args, outputs=True),
                parser.model_config(args),
                args.datasets_folder,
                args.dataset_name,
                args.val_positive_dist_threshold,
                device,
                output_folder,
                results,
            )
        except BaseException as error:
            if is_main:
                commons.end_failed_run(output_folder, error, keep="baseline_recalls" in results)
            raise
    finally:
        distributed.shutdown()


def cli(argv: Sequence[str] | None = None) -> dict:
    """Parse `argv` (default: the command line), run `main`, and close the run's log files."""
    args = parser.parse_arguments("eval", argv)
    restore_signal_handlers = commons.install_signal_handlers()
    try:
        return main(args)
    finally:
        commons.close_logging()
        restore_signal_handlers()


if __name__ == "__main__":
    try:
        cli()
    except commons.Interrupted as interrupted:
        sys.exit(128 + interrupted.signum)  # the shell's convention for a process ended by a signal
    except (OSError, ValueError) as error:  # bad input, or an output folder that cannot be written: one line
        print(f"eval.py: error: {error}", file=sys.stderr)
        sys.exit(1)
