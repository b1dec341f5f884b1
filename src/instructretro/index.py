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

import hashlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import faiss
import h5py
import numpy as np

from .dbfile import DBFile
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


def training_points_useful(index) -> tuple[int, str]:
    """The most training points the index can use, and why: Faiss's k-means keeps at most
    ``max_points_per_centroid`` (256) points per centroid and subsamples the rest away, so a
    larger sample only costs reading time and memory. 0 for an index with nothing to train."""
    cap, why = 0, "nothing to train"
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        per = ivf.cp.max_points_per_centroid
        cap, why = per * ivf.nlist, f"IVF k-means uses at most {per} points per list x {ivf.nlist} lists"
    inner = _inner(index)
    pq = getattr(inner, "pq", None)
    if pq is not None and pq.cp.max_points_per_centroid * pq.ksub > cap:
        cap, why = pq.cp.max_points_per_centroid * pq.ksub, f"PQ k-means uses at most {pq.cp.max_points_per_centroid * pq.ksub} points"
    if cap == 0 and not index.is_trained:
        cap, why = 1 << 62, "no cap known for this index"
    return cap, why


def sample_training_points(embeddings_h5: str | os.PathLike, train_points: int, seed: int,
                           block_size: int = 65536) -> np.ndarray:
    """A seeded random sample of ``train_points`` DB embeddings (all of them when fewer), float32.

    One pass in row order over the file (preads), at most ``block_size`` rows read at a
    time; only the sample itself is held (the index needs it in RAM to train).
    """
    db = DBFile(embeddings_h5)
    n = db.n
    if train_points >= n:
        rows = np.arange(n, dtype=np.int64)
    else:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=train_points, replace=False))
    out = db.embedding_rows(rows, block_size)
    db.close()
    return out


def gpu_count() -> int:
    """GPUs Faiss can use (0 with faiss-cpu, or faiss-gpu on a machine without CUDA)."""
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def _train(index, x: np.ndarray, gpus: int) -> dict:
    """Train ``index`` on ``x``; return which device did what.

    With GPUs, the IVF k-means assigns points with a flat index spread over every GPU
    (``index_cpu_to_all_gpus`` as the IVF's ``clustering_index``); the coarse quantizer (flat or
    HNSW) is then built on CPU over the trained centroids, and the codes (SQ/PQ/OPQ) train on
    CPU. Without GPUs the same steps run on CPU. A failure is an error, never a silent switch
    to another device.
    """
    ivf = faiss.try_extract_index_ivf(index)
    devices = {}
    if ivf is not None:
        quantizer = faiss.downcast_index(ivf.quantizer)
        devices["ivf_kmeans"] = f"gpu x{gpus}" if gpus else "cpu"
        devices["coarse_quantizer"] = ("cpu (HNSW over the centroids)" if hasattr(quantizer, "hnsw")
                                       else "cpu (flat over the centroids)")
        if gpus:
            if gpus > gpu_count():
                raise PipelineError(f"train-index: {gpus} GPU(s) asked for the IVF k-means but Faiss sees "
                                    f"{gpu_count()}; install faiss-gpu on a CUDA machine or run without GPUs")
            flat = faiss.IndexFlat(ivf.d, ivf.metric_type)
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(flat, ngpu=gpus)
    if not isinstance(faiss.downcast_index(_inner(index)), faiss.IndexIVFFlat):
        devices["codes"] = "cpu"  # SQ / PQ / OPQ training
    try:
        index.train(x)
    except RuntimeError as exc:
        raise PipelineError(f"params.yaml: index.factory: training failed on {devices or 'cpu'} ({_reason(exc)})") from None
    finally:
        if ivf is not None and gpus:
            ivf.clustering_index = None
    return devices


def train_index(embeddings_h5: str | os.PathLike, factory: str, train_points: int, seed: int,
                block_size: int = 65536, gpus: int | None = None):
    """Build and train the index the params describe; return (empty trained index, metrics).

    The training sample is ``min(train_points, n_db, what the index can use)`` points, read
    in one streaming pass (``sample_training_points``); the metrics say which bound set it.
    """
    path = Path(embeddings_h5)
    if not path.is_file():
        raise PipelineError(f"{path}: embeddings file not found; run the embed stage")
    with h5py.File(path, "r") as f:
        n_db, dim = f["embeddings"].shape
    if train_points <= 0:
        raise PipelineError(f"params.yaml: param 'index.train_points' must be > 0, got {train_points}")
    n_train = min(train_points, n_db)
    index, string = make_index(factory, dim, n_db, n_train)
    useful, useful_why = training_points_useful(index)
    bound = "index.train_points" if train_points <= min(n_db, useful) else ("db_chunks" if n_db <= useful else useful_why)
    n_train = min(n_train, useful)
    for part in (faiss.try_extract_index_ivf(index), _inner(index)):
        if part is not None and hasattr(part, "cp"):
            part.cp.seed = seed  # k-means seed
        if part is not None and hasattr(part, "pq"):
            part.pq.cp.seed = seed
    gpus = gpu_count() if gpus is None else gpus
    t0 = time.perf_counter()
    devices = {}
    sample_seconds = 0.0
    if not index.is_trained:
        x = sample_training_points(path, n_train, seed, block_size)
        sample_seconds = time.perf_counter() - t0
        devices = _train(index, x, gpus)
        del x
    metrics = {
        "factory": string,
        "factory_param": factory,
        "db_chunks": int(n_db),
        "training_points": int(n_train) if devices else 0,
        "training_points_bound": bound if devices else "nothing to train",
        "sample_seconds": round(sample_seconds, 3),
        "train_seconds": round(time.perf_counter() - t0 - sample_seconds, 3),
        "train_device": ("gpu" if gpus and "ivf_kmeans" in devices else "cpu") if devices else "none",
        "devices": devices,
        "gpus": int(gpus),
    }
    return index, metrics


