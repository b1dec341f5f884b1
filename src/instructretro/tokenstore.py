"""The compact token store: one folder per corpus, train and valid kept apart.

For each split ``S`` in (train, valid):
  ``S.bin``          all document tokens back to back, unsigned ints of the smallest width
                     that holds the vocab (no separators);
  ``S.offsets.npy``  int64, n_docs + 1 offsets into ``S.bin``;
  ``S.doc_ids.npy``  uint64 stable document ids (hash of the text).
``meta.json`` records the dtype, the vocab size, the end-of-document id (``eod_id``: the EOS of
the tokenizer that wrote the store, which pads short chunks and labels a document's last
token) and the counts. Readers memory-map the tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import PipelineError

SPLITS = ("train", "valid")


def token_dtype(vocab_size: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    return np.dtype(np.uint64)


class TokenStoreWriter:
    """Append documents to a split; ``close`` writes offsets, ids and meta. Write into a temp dir."""

    def __init__(self, folder: str | os.PathLike, vocab_size: int, eod_id: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self.eod_id = int(eod_id)
        self.files = {s: open(self.folder / f"{s}.bin", "wb") for s in SPLITS}
        self.offsets = {s: [0] for s in SPLITS}
        self.ids = {s: [] for s in SPLITS}

    def add(self, split: str, doc_id: int, tokens) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        self.files[split].write(arr.tobytes())
        self.offsets[split].append(self.offsets[split][-1] + len(arr))
        self.ids[split].append(doc_id)

    def close(self, extra_meta: dict | None = None) -> dict:
        meta = {"dtype": self.dtype.name, "vocab_size": self.vocab_size, "eod_id": self.eod_id}
        for s in SPLITS:
            self.files[s].close()
            np.save(self.folder / f"{s}.offsets.npy", np.asarray(self.offsets[s], dtype=np.int64))
            np.save(self.folder / f"{s}.doc_ids.npy", np.asarray(self.ids[s], dtype=np.uint64))
            meta[f"{s}_documents"] = len(self.ids[s])
            meta[f"{s}_tokens"] = int(self.offsets[s][-1])
        meta.update(extra_meta or {})
        (self.folder / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return meta


class TokenStore:
    """Read one split of a token store: ``store.doc(i)`` is document i's tokens (a view)."""

    def __init__(self, folder: str | os.PathLike, split: str = "train"):
        self.folder = Path(folder)
        if split not in SPLITS:
            raise PipelineError(f"unknown split {split!r}; expected one of {SPLITS}")
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise PipelineError(f"{self.folder}: not a token store (no meta.json); run the tokenize stage")
        self.meta = json.loads(meta_path.read_text())
        self.split = split
        self.vocab_size = int(self.meta["vocab_size"])
        if "eod_id" not in self.meta:
            raise PipelineError(f"{meta_path}: no eod_id (a store from an older version); rerun the tokenize stage")
        self.eod_id = int(self.meta["eod_id"])
        self.offsets = np.load(self.folder / f"{split}.offsets.npy")
        self.doc_ids = np.load(self.folder / f"{split}.doc_ids.npy")
        n_tokens = int(self.offsets[-1])
        dtype = np.dtype(self.meta["dtype"])
        if n_tokens:
            self.tokens = np.memmap(self.folder / f"{split}.bin", dtype=dtype, mode="r", shape=(n_tokens,))
        else:
            self.tokens = np.zeros(0, dtype=dtype)

    def __len__(self) -> int:
        return len(self.doc_ids)

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)
