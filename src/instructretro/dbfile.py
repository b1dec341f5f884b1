"""Reading the retrieval database file (``embeddings.h5``) without loading it.

The embed stage writes three contiguous, uncompressed HDF5 datasets: ``chunks`` (n, 3) int64
(doc index, start, length), ``doc_ids`` (n,) uint64 and ``embeddings`` (n, dim) float16 or
float32 (``embed.dtype``). ``DBFile`` reads each of them at the dataset's byte offset, so a stage reads
only the rows it touches: a block ``x[lo:hi]`` (one ``pread``) or the rows ``x[ids]`` of a
search result (through a memory map). A dataset that is chunked or compressed (a file written by
some other tool) is read through h5py instead, with the same slicing. Nothing here reads a
whole dataset; callers iterate ``blocks``.

``fingerprint`` identifies the file's content cheaply: the ``fingerprint`` attribute that embed
stores (a hash of every input of the embedding), so a multi-terabyte file is never re-hashed.
A file without it is hashed once in full.

``NeighborTokens`` reads neighbors as the model sees them: the chunk plus its continuation (the
next ``chunk_length`` tokens of the same document, cut at the document end), ``2*chunk_length``
tokens padded with EOD, and a mask of the real tokens.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import h5py
import numpy as np

from .errors import PipelineError, damaged
from .tokenstore import TokenStore

DATASETS = ("chunks", "doc_ids", "embeddings")


class _H5Rows:
    """Row access to a chunked/compressed h5py dataset with numpy-like indexing (sorted reads)."""

    def __init__(self, ds):
        self.ds = ds
        self.shape, self.dtype = ds.shape, ds.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, np.ndarray) or isinstance(key, list):
            ids = np.asarray(key, dtype=np.int64)
            uniq, inverse = np.unique(ids, return_inverse=True)
            rows = self.ds[uniq] if len(uniq) else np.zeros((0,) + self.shape[1:], self.dtype)
            return rows[inverse.reshape(ids.shape)]
        return self.ds[key]


class _FileRows:
    """Row access to a contiguous dataset at byte ``offset`` of a file.

    A slice ``x[lo:hi]`` is one ``os.pread`` into a fresh array, and rows by index ``x[ids]``
    (search results) one ``pread`` per run of consecutive ids. Nothing is memory-mapped: a
    mapped file's pages count in the process's resident memory, and the kernel maps cached
    neighbours of every touched page too (fault-around), so random reads of a mapped file
    grow the resident set towards the file's size (measured: 250 MB of a 230 MB file for
    4,000 random rows).
    """

    def __init__(self, path: Path, offset: int, shape, dtype):
        self.path, self.offset, self.shape, self.dtype = path, int(offset), tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._map = None
        self._fd = None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def mapped(self) -> np.memmap:
        if self._map is None:
            self._map = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
        return self._map

    def _read(self, lo: int, hi: int) -> np.ndarray:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        want = (hi - lo) * self.row_bytes
        buf = os.pread(self._fd, want, self.offset + lo * self.row_bytes)
        if len(buf) != want:
            raise damaged(self.path, "embed", f"short read, {len(buf)} of {want} bytes")
        return np.frombuffer(buf, dtype=self.dtype).reshape((hi - lo,) + self.shape[1:])  # read-only, no copy

    def take(self, ids) -> np.ndarray:
        """Rows ``ids`` (any shape, any order, repeats allowed): one pread per run of consecutive ids."""
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        if not flat.size:
            return np.zeros(ids.shape + self.shape[1:], self.dtype)
        if flat.min() < 0 or flat.max() >= self.shape[0]:
            raise IndexError(f"{self.path}: row ids must be in [0, {self.shape[0]}), got {flat.min()}..{flat.max()}")
        uniq, inverse = np.unique(flat, return_inverse=True)
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        rows = np.empty((len(uniq),) + self.shape[1:], self.dtype)
        for s, e in zip(np.r_[0, breaks], np.r_[breaks, len(uniq)]):
            rows[s:e] = self._read(int(uniq[s]), int(uniq[e - 1]) + 1)
        return rows[inverse.reshape(-1)].reshape(ids.shape + self.shape[1:])

    def __getitem__(self, key):
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(first, slice) and first.step in (None, 1):
            lo, hi, _ = first.indices(self.shape[0])
            rows = self._read(lo, max(lo, hi))
        elif isinstance(first, (int, np.integer)):
            return self._read(int(first), int(first) + 1)[(0,) + rest]
        else:
            rows = self.take(first)
            return rows[(slice(None),) * np.ndim(first) + rest] if rest else rows
        return rows[(slice(None),) + rest] if rest else rows

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._map = None


def file_digest(path: str | os.PathLike) -> bytes:
    """blake2b-128 of a file's bytes, read in 4 MiB pieces."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.digest()


def open_h5(path: str | os.PathLike, stage: str):
    """``h5py.File(path, "r")``; a file h5py cannot open (cut short, not HDF5) is one line naming
    it and ``stage``, the stage that writes it."""
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise damaged(path, stage, str(exc).splitlines()[0][:200]) from None


def check_extent(path: str | os.PathLike, f, names, stage: str) -> None:
    """Every contiguous dataset ``names`` of the open file ``f`` lies inside the file's bytes."""
    size = os.path.getsize(path)
    for name in names:
        ds = f[name]
        offset = ds.id.get_offset()
        end = (offset or 0) + int(np.prod(ds.shape, dtype=np.int64)) * ds.dtype.itemsize
        if offset is not None and end > size:
            raise damaged(path, stage, f"dataset {name!r} ends at byte {end:,}, the file has {size:,}")


