"""Approximate faiss search for evaluation: an index_factory string, checked before extraction, trained on a seeded
sample of the database, with the search effort set and the cost (memory, train, add and search times) measured.

The default "Flat" is the exact `IndexFlatL2` of `retrieval.search`, with bit-identical results. Other factory
strings (e.g. "IVF4096,Flat", "HNSW32", "IVF65536_HNSW32,PQ48") trade recall for memory and speed; see
benchmarks/bench_faiss.py for how much.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

import faiss
import numpy as np

EXAMPLES = "Flat, IVF4096,Flat, HNSW32, IVF4096,PQ48, IVF65536_HNSW32,PQ48"
# faiss warns below this many training points per k-means centroid (Clustering.cpp), yet trains.
RECOMMENDED_POINTS_PER_CENTROID = 39


@dataclass(frozen=True)
class IndexSettings:
    """How to build the faiss index that searches the database's global descriptors.

    Attributes:
        factory: a faiss `index_factory` string; "Flat" is today's exact `IndexFlatL2`.
        train_size: at most this many database descriptors (a seeded random sample) train an index that needs
            training; 2**18 covers IVF4096 at 64 points a list (faiss's k-means uses at most 256 a list anyway).
        nprobe: inverted lists visited per query (indexes with an IVF part); None keeps faiss's default, 1.
        ef_search: HNSW search breadth (efSearch) of every HNSW graph in the index: the index itself ("HNSW32") or
            the IVF's coarse quantizer ("IVF65536_HNSW32,..."), which then also assigns the database vectors to
            lists; None keeps faiss's default, 16.
        seed: seeds the training sample and faiss's k-means (IVF and PQ), so that a build is reproducible.

    A PQ trains faiss's polysemous codes unless the factory says "np" ("IVF4096,PQ48np"): about 0.8 s a
    sub-quantizer on 2 cores, whatever the sample, for codes that the plain search does not use.
    """

    factory: str = "Flat"
    train_size: int = 262_144
    nprobe: int | None = None
    ef_search: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class IndexStats:
    """What an index cost: `memory_bytes` is its serialised size (its codes, lists, graph and quantizers, close to
    the RAM it holds), `num_train` the descriptors it was trained on (0 when it needs no training)."""

    factory: str
    description: str
    memory_bytes: int
    train_seconds: float
    add_seconds: float
    num_train: int


def _faiss_reason(error: Exception) -> str:
    """faiss's message without its "Error in <function> at <file>:<line>: Error: '<condition>' failed:" prefix."""
    line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    line = re.sub(r"^Error in .*? at \S+:\d+: ", "", line)
    return re.sub(r"^Error: '.*' failed: ", "", line)


def _parts(index: faiss.Index) -> list[faiss.Index]:
    """`index` and every index inside it (pre-transform, refinement, id map, HNSW storage, IVF quantizer), each
    downcast to its own class. They live as long as `index` does."""
    index = faiss.downcast_index(index)
    parts = [index]
    for name in ("index", "base_index", "refine_index", "storage", "quantizer"):
        child = getattr(index, name, None)
        if isinstance(child, faiss.Index):
            parts += _parts(child)
    return parts


def _transforms(index: faiss.Index) -> list[faiss.VectorTransform]:
    """The vector transforms (PCA, OPQ, ...) of every pre-transform in `index`, downcast."""
    return [
        faiss.downcast_VectorTransform(part.chain.at(i))
        for part in _parts(index)
        if isinstance(part, faiss.IndexPreTransform)
        for i in range(part.chain.size())
    ]


def _training_needs(index: faiss.Index) -> list[tuple[int, str]]:
    """(fewest training points faiss accepts, why) for each untrained part of `index` whose need is known.

    Measured with faiss 1.15 (it raises below these): k-means needs at least as many points as centroids, so an
    IVF at least nlist, a PQ or OPQ at least 2**nbits (256 for 8-bit codes); a PCA to d' dimensions at least d'.
    Scalar quantizers (SQ8, SQfp16) train on any number. Other parts (e.g. the additive quantizers RQ, LSQ) are
    left to faiss, whose refusal `build_index` re-raises as a ValueError.
    """
    needs = []
    for part in _parts(index):
        if part.is_trained:
            continue
        if isinstance(part, faiss.IndexIVF):
            needs.append((part.nlist, f"k-means of the IVF's {part.nlist} lists"))
        for name in ("pq", "refine_pq"):
            pq = getattr(part, name, None)
            if isinstance(pq, faiss.ProductQuantizer):
                needs.append((pq.ksub, f"k-means of PQ{pq.M}x{pq.nbits}'s {pq.ksub} centroids a sub-quantizer"))
    for transform in _transforms(index):
        if transform.is_trained:
            continue
        if isinstance(transform, faiss.OPQMatrix):
            needs.append((256, f"OPQ{transform.M}'s rotation, trained with an 8-bit PQ (256 centroids)"))
        elif isinstance(transform, faiss.PCAMatrix):
            needs.append((transform.d_out, f"PCA to {transform.d_out} dimensions"))
    return needs


def _make_index(factory: str, dim: int) -> faiss.Index:
    """The empty, untrained index of `factory` for `dim`-d descriptors; "Flat" is exactly `IndexFlatL2(dim)`."""
    if factory == "Flat":
        return faiss.IndexFlatL2(dim)
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_L2)
    except RuntimeError as error:
        raise ValueError(
            f"--faiss_index {factory!r}: faiss cannot build it for {dim}-d descriptors: {_faiss_reason(error)}; "
            f"examples: {EXAMPLES}"
        ) from None
    return index  # already of its own class; a downcast copy would not own it


