"""The Faiss index over the DB chunk embeddings: choose, train, populate, search settings.

The index is described by a Faiss factory string (``index.factory``) over inner product (the
embeddings are L2-normalised, so this is cosine similarity). ``auto`` sizes the index to the
database, following the rules the reference's strings obey at their scale:

- IVF with ``nlist`` lists: k-means wants at least 39 training points per list, and Faiss's
  guideline is ``nlist`` about ``4 * sqrt(n)``; ``nlist`` is the largest power of two under both.
- under 16,384 chunks, or fewer than 32 lists possible: ``Flat`` (exact search, nothing to
  train; at these sizes it is faster than training and probing an IVF, see bench/index.py);
- up to 500k chunks: ``IVF{nlist},Flat`` (exact distances inside the probed lists);
- up to 20M chunks: ``IVF{nlist}_HNSW32,SQ8`` (8-bit codes, 4x smaller);
- beyond: ``OPQ32_64,IVF{nlist}_HNSW32,PQ32`` (the reference's Wikipedia layout, 32 codes that
  divide the 64-d rotation).

Explicit strings are checked before training: one that Faiss cannot parse, whose codes do not
divide the dimension, or that needs more training points than the database has fails with a
``PipelineError`` that says what would work instead of a Faiss assertion.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

import faiss
import h5py
import numpy as np

from .errors import PipelineError
from .io import atomic_path
from .progress import progress

POINTS_PER_LIST = 39  # k-means wants >= 39 training points per centroid
MIN_LISTS = 32
FLAT_BELOW = 16384  # chunks; below this exact search is cheaper than training an IVF (bench/index.py)


def ivf_lists(n_db: int, n_train: int) -> int:
    """IVF list count for ``n_db`` chunks: a power of two <= 4*sqrt(n_db) and <= n_train/39."""
    limit = min(4 * math.sqrt(max(n_db, 1)), n_train / POINTS_PER_LIST)
    return 2 ** int(math.floor(math.log2(limit))) if limit >= 1 else 0


def auto_factory(n_db: int, dim: int, n_train: int) -> str:
    """The factory string ``auto`` picks for ``n_db`` chunks of dimension ``dim``."""
    nlist = ivf_lists(n_db, n_train)
    if n_db < FLAT_BELOW or nlist < MIN_LISTS:
        return "Flat"
    if n_db <= 500_000:
        return f"IVF{nlist},Flat"
    if n_db <= 20_000_000 or dim < 64:
        return f"IVF{nlist}_HNSW32,SQ8"
    return f"OPQ32_64,IVF{nlist}_HNSW32,PQ32"


def _reason(exc: Exception) -> str:
    """The human part of a Faiss exception (drop the C++ signature and location)."""
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    located = re.search(r" at \S+:\d+: (.*)$", text)
    if located:
        text = located.group(1)
    for marker in ("failed: ", "Error: "):
        if marker in text:
            text = text.split(marker, 1)[1]
    return text.strip()


def _inner(index):
    """The innermost index behind pre-transforms and id maps."""
    index = faiss.downcast_index(index)
    while True:
        if isinstance(index, faiss.IndexPreTransform):
            index = faiss.downcast_index(index.index)
        elif isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            index = faiss.downcast_index(index.index)
        else:
            return index


def training_points_needed(index) -> tuple[int, str]:
    """Minimum training points for an untrained index and the component that sets it."""
    need, why = 0, "nothing to train"
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        need, why = POINTS_PER_LIST * ivf.nlist, f"IVF with {ivf.nlist} lists needs {POINTS_PER_LIST} points per list"
    inner = _inner(index)
    pq = getattr(inner, "pq", None)
    if pq is not None and pq.ksub > need:
        need, why = pq.ksub, f"PQ with {pq.nbits}-bit codes needs {pq.ksub} points"
    return need, why


def make_index(factory: str, dim: int, n_db: int, n_train: int):
    """Build the untrained index for ``factory`` ('auto' resolved); return (index, factory string)."""
    string = auto_factory(n_db, dim, n_train) if factory == "auto" else factory
    fix = (f"use 'auto' (here: '{auto_factory(n_db, dim, n_train)}'), 'Flat', or 'IVF<nlist>,Flat' "
           f"with {POINTS_PER_LIST}*nlist <= {n_train} training points")
    try:
        index = faiss.index_factory(dim, string, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise PipelineError(f"params.yaml: index.factory '{string}' cannot be built for {dim}-d embeddings "
                            f"({_reason(exc)}); {fix}") from None
    need, why = training_points_needed(index)
    if not index.is_trained and n_train < need:
        raise PipelineError(f"params.yaml: index.factory '{string}' cannot be trained on {n_train} points "
                            f"({why}, {need} in all); {fix}")
    return index, string


def sample_training_points(embeddings_h5: str | os.PathLike, train_points: int, seed: int) -> np.ndarray:
    """A seeded random sample of ``train_points`` DB embeddings (all of them when fewer)."""
    with h5py.File(embeddings_h5, "r") as f:
        ds = f["embeddings"]
        n = ds.shape[0]
        if train_points >= n:
            return ds[:]
        rows = np.sort(np.random.default_rng(seed).choice(n, size=train_points, replace=False))
        return ds[rows]


def _gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def train_index(embeddings_h5: str | os.PathLike, factory: str, train_points: int, seed: int):
    """Build and train the index the params describe; return (empty trained index, metrics)."""
    path = Path(embeddings_h5)
    if not path.is_file():
        raise PipelineError(f"{path}: embeddings file not found; run the embed stage")
    with h5py.File(path, "r") as f:
        n_db, dim = f["embeddings"].shape
    if train_points <= 0:
        raise PipelineError(f"params.yaml: param 'index.train_points' must be > 0, got {train_points}")
    n_train = min(train_points, n_db)
    index, string = make_index(factory, dim, n_db, n_train)
    for part in (faiss.try_extract_index_ivf(index), _inner(index)):
        if part is not None and hasattr(part, "cp"):
            part.cp.seed = seed  # k-means seed
        if part is not None and hasattr(part, "pq"):
            part.pq.cp.seed = seed
    t0 = time.perf_counter()
    device = "none"
    if not index.is_trained:
        x = sample_training_points(path, n_train, seed)
        device = "cpu"
        try:
            if _gpu_count() > 0:
                res = faiss.StandardGpuResources()
                gpu = faiss.index_cpu_to_gpu(res, 0, index)
                gpu.train(x)
                index = faiss.index_gpu_to_cpu(gpu)
                device = "gpu"
            else:
                index.train(x)
        except RuntimeError as exc:
            if device == "gpu" or _gpu_count() > 0:  # not every index trains on GPU: fall back
                index, _ = make_index(string, dim, n_db, n_train)
                index.train(x)
                device = "cpu"
            else:
                raise PipelineError(f"params.yaml: index.factory '{string}': training failed ({_reason(exc)})") from None
    metrics = {
        "factory": string,
        "factory_param": factory,
        "db_chunks": int(n_db),
        "training_points": int(n_train) if device != "none" else 0,
        "train_seconds": round(time.perf_counter() - t0, 3),
        "train_device": device,
    }
    return index, metrics


def write_index(index, path: str | os.PathLike) -> None:
    """Write a Faiss index atomically."""
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def read_index(path: str | os.PathLike):
    """Read a Faiss index written by this module."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: index file not found; run the train-index / add-index stages")
    return faiss.read_index(str(path))