def write_index(index, path: str | os.PathLike) -> None:
    """Write a Faiss index atomically."""
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def read_index(path: str | os.PathLike):
    """Read a Faiss index written by this module: a file (``trained.faiss``) or a populated
    index folder (:func:`write_populated`), whose on-disk lists are checked against the record."""
    path = Path(path)
    if path.is_dir():
        return read_populated(path)
    if not path.is_file():
        raise PipelineError(f"{path}: index file not found; run the train-index / add-index stages")
    return faiss.read_index(str(path))


# The populated index is one folder, one DVC output: the index file, its on-disk inverted lists
# (when it has them) and a record of the lists' size and content hash. The index refers to its
# lists by file name inside the folder (read with IO_FLAG_ONDISK_SAME_DIR), so the folder can
# move, and DVC always restores the two together. A pair that does not belong together (copied
# by hand, or restored from different builds) is refused by the record.
INDEX_FILE = "index.faiss"
LISTS_FILE = "lists.ivfdata"
RECORD_FILE = "index.json"


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def index_file(path: str | os.PathLike) -> Path:
    """The index file of ``path``: the path itself, or ``<folder>/index.faiss``."""
    path = Path(path)
    return path / INDEX_FILE if path.is_dir() else path


def write_populated(index, folder: str | os.PathLike, lists: str | os.PathLike | None = None) -> dict:
    """Write ``folder/index.faiss`` and ``folder/index.json``; ``lists`` is the on-disk lists
    file already in ``folder`` (``populate``'s ``ivfdata``), or None for an in-RAM index.
    Returns the record."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"ntotal": int(index.ntotal), "lists": None}
    if lists is not None:
        lists = Path(lists)
        if lists.parent.resolve() != folder.resolve() or lists.name != LISTS_FILE:
            raise ValueError(f"write_populated: the lists must be {folder / LISTS_FILE}, got {lists}")
        record["lists"] = {"file": LISTS_FILE, "bytes": lists.stat().st_size, "sha256": sha256_file(lists)}
    faiss.write_index(index, str(folder / INDEX_FILE))
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def read_populated(folder: str | os.PathLike):
    """Read a populated index folder; refuse lists that are not the ones it was built with
    (size and SHA-256 of ``lists.ivfdata`` against ``index.json``: one streaming pass)."""
    folder = Path(folder)
    rebuild = "rerun add-index (dvc repro -f add-index)"
    if not (folder / INDEX_FILE).is_file() or not (folder / RECORD_FILE).is_file():
        raise PipelineError(f"{folder}: not a populated index folder (needs {INDEX_FILE} and {RECORD_FILE}); {rebuild}")
    try:
        record = json.loads((folder / RECORD_FILE).read_text())
        lists = record["lists"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise PipelineError(f"{folder / RECORD_FILE}: malformed index record; {rebuild}") from None
    flags = 0
    if lists is not None:
        path = folder / LISTS_FILE
        if not path.is_file():
            raise PipelineError(f"{folder}: the index has on-disk lists but {LISTS_FILE} is missing; {rebuild}")
        size = path.stat().st_size
        if size != lists.get("bytes") or sha256_file(path) != lists.get("sha256"):
            raise PipelineError(f"{path}: not the inverted lists {folder / INDEX_FILE} was built with "
                                f"({size} bytes, the index was built with {lists.get('bytes')} bytes of sha256 "
                                f"{str(lists.get('sha256'))[:12]}); {rebuild}")
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR
    elif (folder / LISTS_FILE).exists():
        raise PipelineError(f"{folder}: holds {LISTS_FILE} but its index keeps its lists in RAM; {rebuild}")
    return faiss.read_index(str(folder / INDEX_FILE), flags)


def code_bytes(index, n: int) -> int:
    """Bytes the populated index's vectors take: codes plus 8-byte ids."""
    ivf = faiss.try_extract_index_ivf(index)
    code = ivf.code_size if ivf is not None else getattr(faiss.downcast_index(_inner(index)), "code_size", 4 * index.d)
    return int(n) * (int(code) + 8)


