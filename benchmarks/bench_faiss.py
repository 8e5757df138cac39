"""What approximate faiss indexes (--faiss_index) cost and how much of the exact search they find, on synthetic
GeM-like descriptors.

    python -m benchmarks.bench_faiss                                  # 1,000,000 x 384, 1000 queries
    python -m benchmarks.bench_faiss --num 100000 --queries 200       # a quick check (under a minute, 2 cores)
    python -m benchmarks.bench_faiss --num 10000000 --indexes IVF16384,Flat IVF16384,PQ48np

The database is `--centres` Gaussian clusters of L2-normalised `--dim`-d points (float32, generated in chunks), 50
a cluster by default, so that the exact top-32 of a query lies mostly in its cluster: beyond it, points in 384-d
are all about equally far, and which of them an index returns is a coin toss that overlap@32 would count. Each
query is a database point moved by noise and normalised again, so it has a true neighbour nearby. The exact top-32
(faiss.knn, which holds no copy of the database) is the reference; each index is built with
evaluation.index.build_index (trained on a seeded sample of --train_size) and searched with search_index at each
search effort: IVF indexes at each --nprobe, HNSW at each --ef_search (an IVF's HNSW quantizer at the largest).
Per row: the index's serialised size, train, add and search seconds, overlap@32 (mean fraction of the exact
top-32 in the index's top-32) and top-1 (fraction of queries whose exact nearest neighbour comes first).

Memory: the database takes N x dim x 4 bytes (1.5 GB at 1M x 384, 15 GB at 10M), and Flat, IVF-Flat and
HNSW-Flat hold a second copy each, one index at a time. On 2 cores, HNSW32's graph takes hours at 10M: choose
--indexes there. "np" after PQ skips faiss's polysemous training (about 0.8 s a sub-quantizer, unused by the
search).
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import faiss
import numpy as np

from benchmarks.machine import cpu_name
from evaluation.index import IndexSettings, build_index, search_index

K = 32


def synthetic_descriptors(
    num: int, num_queries: int, dim: int, num_centres: int, seed: int, chunk: int = 100_000
) -> tuple[np.ndarray, np.ndarray]:
    """(database (num, dim), queries (num_queries, dim)), float32, L2-normalised rows.

    Database points lie around `num_centres` random unit centres (per-dimension noise 0.6 / sqrt(dim), about 0.6
    from their centre against ~1.4 between centres); queries are database points moved by noise of norm ~0.25.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_centres, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    database = np.empty((num, dim), dtype=np.float32)
    for start in range(0, num, chunk):
        rows = database[start : start + chunk]
        rows[:] = centres[rng.integers(0, num_centres, len(rows))]
        rows += rng.standard_normal(rows.shape, dtype=np.float32) * np.float32(0.6 / math.sqrt(dim))
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    queries = database[rng.integers(0, num, num_queries)]
    queries += rng.standard_normal(queries.shape, dtype=np.float32) * np.float32(0.25 / math.sqrt(dim))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return database, queries


def overlap(predictions: np.ndarray, reference: np.ndarray) -> float:
    """Mean fraction of each row of `reference` (Q, k) found in the same row of `predictions` (Q, k)."""
    return float((predictions[:, :, None] == reference[:, None, :]).any(axis=1).mean())


def search_efforts(factory: str, dim: int, nprobes: list[int], ef_searches: list[int]) -> list[dict[str, int]]:
    """The search parameters (faiss.ParameterSpace names) to measure `factory` at: its nprobes when it has an IVF,
    else its efSearches when it has an HNSW graph, else none."""
    if faiss.try_extract_index_ivf(faiss.index_factory(dim, factory)) is not None:
        return [{"nprobe": nprobe} for nprobe in nprobes]
    if "HNSW" in factory:
        return [{"efSearch": ef_search} for ef_search in ef_searches]
    return [{}]


def main(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    print(f"CPU: {cpu_name()}; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    database, queries = synthetic_descriptors(args.num, args.queries, args.dim, args.centres, args.seed)
    print(
        f"{args.num} x {args.dim} database descriptors around {args.centres} centres, {args.queries} queries "
        f"(generated in {time.perf_counter() - started:.1f} s); k = {K}, --train_size {args.train_size}"
    )
    start = time.perf_counter()
    _, reference = faiss.knn(queries, database, K)
    print(f"exact reference top-{K} (faiss.knn): {time.perf_counter() - start:.1f} s\n", flush=True)

    print("| index | search | memory MB | train s | add s | search s | ms/query | overlap@32 | top-1 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for factory in args.indexes:
        efforts = search_efforts(factory, args.dim, args.nprobe, args.ef_search)
        ef_search = max(args.ef_search) if "HNSW" in factory else None  # an HNSW quantizer's, while adding too
        settings = IndexSettings(factory, args.train_size, efforts[0].get("nprobe"), ef_search, args.seed)
        index, stats = build_index(settings, database)
        for effort in efforts:
            for name, value in effort.items():
                faiss.ParameterSpace().set_index_parameter(index, name, value)
            _, predictions, seconds = search_index(index, queries, K)
            search = ", ".join(f"{name} {value}" for name, value in effort.items()) or "exact"
            print(
                f"| {factory} | {search} | {stats.memory_bytes / 2**20:.1f} | {stats.train_seconds:.1f} | "
                f"{stats.add_seconds:.1f} | {seconds:.2f} | {seconds / len(queries) * 1e3:.2f} | "
                f"{overlap(predictions, reference):.3f} | {(predictions[:, 0] == reference[:, 0]).mean():.3f} |",
                flush=True,
            )
        del index
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {peak_mb:.0f} MB; total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=1_000_000, help="database descriptors")
    parser.add_argument("--queries", type=int, default=1000, help="query descriptors")
    parser.add_argument("--dim", type=int, default=384, help="descriptor dimension (GeM over CCT-14: 384)")
    parser.add_argument(
        "--centres", type=int, default=None, help="Gaussian clusters of the database (default: num / 50, 20000 at 1M)"
    )
    parser.add_argument(
        "--indexes",
        nargs="+",
        default=None,
        help="faiss index_factory strings (default: Flat, IVF{n},Flat, HNSW32, IVF{n},PQ{dim/8}np, n the power "
        "of two nearest 4 sqrt(num))",
    )
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 64], help="IVF lists visited per query")
    parser.add_argument("--ef_search", type=int, nargs="+", default=[64, 128], help="HNSW efSearch values")
    parser.add_argument("--train_size", type=int, default=IndexSettings.train_size, help="--faiss_train_size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the descriptors and of the training")
    args = parser.parse_args()
    if args.centres is None:
        args.centres = max(1, args.num // 50)
    if min(args.num, args.queries, args.dim, args.centres, args.train_size, *args.nprobe, *args.ef_search) < 1:
        parser.error("--num, --queries, --dim, --centres, --train_size, --nprobe and --ef_search must be positive")
    if args.num < K:
        parser.error(f"--num must be at least {K}")
    if args.indexes is None:
        nlist = 2 ** round(math.log2(4 * math.sqrt(args.num)))
        args.indexes = ["Flat", f"IVF{nlist},Flat", "HNSW32"]
        if args.dim % 8 == 0:
            args.indexes.append(f"IVF{nlist},PQ{args.dim // 8}np")
    main(args)
