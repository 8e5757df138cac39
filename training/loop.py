"""The training loop that `train_dhe.py` and `finetune.py` share.

A script describes its job as a `Task`; `run` makes the run folder and the logs, resumes, builds the task and calls
`fit`, the one loop: `train_one_epoch` (steps under autocast when `amp`, losses averaged over processes, a stop on a
non-finite loss), then `record_epoch` (the task's files and validation, the best model, metrics.csv's row), then
`last_checkpoint.pth` and the plot; at the end `results.json`. `run_script` turns the errors a user can fix and the
interruptions into one line on stderr and an exit code.

Files of a run folder `logs/<exp_name>/<YYYY-MM-DD_HH-MM-SS>/`:
    info.log, debug.log     the command, arguments, versions, counts and the periodic loss lines;
    metrics.csv             one row per epoch: epoch, the losses, lr, seconds, val_R@N and val_reranked_R@N;
    training_curves.png     the losses and recalls per epoch, redrawn each epoch (matplotlib);
    events.out.tfevents.*   with --tensorboard: losses and lr per iteration, recalls and a picture per validation;
    last_checkpoint.pth     everything `--resume_train` needs, rewritten atomically each epoch;
    results.json            recalls at the end (util.save_results);
and the task's state dicts (`homography_regression_{epoch:03d}.torch`, ...), saved atomically.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import commons
import distributed
from model.checkpoints import CheckpointMismatchError
from model.precision import amp_autocast, amp_dtype
from training.dashboard import TensorBoardLog, require_tensorboard
from training.records import METRICS_CSV, PLOT_PNG, plot_metrics, save_training_results, write_metrics
from training.resume import (
    LAST_CHECKPOINT,
    Progress,
    capture_rng_states,
    load_training_checkpoint,
    restore_checkpoint,
    resume_arguments,
    save_checkpoint,
)
from training.task import NonFiniteLossError, Task, TrainingError

EXPECTED_ERRORS = (TrainingError, CheckpointMismatchError, FileNotFoundError, ValueError, OSError)


@dataclass(frozen=True)
class RunOptions:
    """How `run` sets up a run: the flags of the same names (`parser.run_options(args)`).

    Attributes:
        device: --device, for `distributed.init` ("auto", "cpu", "cuda", ...).
        seed: the seed of the processes (a resumed run's is the checkpoint's).
        exp_name: the run folder is `logs/<exp_name>/<date>/`.
        amp: mixed precision (said in the first lines of info.log).
        resume_train: a `last_checkpoint.pth` to continue, or None.
        tensorboard: write TensorBoard event files into the run folder (rank 0).
    """

    device: str
    seed: int
    exp_name: str
    amp: bool
    resume_train: str | None = None
    tensorboard: bool = False


def train_one_epoch(
    task: Task,
    device: torch.device,
    epoch: int,
    progress: Progress,
    output_folder: Path,
    dashboard: TensorBoardLog | None = None,
) -> dict:
    """One epoch of optimizer steps (the scheduler stepped after each); `progress.iteration` counts them, and each
    step's losses and learning rate go to `dashboard` when given. Returns {loss name: mean over the epoch's steps of
    the mean over processes}.

    Raises:
        NonFiniteLossError: before the step of a NaN or infinite loss.
    """
    settings, world_size = task.settings, distributed.get_world_size()
    sums = torch.zeros(len(task.loss_names), dtype=torch.float64)
    window: list[float] = []
    steps = 0
    batches = tqdm(
        task.epoch_batches(epoch),
        desc=f"epoch {epoch}",
        total=settings.iterations_per_epoch,
        ncols=100,
        leave=False,
        disable=not distributed.is_main_process(),
    )
    for batch in batches:
        commons.raise_if_interrupted()
        with amp_autocast(device, settings.amp):
            losses = task.losses(batch)
        local = torch.stack([losses[name].detach().double() for name in task.loss_names])  # on the device (nccl)
        means = (distributed.all_reduce_sum(local) / world_size).cpu()
        if not torch.isfinite(means).all():
            raise NonFiniteLossError(
                f"non-finite loss ({', '.join(f'{n} {v:.4g}' for n, v in zip(task.loss_names, means.tolist()))}) "
                f"at iteration {progress.iteration} (epoch {epoch}, step {steps} of the epoch): stopping before the "
                "optimizer step; nothing of this epoch is saved"
                + (f", the last good checkpoint is {output_folder / LAST_CHECKPOINT}" if epoch > 0 else "")
            )
        lr = task.optimizer.param_groups[0]["lr"]  # this step's, before the scheduler moves it
        task.optimizer.zero_grad(set_to_none=True)
        task.scaler.scale(losses["loss"]).backward()
        task.scaler.step(task.optimizer)
        task.scaler.update()
        if task.scheduler is not None:
            task.scheduler.step()
        progress.iteration += 1
        steps += 1
        sums += means
        if dashboard is not None:
            dashboard.log_iteration(progress.iteration, dict(zip(task.loss_names, means.tolist())), lr)
        window.append(float(means[0]))
        if len(window) == settings.log_period:
            logging.info(
                f"epoch {epoch}, iteration {progress.iteration}: loss {window[-1]:.4f}, mean of the last "
                f"{len(window)}: {sum(window) / len(window):.4f}"
            )
            window = []
        logging.debug(
            f"iteration {progress.iteration}: " + ", ".join(f"{n} {v:.6f}" for n, v in zip(task.loss_names, means))
        )
    if steps == 0:
        raise TrainingError(f"epoch {epoch} had no batch: check the batch size against the data")
    _check_parameters_finite(task, epoch)
    return {name: float(value) for name, value in zip(task.loss_names, sums / steps)}


def _check_parameters_finite(task: Task, epoch: int) -> None:
    for name, module in task.modules.items():
        for parameter_name, parameter in module.named_parameters():
            if not torch.isfinite(parameter).all():
                raise NonFiniteLossError(
                    f"{name}.{parameter_name} holds non-finite values after epoch {epoch}: stopping without "
                    "saving this epoch's weights"
                )


def record_epoch(
    task: Task, epoch: int, epoch_losses: dict, seconds_since: float, progress: Progress, output_folder: Path
) -> None:
    """After an epoch's steps: the task's files (rank 0) and validation (every process shares it), the best model,
    metrics.csv's row in `progress.rows` and the epoch's log line. `seconds_since`: `time.perf_counter()` at the
    start of the epoch."""
    lr = task.optimizer.param_groups[0]["lr"]
    metrics = task.end_epoch(epoch, output_folder)
    selection = metrics.get(task.selection_key) if task.selection_key else None
    if selection is not None:
        if progress.best is None or selection > progress.best:
            progress.best, progress.not_improved = selection, 0
            if distributed.is_main_process():
                task.save_best(output_folder)
            logging.info(f"New best {task.selection_key}: {selection:.2f} at epoch {epoch}")
        else:
            progress.not_improved += 1
    row = {"epoch": epoch, **epoch_losses, "lr": lr, "seconds": time.perf_counter() - seconds_since, **metrics}
    progress.rows.append(row)
    logging.info(
        f"Finished epoch {epoch:02d} in {row['seconds']:.1f} s: "
        + ", ".join(f"{k} {v:.4f}" for k, v in epoch_losses.items())
        + f", lr {lr:.3g}"
    )


def fit(
    task: Task,
    device: torch.device,
    output_folder: Path,
    flags: dict[str, Any],
    resume: dict | None = None,
    resume_source: str | None = None,
    dashboard: TensorBoardLog | None = None,
) -> dict:
    """Train `task` from its current state (or from `resume`, read from the file `resume_source`) up to
    `task.settings.num_epochs`; returns what `run` returns. `flags`: the run's flags, saved in the checkpoint for
    `resume_arguments` (tuples as lists). `dashboard` (rank 0, `--tensorboard`): gets every step's losses, each
    epoch's row and each validation's picture, at the global iteration."""
    settings, is_main = task.settings, distributed.is_main_process()
    progress = Progress()
    if resume is not None:
        progress = restore_checkpoint(task, resume, settings.lr, resume_source)
        if is_main and progress.rows:
            write_metrics(progress.rows, output_folder / METRICS_CSV)
    if progress.epoch >= settings.num_epochs:
        logging.info(
            f"Nothing to train: the checkpoint has {progress.epoch} epochs, {settings.num_epochs} were asked for"
        )
    for epoch in range(progress.epoch, settings.num_epochs):
        epoch_start = time.perf_counter()
        epoch_losses = train_one_epoch(task, device, epoch, progress, output_folder, dashboard)
        record_epoch(task, epoch, epoch_losses, epoch_start, progress, output_folder)
        if dashboard is not None:
            dashboard.log_epoch(progress.iteration, progress.rows[-1], task.loss_names)
            picture = task.validation_picture()
            if picture is not None:
                dashboard.log_picture(progress.iteration, picture)
        progress.epoch = epoch + 1
        states = distributed.gather_objects(capture_rng_states())
        if is_main:
            write_metrics(progress.rows, output_folder / METRICS_CSV)
            save_checkpoint(task, progress, states, flags, output_folder)
            plot_metrics(progress.rows, output_folder / PLOT_PNG, task.selection_key is not None)
        stop = settings.patience is not None and progress.not_improved >= settings.patience
        if distributed.broadcast_object(stop):
            logging.info(f"Stopping early: {task.selection_key} did not improve for {settings.patience} epochs")
            break

    result: dict = {"output_folder": output_folder, "metrics": progress.rows}
    final = task.finish(output_folder)  # every process: a final test shares its work
    if is_main:
        result["results"] = save_training_results(output_folder, settings.recall_values, final)
        if progress.rows:
            plot_metrics(progress.rows, output_folder / PLOT_PNG, task.selection_key is not None)
    distributed.barrier()
    return result


def run(
    options: RunOptions,
    flags: dict[str, Any],
    script: str,
    build_task: Callable[[dict[str, Any], torch.device, Path, dict | None], Task],
    given_flags: set[str] | None = None,
) -> dict:
    """Set up the processes, the run folder and the logs, resume if asked, build the task and `fit` it.

    `flags`: the script's flags ({dest: value}, as parsed): logged, checked against a resumed checkpoint's
    (`resume_arguments`) and saved in the checkpoint; `build_task(run_flags, device, output_folder, resume)`: the
    script's task, built from the run's flags (those of the checkpoint where the run takes them) and the checkpoint
    (None for a new run); `given_flags`: those given on the command line (see `resume_arguments`).

    A run that fails before it saved any weights leaves no run folder; a later failure or interruption keeps the
    folder and every weights file in it (`last_checkpoint.pth` is the last complete epoch), and the last line of
    its info.log says what happened.
    """
    if options.tensorboard:
        require_tensorboard()  # before any process or folder is made
    device = distributed.init(options.device)
    try:
        commons.make_deterministic(commons.process_seed(options.seed, distributed.get_rank()))
        output_folder = commons.make_run_folder(options.exp_name) if distributed.is_main_process() else None
        output_folder = Path(distributed.broadcast_object(str(output_folder) if output_folder else None))
        try:
            if distributed.is_main_process():
                commons.setup_logging(output_folder)
                commons.log_run_header(flags, output_folder)
            else:  # rank 0 speaks for every process; the others report errors only
                logging.getLogger().setLevel(logging.ERROR)
            world_size = distributed.get_world_size()
            logging.info(
                f"{script}.py on {device}, {world_size} process{'es' if world_size > 1 else ''}"
                + (" with mixed precision " + str(amp_dtype(device)).removeprefix("torch.") if options.amp else "")
            )
            resume = load_training_checkpoint(options.resume_train, script) if options.resume_train else None
            if resume is not None:
                flags = resume_arguments(flags, resume.get("args", {}), given_flags, options.resume_train)
                logging.debug(f"Arguments of the resumed run: {commons.describe_flags(flags)}")
                if flags["seed"] != options.seed:  # the run's --seed, taken from the checkpoint: what is built next
                    commons.make_deterministic(commons.process_seed(flags["seed"], distributed.get_rank()))
            task = build_task(flags, device, output_folder, resume)
            for line in task.fixes:
                logging.info(f"Differs from the original on purpose: {line}")
            saved_flags = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flags.items()}
            dashboard = TensorBoardLog(output_folder) if options.tensorboard and distributed.is_main_process() else None
            try:
                return fit(task, device, output_folder, saved_flags, resume, options.resume_train, dashboard)
            finally:  # complete event files before a stopped run's folder is kept or removed
                if dashboard is not None:
                    dashboard.close()
        except BaseException as error:
            if distributed.is_main_process():
                _end_stopped_run(output_folder, error, options.resume_train)
            raise
    finally:
        distributed.shutdown()


def saved_weights(output_folder: Path) -> list[Path]:
    """The trained weights in a run folder: the task's state dicts (`*.torch`) and `last_checkpoint.pth`."""
    return sorted(p for p in output_folder.glob("*.torch") if p.is_file()) + [
        p for p in [output_folder / LAST_CHECKPOINT] if p.is_file()
    ]


