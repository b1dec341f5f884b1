"""Reading the retrieval database file (``embeddings.h5``) without loading it.

The embed stage writes three contiguous, uncompressed HDF5 datasets: ``chunks`` (n, 3) int64
(doc index, start, length), ``doc_ids`` (n,) uint64 and ``embeddings`` (n, dim) float16 or
float32 (``embed.dtype``). ``DBFile`` maps each of them into memory (``np.memmap`` at the
dataset's byte offset), so a stage reads only the rows it touches: a block ``x[lo:hi]`` or the
rows ``x[ids]`` of a search result. A dataset that is chunked or compressed (a file written by
some other tool) is read through h5py instead, with the same slicing. Nothing here reads a
whole dataset; callers iterate ``blocks``.

``fingerprint`` identifies the file's content cheaply: the ``fingerprint`` attribute that embed
stores (a hash of every input of the embedding), so a multi-terabyte file is never re-hashed.
A file without it is hashed once in full.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import h5py
import numpy as np

from .errors import PipelineError

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


def file_digest(path: str | os.PathLike) -> bytes:
    """blake2b-128 of a file's bytes, read in 4 MiB pieces."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.digest()


class DBFile:
    """``DBFile(path)``: ``.chunks``, ``.doc_ids``, ``.embeddings`` as memory maps, ``.attrs``."""

    def __init__(self, path: str | os.PathLike, need_embeddings: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise PipelineError(f"{self.path}: embeddings file not found; run the embed stage")
        with h5py.File(self.path, "r") as f:
            missing = [n for n in DATASETS if n not in f and (need_embeddings or n != "embeddings")]
            if missing:
                raise PipelineError(f"{self.path}: no dataset {missing[0]!r} (has {sorted(f.keys())}); rerun embed")
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
            return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape)
        if self._h5 is None:
            self._h5 = h5py.File(self.path, "r")
        return _H5Rows(self._h5[name])

    def __len__(self) -> int:
        return self.n

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
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None
