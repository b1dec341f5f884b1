"""Neighbors of the pretraining chunks, and the reader that turns neighbor ids into tokens.

query-neighbors: every chunk of every pretraining sample (``chunks.SampleLayout``, both splits)
is embedded with the DB's encoder (block-wise and resumable; a chunk that coincides with a DB
chunk, same document id, start and length, re-uses the DB embedding), then the populated
index returns ``num_neighbors_query`` candidates. Every candidate from a document the query's
*sample* reads is dropped (by stable document id, so it works when the DB and pretraining
corpora are one), the first ``num_neighbors_save`` are kept and the rest is padded with -1.

Quality is measured, not assumed: ``recall_at_k`` compares the stored neighbors of a random
sample of query chunks with exact inner-product search (``IndexFlatIP``) under the same
exclusion. It is tie-aware: a stored neighbor counts as a hit when its true score reaches the
exact k-th score (duplicate chunks score equally, and either copy is a correct answer).

``NeighborTokens`` reads neighbors as the model sees them: the chunk plus its continuation (the
next ``chunk_length`` tokens of the same document, cut at the document end), ``2*chunk_length``
tokens padded with EOD, and a mask of the real tokens.

Past one machine: under a launcher each rank embeds its share of the query blocks (block ``b``
goes to rank ``b % world``, both splits) into the shared work folder; after a barrier rank 0
alone searches and writes the output, so the bytes equal a one-process run.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import faiss
import h5py
import numpy as np

from .chunks import SampleLayout
from .embed import (BlockCache, Encoder, _file_digest, chunk_texts, embed_rows_blockwise, end_ranks,
                    gather_to_rank0, start_ranks, store_fingerprint)
from .errors import PipelineError
from .io import atomic_path
from .progress import progress
from .tokenizer import EOD_ID, Tokenizer
from .tokenstore import TokenStore

FEWER_THAN_K_WARNING = 0.5  # warn when more query chunks than this have fewer than k neighbors
SCORE_TOLERANCE = 1e-5  # float32 inner products of unit vectors agree to about 1e-6


class NeighborTokens:
    """``NeighborTokens(db_tokens_dir, embeddings_h5, chunk_length)(ids) -> (tokens, mask)``.

    ``ids`` int64 (..., k) DB chunk ids (-1 = none) -> ``tokens`` int64 (..., k, 2*chunk_length)
    and ``mask`` bool of the same shape. Vectorised: one gather from the memory-mapped store.
    """

    def __init__(self, db_tokens_dir: str | os.PathLike, embeddings_h5: str | os.PathLike, chunk_length: int):
        self.store = TokenStore(db_tokens_dir, "train")
        path = Path(embeddings_h5)
        if not path.is_file():
            raise PipelineError(f"{path}: embeddings file not found; run the embed stage")
        with h5py.File(path, "r") as f:
            chunks = f["chunks"][:]
            stored_cl = int(f.attrs.get("chunk_length", chunk_length))
        if stored_cl != chunk_length:
            raise PipelineError(f"{path}: built with chunk_length {stored_cl}, asked for {chunk_length}; rerun embed")
        self.chunk_length = chunk_length
        self.width = 2 * chunk_length
        doc, start = chunks[:, 0], chunks[:, 1]
        doc_len = self.store.doc_lengths()[doc]
        self.begin = self.store.offsets[doc] + start  # first token of each chunk in the store
        self.length = np.minimum(self.width, doc_len - start)  # chunk + continuation, cut at doc end
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.begin)

    def __call__(self, ids) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        if flat.size and (flat.max(initial=-1) >= len(self) or flat.min(initial=0) < -1):
            raise PipelineError(f"neighbor ids must be in [-1, {len(self)}), got {flat.min()}..{flat.max()}")
        valid = flat >= 0
        safe = np.where(valid, flat, 0)
        length = np.where(valid, self.length[safe], 0)
        pos = np.arange(self.width)
        mask = pos[None, :] < length[:, None]
        where = np.where(mask, self.begin[safe][:, None] + pos[None, :], 0)
        tokens = np.where(mask, self.store.tokens[where] if len(self.store.tokens) else 0, EOD_ID).astype(np.int64)
        shape = ids.shape + (self.width,)
        return tokens.reshape(shape), mask.reshape(shape)


def exclude_and_keep(candidates: np.ndarray, db_doc_ids: np.ndarray, banned: np.ndarray,
                     banned_valid: np.ndarray, k: int) -> np.ndarray:
    """Drop candidates whose DB document is banned for their query; keep the first ``k``, pad -1.

    ``candidates`` (nq, K) ids in rank order (-1 = none); ``banned`` (nq, m) uint64 document ids
    with ``banned_valid`` (nq, m) marking the real ones.
    """
    ok = candidates >= 0
    docs = db_doc_ids[np.where(ok, candidates, 0)]
    clash = ((docs[:, :, None] == banned[:, None, :]) & banned_valid[:, None, :]).any(-1)
    keep = ok & ~clash
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept ones first, in rank order
    out = np.take_along_axis(candidates, order, axis=1)
    out[~np.take_along_axis(keep, order, axis=1)] = -1
    if out.shape[1] < k:
        out = np.pad(out, ((0, 0), (0, k - out.shape[1])), constant_values=-1)
    return out


def sample_bans(layout: SampleLayout) -> tuple[np.ndarray, np.ndarray]:
    """Per query chunk: the stable ids of the documents its sample reads (nq, m) and a valid mask."""
    m = layout.chunks_per_sample
    docs = layout.chunks["doc"].reshape(-1, m)
    valid = docs >= 0
    ids = np.where(valid, layout.store.doc_ids[np.where(valid, docs, 0)] if len(layout.store) else 0, 0)
    ids = ids.astype(np.uint64)
    return np.repeat(ids, m, axis=0), np.repeat(valid, m, axis=0)


def db_rows_of(layout: SampleLayout, db_chunks: np.ndarray, db_doc_ids: np.ndarray) -> np.ndarray:
    """For each query chunk, the DB chunk with the same document id, start and length, or -1."""
    where = {(int(d), int(s)): r for r, (d, s) in enumerate(zip(db_doc_ids.tolist(), db_chunks[:, 1].tolist()))}
    rows = layout.chunks
    out = np.full(len(rows), -1, dtype=np.int64)
    if not len(layout.store):
        return out
    qdoc = layout.store.doc_ids[np.maximum(rows["doc"], 0)]
    for q, (d, s, length, doc) in enumerate(zip(qdoc.tolist(), rows["start"].tolist(), rows["length"].tolist(), rows["doc"].tolist())):
        if doc < 0:
            continue
        r = where.get((d, s))
        if r is not None and db_chunks[r, 2] == length:
            out[q] = r
    return out


def search_blocks(index, cache: BlockCache, n_rows: int, block_size: int, searchable: np.ndarray,
                  bans: tuple[np.ndarray, np.ndarray], db_doc_ids: np.ndarray, n_query: int, n_save: int,
                  desc: str) -> np.ndarray:
    """Search every searchable query row (embeddings from ``cache``), exclude, keep ``n_save``."""
    out = np.full((n_rows, n_save), -1, dtype=np.int64)
    banned, banned_valid = bans
    for b in progress(range(-(-n_rows // block_size)), desc=desc, unit="block"):
        lo, hi = b * block_size, min(n_rows, (b + 1) * block_size)
        rows = lo + np.flatnonzero(searchable[lo:hi])
        if not len(rows):
            continue
        emb = cache.load(b)[rows - lo]
        _, cand = index.search(np.ascontiguousarray(emb), n_query)
        out[rows] = exclude_and_keep(cand, db_doc_ids, banned[rows], banned_valid[rows], n_save)
    return out


def recall_at_k(queries: np.ndarray, approx: np.ndarray, db_embeddings: np.ndarray, db_doc_ids: np.ndarray,
                bans: tuple[np.ndarray, np.ndarray], n_query: int, k: int) -> dict:
    """Tie-aware recall@k of ``approx`` (nq, k) against exact inner-product search, same exclusion."""
    exact_index = faiss.IndexFlatIP(db_embeddings.shape[1])
    exact_index.add(db_embeddings)
    _, cand = exact_index.search(np.ascontiguousarray(queries), min(n_query, len(db_embeddings)))
    exact = exclude_and_keep(cand, db_doc_ids, bans[0], bans[1], k)
    hits = wanted = same_ids = 0
    for q in range(len(queries)):
        e = exact[q][exact[q] >= 0]
        a = approx[q][approx[q] >= 0]
        if not len(e):
            continue
        threshold = float(db_embeddings[e[-1]] @ queries[q]) - SCORE_TOLERANCE
        scores = db_embeddings[a] @ queries[q] if len(a) else np.zeros(0)
        hits += min(len(e), int((scores >= threshold).sum()))
        same_ids += len(np.intersect1d(a, e))
        wanted += len(e)
    return {"recall_at_k": round(hits / wanted, 4) if wanted else None,
            "recall_at_k_same_ids": round(same_ids / wanted, 4) if wanted else None,
            "recall_queries": int(len(queries))}


def query_neighbors(pretrain_tokens_dir: str | os.PathLike, tokenizer_path: str | os.PathLike, encoder: Encoder,
                    index, embeddings_h5: str | os.PathLike, chunk_length: int, seq_length: int,
                    n_query: int, n_save: int, block_size: int, recall_sample: int, seed: int,
                    out: str | os.PathLike, work_dir: str | os.PathLike) -> dict | None:
    """Neighbors of every pretraining query chunk (train and valid) into ``out``; return metrics.

    Under a launcher every rank embeds its query blocks; rank 0 searches, writes ``out`` and
    returns the metrics, the other ranks return ``None``.
    """
    if n_save > n_query:
        raise PipelineError(f"params.yaml: query.num_neighbors_save ({n_save}) must be <= query.num_neighbors_query ({n_query})")
    emb_path = Path(embeddings_h5)
    db = h5py.File(emb_path, "r")
    with db:
        db_chunks, db_doc_ids, db_emb = db["chunks"][:], db["doc_ids"][:], db["embeddings"][:]
        attrs = dict(db.attrs)
    if attrs.get("encoder") != encoder.name or int(attrs.get("chunk_length", -1)) != chunk_length:
        raise PipelineError(f"{emb_path}: built with encoder {attrs.get('encoder')!r} and chunk_length "
                            f"{attrs.get('chunk_length')}, but params give {encoder.name!r} and {chunk_length}; rerun embed")
    if index.ntotal != len(db_chunks):
        raise PipelineError(f"populated index holds {index.ntotal} vectors but {emb_path} has {len(db_chunks)} chunks; rerun add-index")
    tok = Tokenizer(tokenizer_path)
    t_start = time.perf_counter()
    rank, world = start_ranks()
    prepared = {}
    embedded = seconds = 0.0
    for split in ("train", "valid"):  # 1. every rank embeds its blocks of the query chunks
        store = TokenStore(pretrain_tokens_dir, split)
        layout = SampleLayout(store, chunk_length, seq_length)
        rows = layout.chunks
        n = len(rows)
        known = db_rows_of(layout, db_chunks, db_doc_ids)
        known[rows["doc"] < 0] = -2  # empty padding chunks: nothing to embed or search
        key = hashlib.blake2b(
            f"{split}|{store_fingerprint(pretrain_tokens_dir, split)}|{_file_digest(Path(tokenizer_path)).hex()}"
            f"|{_file_digest(emb_path).hex()}|{encoder.fingerprint()}|{chunk_length}|{seq_length}|{block_size}".encode(),
            digest_size=12).hexdigest()
        cache = BlockCache(Path(work_dir) / split, key)

        def texts_of(lo, hi, store=store, rows=rows):
            return chunk_texts(store, rows[lo:hi], chunk_length, tok)

        done, secs = embed_rows_blockwise(texts_of, n, encoder, block_size, cache, f"embed queries ({split})",
                                          known=known, known_embeddings=db_emb, rank=rank, world=world)
        embedded += done
        seconds += secs
        prepared[split] = (layout, known, cache)
    gathered = gather_to_rank0(world, int(embedded), seconds)
    if gathered is None:
        return None  # not rank 0: this rank's blocks are in the work folder
    embedded, seconds = gathered
    results, metrics, caches = {}, {}, []
    rng = np.random.default_rng(seed)
    for split in ("train", "valid"):  # 2. rank 0 searches every block
        layout, known, cache = prepared[split]
        rows = layout.chunks
        n = len(rows)
        n_blocks = -(-n // block_size)
        norms = np.concatenate([np.linalg.norm(cache.load(b), axis=1) for b in range(n_blocks)]) if n else np.zeros(0)
        searchable = norms > 0
        bans = sample_bans(layout)
        neighbors = search_blocks(index, cache, n, block_size, searchable, bans, db_doc_ids, n_query, n_save,
                                  f"search ({split})")
        results[split] = neighbors
        real = rows["doc"] >= 0
        short = (neighbors[real] < 0).any(axis=1) if real.any() else np.zeros(0, bool)
        metrics[split] = {
            "query_chunks": int(real.sum()),
            "query_chunks_padding": int((~real).sum()),
            "query_chunks_reusing_db_embedding": int((known >= 0).sum()),
            "query_chunks_no_encoder_tokens": int((real & ~searchable).sum()),
            "fraction_fewer_than_k": round(float(short.mean()), 4) if len(short) else 0.0,
            "query_chunks_no_neighbor": int((neighbors[real] < 0).all(axis=1).sum()) if real.any() else 0,
        }
        if split == "train" and searchable.any() and recall_sample > 0:
            pick = np.flatnonzero(searchable)
            pick = np.sort(rng.choice(pick, size=min(recall_sample, len(pick)), replace=False))
            q_emb = np.concatenate([cache.load(b)[pick[(pick // block_size) == b] - b * block_size]
                                    for b in np.unique(pick // block_size)])
            metrics.update(recall_at_k(q_emb, neighbors[pick], db_emb, db_doc_ids,
                                       (bans[0][pick], bans[1][pick]), n_query, n_save))
        caches.append(cache)
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as f:
            for split in ("train", "valid"):
                f.create_dataset(split, data=results[split], track_times=False)
            f.attrs["num_neighbors_save"] = n_save
            f.attrs["chunk_length"] = chunk_length
            f.attrs["seq_length"] = seq_length
    for cache in caches:  # the output is complete: the finished blocks are no longer needed
        cache.clear()
    end_ranks(world)
    total_real = metrics["train"]["query_chunks"] + metrics["valid"]["query_chunks"]
    metrics["k"] = n_save
    metrics["fraction_fewer_than_k"] = round(
        (metrics["train"]["fraction_fewer_than_k"] * metrics["train"]["query_chunks"]
         + metrics["valid"]["fraction_fewer_than_k"] * metrics["valid"]["query_chunks"]) / max(total_real, 1), 4)
    metrics["query_chunks_per_s"] = round(embedded / seconds, 1) if seconds > 0 else None
    metrics["seconds"] = round(time.perf_counter() - t_start, 2)
    metrics["warning"] = fewer_than_k_warning(metrics, len(np.unique(db_doc_ids)))
    return metrics


def fewer_than_k_warning(metrics: dict, db_documents: int) -> str | None:
    """One line when many query chunks have fewer than k neighbors (None otherwise)."""
    frac = metrics["fraction_fewer_than_k"]
    if frac <= FEWER_THAN_K_WARNING:
        return None
    none = metrics["train"]["query_chunks_no_neighbor"] + metrics["valid"]["query_chunks_no_neighbor"]
    total = metrics["train"]["query_chunks"] + metrics["valid"]["query_chunks"]
    return (f"{frac:.0%} of query chunks have fewer than {metrics['k']} neighbors and {none} of {total} have none: "
            f"the database corpus has {db_documents} document{'' if db_documents == 1 else 's'}, and DB chunks of a sample's own documents are "
            "excluded (a corpus that is one document, e.g. one .txt file as both corpora, leaves no neighbor)")
