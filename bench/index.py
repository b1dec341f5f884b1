"""Benchmark: the ``auto`` index versus exact search, at the default DB size and at 4x it.

Vectors: the DB embeddings of a built repo (``data/db/embeddings.h5``); the 4x database adds
embeddings of pretraining-corpus chunks (train split), embedded here with the same encoder.
Queries: chunks of the pretraining valid split. For each size it prints the factory ``auto``
picks, train / add / search seconds, and tie-aware recall@k (k = query.num_neighbors_save,
``num_neighbors_query`` candidates, each query's own document excluded) against
``IndexFlatIP``, for a few nprobe values.

    python bench/index.py [--repo .] [--queries 500] [--scale 1 4]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import h5py
import numpy as np

from instructretro import params as P
from instructretro.chunks import chunk_table
from instructretro.embed import Encoder, chunk_texts
from instructretro.index import FLAT_BELOW, ivf_lists, make_index, set_search_params
from instructretro.neighbors import exclude_and_keep, recall_at_k
from instructretro.tokenizer import Tokenizer
from instructretro.tokenstore import TokenStore


def embed_chunks(repo: Path, split: str, n: int, encoder: Encoder, chunk_length: int, seed: int):
    store = TokenStore(repo / "data/tokens/pretrain", split)
    table = chunk_table(store.doc_lengths(), chunk_length)
    rows = table[np.sort(np.random.default_rng(seed).choice(len(table), size=min(n, len(table)), replace=False))]
    texts = chunk_texts(store, rows, chunk_length, Tokenizer(repo / "data/tokenizer"))
    emb = encoder.encode(texts)
    keep = np.linalg.norm(emb, axis=1) > 0
    return emb[keep], store.doc_ids[rows["doc"]][keep]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=".")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--scale", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    args = ap.parse_args()
    repo = Path(args.repo)
    p = P.load(repo / "params.yaml")
    cl = p.get("retro.chunk_length", int)
    n_query, k = p.get("query.num_neighbors_query", int), p.get("query.num_neighbors_save", int)
    with h5py.File(repo / "data/db/embeddings.h5") as f:
        db, db_ids = f["embeddings"][:], f["doc_ids"][:]
        precision = str(f.attrs["encoder"]).split("(")[-1].rstrip(")")
    encoder = Encoder(p.get("embed.encoder", str), precision=precision, batch_size=p.get("embed.batch_size", int))
    t0 = time.perf_counter()
    queries, q_ids = embed_chunks(repo, "valid", args.queries, encoder, cl, seed=1)
    extra_needed = (max(args.scale) - 1) * len(db)
    extra, extra_ids = embed_chunks(repo, "train", extra_needed, encoder, cl, seed=2) if extra_needed else (db[:0], db_ids[:0])
    print(f"embedded {len(queries)} queries and {len(extra)} extra DB vectors in {time.perf_counter() - t0:.1f} s "
          f"({encoder.name}); k={k}, candidates={n_query}, {faiss.omp_get_max_threads()} threads")
    bans = (q_ids[:, None].astype(np.uint64), np.ones((len(q_ids), 1), bool))
    for scale in args.scale:
        n = min(scale * len(db), len(db) + len(extra))
        x = np.concatenate([db, extra])[:n]
        ids = np.concatenate([db_ids, extra_ids])[:n]
        t = time.perf_counter()
        exact = faiss.IndexFlatIP(x.shape[1])
        exact.add(x)
        exact.search(queries, min(n_query, n))
        t_exact = time.perf_counter() - t
        n_train = min(n, p.get("index.train_points", int))
        candidates = [make_index("auto", x.shape[1], n, n_train)[1]]
        nlist = ivf_lists(n, n_train)
        if candidates[0] == "Flat" and nlist >= 2:  # what auto would pick without its Flat floor
            candidates.append(f"IVF{nlist},Flat")
        print(f"\nDB {n} chunks (x{scale}): auto = {candidates[0]} (Flat below {FLAT_BELOW} chunks); "
              f"exact IndexFlatIP build+search {t_exact:.3f} s")
        for factory in candidates:
            index, _ = make_index(factory, x.shape[1], n, n_train)
            t = time.perf_counter()
            index.train(x[np.sort(np.random.default_rng(0).choice(n, n_train, replace=False))])
            t_train = time.perf_counter() - t
            t = time.perf_counter()
            index.add(x)
            t_add = time.perf_counter() - t
            print(f" {factory}: train {t_train:.3f} s, add {t_add:.3f} s")
            for nprobe in (args.nprobe if faiss.try_extract_index_ivf(index) else [None]):
                set_search_params(index, nprobe=nprobe)
                t = time.perf_counter()
                _, cand = index.search(queries, min(n_query, n))
                t_search = time.perf_counter() - t
                kept = exclude_and_keep(cand, ids, bans[0], bans[1], k)
                r = recall_at_k(queries, kept, x, ids, bans, n_query, k)
                print(f"  nprobe {str(nprobe):>4}: search {len(queries)} queries {t_search:.3f} s "
                      f"({len(queries) / t_search:.0f} q/s), recall@{k} {r['recall_at_k']:.4f} "
                      f"(same ids {r['recall_at_k_same_ids']:.4f})")


if __name__ == "__main__":
    main()