def _end_stopped_run(output_folder: Path, error: BaseException, resumed_from: str | None) -> None:
    """Rank 0, when a run stops on an error or an interruption: the last line of info.log says what happened; the
    run folder is removed only when it holds no trained weights (a failure before the first epoch was saved).
    `resumed_from`: the --resume_train checkpoint, still the last complete epoch until this run writes its own."""
    if isinstance(error, KeyboardInterrupt):
        what = f"was interrupted ({getattr(error, 'signal_name', 'Ctrl-C')})"
    else:
        what = f"failed ({type(error).__name__}: {error})"
    weights = saved_weights(output_folder)
    checkpoint = output_folder / LAST_CHECKPOINT
    if checkpoint.is_file():
        logging.info(
            f"Stopped: the run {what}; the run folder {output_folder} keeps the last "
            f"complete epoch: continue with --resume_train {checkpoint}"
        )
    elif weights and resumed_from:
        logging.error(
            f"The run {what}; the run folder {output_folder} is kept with {', '.join(p.name for p in weights)}; the "
            f"last complete epoch is still {resumed_from}: continue with --resume_train {resumed_from}"
        )
    elif weights:
        logging.error(
            f"The run {what}; the run folder {output_folder} is kept with the weights saved so far "
            f"({', '.join(p.name for p in weights)}) but no {LAST_CHECKPOINT}: the run cannot be resumed, start a new "
            "one from these weights (--resume_fe / --resume_hr)"
        )
    else:
        logging.debug("Failed before any epoch was saved", exc_info=True)
    commons.close_logging()
    if not weights:
        commons.remove_run_folder(output_folder)


def run_script(script: str, main: Callable[[], dict]) -> dict:
    """Run a training script's `main` with the signal handlers of `commons`; bad input and non-finite losses end
    with a one-line error and exit code 1, an interruption with the shell's 128 + signal."""
    restore_signal_handlers = commons.install_signal_handlers()
    try:
        return main()
    except EXPECTED_ERRORS as error:
        print(f"{script}.py: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt as error:
        # Ctrl-C, or SIGTERM / SIGHUP turned into commons.Interrupted; the exit code is the shell's 128 + signal
        signal_name = getattr(error, "signal_name", "SIGINT (Ctrl-C)")
        print(f"{script}.py: interrupted by {signal_name}", file=sys.stderr)
        raise SystemExit(128 + getattr(error, "signum", signal.SIGINT)) from None
    finally:
        commons.close_logging()
        restore_signal_handlers()
