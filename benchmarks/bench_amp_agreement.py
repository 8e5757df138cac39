"""Does `--amp` change the re-ranking? Top-1 after re-ranking in fp32 vs amp on the synthetic test split.

    python -m benchmarks.bench_amp_agreement [--datasets_folder datasets_vg/datasets --dataset_name synthetic]

The world is generated first if missing (synthetic.py defaults). Models: the features extractor and DHE head with
seeded random weights, the head's output bias spread over the image corners (so that it predicts well-posed
homographies, as a trained head does). The global stage is computed once; the top `--num_reranked_preds` of every
query are re-ranked twice, in fp32 and with the head under bf16 autocast, through
`evaluation.reranking.rerank_predictions` as `eval.py` runs it. Prints the share of queries whose top-1 is the
same, the mean score change and both timings.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import commons
import util
from datasets_ws import BaseDataset
from evaluation.local_features import LocalFeatureStore
from evaluation.reranking import rerank_predictions
from evaluation.retrieval import search
from model import FeaturesExtractor, HomographyRegression
from model.dhe import init_spread_corners_
from tools.synthetic.world import generate_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets_folder", default="datasets_vg/datasets", help="Where the synthetic world is.")
    parser.add_argument("--dataset_name", default="synthetic", help="World folder name (generated if missing).")
    parser.add_argument("--resize", type=int, nargs=2, default=[384, 384], help="H W.")
    parser.add_argument("--num_reranked_preds", type=int, default=32, help="Candidates re-ranked per query.")
    parser.add_argument("--max_queries", type=int, default=None, help="Only the first N test queries.")
    parser.add_argument("--infer_batch_size", type=int, default=32, help="Pairs per pass of the head.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    parser.add_argument("--device", default="cpu", choices=["auto", "cuda", "cpu"], help="Where to run (default cpu).")
    args = parser.parse_args()
    world = Path(args.datasets_folder) / args.dataset_name
    if not world.exists():
        generate_world(args.datasets_folder, args.dataset_name)
    resize = tuple(args.resize)
    dataset = BaseDataset(args.datasets_folder, args.dataset_name, "test", resize=resize)
    device = commons.resolve_device(args.device)

    torch.manual_seed(args.seed)
    features_extractor = FeaturesExtractor(resize=resize).eval().to(device)
    # drawn after the features extractor's weights
    head = init_spread_corners_(HomographyRegression(resize=resize).eval()).to(device)

    num_queries = dataset.queries_num if args.max_queries is None else min(args.max_queries, dataset.queries_num)
    query_indexes = list(range(dataset.database_num, dataset.database_num + num_queries))
    with tempfile.TemporaryDirectory() as temporary:
        store = LocalFeatureStore(
            Path(temporary) / "local.f16", len(dataset.images_paths), (384, *features_extractor.grid_size)
        )
        images = dataset.hard_resized_images(list(range(dataset.database_num)) + query_indexes)
        descriptors = util.extract_features(features_extractor, images, device, args.infer_batch_size, 0, store)
        _, predictions = search(descriptors[: dataset.database_num], descriptors[dataset.database_num :], 32)
        results = {}
        for amp in (False, True):
            start = time.perf_counter()
            results[amp] = rerank_predictions(
                head, store, query_indexes, predictions, args.num_reranked_preds, args.infer_batch_size, device, amp
            )
            elapsed = time.perf_counter() - start
            pairs = num_queries * min(args.num_reranked_preds, predictions.shape[1])
            print(f"{'amp' if amp else 'fp32':>10}: {elapsed:6.1f} s, {pairs / elapsed:5.2f} pairs/s", flush=True)
        store.close()
    (fp32_predictions, fp32_scores), (amp_predictions, amp_scores) = results[False], results[True]
    same_top1 = np.mean(fp32_predictions[:, 0] == amp_predictions[:, 0])
    print(f"{dataset} at {resize}, {device.type}: {num_queries} queries x {args.num_reranked_preds} candidates")
    print(f"top-1 after re-ranking identical in fp32 and amp: {same_top1:.1%} of queries (target >= 98%)")
    print(f"mean |score change| of the top candidates: {np.abs(np.sort(fp32_scores) - np.sort(amp_scores)).mean():.2f}")


if __name__ == "__main__":
    main()