def _ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    """The outermost IVF part of `index`, downcast, or None."""
    return next((part for part in _parts(index) if isinstance(part, faiss.IndexIVF)), None)


def _hnsws(index: faiss.Index) -> list[faiss.IndexHNSW]:
    """Every HNSW graph of `index`: the index itself, or the IVF's coarse quantizer."""
    return [part for part in _parts(index) if isinstance(part, faiss.IndexHNSW)]


def _check(settings: IndexSettings, index: faiss.Index, database_num: int) -> tuple[str, int]:
    """The checks of `check_index` on the empty `index`: (description, training sample size, 0 if untrained)."""
    factory = settings.factory
    if settings.train_size < 1:
        raise ValueError(f"--faiss_train_size must be at least 1, got {settings.train_size}")
    if database_num < 1:
        raise ValueError(f"--faiss_index {factory!r}: the database is empty: there is nothing to search")
    ivf, hnsws = _ivf(index), _hnsws(index)
    details = []
    if ivf is not None:
        if settings.nprobe is not None and not 1 <= settings.nprobe <= ivf.nlist:
            raise ValueError(
                f"--faiss_nprobe {settings.nprobe}: must be between 1 and the {ivf.nlist} lists of {factory!r}"
            )
        nprobe = ivf.nprobe if settings.nprobe is None else settings.nprobe
        details.append(f"nlist {ivf.nlist}, nprobe {nprobe}{' (faiss default)' if settings.nprobe is None else ''}")
    elif settings.nprobe is not None:
        raise ValueError(f"--faiss_nprobe applies to indexes with an IVF part; {factory!r} has none")
    if hnsws:
        if settings.ef_search is not None and settings.ef_search < 1:
            raise ValueError(f"--faiss_ef_search must be at least 1, got {settings.ef_search}")
        ef_search = hnsws[0].hnsw.efSearch if settings.ef_search is None else settings.ef_search
        where = "quantizer HNSW" if ivf is not None else "HNSW"  # an IVF's HNSW is its coarse quantizer
        default = " (faiss default)" if settings.ef_search is None else ""
        details.append(f"{where} M {hnsws[0].hnsw.nb_neighbors(1)}, efSearch {ef_search}{default}")
    elif settings.ef_search is not None:
        raise ValueError(f"--faiss_ef_search applies to indexes with an HNSW graph; {factory!r} has none")
    for part in _parts(index):
        pq = getattr(part, "pq", None)
        if isinstance(pq, faiss.ProductQuantizer):
            details.append(f"PQ {pq.M}x{pq.nbits} bits")
            if getattr(part, "do_polysemous_training", False):
                details.append("polysemous training (unused by the search; 'np' after PQ skips it)")
    name = "exact IndexFlatL2" if factory == "Flat" else type(index).__name__
    description = f"{factory} ({', '.join([name, *details])})"
    if index.is_trained:
        return f"{description}, no training", 0

    num_train = min(settings.train_size, database_num)
    for need, why in _training_needs(index):
        if num_train < need:
            limit = (
                f"--faiss_train_size {settings.train_size}: raise it"
                if settings.train_size < database_num
                else f"the database size ({database_num} descriptors): choose a smaller index"
            )
            raise ValueError(
                f"--faiss_index {factory!r} needs at least {need} training descriptors ({why}), but would be trained "
                f"on {num_train}, limited by {limit}"
            )
    return f"{description}, trained on {num_train} of {database_num} descriptors", num_train


def check_index(settings: IndexSettings, dim: int, database_num: int) -> str:
    """Check `settings` for `database_num` descriptors of `dim` dimensions before any descriptor exists.

    Builds the empty, untrained index (cheap: milliseconds, even for IVF65536_HNSW32,PQ48 at 384-d) and raises
    ValueError for a factory string faiss cannot build, --faiss_nprobe without an IVF part or above its nlist,
    --faiss_ef_search without an HNSW graph, --faiss_train_size < 1, an empty database, and a training sample
    min(train_size, database_num) smaller than what faiss accepts (see `_training_needs`). Warns when the sample
    gives fewer than 39 points an IVF list, below which faiss warns that its k-means may be poor.

    Returns:
        a one-line description, e.g. "IVF4096,Flat (IndexIVFFlat, nlist 4096, nprobe 16), trained on 262144 of
        1000000 descriptors".
    """
    index = _make_index(settings.factory, dim)
    description, num_train = _check(settings, index, database_num)
    ivf = _ivf(index)
    if num_train and ivf is not None and num_train < RECOMMENDED_POINTS_PER_CENTROID * ivf.nlist:
        logging.warning(
            f"--faiss_index {settings.factory!r} trains {ivf.nlist} lists on {num_train} descriptors; faiss "
            f"recommends at least {RECOMMENDED_POINTS_PER_CENTROID * ivf.nlist} ({RECOMMENDED_POINTS_PER_CENTROID} "
            "a list)"
        )
    return description