def populate(trained, embeddings_h5: str | os.PathLike, block_size: int, ondisk_above: int | None = None,
             ivfdata: str | os.PathLike | None = None, shard_blocks: int = 16):
    """Add every DB embedding to a copy of ``trained`` in blocks, with ids = chunk ids (rows).

    Memory: one block of embeddings plus the index. For an IVF index whose codes would take more
    than ``ondisk_above`` bytes, the vectors go into shards of ``shard_blocks`` blocks, each an
    IVF index written to disk, whose inverted lists are merged at the end into one on-disk file
    ``ivfdata`` (Faiss's ``OnDiskInvertedLists``; the returned index refers to it by that path,
    so it must stay beside the index file). Search results are the same as in RAM.
    """
    index = faiss.clone_index(trained)
    if not index.is_trained:
        raise PipelineError("add-index: the trained index is not trained; rerun train-index")
    if index.ntotal:
        raise PipelineError(f"add-index: the trained index already holds {index.ntotal} vectors")
    if faiss.try_extract_index_ivf(index) is None and not isinstance(
        faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2)
    ):
        index = faiss.IndexIDMap2(index)  # Flat/HNSW/PQ keep sequential ids; map them to chunk ids
    db = DBFile(embeddings_h5)
    n, dim = db.n, db.dim
    if dim != index.d:
        raise PipelineError(f"{embeddings_h5}: embeddings are {dim}-d but the trained index is {index.d}-d; rerun train-index")
    ondisk = (ondisk_above is not None and faiss.try_extract_index_ivf(index) is not None
              and code_bytes(index, n) > ondisk_above)
    if ondisk and ivfdata is None:
        raise PipelineError("add-index: the index is above index.ondisk_above but no path for its on-disk lists was given")
    shard_dir = Path(f"{ivfdata}.shards") if ondisk else None
    shards, shard = [], None
    if shard_dir is not None:
        shutil.rmtree(shard_dir, ignore_errors=True)
        shard_dir.mkdir(parents=True)
    ivf_top = isinstance(faiss.downcast_index(index), faiss.IndexIVF)
    assign = None
    if ivf_top and not ondisk:
        assign = _presize_lists(faiss.downcast_index(index), db, block_size)
    bar = progress(total=n, desc="add-index" + (" (on-disk shards)" if ondisk else ""), unit="vec")
    for b, (lo, hi) in enumerate(db.blocks(block_size)):
        target = index
        if ondisk:
            if shard is None:
                shard = faiss.clone_index(trained)
            target = shard
        x = np.ascontiguousarray(db.embeddings[lo:hi], dtype=np.float32)
        ids = np.arange(lo, hi, dtype=np.int64)
        if assign is not None:  # lists already sized: no vector growth, no second assignment
            a = np.ascontiguousarray(assign[lo:hi], dtype=np.int64)
            faiss.downcast_index(index).add_core(hi - lo, faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(a))
        else:
            target.add_with_ids(x, ids)
        if ondisk and ((b + 1) % shard_blocks == 0 or hi == n):
            shards.append(str(shard_dir / f"shard_{len(shards):06d}.faiss"))
            faiss.write_index(shard, shards[-1])
            shard = None
        bar.update(hi - lo)
    bar.close()
    db.close()
    if ondisk:
        from faiss.contrib.ondisk import merge_ondisk

        tmp = Path(ivfdata).with_name(f".{Path(ivfdata).name}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        merge_ondisk(index, shards, str(tmp))
        os.replace(tmp, ivfdata)
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
        lists.filename = str(ivfdata)  # the index file refers to the final name
        shutil.rmtree(shard_dir, ignore_errors=True)
    if index.ntotal != n:
        raise PipelineError(f"add-index: index holds {index.ntotal} vectors but {embeddings_h5} has {n} chunks")
    return index


def _presize_lists(ivf, db: DBFile, block_size: int) -> np.ndarray:
    """Assign every DB vector to its list (one pass over blocks), then reserve each inverted
    list's exact size, so adding never grows a list by reallocation (which holds the old and
    the new copy: up to about 2x the index at the peak). Returns the assignments (int32, 4
    bytes per vector, about 1% of an SQ8 index of 384-d vectors)."""
    assign = np.empty(db.n, dtype=np.int32)
    for lo, hi in progress(list(db.blocks(block_size)), desc="add-index (assign)", unit="block"):
        x = np.ascontiguousarray(db.embeddings[lo:hi], dtype=np.float32)
        _, a = ivf.quantizer.search(x, 1)
        assign[lo:hi] = a[:, 0]
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if isinstance(lists, faiss.ArrayInvertedLists):
        counts = np.bincount(assign, minlength=ivf.nlist)
        for list_no in np.flatnonzero(counts):
            lists.resize(int(list_no), int(counts[list_no]))  # allocates exactly ...
            lists.resize(int(list_no), 0)  # ... and keeps the capacity
    return assign


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
