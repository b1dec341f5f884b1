"""Chunks and pretraining samples.

A chunk is ``chunk_length`` consecutive tokens inside one document; a document is cut into
consecutive, non-overlapping chunks and its last chunk may be short. Chunks never cross
documents. The same cutting serves the retrieval database (chunks of the database corpus) and
the pretraining samples, so that when both corpora are one, a query chunk *is* a DB chunk.

A pretraining sample is ``seq_length // chunk_length`` consecutive chunks of one split. Each
chunk occupies exactly ``chunk_length`` positions of the sample: a short last chunk is padded
with EOD and its padding is masked out of the loss. The label of a document's last token is
EOD, so the model learns where documents end. The split's last sample is filled up with empty
chunks (document -1, fully masked). The end-of-document id is the token store's
(``TokenStore.eod_id``: the EOS of the tokenizer that wrote it).
"""

from __future__ import annotations

import numpy as np

from .errors import PipelineError
from .tokenstore import TokenStore

CHUNK_DTYPE = np.dtype([("doc", np.int64), ("start", np.int64), ("length", np.int64)])


def chunk_table(doc_lengths: np.ndarray, chunk_length: int) -> np.ndarray:
    """Rows (doc index, start, length) that tile every non-empty document exactly."""
    if chunk_length <= 0:
        raise PipelineError(f"chunk_length must be > 0, got {chunk_length}")
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    counts = -(-lengths // chunk_length)  # ceil; 0 for empty documents
    total = int(counts.sum())
    table = np.empty(total, dtype=CHUNK_DTYPE)
    doc = np.repeat(np.arange(len(lengths), dtype=np.int64), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    start = (np.arange(total, dtype=np.int64) - first) * chunk_length
    table["doc"] = doc
    table["start"] = start
    table["length"] = np.minimum(chunk_length, lengths[doc] - start)
    return table


def chunk_tokens(store: TokenStore, rows: np.ndarray, chunk_length: int, pad_id: int | None = None) -> np.ndarray:
    """Token ids of ``rows`` as an (n, chunk_length) int64 array padded with ``pad_id``
    (default: the store's end-of-document).

    Rows with ``doc == -1`` (empty chunks) are all padding.
    """
    out = np.full((len(rows), chunk_length), store.eod_id if pad_id is None else pad_id, dtype=np.int64)
    for i, (doc, start, length) in enumerate(rows):
        if doc >= 0:
            begin = store.offsets[doc] + start
            out[i, :length] = store.tokens[begin : begin + length]
    return out


class SampleLayout:
    """Pretraining samples of one split: sample ``s`` is chunks ``[s*m, (s+1)*m)``."""

    def __init__(self, store: TokenStore, chunk_length: int, seq_length: int):
        if seq_length % chunk_length:
            raise PipelineError(
                f"seq_length ({seq_length}) must be a multiple of chunk_length ({chunk_length})"
            )
        self.store = store
        self.chunk_length = chunk_length
        self.seq_length = seq_length
        self.chunks_per_sample = seq_length // chunk_length
        self.doc_lengths = store.doc_lengths()
        table = chunk_table(self.doc_lengths, chunk_length)
        m = self.chunks_per_sample
        self.num_samples = -(-len(table) // m)
        padded = np.empty(self.num_samples * m, dtype=CHUNK_DTYPE)
        padded[: len(table)] = table
        padded[len(table) :] = (-1, 0, 0)
        self.chunks = padded  # one row per query chunk, sample-major

    def __len__(self) -> int:
        return self.num_samples

    def sample_rows(self, s: int) -> np.ndarray:
        m = self.chunks_per_sample
        return self.chunks[s * m : (s + 1) * m]

    def sample_doc_ids(self, s: int) -> np.ndarray:
        """Stable ids of the documents the sample reads (for neighbor exclusion)."""
        docs = self.sample_rows(s)["doc"]
        return np.unique(self.store.doc_ids[docs[docs >= 0]])

    def sample(self, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(tokens, labels, loss_mask)``, each of length ``seq_length``."""
        cl = self.chunk_length
        rows = self.sample_rows(s)
        eod = self.store.eod_id
        tokens = np.full(self.seq_length, eod, dtype=np.int64)
        labels = np.full(self.seq_length, eod, dtype=np.int64)
        mask = np.zeros(self.seq_length, dtype=np.float32)
        for j, (doc, start, length) in enumerate(rows):
            if doc < 0:
                continue
            begin = self.store.offsets[doc] + start
            o = j * cl
            toks = self.store.tokens[begin : begin + length + 1]  # one extra for the next label
            tokens[o : o + length] = toks[:length]
            labels[o : o + length - 1] = toks[1:length]
            at_end = start + length >= self.doc_lengths[doc]
            labels[o + length - 1] = eod if at_end else toks[length]
            mask[o : o + length] = 1.0
        return tokens, labels, mask