def _memory_bytes(index: faiss.Index) -> int:
    """The serialised size of `index`, counted as faiss writes it, without holding a copy."""
    total = 0

    def count(chunk: bytes) -> None:
        nonlocal total
        total += len(chunk)

    writer = faiss.PyCallbackIOWriter(count)
    faiss.write_index(index, writer)
    del writer  # flushes the last chunk
    return total


def build_index(settings: IndexSettings, database_descriptors: np.ndarray) -> tuple[faiss.Index, IndexStats]:
    """Build, train (on a seeded sample) and fill the index of `settings` with `database_descriptors` (N, D).

    "Flat" is `faiss.IndexFlatL2(D)`, exactly as `retrieval.search`. A trained index gets the sorted sample
    `default_rng(seed).choice(N, min(train_size, N), replace=False)` and faiss's k-means (IVF, PQ) seeded with
    `seed`; nprobe and efSearch are set before adding, so that an HNSW quantizer assigns the database with the
    search's effort. Raises ValueError as `check_index`, and for a training sample faiss refuses.
    """
    if database_descriptors.ndim != 2:
        raise ValueError(f"database_descriptors must be (N, D), got shape {database_descriptors.shape}")
    database_descriptors = np.ascontiguousarray(database_descriptors, dtype=np.float32)
    database_num, dim = database_descriptors.shape
    index = _make_index(settings.factory, dim)
    description, num_train = _check(settings, index, database_num)

    for part in _parts(index):
        if isinstance(part, faiss.IndexIVF):
            part.cp.seed = settings.seed
        for name in ("pq", "refine_pq"):
            pq = getattr(part, name, None)
            if isinstance(pq, faiss.ProductQuantizer):
                pq.cp.seed = settings.seed
    start = time.perf_counter()
    if num_train:
        sample = database_descriptors
        if num_train < database_num:
            rng = np.random.default_rng(settings.seed)
            sample = database_descriptors[np.sort(rng.choice(database_num, size=num_train, replace=False))]
        try:
            index.train(sample)
        except RuntimeError as error:
            raise ValueError(
                f"--faiss_index {settings.factory!r}: faiss cannot train it on {num_train} descriptors: "
                f"{_faiss_reason(error)}; raise --faiss_train_size or choose a smaller index"
            ) from None
    train_seconds = time.perf_counter() - start

    if settings.nprobe is not None:
        _ivf(index).nprobe = settings.nprobe
    if settings.ef_search is not None:
        for hnsw_index in _hnsws(index):
            hnsw_index.hnsw.efSearch = settings.ef_search
    start = time.perf_counter()
    index.add(database_descriptors)
    add_seconds = time.perf_counter() - start
    stats = IndexStats(settings.factory, description, _memory_bytes(index), train_seconds, add_seconds, num_train)
    return index, stats


def search_index(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """kNN of `queries` (Q, D) in `index`: (distances (Q, k'), predictions (Q, k'), seconds), k' = min(k, ntotal).

    As `retrieval.search`, asking for more than the index holds warns and asks for all. An approximate index may
    still find fewer than k' (faiss pads with -1, e.g. an IVF with a small nprobe): that raises ValueError.
    """
    if k > index.ntotal:
        logging.warning(
            f"Asked for {k} predictions, but the database has only {index.ntotal} images: using {index.ntotal}"
        )
        k = index.ntotal
    start = time.perf_counter()
    distances, predictions = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    seconds = time.perf_counter() - start
    short = int((predictions < 0).any(axis=1).sum())
    if short:
        raise ValueError(
            f"The faiss index found fewer than {k} candidates for {short} of {len(predictions)} queries: raise "
            f"--faiss_nprobe (IVF) or --faiss_ef_search (HNSW), or ask for fewer predictions"
        )
    return distances, predictions, seconds


def index_log_line(stats: IndexStats, search_seconds: float) -> str:
    """ "faiss index IVF4096,Flat: 1536.0 MB, trained in 3.2 s on 262144 descriptors, added in 1.0 s, searched in
    0.4 s" style."""
    trained = f"trained in {stats.train_seconds:.1f} s on {stats.num_train} descriptors" if stats.num_train else ""
    return (
        f"faiss index {stats.factory}: {stats.memory_bytes / 2**20:.1f} MB, {trained or 'no training'}, "
        f"added in {stats.add_seconds:.1f} s, searched in {search_seconds:.1f} s"
    )
