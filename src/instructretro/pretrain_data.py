"""Pretraining batches: samples of one split, each with the neighbor tokens of its chunks.

A sample is ``seq_length`` tokens (``SampleLayout`` in ``chunks``): ``C = seq_length //
chunk_length`` query chunks. Query chunk row ``q`` of the split has up to K neighbor ids in
``neighbors.h5`` (row ``q`` = ``SampleLayout.chunks[q]``, -1 = none); the model reads the first
``k`` of them, each as the neighbor chunk plus its continuation (``2 * chunk_length`` tokens,
from ``dbfile.NeighborTokens``). A batch is a dict of tensors::

    tokens (B, T) int64, labels (B, T) int64, loss_mask (B, T) float32,
    neighbors (B, C, k, R) int64, neighbor_mask (B, C, k, R) bool      (Retro only)
    fact_mask (B, T) float32                                           (when facts are known)

``fact_mask`` marks the positions whose *label* is a token stating a fact: the synthetic world
records each fact's character span (``fact_spans``) and we map spans to tokens with the
SentencePiece offsets. Validation with *shuffled* neighbors gives every sample the neighbors of
the sample half the split away, so it never gets its own: if the model uses retrieval, that
loss is higher. Validation with *no* neighbors is the same weights with retrieval switched
off: set against GPT, it says how much of a Retro run's lead is its decoder and how much is
what it reads.

The leakage filter (``batch(..., max_overlap=x)``) masks out, like a missing neighbor, every
neighbor that holds more than the fraction ``x`` of the chunk it is read for as one run of
tokens (``overlap``). Chunked cross-attention is shifted: the neighbors retrieved for query
chunk ``q`` are read while the model predicts chunk ``q + 1``, so that is the chunk they are
measured against.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .chunks import CHUNK_DTYPE, SampleLayout, chunk_tokens
from .data import corpus_files, document_id, is_json_lines
from .errors import PipelineError
from .overlap import filter_neighbors
from .tokenizer import Tokenizer
from .tokenstore import TokenStore

NeighborTokensFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


# --------------------------------------------------------------------------------------------
# Fact tokens


def token_char_spans(tok: Tokenizer, text: str) -> tuple[list[int], np.ndarray]:
    """Token ids of ``text`` and the (n, 2) character span of each token.

    Byte-fallback pieces of one character share its span (all but the last are empty in
    SentencePiece's mapping; we give each the character they belong to).
    """
    ids, spans = tok.encode_with_offsets(text)
    spans[:, 1] = np.maximum(spans[:, 1], spans[:, 0] + 1)
    return ids, spans


def fact_token_flags(tok: Tokenizer, text: str, fact_spans: list, where: str) -> tuple[list[int], np.ndarray]:
    """Token ids of ``text`` and a bool per token: does the token overlap a fact's characters?"""
    ids, spans = token_char_spans(tok, text)
    flags = np.zeros(len(ids), dtype=bool)
    for span in fact_spans:
        if (not isinstance(span, (list, tuple)) or len(span) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)
                or not 0 <= span[0] < span[1] <= len(text)):
            raise PipelineError(f"{where}: each of 'fact_spans' must be [start, end] with "
                                f"0 <= start < end <= {len(text)} (text length), got {span!r}")
        flags |= (spans[:, 0] < span[1]) & (spans[:, 1] > span[0])
    return ids, flags