class DBFile:
    """``DBFile(path)``: ``.chunks``, ``.doc_ids``, ``.embeddings`` as row readers, ``.attrs``."""

    def __init__(self, path: str | os.PathLike, need_embeddings: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise PipelineError(f"{self.path}: embeddings file not found; run the embed stage")
        with open_h5(self.path, "embed") as f:
            missing = [n for n in DATASETS if n not in f and (need_embeddings or n != "embeddings")]
            if missing:
                raise PipelineError(f"{self.path}: no dataset {missing[0]!r} (has {sorted(f.keys())}); rerun embed")
            check_extent(self.path, f, [n for n in DATASETS if n in f], "embed")
            self.attrs = dict(f.attrs)
            layout = {n: (f[n].id.get_offset(), f[n].shape, f[n].dtype, f[n].chunks is None and f[n].compression is None)
                      for n in DATASETS if n in f}
        self._h5 = None
        for name, (offset, shape, dtype, plain) in layout.items():
            setattr(self, name, self._array(name, offset, shape, dtype, plain))
        self.n = int(self.chunks.shape[0])
        self.dim = int(self.embeddings.shape[1]) if "embeddings" in layout else int(self.attrs.get("dim", 0))

    def _array(self, name: str, offset, shape, dtype, plain: bool):
        """A read-only array-like over dataset ``name`` (tests wrap this to count rows read)."""
        if shape[0] == 0:
            return np.zeros(shape, dtype)
        if plain and offset is not None:
            return _FileRows(self.path, offset, shape, dtype)
        if self._h5 is None:
            self._h5 = h5py.File(self.path, "r")
        return _H5Rows(self._h5[name])

    def __len__(self) -> int:
        return self.n

    def as_array(self, name: str):
        """Dataset ``name`` as an ndarray-like: the memory map of a contiguous dataset (pages are
        read when touched), else the dataset read whole."""
        rows = getattr(self, name)
        if isinstance(rows, _FileRows):
            return rows.mapped
        return rows[:] if isinstance(rows, _H5Rows) else rows

    def blocks(self, block_size: int):
        """``(lo, hi)`` row ranges of at most ``block_size`` rows covering the file."""
        for lo in range(0, self.n, block_size):
            yield lo, min(self.n, lo + block_size)

    def embedding_rows(self, ids: np.ndarray, block_size: int) -> np.ndarray:
        """float32 embeddings of ``ids`` (any order), read at most ``block_size`` rows at a time."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for lo in range(0, len(ids), block_size):
            out[lo : lo + block_size] = self.embeddings[ids[lo : lo + block_size]]
        return out

    @property
    def fingerprint(self) -> str:
        """The content hash embed stored; a full hash of the file when there is none."""
        stored = self.attrs.get("fingerprint")
        if stored:
            return str(stored)
        return file_digest(self.path).hex()

    def close(self) -> None:
        for name in DATASETS:
            if isinstance(getattr(self, name, None), _FileRows):
                getattr(self, name).close()
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None


class NeighborTokens:
    """``NeighborTokens(db_tokens_dir, embeddings_h5, chunk_length)(ids) -> (tokens, mask)``.

    ``ids`` int64 (..., k) DB chunk ids (-1 = none) -> ``tokens`` int64 (..., k, 2*chunk_length)
    and ``mask`` bool of the same shape. Vectorised: the rows of the asked chunks are read from
    the chunk table (by offset), then one gather from the memory-mapped token store.
    """

    def __init__(self, db_tokens_dir: str | os.PathLike, embeddings_h5: str | os.PathLike, chunk_length: int):
        self.store = TokenStore(db_tokens_dir, "train")
        self.db = DBFile(embeddings_h5, need_embeddings=False)
        stored_cl = int(self.db.attrs.get("chunk_length", chunk_length))
        if stored_cl != chunk_length:
            raise PipelineError(f"{self.db.path}: built with chunk_length {stored_cl}, asked for {chunk_length}; rerun embed")
        self.chunk_length = chunk_length
        self.width = 2 * chunk_length
        self.doc_lengths = self.store.doc_lengths()

    @property
    def chunks(self):
        """The DB chunk table (n, 3) (doc index, start, length), read by row on demand."""
        return self.db.chunks

    def __len__(self) -> int:
        return self.db.n

    def __call__(self, ids) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        if flat.size and (flat.max(initial=-1) >= len(self) or flat.min(initial=0) < -1):
            raise PipelineError(f"neighbor ids must be in [-1, {len(self)}), got {flat.min()}..{flat.max()}")
        valid = flat >= 0
        uniq, inverse = np.unique(np.where(valid, flat, 0), return_inverse=True)
        rows = np.asarray(self.db.chunks[uniq]).reshape(-1, 3) if len(uniq) else np.zeros((0, 3), np.int64)
        doc, start = rows[:, 0], rows[:, 1]
        begin = (self.store.offsets[doc] + start)[inverse]  # first token of each chunk in the store
        length = np.where(valid, np.minimum(self.width, self.doc_lengths[doc] - start)[inverse], 0)
        pos = np.arange(self.width)
        mask = pos[None, :] < length[:, None]
        where = np.where(mask, begin[:, None] + pos[None, :], 0)
        tokens = np.where(mask, self.store.tokens[where] if len(self.store.tokens) else 0, self.store.eod_id).astype(np.int64)
        shape = ids.shape + (self.width,)
        return tokens.reshape(shape), mask.reshape(shape)

