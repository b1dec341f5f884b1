"""What storing embeddings as float16 (``embed.dtype``'s default) costs in retrieval quality.

    .venv/bin/python bench/embed_dtype.py data/db/embeddings.h5     # a float32 embeddings file
    .venv/bin/python bench/embed_dtype.py --synthetic 100000         # bench/scale_db.py's data

Takes ``--queries`` seeded DB chunks as queries, drops every chunk of the query's own document
(as query-neighbors does), and compares exact top-``k`` search over the float16-rounded
database and queries with exact search in float32: ``recall_at_k`` is tie-aware on the float32
scores (``neighbors.recall_at_k``), ``same_ids`` the plain overlap of the id sets.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from instructretro.dbfile import DBFile  # noqa: E402
from instructretro.neighbors import exact_candidates, exclude_and_keep, recall_at_k  # noqa: E402


def write(path: Path, chunks, doc_ids, emb) -> Path:
    with h5py.File(path, "w") as f:
        f["chunks"], f["doc_ids"], f["embeddings"] = chunks, doc_ids, emb
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("embeddings", nargs="?", default=None)
    ap.add_argument("--synthetic", type=int, default=0, help="DB chunks of scale_db's generator instead of a file")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("-k", type=int, default=20)
    ap.add_argument("--candidates", type=int, default=200)
    args = ap.parse_args()
    if args.synthetic:
        import scale_db

        n = args.synthetic
        centres, basis = scale_db.model(n)
        emb = scale_db.draw(np.random.default_rng(1), n, centres, basis)
        r = np.arange(n)
        chunks = np.stack([r // scale_db.CHUNKS_PER_DOC, (r % scale_db.CHUNKS_PER_DOC) * 64, np.full(n, 64)], 1)
        doc_ids = (r // scale_db.CHUNKS_PER_DOC).astype(np.uint64)
        source = f"synthetic, {n:,} chunks"
    else:
        with h5py.File(args.embeddings) as f:
            chunks, doc_ids, emb = f["chunks"][:], f["doc_ids"][:], f["embeddings"][:].astype(np.float32)
            if f["embeddings"].dtype != np.float32:
                raise SystemExit(f"{args.embeddings}: stored as {f['embeddings'].dtype}; give a float32 file (embed.dtype: float32)")
        source = f"{args.embeddings}, {len(emb):,} chunks"
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(len(emb), size=min(args.queries, len(emb)), replace=False))
    banned, valid = doc_ids[rows][:, None].astype(np.uint64), np.ones((len(rows), 1), bool)
    with tempfile.TemporaryDirectory() as tmp:
        f32 = DBFile(write(Path(tmp) / "f32.h5", chunks, doc_ids, emb))
        f16 = DBFile(write(Path(tmp) / "f16.h5", chunks, doc_ids, emb.astype(np.float16)))
        n_cand = min(args.candidates, len(emb))
        q32 = emb[rows]
        q16 = q32.astype(np.float16).astype(np.float32)
        _, c32 = exact_candidates(q32, f32, n_cand, 65536)
        _, c16 = exact_candidates(q16, f16, n_cand, 65536)
        exact = exclude_and_keep(c32, f32.doc_ids, banned, valid, args.k)
        got = exclude_and_keep(c16, f16.doc_ids, banned, valid, args.k)
        m = recall_at_k(q32, got, exact, f32, 65536)
    print(f"{source}: float16 storage vs float32, {len(rows)} queries, exact top-{args.k} after own-document exclusion: "
          f"recall_at_k {m['recall_at_k']}, same ids {m['recall_at_k_same_ids']}")


if __name__ == "__main__":
    main()
