"""The joint fine-tuning (`finetune.py`): a metric loss on global descriptors + REI on the head, backbone and head
trained together.

As the original: an epoch is queries_per_epoch / cache_refresh_rate loops; each loop mines one triplet for each of
`--cache_refresh_rate` queries (model in eval mode), then trains over them in order, `--train_batch_size` triplets a
batch, whole model in train mode; loss = triplet (sum / (batch x negatives)) + `--rei_weight` x REI (sum / batch);
after each epoch `features_extractor_{e:03d}.torch` and `homography_regression_{e:03d}.torch`, then validation
(re-ranked from `--rerank_val_from_epoch`). New: the best model by val R@5, `--criterion sare_ind|sare_joint`,
opt-in `--patience`.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

import commons
import distributed
from datasets_ws import (
    BaseDataset,
    InferenceSettings,
    MiningSettings,
    QueryAugmentation,
    TripletsDataset,
    collate_fn,
)
from evaluation import pictures
from evaluation.pipeline import EvalSettings, evaluate_split
from model.checkpoints import save_state_dict
from model.files import replaced_atomically
from model.matching import rei_loss
from model.rerank import predict_homographies
from training.dhe_init import SGD_MOMENTUM, SGD_WEIGHT_DECAY, dlt_weights
from training.resume import check_resumed_split, split_digest
from training.task import Task, TrainingError, TrainSettings, check_split_measures, grad_scaler

BEST_FILES = ("best_features_extractor.torch", "best_homography_regression.torch")
FIXES = (
    "--criterion sare_ind and sare_joint work, as the geo-localization benchmark defines them (the original crashed)",
    "the best model by validation R@5 is kept (best_*.torch); --patience stops early only when given (the original "
    "never stopped)",
    "--device and DistributedDataParallel under torchrun instead of .cuda() and DataParallel",
    "metrics.csv, last_checkpoint.pth, results.json and training_curves.png are written",
)


def sare_loss(query: Tensor, positive: Tensor, negatives: Tensor) -> Tensor:
    """SARE of one query: -log softmax of the negated squared distances, taken at the positive.

    Args:
        query: (D,); positive: (D,); negatives: (N, D) (N = 1 for sare_ind, all of the query's for sare_joint).
    Returns:
        () the loss.
    """
    distances = torch.cat([((query - positive) ** 2).sum().view(1), ((query - negatives) ** 2).sum(dim=1)])
    return -F.log_softmax(-distances, dim=0)[0]


def metric_loss(criterion: str, descriptors: Tensor, triplets: Tensor, margin: float, negatives_num: int) -> Tensor:
    """Sum of the metric loss over the batch, as the benchmark (the caller divides by batch x negatives).

    Args:
        descriptors: (B * (2 + N), D) global descriptors of the batch's images.
        triplets: (B * N, 3) rows (query, positive, negative) indexing `descriptors`, each query's N rows together.
    """
    query, positive, negative = (descriptors[triplets[:, i]] for i in range(3))
    if criterion == "triplet":
        return F.triplet_margin_loss(query, positive, negative, margin=margin, p=2, reduction="sum")
    if criterion == "sare_ind":
        return sum(sare_loss(q, p, n.unsqueeze(0)) for q, p, n in zip(query, positive, negative))
    if criterion == "sare_joint":
        grouped = triplets.view(-1, negatives_num, 3)
        return sum(
            sare_loss(descriptors[rows[0, 0]], descriptors[rows[0, 1]], descriptors[rows[:, 2]]) for rows in grouped
        )
    raise ValueError(f"unknown criterion {criterion!r}")


def joint_losses(
    features_extractor: nn.Module,
    head: nn.Module,
    images: Tensor,
    triplets: Tensor,
    negatives_num: int,
    *,
    criterion: str,
    margin: float,
    rei_weight: float,
    rei_inliers: str,
) -> dict[str, Tensor]:
    """Losses of a batch of B (query, positive, N negatives) groups, as the original.

    Args:
        images: (B * (2 + N), 3, H, W), each group's query first, then its positive.
        triplets: (B * N, 3) rows (query, positive, negative) indexing `images`.
        negatives_num: N.
        criterion, margin: the metric loss (`metric_loss`); rei_weight: the REI term's weight in "loss";
        rei_inliers: how RANSAC's inliers are counted (`rei_loss`).
    Returns:
        {"loss": triplet + rei_weight * rei, "triplet_loss": metric loss sum / (B * N), "rei_loss": REI sum / B},
        scalars. The models run in the caller's autocast state; correlation, DLT, matching and RANSAC in float32.
    """
    device = images.device
    items = images.shape[0] // (2 + negatives_num)
    descriptors, local_features = features_extractor(images)
    metric = metric_loss(criterion, descriptors.float(), triplets, margin, negatives_num)
    metric = metric / (items * negatives_num)
    starts = torch.arange(items, device=device) * (2 + negatives_num)
    local_query, local_positive = local_features[starts].float(), local_features[starts + 1].float()
    H = predict_homographies(head, local_query, local_positive, dlt_weights=dlt_weights(items, device))
    with torch.autocast(device.type, enabled=False):
        rei = rei_loss(local_query, local_positive, H, inliers=rei_inliers).sum() / items
    return {"loss": metric + rei_weight * rei, "triplet_loss": metric, "rei_loss": rei}


@dataclass(frozen=True)
class FinetuneSettings:
    """What `Finetuning` is built from (`parser.finetune_settings(args, device)`).

    Attributes:
        train: the loop's values (epochs, iterations, lr, amp, patience, ...).
        model: the backbone and the head to build.
        evaluation: the validation's settings.
        inference: how the backbone computes the descriptors of the mining.
        mining: the triplets' mining (`mining.cache_refresh_rate` queries a loop); augmentation: of the queries.
        datasets_folder, dataset_name: where the splits are.
        dataset_options: keyword arguments of the splits' datasets (resize, positive_dist_threshold).
        seed: of the horizontal flips; batch_size: triplets a global batch (every process takes its share);
        num_workers: data-loader processes; horizontal_flip: flip half of the batches.
        queries_per_epoch: queries mined in an epoch (`mining.cache_refresh_rate` a loop).
        criterion, margin, rei_weight, rei_inliers: the losses (`joint_losses`).
        optim: "adam" or "sgd"; rerank_val_from_epoch: the first epoch whose validation re-ranks.
    """

    train: TrainSettings
    model: commons.ModelConfig
    evaluation: EvalSettings
    inference: InferenceSettings
    mining: MiningSettings
    augmentation: QueryAugmentation
    datasets_folder: str
    dataset_name: str
    dataset_options: dict[str, Any]
    seed: int
    batch_size: int
    num_workers: int
    horizontal_flip: bool
    queries_per_epoch: int
    criterion: str
    margin: float
    rei_weight: float
    rei_inliers: str
    optim: str
    rerank_val_from_epoch: int


class Finetuning(Task):
    """The original's `finetune.py` as a `Task`."""

    script = "finetune"
    loss_names = ("loss", "triplet_loss", "rei_loss")
    fixes = FIXES

    def __init__(self, settings: FinetuneSettings, device: torch.device, output_folder: Path, resume: dict | None):
        self.settings, self.device = settings.train, device
        self.task_settings = settings  # the models', data's and evaluation's values; `settings`: the loop's
        self.batch_size, self.num_workers = settings.batch_size, settings.num_workers
        self.horizontal_flip, self.recall_values = settings.horizontal_flip, settings.train.recall_values
        self.loss_options = {
            "criterion": settings.criterion,
            "margin": settings.margin,
            "rei_weight": settings.rei_weight,
            "rei_inliers": settings.rei_inliers,
        }
        self.rerank_val_from_epoch, self.dataset_name = settings.rerank_val_from_epoch, settings.dataset_name
        cache_refresh_rate = settings.mining.cache_refresh_rate
        world_size, self.rank = distributed.get_world_size(), distributed.get_rank()
        if self.batch_size % world_size:
            raise TrainingError(
                f"--train_batch_size {self.batch_size} must be a multiple of the {world_size} processes"
            )
        if cache_refresh_rate < self.batch_size:
            raise TrainingError(
                f"--cache_refresh_rate {cache_refresh_rate} is less than --train_batch_size "
                f"{self.batch_size}: a loop would have no batch"
            )
        self.local_batch_size = self.batch_size // world_size
        self._build_models(resume)
        self._build_data(resume)
        self.flip_generator = torch.Generator().manual_seed(settings.seed)  # one draw per global batch, on every rank

        parameters = [p for m in (self.features_extractor, self.head) for p in m.parameters() if p.requires_grad]
        if settings.optim == "adam":
            self.optimizer = torch.optim.Adam(parameters, lr=settings.train.lr)
        else:
            self.optimizer = torch.optim.SGD(
                parameters, lr=settings.train.lr, momentum=SGD_MOMENTUM, weight_decay=SGD_WEIGHT_DECAY
            )
        self.scaler = grad_scaler(device, settings.train.amp)
        self.loops_per_epoch = settings.queries_per_epoch // cache_refresh_rate
        self.batches_per_loop = cache_refresh_rate // self.batch_size
        self.selection_key = f"val_R@{5 if 5 in self.recall_values else self.recall_values[0]}"
        self.last_validation: dict = {}
        self.validation_results: dict | None = None  # the last evaluate_split's, for validation_picture
        if resume is not None and distributed.is_main_process():
            self._carry_best_model(Path(settings.model.resume_train).parent, output_folder, resume)

    def _build_models(self, resume: dict | None) -> None:
        """The backbone and the head (DDP-wrapped), the same weights in every process."""
        from_checkpoint = ("features_extractor", "homography_regression") if resume is not None else ()
        features_extractor, head = commons.build_models(self.task_settings.model, self.device, from_checkpoint)
        distributed.share_weights(features_extractor, head)  # rank 0's weights everywhere, frozen blocks included
        self.features_extractor = distributed.wrap(features_extractor, self.device)
        self.head = distributed.wrap(head, self.device)
        self.modules = {"features_extractor": self.features_extractor, "homography_regression": self.head}

    def _build_data(self, resume: dict | None) -> None:
        """The train split's triplets and the validation split."""
        settings = self.task_settings
        self.dataset = TripletsDataset(
            settings.datasets_folder,
            settings.dataset_name,
            "train",
            **settings.dataset_options,
            mining=settings.mining,
            augmentation=settings.augmentation,
        )
        logging.info(f"Train set: {self.dataset}")
        self.train_split_digest = split_digest(self.dataset)
        check_resumed_split(self.dataset, self.train_split_digest, resume)
        self.val_dataset = BaseDataset(
            settings.datasets_folder, settings.dataset_name, "val", **settings.dataset_options
        )
        check_split_measures(
            self.val_dataset,
            settings.dataset_options["positive_dist_threshold"],
            "validation, which chooses the best model" + (" and stops early" if settings.train.patience else ""),
        )

    def _carry_best_model(self, previous: Path, output_folder: Path, resume: dict) -> None:
        """Copy the run's best model so far (best_*.torch, in the folder of the resumed checkpoint) to this run's
        folder, so that the folder of a resumed run holds the best model of the whole run; say so, or that it is
        missing."""
        if resume["best"] is None:
            return
        epochs = [row["epoch"] for row in resume["metrics"] if row.get(self.selection_key) == resume["best"]]
        what = f"{self.selection_key} {resume['best']:.2f} at epoch {epochs[0] if epochs else '?'}"
        missing = [name for name in BEST_FILES if not (previous / name).is_file()]
        if missing:
            logging.warning(
                f"WARNING: the best model of the run so far ({what}) was saved in {previous}, which no longer holds "
                f"{', '.join(missing)}: this run writes best_*.torch only when validation beats it"
            )
            return
        for name in BEST_FILES:
            with replaced_atomically(output_folder / name) as temporary:
                shutil.copyfile(previous / name, temporary)
        logging.info(f"The best model of the run so far ({what}) is copied from {previous} to {output_folder}")

    def _mine(self) -> None:
        """Rank 0 mines the next `--cache_refresh_rate` triplets; every rank gets them."""
        triplets = None
        if distributed.is_main_process():
            self.dataset.compute_triplets(distributed.unwrap(self.features_extractor), self.task_settings.inference)
            triplets = self.dataset.triplets_global_indexes
        self.dataset.triplets_global_indexes = distributed.broadcast_object(triplets)

    def epoch_batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        size, local = self.batch_size, self.local_batch_size
        for loop in range(self.loops_per_epoch):
            logging.debug(f"epoch {epoch}, loop {loop + 1}/{self.loops_per_epoch}: mining")
            self._mine()
            self.features_extractor.train()
            self.head.train()
            indexes = [
                batch * size + self.rank * local + i for batch in range(self.batches_per_loop) for i in range(local)
            ]
            loader = DataLoader(
                Subset(self.dataset, indexes),
                batch_size=local,
                shuffle=False,
                num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda",
                worker_init_fn=commons.worker_init,
                collate_fn=collate_fn,
            )
            for images, triplets, _ in loader:
                if self.horizontal_flip and torch.rand((), generator=self.flip_generator) < 0.5:
                    images = images.flip(-1)  # the whole batch, as the original
                yield images.to(self.device, non_blocking=True), triplets.to(self.device)

    def losses(self, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        images, triplets = batch
        return joint_losses(
            self.features_extractor,
            self.head,
            images,
            triplets,
            self.dataset.negs_num_per_query,
            **self.loss_options,
        )

    def validate(self, output_folder: Path, rerank: bool) -> dict:
        """The validation split's recalls with the current models, re-ranked when `rerank`: evaluate_split's
        {"baseline_recalls", "reranked_recalls"}."""
        return evaluate_split(
            self.task_settings.evaluation,
            self.val_dataset,
            distributed.unwrap(self.features_extractor),
            distributed.unwrap(self.head),
            self.device,
            output_folder,
            rerank=rerank,
        )

    def end_epoch(self, epoch: int, output_folder: Path) -> dict[str, float]:
        if distributed.is_main_process():
            save_state_dict(self.features_extractor, output_folder / f"features_extractor_{epoch:03d}.torch")
            save_state_dict(self.head, output_folder / f"homography_regression_{epoch:03d}.torch")
        rerank = epoch >= self.rerank_val_from_epoch
        result = self.validate(output_folder, rerank)
        self.validation_results = result
        metrics = {f"val_R@{n}": float(v) for n, v in zip(self.recall_values, result["baseline_recalls"])}
        if rerank:
            metrics |= {f"val_reranked_R@{n}": float(v) for n, v in zip(self.recall_values, result["reranked_recalls"])}
        self.last_validation = {
            "baseline": result["baseline_recalls"],
            "reranked": result["reranked_recalls"],
            "epoch": epoch,
        }
        return metrics

    def validation_picture(self) -> Image.Image | None:
        if self.validation_results is None:
            return None
        return pictures.validation_picture(
            self.val_dataset,
            self.validation_results,
            distributed.unwrap(self.features_extractor),
            distributed.unwrap(self.head),
            self.device,
        )

    def save_best(self, output_folder: Path) -> None:
        save_state_dict(self.features_extractor, output_folder / BEST_FILES[0])
        save_state_dict(self.head, output_folder / BEST_FILES[1])

    def finish(self, output_folder: Path) -> dict:
        validation = self.last_validation or {"baseline": None, "reranked": None, "epoch": None}
        return {
            "baseline": validation["baseline"],
            "reranked": validation["reranked"],
            "split": "val",
            "epoch": validation["epoch"],
            "dataset": self.dataset_name,
        }

    def state(self) -> dict:
        state = {
            "mining_rng": self.dataset.rng.bit_generator.state,
            "flip_generator": self.flip_generator.get_state(),
            "train_split_digest": self.train_split_digest,
            "last_validation": {
                k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.last_validation.items()
            },
        }
        if self.dataset.mining == "full":
            state["neg_cache"] = [torch.from_numpy(cache) for cache in self.dataset.neg_cache]
        return state

    def load_state(self, state: dict) -> None:
        self.dataset.rng.bit_generator.state = state["mining_rng"]
        self.flip_generator.set_state(state["flip_generator"])
        self.last_validation = dict(state["last_validation"])
        if "neg_cache" in state:
            self.dataset.neg_cache = [cache.numpy() for cache in state["neg_cache"]]
