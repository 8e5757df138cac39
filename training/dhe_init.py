"""The DHE head's initialisation (`train_dhe.py`): the head trained on query-positive pairs with the REI loss, the
backbone frozen.

As the original: pairs built once with the initial backbone (`--qp_mode`), each image of a pair an independent
random crop; loss = mean REI of the pairs with random DLT weights; Adam (or SGD) with StepLR(10000, 0.8) stepped every
iteration; `homography_regression_{epoch:03d}.torch` every 10 epochs (and at the last); at the end the test split's
recalls before and after re-ranking.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

import commons
import distributed
from datasets_ws import BaseDataset, InferenceSettings, QueryPositivePairs
from evaluation.pipeline import EvalSettings, evaluate_split
from model.checkpoints import save_state_dict
from model.matching import rei_loss
from model.rerank import predict_homographies
from training.resume import check_resumed_split, split_digest
from training.task import Task, TrainingError, TrainSettings, check_split_measures, grad_scaler

LOG_PERIOD = 500  # the original's loss lines: every 500 iterations
SAVE_PERIOD = 10  # the original saves the head when epoch % 10 == 9
SCHEDULER_STEP, SCHEDULER_GAMMA = 10000, 0.8
DLT_WEIGHT_EXPONENT = 0.1  # DLT weights rand(B, 4) ** 0.1, as the original
SGD_MOMENTUM, SGD_WEIGHT_DECAY = 0.9, 0.001

FIXES = (
    "the frozen backbone runs under no_grad (the original ran it with autograd, for nothing)",
    "--optim sgd gets the same StepLR as adam (the original crashed for lack of a scheduler)",
    "--device and DistributedDataParallel under torchrun instead of .cuda() and DataParallel",
    "the head is also saved at the last epoch, and last_checkpoint.pth / metrics.csv / results.json are written",
    "pairs are shuffled by a generator seeded from --seed and the pass over them, so that a resumed run draws the "
    "same batches (the original's infinite loader drew from the global RNG)",
)


def dlt_weights(batch_size: int, device: torch.device) -> Tensor:
    """(B, 4) random DLT weights drawn from torch's global CPU generator, as the original (they change H by rounding
    only, since the DLT of four points is exact)."""
    return (torch.rand(batch_size, 4) ** DLT_WEIGHT_EXPONENT).to(device)


def head_loss(
    features_extractor: nn.Module,
    head: nn.Module,
    query: Tensor,
    positive: Tensor,
    device: torch.device,
    rei_inliers: str = "minimal",
) -> Tensor:
    """Mean REI loss of a batch of pairs: query and positive images (B, 3, H, W) -> () loss.

    `rei_inliers` ("minimal" or "refined", `--rei_inliers`) is how RANSAC's inliers k are counted (`rei_loss`).

    The backbone runs under no_grad (it is frozen here); the head runs in the caller's autocast state; the
    correlation, DLT, matching and RANSAC in float32.
    """
    with torch.no_grad():
        _, local_features = features_extractor(torch.cat([query, positive]))
    local_query, local_positive = local_features.float().chunk(2)
    weights = dlt_weights(len(local_query), device)
    H = predict_homographies(head, local_query, local_positive, dlt_weights=weights)
    with torch.autocast(device.type, enabled=False):
        return rei_loss(local_query, local_positive, H, inliers=rei_inliers).mean()


@dataclass(frozen=True)
class DHEInitSettings:
    """What `DHEInitialisation` is built from (`parser.dhe_init_settings(args, device)`).

    Attributes:
        train: the loop's values (epochs, iterations, lr, amp, ...).
        model: the frozen backbone and the head to build.
        evaluation: the final test's settings.
        inference: how the backbone computes the descriptors of the predicted pairs.
        datasets_folder, dataset_name: where the splits are.
        dataset_options: keyword arguments of the splits' `BaseDataset` (resize, positive_dist_threshold).
        seed: of the pairs' order (the passes over them).
        batch_size: pairs a global batch (every process takes its share); num_workers: data-loader processes.
        qp_mode, qp_threshold: how the query-positive pairs are made (`QueryPositivePairs`).
        optim: "adam" or "sgd"; rei_inliers: how the REI loss counts RANSAC's inliers ("minimal" or "refined").
    """

    train: TrainSettings
    model: commons.ModelConfig
    evaluation: EvalSettings
    inference: InferenceSettings
    datasets_folder: str
    dataset_name: str
    dataset_options: dict[str, Any]
    seed: int
    batch_size: int
    num_workers: int
    qp_mode: str
    qp_threshold: float
    optim: str
    rei_inliers: str


class DHEInitialisation(Task):
    """The original's `train_dhe.py` as a `Task`."""

    script = "train_dhe"
    loss_names = ("loss",)
    fixes = FIXES

    def __init__(self, settings: DHEInitSettings, device: torch.device, output_folder: Path, resume: dict | None):
        self.settings, self.device = settings.train, device
        self.task_settings = settings  # the models', data's and evaluation's values; `settings`: the loop's
        self.seed, self.batch_size, self.num_workers = settings.seed, settings.batch_size, settings.num_workers
        self.rei_inliers, self.dataset_name = settings.rei_inliers, settings.dataset_name
        world_size, self.rank = distributed.get_world_size(), distributed.get_rank()
        if self.batch_size % world_size:
            raise TrainingError(f"--batch_size {self.batch_size} must be a multiple of the {world_size} processes")
        self.local_batch_size = self.batch_size // world_size
        self._build_models(resume)
        self._build_data(resume)
        parameters = [p for p in self.head.parameters() if p.requires_grad]
        if settings.optim == "adam":
            self.optimizer = torch.optim.Adam(parameters, lr=settings.train.lr)
        else:
            self.optimizer = torch.optim.SGD(
                parameters, lr=settings.train.lr, momentum=SGD_MOMENTUM, weight_decay=SGD_WEIGHT_DECAY
            )
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, SCHEDULER_STEP, SCHEDULER_GAMMA)
        self.scaler = grad_scaler(device, settings.train.amp)
        self._permutation_cache: tuple[int, np.ndarray] | None = None

    def _build_models(self, resume: dict | None) -> None:
        """The frozen backbone and the head (DDP-wrapped), the same weights in every process."""
        model = self.task_settings.model
        from_checkpoint = ("homography_regression",) if resume is not None else ()
        self.features_extractor, head = commons.build_models(model, self.device, from_checkpoint)
        distributed.share_weights(self.features_extractor, head)  # the frozen backbone too: it is not in DDP
        self.features_extractor.eval().requires_grad_(False)
        # The frozen backbone is not in last_checkpoint.pth (it never changes): its digest is, so that a resumed run
        # refuses a --resume_fe file whose weights are not those the run trained on.
        self.features_extractor_digest = distributed.weights_digest(self.features_extractor)
        if resume is not None and resume["task"].get("features_extractor_digest") not in (
            None,
            self.features_extractor_digest,
        ):
            source = model.resume_fe or model.pretrained_cct or "random weights of --seed"
            raise TrainingError(
                f"--resume_train {model.resume_train}: the features extractor ({source}) is not the one the run was "
                "trained with (its weights differ): the file changed since, or another one has its name; continue "
                "with the original weights, or start a new run"
            )
        self.head = distributed.wrap(head, self.device)
        self.modules = {"homography_regression": self.head}

    def _build_data(self, resume: dict | None) -> None:
        """The train split's query-positive pairs (the run's, when resuming) and the test split."""
        settings = self.task_settings
        train_dataset = BaseDataset(
            settings.datasets_folder, settings.dataset_name, "train", **settings.dataset_options
        )
        logging.info(f"Train set: {train_dataset}")
        self.train_split_digest = split_digest(train_dataset)
        check_resumed_split(train_dataset, self.train_split_digest, resume)
        if resume is not None:
            pairs = resume["task"]["pairs"].numpy()
        else:  # computed once by rank 0 with the initial backbone, as the original, and shared
            pairs = None
            if distributed.is_main_process():
                pairs = QueryPositivePairs(
                    train_dataset, settings.qp_mode, settings.qp_threshold, self.features_extractor, settings.inference
                ).pairs
            pairs = distributed.broadcast_object(pairs)
        self.pairs = QueryPositivePairs(train_dataset, settings.qp_mode, settings.qp_threshold, pairs=pairs)
        self.batches_per_pass = len(self.pairs) // self.batch_size
        if self.batches_per_pass == 0:
            raise TrainingError(
                f"only {len(self.pairs)} query-positive pairs in {train_dataset.dataset_folder}, fewer than "
                f"--batch_size {self.batch_size}"
            )
        self.test_dataset = BaseDataset(
            settings.datasets_folder, settings.dataset_name, "test", **settings.dataset_options
        )
        check_split_measures(self.test_dataset, settings.dataset_options["positive_dist_threshold"], "final test")

    def _permutation(self, pass_index: int) -> np.ndarray:
        """The order of the pairs in pass `pass_index` over them: a function of --seed and the pass alone."""
        if self._permutation_cache is None or self._permutation_cache[0] != pass_index:
            generator = np.random.default_rng([self.seed, pass_index])
            self._permutation_cache = (pass_index, generator.permutation(len(self.pairs)))
        return self._permutation_cache[1]

    def epoch_indexes(self, epoch: int) -> list[int]:
        """Pair indexes of this process for `epoch`: its slice of each global batch of --batch_size pairs; global
        batch g is batch g % P of pass g // P over the shuffled pairs (P full batches a pass, the rest dropped)."""
        indexes: list[int] = []
        size, local, per_epoch = self.batch_size, self.local_batch_size, self.settings.iterations_per_epoch
        for global_batch in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            pass_index, position = divmod(global_batch, self.batches_per_pass)
            batch = self._permutation(pass_index)[position * size : (position + 1) * size]
            indexes += batch[self.rank * local : (self.rank + 1) * local].tolist()
        return indexes

    def epoch_batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        self.head.train()
        loader = DataLoader(
            Subset(self.pairs, self.epoch_indexes(epoch)),
            batch_size=self.local_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=commons.worker_init,
        )
        for query, positive in loader:
            yield query.to(self.device, non_blocking=True), positive.to(self.device, non_blocking=True)

    def losses(self, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        query, positive = batch
        loss = head_loss(self.features_extractor, self.head, query, positive, self.device, self.rei_inliers)
        return {"loss": loss}

    def end_epoch(self, epoch: int, output_folder: Path) -> dict[str, float]:
        period = self.settings.save_period
        last = epoch % period == period - 1 or epoch == self.settings.num_epochs - 1
        if last and distributed.is_main_process():
            save_state_dict(self.head, output_folder / f"homography_regression_{epoch:03d}.torch")
        return {}

    def test(self, output_folder: Path) -> dict:
        """The test split's recalls with the current head: evaluate_split's {"baseline_recalls", "reranked_recalls"}."""
        return evaluate_split(
            self.task_settings.evaluation,
            self.test_dataset,
            self.features_extractor,
            distributed.unwrap(self.head),
            self.device,
            output_folder,
        )

    def finish(self, output_folder: Path) -> dict:
        logging.info("Testing the head on the test split")
        test = self.test(output_folder)
        return {
            "baseline": test["baseline_recalls"],
            "reranked": test["reranked_recalls"],
            "split": "test",
            "dataset": self.dataset_name,
        }

    def state(self) -> dict:
        return {
            "pairs": torch.from_numpy(self.pairs.pairs),
            "features_extractor_digest": self.features_extractor_digest,
            "train_split_digest": self.train_split_digest,
        }