def fact_flags_for_store(corpus: str | os.PathLike, tok: Tokenizer, store: TokenStore) -> dict[int, np.ndarray] | None:
    """Per-document fact-token flags for the documents of ``store`` (index -> bool per token).

    Reads ``fact_spans`` from the corpus's JSON-lines records (matched to the store by document
    id). Returns None when no record of the corpus has ``fact_spans`` (e.g. a plain-text
    corpus): the fact-token loss is then not measured. Documents whose tokens differ from the
    store's mean the tokenizer is not the one that built the store: that is an error.
    """
    index_of = {int(d): i for i, d in enumerate(store.doc_ids)}
    flags: dict[int, np.ndarray] = {}
    seen_spans = False
    for file in corpus_files(corpus):
        if not is_json_lines(file):
            continue
        with open(file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if '"fact_spans"' not in line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PipelineError(f"{file}:{lineno}: malformed JSON ({exc.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    continue
                spans = rec.get("fact_spans")
                if not isinstance(spans, list):
                    raise PipelineError(f"{file}:{lineno}: 'fact_spans' must be a list of [start, end]")
                seen_spans = True
                i = index_of.get(document_id(rec["text"]))
                if i is None or i in flags:
                    continue  # the other split, or a duplicate text
                ids, doc_flags = fact_token_flags(tok, rec["text"], spans, f"{file}:{lineno}")
                if len(ids) != len(store.doc(i)) or not np.array_equal(np.asarray(ids), store.doc(i)):
                    raise PipelineError(f"{file}:{lineno}: tokens differ from the token store "
                                        f"{store.folder}; was it built with this tokenizer?")
                flags[i] = doc_flags
    return flags if seen_spans else None


# --------------------------------------------------------------------------------------------
# Samples


class PretrainSamples:
    """The samples of one split as batches, with neighbor tokens when a model is Retro.

    ``neighbor_ids`` is the split's (n_query_chunks, K) array from ``neighbors.h5`` (None for
    GPT); ``neighbor_tokens`` maps ids (..., k) to (tokens, mask) (..., k, 2*chunk_length);
    ``fact_flags`` comes from :func:`fact_flags_for_store`.
    """

    def __init__(self, store: TokenStore, chunk_length: int, seq_length: int,
                 neighbor_ids: np.ndarray | None = None, neighbor_tokens: NeighborTokensFn | None = None,
                 num_neighbors: int = 0, fact_flags: dict[int, np.ndarray] | None = None):
        self.layout = SampleLayout(store, chunk_length, seq_length)
        self.chunk_length = chunk_length
        self.seq_length = seq_length
        self.chunks_per_sample = self.layout.chunks_per_sample
        self.k = num_neighbors
        self.neighbor_tokens = neighbor_tokens
        self.neighbor_ids = None
        self.fact_flags = fact_flags
        if num_neighbors > 0:
            if neighbor_ids is None or neighbor_tokens is None:
                raise PipelineError("a Retro model needs neighbor ids and neighbor tokens")
            if neighbor_ids.ndim != 2 or len(neighbor_ids) != len(self.layout.chunks):
                raise PipelineError(
                    f"neighbors for split {store.split!r} have shape {neighbor_ids.shape}, expected "
                    f"({len(self.layout.chunks)}, K): one row per query chunk of {store.folder} "
                    f"with chunk_length {chunk_length}; rerun query-neighbors")
            if neighbor_ids.shape[1] < num_neighbors:
                raise PipelineError(f"the model reads {num_neighbors} neighbors but only "
                                    f"{neighbor_ids.shape[1]} were saved per chunk (query.num_neighbors_save)")
            self.neighbor_ids = neighbor_ids  # may be a memory map: batches read their rows only

    def __len__(self) -> int:
        return len(self.layout)

    def sample_neighbor_ids(self, s: int) -> np.ndarray:
        m = self.chunks_per_sample
        return np.asarray(self.neighbor_ids[s * m : (s + 1) * m, : self.k], dtype=np.int64)

    def fact_mask(self, s: int) -> np.ndarray:
        """1.0 where the label is a fact token (label at position i is the next token)."""
        cl = self.chunk_length
        out = np.zeros(self.seq_length, dtype=np.float32)
        for j, (doc, start, length) in enumerate(self.layout.sample_rows(s)):
            flags = self.fact_flags.get(int(doc)) if doc >= 0 else None
            if flags is None:
                continue
            nxt = flags[start + 1 : start + length + 1]  # labels: the tokens after each position
            out[j * cl : j * cl + len(nxt)] = nxt
        return out

    def read_for(self, indices) -> np.ndarray:
        """(B, C, chunk_length) int64: for each neighbor slot of samples ``indices``, the tokens of
        the chunk the model reads those neighbors for (query chunk ``q``'s neighbors serve chunk
        ``q + 1``; the last slot of a sample serves the first chunk of the next sample).
        Positions that are not tokens (a short chunk's end, an empty chunk) are -1."""
        m, rows = self.chunks_per_sample, self.layout.chunks
        out = np.empty((len(indices), m, self.chunk_length), dtype=np.int64)
        for b, s in enumerate(indices):
            nxt = rows[int(s) * m + 1 : (int(s) + 1) * m + 1]
            if len(nxt) < m:  # the split's last chunk: nothing follows it
                nxt = np.concatenate([nxt, np.array([(-1, 0, 0)] * (m - len(nxt)), dtype=CHUNK_DTYPE)])
            out[b] = chunk_tokens(self.layout.store, nxt, self.chunk_length, pad_id=-1)
        return out

    def batch(self, indices, shuffled_neighbors: bool = False, max_overlap: float | None = None) -> dict[str, torch.Tensor]:
        """The batch of samples ``indices``; with ``shuffled_neighbors`` sample ``s`` reads the
        neighbors of sample ``(s + n // 2) % n``; with ``max_overlap`` every neighbor whose
        overlap with the chunk it is read for (:meth:`read_for`) exceeds it is masked out."""
        parts = [self.layout.sample(int(s)) for s in indices]
        batch = {
            "tokens": torch.from_numpy(np.stack([p[0] for p in parts])),
            "labels": torch.from_numpy(np.stack([p[1] for p in parts])),
            "loss_mask": torch.from_numpy(np.stack([p[2] for p in parts])),
        }
        if self.k > 0:
            n = len(self)
            src = [(int(s) + n // 2) % n if shuffled_neighbors else int(s) for s in indices]
            ids = np.stack([self.sample_neighbor_ids(s) for s in src])  # (B, C, k)
            tokens, mask = self.neighbor_tokens(ids)
            if max_overlap is not None:
                mask = filter_neighbors(tokens, mask, self.read_for(indices), max_overlap)
            batch["neighbors"] = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
            batch["neighbor_mask"] = torch.from_numpy(np.asarray(mask, dtype=bool))
        if self.fact_flags is not None:
            batch["fact_mask"] = torch.from_numpy(np.stack([self.fact_mask(int(s)) for s in indices]))
        return batch


# --------------------------------------------------------------------------------------------
# Which samples each step reads


class TrainOrder:
    """Sample indices for (step, micro batch, rank): epochs of seeded permutations.

    Position ``p`` in the stream of samples is in epoch ``p // n``; each epoch is a fresh
    permutation of the n samples. The mapping depends only on the position, so a resumed run
    reads exactly the samples the uninterrupted run would have read.
    """

    def __init__(self, num_samples: int, micro_batch: int, grad_accum: int, world_size: int, rank: int, seed: int):
        if num_samples <= 0:
            raise PipelineError("the train split has no samples")
        self.n, self.mb, self.ga, self.world, self.rank, self.seed = num_samples, micro_batch, grad_accum, world_size, rank, seed
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def indices(self, step: int, micro: int) -> np.ndarray:
        first = ((step * self.ga + micro) * self.world + self.rank) * self.mb
        pos = np.arange(first, first + self.mb)
        return np.array([self.permutation(int(p // self.n))[p % self.n] for p in pos], dtype=np.int64)


def eval_indices(num_samples: int, eval_batches: int, micro_batch: int, world_size: int, rank: int) -> list[np.ndarray]:
    """This rank's validation batches: a fixed, evenly spread subset of at most
    ``eval_batches * micro_batch * world_size`` samples (all of them when the split is smaller),
    batch ``b`` of :func:`all_eval_batches` going to rank ``b % world_size``. Ranks can get
    unequal counts (160 samples in batches of 8 on 8 ranks: 3 or 2 each)."""
    return all_eval_batches(num_samples, eval_batches, micro_batch, world_size)[rank::world_size]


def all_eval_batches(num_samples: int, eval_batches: int, micro_batch: int, world_size: int) -> list[np.ndarray]:
    """Every rank's validation batches together, in order (see :func:`eval_indices`)."""
    total = min(num_samples, eval_batches * micro_batch * world_size)
    chosen = np.unique(np.linspace(0, num_samples - 1, total).round().astype(np.int64)) if total else np.zeros(0, np.int64)
    return [chosen[i : i + micro_batch] for i in range(0, len(chosen), micro_batch)]


# --------------------------------------------------------------------------------------------
# Loading the stage's inputs


def read_neighbor_ids(path: str | os.PathLike, split: str) -> np.ndarray:
    """The ``split`` dataset of ``neighbors.h5`` (n_query_chunks, K), memory-mapped.

    query-neighbors writes a contiguous int64 dataset, so this maps it at its byte offset and a
    batch reads only its samples' rows; a chunked or compressed dataset (another writer) is read.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: neighbors file not found (run query-neighbors)")
    from .dbfile import check_extent, open_h5

    with open_h5(path, "query-neighbors") as f:
        if split not in f:
            raise PipelineError(f"{path}: no dataset {split!r} (has {sorted(f.keys())})")
        ds = f[split]
        offset, shape, dtype = ds.id.get_offset(), ds.shape, ds.dtype
        if offset is None or ds.chunks is not None or ds.compression is not None or not shape[0]:
            return np.asarray(ds[...], dtype=np.int64)
        check_extent(path, f, [split], "query-neighbors")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


@dataclass
class PretrainInputs:
    """Paths of the stage's inputs."""

    tokens: str = "data/tokens/pretrain"
    neighbors: str = "data/neighbors/neighbors.h5"
    db_tokens: str = "data/tokens/db"
    embeddings: str = "data/db/embeddings.h5"
    tokenizer: str = "data/tokenizer"
    corpus: str = ""  # the pretraining corpus, for fact spans ("" = do not measure)


def load_split(inputs: PretrainInputs, model_config, split: str, fact_flags: bool = False,
               neighbor_tokens=None) -> PretrainSamples:
    """The samples of ``split`` for ``model_config`` (neighbors only for a Retro model)."""
    store = TokenStore(inputs.tokens, split)
    k = model_config.num_neighbors if model_config.retro else 0
    ids = read_neighbor_ids(inputs.neighbors, split) if k else None
    if k and neighbor_tokens is None:
        from .dbfile import NeighborTokens

        neighbor_tokens = NeighborTokens(inputs.db_tokens, inputs.embeddings, model_config.chunk_length)
    flags = None
    if fact_flags and inputs.corpus:
        flags = fact_flags_for_store(inputs.corpus, Tokenizer(inputs.tokenizer), store)
    return PretrainSamples(store, model_config.chunk_length, model_config.seq_length, ids,
                           neighbor_tokens if k else None, k, flags)
