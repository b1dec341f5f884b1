"""Neighbors of the pretraining chunks, and the reader that turns neighbor ids into tokens.

query-neighbors: every chunk of every pretraining sample (``chunks.SampleLayout``, both splits)
is embedded with the DB's encoder (block-wise and resumable; a chunk that coincides with a DB
chunk, same document id, start and length, re-uses the DB embedding), then the populated
index returns ``num_neighbors_query`` candidates. Every candidate from a document the query's
*sample* reads is dropped (by stable document id, so it works when the DB and pretraining
corpora are one), the first ``num_neighbors_save`` are kept and the rest is padded with -1.

Memory is bounded by ``block_size``, the index and the encoder, not by the database: the DB
file is read a block or a search result at a time (``dbfile.DBFile``, by file offset); the
query-to-DB-chunk join and the document id of a candidate come from a sorted table of the
DB's documents (one row per document, built in one streaming pass) searched with
``np.searchsorted``; the exclusion is one vectorised comparison per block; every output is
written block by block.

Quality is measured, not assumed: ``recall_at_k`` compares the stored neighbors of a random
sample of query chunks with exact inner-product search (block by block over the
DB embeddings) under the same exclusion. It is tie-aware: a stored neighbor counts as a hit
when its true score reaches the exact k-th score (duplicate chunks score equally, and either
copy is a correct answer). For an IVF index the same sample is searched again at nprobe 1, 2,
4, ... nlist (``recall_nprobe``: the curve that tells which nprobe a database needs).

Past one machine: under a launcher block ``b`` of each split goes to rank ``b % world``; every
rank embeds *and searches* its blocks and writes them to the shared work folder; after a
barrier rank 0 assembles the output from the blocks, streaming, so the bytes equal a
one-process run. Each rank opens the index only after it knows its rank.
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
from .dbfile import DBFile
from .dist import end_ranks, gather_to_rank0, start_ranks
from .embed import BlockCache, Encoder, chunk_texts, embed_block, store_fingerprint
from .errors import PipelineError
from .io import atomic_path
from .progress import progress
from .tokenizer import Tokenizer
from .tokenstore import TokenStore
from .workdir import code_files, resume_key

FEWER_THAN_K_WARNING = 0.5  # warn when more query chunks than this have fewer than k neighbors
SCORE_TOLERANCE = 1e-5  # float32 inner products of unit vectors agree to about 1e-6
REUSED, SEARCHABLE = 1, 2  # per-row flags saved with each searched block


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


class DBDocuments:
    """The DB's documents as a sorted table: stable id -> (first DB row, number of rows).

    Built in one streaming pass over ``doc_ids`` (a document's chunks are consecutive rows); one
    row per DB *document*, 40 bytes each (the table sorted by id, and by row). ``rows_of`` joins
    query chunks to DB chunks with ``np.searchsorted`` on the document id, then a vectorised binary search on the chunk start
    inside the document's rows (read from the chunk table by row).
    """

    def __init__(self, db: DBFile, block_size: int):
        self.db = db
        firsts, ids, prev = [], [], None
        for lo, hi in db.blocks(block_size):
            d = np.asarray(db.doc_ids[lo:hi])
            change = np.ones(len(d), dtype=bool)
            change[1:] = d[1:] != d[:-1]
            if prev is not None and d[0] == prev:
                change[0] = False
            firsts.append(lo + np.flatnonzero(change))
            ids.append(d[change])
            prev = d[-1]
        first = np.concatenate(firsts) if firsts else np.zeros(0, np.int64)
        doc_ids = np.concatenate(ids) if ids else np.zeros(0, np.uint64)
        count = np.diff(np.append(first, db.n))
        self.first_by_row, self.id_by_row = first, doc_ids  # row order: the document of a DB row
        order = np.argsort(doc_ids, kind="stable")
        self.doc_ids, self.first, self.count = doc_ids[order], first[order], count[order]

    def __getitem__(self, rows) -> np.ndarray:
        """Stable document id of DB rows ``rows`` (any shape): a search in the in-RAM table, so
        excluding candidates reads nothing from the DB file."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.id_by_row[np.searchsorted(self.first_by_row, rows, side="right") - 1]

    def rows_of(self, doc_ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """For each query chunk (stable doc id, start, length), the DB row of the same chunk or -1."""
        out = np.full(len(doc_ids), -1, dtype=np.int64)
        if not len(self.doc_ids) or not len(doc_ids):
            return out
        pos = np.minimum(np.searchsorted(self.doc_ids, doc_ids), len(self.doc_ids) - 1)
        hit = self.doc_ids[pos] == doc_ids
        lo = np.where(hit, self.first[pos], 0)
        hi = np.where(hit, self.first[pos] + self.count[pos], 0)
        end = hi.copy()
        active = lo < hi
        while active.any():  # lower bound of ``start`` in the document's rows, all queries at once
            q = np.flatnonzero(active)
            mid = (lo[q] + hi[q]) // 2
            below = _column(self.db.chunks, mid, 1) < starts[q]
            lo[q] = np.where(below, mid + 1, lo[q])
            hi[q] = np.where(below, hi[q], mid)
            active = lo < hi
        q = np.flatnonzero(hit & (lo < end))
        if len(q):
            found = np.asarray(self.db.chunks[lo[q]]).reshape(-1, 3)
            same = (found[:, 1] == starts[q]) & (found[:, 2] == lengths[q])
            out[q[same]] = lo[q[same]]
        return out


def _column(table, rows: np.ndarray, c: int) -> np.ndarray:
    return np.asarray(table[rows]).reshape(len(rows), -1)[:, c]


class QuerySplit:
    """The query chunks of one pretraining split, and per-block views of them."""

    def __init__(self, tokens_dir, split: str, chunk_length: int, seq_length: int):
        self.store = TokenStore(tokens_dir, split)
        self.layout = SampleLayout(self.store, chunk_length, seq_length)
        self.rows = self.layout.chunks
        self.n = len(self.rows)
        self.m = self.layout.chunks_per_sample

    def doc_ids(self, lo: int, hi: int) -> np.ndarray:
        """Stable document ids of rows ``[lo, hi)`` (0 for padding rows)."""
        doc = self.rows["doc"][lo:hi]
        if not len(self.store):
            return np.zeros(hi - lo, np.uint64)
        return np.where(doc >= 0, self.store.doc_ids[np.maximum(doc, 0)], 0).astype(np.uint64)

    def bans(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per query row: the stable ids of the documents its sample reads (n, m) and a valid mask."""
        s = np.asarray(rows, dtype=np.int64) // self.m
        docs = self.rows["doc"].reshape(-1, self.m)[s]
        valid = docs >= 0
        if not len(self.store):
            return np.zeros(docs.shape, np.uint64), valid
        return np.where(valid, self.store.doc_ids[np.maximum(docs, 0)], 0).astype(np.uint64), valid


def search_block(index, emb: np.ndarray, rows: np.ndarray, split: QuerySplit, db: DBFile,
                 n_query: int, n_save: int, documents: "DBDocuments") -> np.ndarray:
    """Neighbors (len(rows), n_save) of query ``rows`` with embeddings ``emb``, sample documents excluded."""
    out = np.full((len(rows), n_save), -1, dtype=np.int64)
    live = np.flatnonzero(np.linalg.norm(emb, axis=1) > 0)
    if len(live):
        _, cand = index.search(np.ascontiguousarray(emb[live], dtype=np.float32), min(n_query, max(db.n, 1)))
        banned, valid = split.bans(rows[live])
        out[live] = exclude_and_keep(cand, documents, banned, valid, n_save)
    return out


def exact_candidates(queries: np.ndarray, db: DBFile, n: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``n`` inner-product (scores, ids) of ``queries``, best first: one pass over DB blocks."""
    nq = len(queries)
    best_s = np.full((nq, 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((nq, 0), dtype=np.int64)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    for lo, hi in db.blocks(block_size):
        scores = q @ np.asarray(db.embeddings[lo:hi], dtype=np.float32).T
        s = np.concatenate([best_s, scores], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(lo, hi), scores.shape)], axis=1)
        if s.shape[1] > n:
            keep = np.argpartition(-s, n - 1, axis=1)[:, :n]
            s, i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
        best_s, best_i = s, i
    order = np.lexsort((best_i, -best_s), axis=1)
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def recall_at_k(queries: np.ndarray, approx: np.ndarray, exact: np.ndarray, db: DBFile, block_size: int) -> dict:
    """Tie-aware recall@k of ``approx`` (nq, k) against ``exact`` (nq, k), both after exclusion."""
    hits = wanted = same_ids = 0
    last = np.array([e[e >= 0][-1] if (e >= 0).any() else -1 for e in exact])
    has = last >= 0
    thresholds = np.full(len(queries), np.inf, dtype=np.float32)
    if has.any():
        thresholds[has] = np.einsum("ij,ij->i", db.embedding_rows(last[has], block_size), queries[has]) - SCORE_TOLERANCE
    a_ok = approx >= 0
    a_scores = np.full(approx.shape, -np.inf, dtype=np.float32)
    if a_ok.any():
        qi, ki = np.nonzero(a_ok)
        a_scores[qi, ki] = np.einsum("ij,ij->i", db.embedding_rows(approx[qi, ki], block_size), queries[qi])
    for q in np.flatnonzero(has):
        e = exact[q][exact[q] >= 0]
        hits += min(len(e), int((a_scores[q] >= thresholds[q]).sum()))
        same_ids += len(np.intersect1d(approx[q][a_ok[q]], e))
        wanted += len(e)
    return {"recall_at_k": round(hits / wanted, 4) if wanted else None,
            "recall_at_k_same_ids": round(same_ids / wanted, 4) if wanted else None,
            "recall_queries": int(len(queries))}


def _exclude_blockwise(cand, documents, banned, valid, k: int, block_size: int) -> np.ndarray:
    """``exclude_and_keep`` on ``block_size`` queries at a time."""
    return np.concatenate([exclude_and_keep(cand[lo : lo + block_size], documents, banned[lo : lo + block_size],
                                            valid[lo : lo + block_size], k)
                           for lo in range(0, len(cand), block_size)] or [np.zeros((0, k), np.int64)])


def recall_check(index, queries: np.ndarray, approx: np.ndarray, rows: np.ndarray, split: QuerySplit, db: DBFile,
                 documents: "DBDocuments", n_query: int, n_save: int, block_size: int, nprobe_max: int = 0) -> tuple[dict, list[tuple[int, float]]]:
    """``recall_at_k`` of the stored neighbors, and (nprobe, recall_at_k) at nprobe 1, 2, 4, ... nlist
    (or up to ``nprobe_max`` when > 0: probing every list of a big index is a full scan).

    A non-IVF index gets one row, at nprobe 0 (nothing to probe).
    """
    banned, valid = split.bans(rows)
    _, cand = exact_candidates(queries, db, min(n_query, db.n), block_size)
    exact = _exclude_blockwise(cand, documents, banned, valid, n_save, block_size)
    metrics = recall_at_k(queries, approx, exact, db, block_size)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return metrics, [(0, metrics["recall_at_k"])]
    curve, nprobe, was = [], 1, ivf.nprobe
    top = min(ivf.nlist, nprobe_max) if nprobe_max > 0 else ivf.nlist
    while True:
        ivf.nprobe = min(nprobe, top)
        _, c = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(n_query, db.n))
        got = _exclude_blockwise(c, documents, banned, valid, n_save, block_size)
        curve.append((int(ivf.nprobe), recall_at_k(queries, got, exact, db, block_size)["recall_at_k"]))
        if ivf.nprobe >= top:
            break
        nprobe *= 2
    ivf.nprobe = was
    return metrics, curve


def file_key(path: str | os.PathLike) -> str:
    """What identifies an index file for a resume key: its path, size and mtime (hashing a file
    of hundreds of GB would cost more than the search it saves); for a folder (the populated
    index: index file, on-disk lists, record) those of each file in it."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return "|".join(f"{f.resolve()}|{f.stat().st_size}|{f.stat().st_mtime_ns}" for f in files)


def _search_settings(index) -> str:
    ivf = faiss.try_extract_index_ivf(index)
    hnsw = [getattr(x, "hnsw", None) for x in (index, getattr(ivf, "quantizer", None)) if x is not None]
    return f"{getattr(ivf, 'nprobe', None)}|{[h.efSearch for h in hnsw if h is not None]}"


def query_neighbors(pretrain_tokens_dir: str | os.PathLike, tokenizer_path: str | os.PathLike, encoder: Encoder,
                    index, embeddings_h5: str | os.PathLike, chunk_length: int, seq_length: int,
                    n_query: int, n_save: int, block_size: int, recall_sample: int, seed: int,
                    out: str | os.PathLike, work_dir: str | os.PathLike, index_key: str | None = None,
                    recall_nprobe_max: int = 0) -> dict | None:
    """Neighbors of every pretraining query chunk (train and valid) into ``out``; return metrics.

    ``index`` is the populated index (search settings applied), or a function that opens it,
    called once this process knows its rank; then ``index_key`` identifies it for the resume
    key (``file_key`` of its file). Under a launcher every rank
    embeds and searches its query blocks; rank 0 assembles ``out`` and returns the metrics
    (``recall_nprobe`` holds the nprobe curve), the other ranks return ``None``.
    """
    if n_save > n_query:
        raise PipelineError(f"params.yaml: query.num_neighbors_save ({n_save}) must be <= query.num_neighbors_query ({n_query})")
    db = DBFile(embeddings_h5)
    attrs = db.attrs
    if attrs.get("encoder") != encoder.name or int(attrs.get("chunk_length", -1)) != chunk_length:
        raise PipelineError(f"{db.path}: built with encoder {attrs.get('encoder')!r} and chunk_length "
                            f"{attrs.get('chunk_length')}, but params give {encoder.name!r} and {chunk_length}; rerun embed")
    tok = Tokenizer(tokenizer_path)
    t_start = time.perf_counter()
    rank, world = start_ranks()
    if callable(index):
        if index_key is None:
            raise ValueError("query_neighbors: an index opener needs index_key")
        index = index()
    else:
        index_key = hashlib.blake2b(faiss.serialize_index(index).tobytes(), digest_size=16).hexdigest()
    index_key = f"{index_key}|{_search_settings(index)}"
    if index.ntotal != db.n:
        raise PipelineError(f"populated index holds {index.ntotal} vectors but {db.path} has {db.n} chunks; rerun add-index")
    documents = DBDocuments(db, block_size)
    code = code_files(__file__)  # every block cache is keyed by the code too (workdir.resume_key)
    splits = {}
    embedded = seconds = search_seconds = 0.0
    searched = 0
    for name in ("train", "valid"):  # every rank embeds and searches its blocks of both splits
        split = QuerySplit(pretrain_tokens_dir, name, chunk_length, seq_length)
        emb_key = resume_key({"split": name, "store": store_fingerprint(pretrain_tokens_dir, name),
                              "tokenizer": tok.digest, "db": db.fingerprint,
                              "encoder": encoder.fingerprint(), "chunk_length": chunk_length,
                              "seq_length": seq_length, "block_size": block_size}, code=code)
        emb_cache = BlockCache(Path(work_dir) / "embed" / name, emb_key)
        nb_key = resume_key({"embed": emb_key, "index": index_key, "n_query": n_query, "n_save": n_save}, code=code)
        nb_cache = BlockCache(Path(work_dir) / "search" / name, nb_key)
        rows = split.rows

        def texts_of(lo, hi, split=split):
            return chunk_texts(split.store, split.rows[lo:hi], chunk_length, tok)

        n_blocks = -(-split.n // block_size)
        mine = range(rank, n_blocks, world)
        bar = progress(total=len(mine), desc=f"query blocks ({name})" + (f" [rank {rank}/{world}]" if world > 1 else ""),
                       unit="block")
        for b in mine:
            lo, hi = b * block_size, min(split.n, (b + 1) * block_size)
            if nb_cache.has(b) and nb_cache.has(b, "flags"):
                bar.update(1)
                continue
            real = rows["doc"][lo:hi] >= 0
            known = documents.rows_of(split.doc_ids(lo, hi), rows["start"][lo:hi], rows["length"][lo:hi])
            known[~real] = -2  # empty padding chunks: nothing to embed or search
            if emb_cache.has(b):
                emb = emb_cache.load(b)
            else:
                t0 = time.perf_counter()
                emb, n_enc = embed_block(texts_of, lo, hi, encoder, known, db.embeddings)
                emb_cache.save(b, emb)
                seconds += time.perf_counter() - t0
                embedded += n_enc
            searchable = np.linalg.norm(emb, axis=1) > 0
            t0 = time.perf_counter()
            nb_cache.save(b, search_block(index, emb, np.arange(lo, hi), split, db, n_query, n_save, documents))
            search_seconds += time.perf_counter() - t0
            searched += int(searchable.sum())
            nb_cache.save(b, ((known >= 0) * REUSED + searchable * SEARCHABLE).astype(np.uint8), "flags")
            bar.update(1)
        bar.close()
        splits[name] = (split, emb_cache, nb_cache)
    gathered = gather_to_rank0(world, int(embedded), seconds)
    if gathered is None:
        db.close()
        return None  # not rank 0: this rank's blocks are in the work folder
    embedded, seconds = gathered
    metrics, curve = assemble_neighbors(out, splits, index, db, documents, n_query, n_save, chunk_length, seq_length,
                                        block_size, recall_sample, seed, recall_nprobe_max)
    db.close()
    end_ranks(world)
    metrics["query_chunks_per_s"] = round(embedded / seconds, 1) if seconds > 0 else None
    metrics["seconds"] = round(time.perf_counter() - t_start, 2)
    metrics["warning"] = fewer_than_k_warning(metrics, len(documents.doc_ids))
    # this rank's own search (search + exclusion; with several ranks, rank 0's share)
    metrics["search_ms_per_query_chunk"] = round(1000 * search_seconds / searched, 4) if searched else None
    metrics["recall_nprobe"] = curve
    return metrics


def assemble_neighbors(out: str | os.PathLike, splits: dict, index, db: DBFile, documents: "DBDocuments",
                       n_query: int, n_save: int, chunk_length: int, seq_length: int, block_size: int,
                       recall_sample: int, seed: int, recall_nprobe_max: int = 0) -> tuple[dict, list]:
    """Rank 0's half of query-neighbors, once every block is searched: stream the blocks of both
    splits (``splits[name] = (QuerySplit, embedding cache, neighbor cache)``) into ``out``, count
    per split, check recall on a sample of train query chunks, and delete the blocks.

    Returns ``(metrics, recall_nprobe curve)``: the per-split counts, recall and the overall
    ``fraction_fewer_than_k``.
    """
    metrics, curve = {}, []
    rng = np.random.default_rng(seed)
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as f:
            for name in ("train", "valid"):  # rank 0 assembles the blocks, streaming
                split, emb_cache, nb_cache = splits[name]
                ds = f.create_dataset(name, shape=(split.n, n_save), dtype=np.int64, track_times=False)
                searchable = np.zeros(split.n, dtype=bool)
                counts = dict(real=0, reused=0, short=0, none=0)
                for b in range(-(-split.n // block_size)):
                    lo, hi = b * block_size, min(split.n, (b + 1) * block_size)
                    nb, flags = nb_cache.load(b), nb_cache.load(b, "flags")
                    ds[lo:hi] = nb
                    real = split.rows["doc"][lo:hi] >= 0
                    searchable[lo:hi] = (flags & SEARCHABLE) > 0
                    counts["real"] += int(real.sum())
                    counts["reused"] += int(((flags & REUSED) > 0).sum())
                    counts["short"] += int((nb[real] < 0).any(axis=1).sum())
                    counts["none"] += int((nb[real] < 0).all(axis=1).sum())
                metrics[name] = {
                    "query_chunks": counts["real"],
                    "query_chunks_padding": int(split.n - counts["real"]),
                    "query_chunks_reusing_db_embedding": counts["reused"],
                    "query_chunks_no_encoder_tokens": int(counts["real"] - searchable.sum()),
                    "fraction_fewer_than_k": round(counts["short"] / counts["real"], 4) if counts["real"] else 0.0,
                    "query_chunks_no_neighbor": counts["none"],
                }
                if name == "train" and searchable.any() and recall_sample > 0:
                    pick = np.flatnonzero(searchable)
                    pick = np.sort(rng.choice(pick, size=min(recall_sample, len(pick)), replace=False))
                    blocks = pick // block_size
                    q_emb = np.concatenate([emb_cache.load(b)[pick[blocks == b] - b * block_size] for b in np.unique(blocks)])
                    approx = np.concatenate([nb_cache.load(b)[pick[blocks == b] - b * block_size] for b in np.unique(blocks)])
                    t_recall = time.perf_counter()
                    recall, curve = recall_check(index, q_emb, approx, pick, split, db, documents, n_query, n_save, block_size,
                                                 recall_nprobe_max)
                    metrics.update(recall)
                    metrics["recall_seconds"] = round(time.perf_counter() - t_recall, 2)
                del searchable
            f.attrs["num_neighbors_save"] = n_save
            f.attrs["chunk_length"] = chunk_length
            f.attrs["seq_length"] = seq_length
    for _, emb_cache, nb_cache in splits.values():  # the output is complete: the blocks are no longer needed
        emb_cache.clear()
        nb_cache.clear()
    total_real = metrics["train"]["query_chunks"] + metrics["valid"]["query_chunks"]
    metrics["k"] = n_save
    metrics["fraction_fewer_than_k"] = round(
        (metrics["train"]["fraction_fewer_than_k"] * metrics["train"]["query_chunks"]
         + metrics["valid"]["fraction_fewer_than_k"] * metrics["valid"]["query_chunks"]) / max(total_real, 1), 4)
    return metrics, curve


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