def populate(trained, embeddings_h5: str | os.PathLike, block_size: int):
    """Add every DB embedding to a copy of ``trained`` in blocks, with ids = chunk ids (rows)."""
    index = faiss.clone_index(trained)
    if not index.is_trained:
        raise PipelineError("add-index: the trained index is not trained; rerun train-index")
    if index.ntotal:
        raise PipelineError(f"add-index: the trained index already holds {index.ntotal} vectors")
    if faiss.try_extract_index_ivf(index) is None and not isinstance(
        faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2)
    ):
        index = faiss.IndexIDMap2(index)  # Flat/HNSW/PQ keep sequential ids; map them to chunk ids
    with h5py.File(embeddings_h5, "r") as f:
        ds = f["embeddings"]
        n, dim = ds.shape
        if dim != index.d:
            raise PipelineError(f"{embeddings_h5}: embeddings are {dim}-d but the trained index is {index.d}-d; rerun train-index")
        for lo in progress(range(0, n, block_size), desc="add-index", unit="block"):
            hi = min(n, lo + block_size)
            index.add_with_ids(np.ascontiguousarray(ds[lo:hi]), np.arange(lo, hi, dtype=np.int64))
    if index.ntotal != n:
        raise PipelineError(f"add-index: index holds {index.ntotal} vectors but {embeddings_h5} has {n} chunks")
    return index


def set_search_params(index, nprobe: int | None = None, efsearch: int | None = None) -> dict:
    """Set ``nprobe`` (IVF) and ``efSearch`` (HNSW, also an HNSW coarse quantizer) where they apply."""
    applied = {}
    ps = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", efsearch), ("quantizer_efSearch", efsearch)):
        if value is None:
            continue
        try:
            ps.set_index_parameter(index, name, value)
            applied[name] = int(value)
        except RuntimeError:
            pass
    inner = _inner(index)  # ParameterSpace does not look through IndexIDMap
    if efsearch is not None and hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = int(efsearch)
        applied["efSearch"] = int(efsearch)
    return applied
