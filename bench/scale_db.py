"""Scale benchmark of the retrieval database: train-index, add-index and query-neighbors on
synthetic databases of 10^5, 10^6 and 10^7 chunks, with the index string ``auto`` picks.

    .venv/bin/python bench/scale_db.py                          # 10^5 and 10^6
    nice -n 10 .venv/bin/python bench/scale_db.py --sizes 10000000 --dir /work/tmp-scale  # ~8 GB + 4 GB
    .venv/bin/python bench/scale_db.py --sizes 100000 --queries 1000000   # more query chunks

No encoder runs: the database is synthetic clustered unit vectors of the encoder's dimension
(384): a cluster centre (1,024 of them) plus a point of a shared 32-d subspace plus isotropic
noise, stored as embed writes them (contiguous float16 ``embeddings.h5`` with chunk table, doc
ids and fingerprint). The query chunks are a real token store (random tokens, a SentencePiece
model trained here) of ``--queries`` chunks; a stand-in encoder maps each chunk's text to a
vector of the same generative model (seeded by a hash of the text), so query-neighbors runs
exactly as in the pipeline (detokenise, "encode", search, exclude, write, recall check).

Every stage runs through the stage's own function (``index.train_index``, ``index.populate``,
``neighbors.query_neighbors``) in its own process, whose wall time and peak RSS (``wait4``) are
reported, with the index size, the search time per query chunk (search + exclusion) and
``recall_at_k`` at two nprobe values (from the stage's recall-per-nprobe curve).

Targets: peak RSS of add-index and query-neighbors at the largest size within 1.5x of the
previous size plus the index's own size; search time per query chunk flat (<= 1.3x) between the
two largest sizes at the same nprobe; recall_at_k >= 0.9 at the default nprobe for IVF strings.
The synthetic data goes under ``--dir`` (not the repo) and is deleted at the end (``--keep``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

DIM = 384  # all-MiniLM-L6-v2
CHUNKS_PER_CENTRE, RANK = 1000, 32
CHUNK, SEQ, CHUNKS_PER_DOC = 64, 256, 10
NAME = "synthetic-clusters (float32)"


def model(n_db: int):
    """The shared generative model: one cluster centre per 1,000 DB chunks and a 32-d subspace."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(max(64, n_db // CHUNKS_PER_CENTRE), DIM)).astype(np.float32)
    return centres, (0.05 * rng.normal(size=(RANK, DIM))).astype(np.float32)


def draw(rng, n: int, centres, basis) -> np.ndarray:
    x = centres[rng.integers(0, len(centres), n)] + rng.normal(size=(n, RANK)).astype(np.float32) @ basis
    x += 0.1 * rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class SyntheticEncoder:
    """Stands in for the encoder: text -> a vector of the generative model, seeded by the text."""

    name, dim = NAME, DIM

    def __init__(self, n_db: int):
        self.centres, self.basis = model(n_db)

    def fingerprint(self) -> str:
        return "synthetic-v1"

    def encode(self, texts, progress=False) -> np.ndarray:
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
            out[i] = draw(np.random.default_rng(seed), 1, self.centres, self.basis)[0]
        return out


def auto_train_points(n: int) -> int:
    """Training points for auto at ``n`` chunks: 40 per list of the 4*sqrt(n) rule (>= 39)."""
    return int(40 * 4 * math.sqrt(n))


# --------------------------------------------------------------------------------------------
# Workers: one process per stage


def make(d: Path, n: int, queries: int) -> dict:
    import h5py

    from instructretro import tokenizer
    from instructretro.tokenstore import TokenStoreWriter

    d.mkdir(parents=True, exist_ok=True)
    centres, basis = model(n)
    rng = np.random.default_rng(1)
    block = 1 << 17
    with h5py.File(d / "embeddings.h5", "w") as f:
        chunks = f.create_dataset("chunks", shape=(n, 3), dtype=np.int64)
        doc_ids = f.create_dataset("doc_ids", shape=(n,), dtype=np.uint64)
        emb = f.create_dataset("embeddings", shape=(n, DIM), dtype=np.float16)
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            r = np.arange(lo, hi)
            chunks[lo:hi] = np.stack([r // CHUNKS_PER_DOC, (r % CHUNKS_PER_DOC) * CHUNK, np.full(hi - lo, CHUNK)], 1)
            doc_ids[lo:hi] = (r // CHUNKS_PER_DOC).astype(np.uint64) * np.uint64(2) + np.uint64(1)  # odd ids
            emb[lo:hi] = draw(rng, hi - lo, centres, basis).astype(np.float16)
        f.attrs.update(encoder=NAME, chunk_length=CHUNK, dim=DIM, dtype="float16",
                       fingerprint=f"synthetic-{n}-{len(centres)}-{RANK}")
    words = [" ".join(f"w{rng.integers(0, 400)}" for _ in range(60)) for _ in range(2000)]
    (d / "spm.model").write_bytes(tokenizer.train(iter(words), 500, 1_000_000))
    vocab = tokenizer.Tokenizer(d / "spm.model").vocab_size
    w = TokenStoreWriter(d / "pretrain", vocab, tokenizer.Tokenizer(d / "spm.model").eod_id)
    tokens_per_doc = CHUNK * CHUNKS_PER_DOC
    for i in range(-(-queries // CHUNKS_PER_DOC)):  # even ids: never a DB document
        w.add("train", 2 * (i + 1), rng.integers(3, vocab, tokens_per_doc))
    for i in range(10):
        w.add("valid", 2 * (10**9 + i), rng.integers(3, vocab, tokens_per_doc))
    w.close()
    return {"bytes": (d / "embeddings.h5").stat().st_size}


def train(d: Path, n: int, args) -> dict:
    from instructretro.index import train_index, write_index

    index, m = train_index(d / "embeddings.h5", "auto", args.train_points or auto_train_points(n), 1234,
                           block_size=65536)
    write_index(index, d / "trained.faiss")
    return m


def add(d: Path, n: int, args) -> dict:
    from instructretro.index import LISTS_FILE, code_bytes, populate, read_index, write_populated

    folder = d / "populated"
    folder.mkdir(parents=True, exist_ok=True)
    index = populate(read_index(d / "trained.faiss"), d / "embeddings.h5", 65536, ondisk_above=args.ondisk_above,
                     ivfdata=folder / LISTS_FILE)
    write_populated(index, folder, folder / LISTS_FILE if (folder / LISTS_FILE).is_file() else None)
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return {"ntotal": int(index.ntotal), "index_bytes": size, "code_bytes": code_bytes(index, index.ntotal)}


def query(d: Path, n: int, args) -> dict:
    from instructretro.index import read_index, set_search_params
    from instructretro.neighbors import file_key, query_neighbors

    def open_index():
        index = read_index(d / "populated")
        set_search_params(index, args.nprobe, 32)
        return index

    return query_neighbors(d / "pretrain", d / "spm.model", SyntheticEncoder(n), open_index, d / "embeddings.h5",
                           CHUNK, SEQ, 200, 20, 2048, args.recall_sample, 1234, d / "neighbors.h5", d / "work",
                           index_key=file_key(d / "populated"), recall_nprobe_max=args.recall_nprobe_max)


def worker(args) -> None:
    d, n = Path(args.dir) / f"n{args.n}", args.n
    t0 = time.perf_counter()
    out = {"make": lambda: make(d, n, args.queries), "train": lambda: train(d, n, args),
           "add": lambda: add(d, n, args), "query": lambda: query(d, n, args)}[args.worker]()
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    out["proc_status"] = {k: status[k].strip() for k in ("VmHWM", "RssAnon", "RssFile") if k in status}
    (d / f"{args.worker}.json").write_text(json.dumps(out))


# --------------------------------------------------------------------------------------------


def run_stage(stage: str, n: int, args) -> dict:
    """Run one stage in a child process; its wall time, peak RSS (MiB) and its result."""
    cmd = [sys.executable, __file__, "--worker", stage, "--n", str(n), "--dir", args.dir, "--queries", str(args.queries),
           "--nprobe", str(args.nprobe), "--recall-sample", str(args.recall_sample),
           "--recall-nprobe-max", str(args.recall_nprobe_max), "--ondisk-above", str(args.ondisk_above),
           "--train-points", str(args.train_points)]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"stage {stage} at {n} chunks failed (exit {proc.returncode})")
    result = json.loads((Path(args.dir) / f"n{n}" / f"{stage}.json").read_text())
    result["rss_mib"] = round(usage.ru_maxrss / 1024, 1)
    result["process_s"] = round(time.perf_counter() - t0, 1)
    print(f"  {stage:6s} n={n:>10,}: {result['process_s']:8.1f} s, peak RSS {result['rss_mib']:8.1f} MiB "
          f"{result.get('proc_status', '')}", flush=True)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=100_000, help="query chunks (pretraining side)")
    ap.add_argument("--nprobe", type=int, default=64, help="query.nprobe (params.yaml default)")
    ap.add_argument("--recall-sample", type=int, default=500)
    ap.add_argument("--recall-nprobe-max", type=int, default=256)
    ap.add_argument("--ondisk-above", type=int, default=8_000_000_000, help="index.ondisk_above (bytes)")
    ap.add_argument("--train-points", type=int, default=0, help="0: 40 x 4*sqrt(N), what auto's nlist rule needs")
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "scale_db"), help="where the synthetic data goes")
    ap.add_argument("--keep", action="store_true", help="keep the data (and re-use it with --stages)")
    ap.add_argument("--stages", nargs="+", default=["make", "train", "add", "query"], help="stages to run (others are read)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    import faiss

    print(f"scale_db: {faiss.omp_get_max_threads()} Faiss threads, {os.cpu_count()} cores, queries={args.queries}, "
          f"nprobe={args.nprobe}, recall sample {args.recall_sample}", flush=True)
    rows = []
    for n in args.sizes:
        if "make" in args.stages:
            shutil.rmtree(Path(args.dir) / f"n{n}", ignore_errors=True)
        r = {"n": n}
        for stage in ("make", "train", "add", "query"):
            if stage in args.stages:
                r[stage] = run_stage(stage, n, args)
                (Path(args.dir) / f"n{n}" / f"{stage}.result.json").write_text(json.dumps(r[stage]))
            else:
                r[stage] = json.loads((Path(args.dir) / f"n{n}" / f"{stage}.result.json").read_text())
        curve = dict((int(a), b) for a, b in r["query"]["recall_nprobe"])
        r["recall"] = curve
        rows.append(r)
        q = r["query"]
        print(f"n={n:,}: {r['train']['factory']} ({r['train']['training_points']} training points), index "
              f"{r['add']['index_bytes'] / 2**20:.0f} MiB, search {q['search_ms_per_query_chunk']} ms/query chunk, "
              f"recall@20 {q['recall_at_k']} at nprobe {args.nprobe}, curve {curve}", flush=True)
        if not args.keep:
            shutil.rmtree(Path(args.dir) / f"n{n}", ignore_errors=True)
    print()
    second = args.nprobe // 4 if args.nprobe >= 4 else args.nprobe * 4
    print(f"| DB chunks | auto index | train s | train RSS MiB | add s | add RSS MiB | index MiB | query s | "
          f"query RSS MiB | search ms/query chunk | recall@20 nprobe {second} | recall@20 nprobe {args.nprobe} |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        q = r["query"]
        print(f"| {r['n']:,} | `{r['train']['factory']}` | {r['train']['process_s']} | {r['train']['rss_mib']} | "
              f"{r['add']['process_s']} | {r['add']['rss_mib']} | {r['add']['index_bytes'] / 2**20:.0f} | "
              f"{q['process_s']} | {q['rss_mib']} | {q['search_ms_per_query_chunk']} | "
              f"{r['recall'].get(second, r['recall'].get(0))} | {q['recall_at_k']} |")
    if len(rows) >= 2:
        a, b = rows[-2], rows[-1]
        for stage in ("add", "query"):
            bound = 1.5 * a[stage]["rss_mib"] + b["add"]["index_bytes"] / 2**20
            print(f"{stage} peak RSS at {b['n']:,}: {b[stage]['rss_mib']} MiB, target <= 1.5 x {a[stage]['rss_mib']} + "
                  f"index {b['add']['index_bytes'] / 2**20:.0f} = {bound:.0f} MiB: "
                  f"{'met' if b[stage]['rss_mib'] <= bound else 'MISSED'}")
        ratio = b["query"]["search_ms_per_query_chunk"] / a["query"]["search_ms_per_query_chunk"]
        print(f"search time per query chunk {b['n']:,} / {a['n']:,}: {ratio:.2f}x (target <= 1.3x): "
              f"{'met' if ratio <= 1.3 else 'MISSED'}")
    for r in rows:
        if r["train"]["factory"].startswith("IVF") or "IVF" in r["train"]["factory"]:
            ok = r["query"]["recall_at_k"] >= 0.9
            print(f"recall@20 at nprobe {args.nprobe}, {r['n']:,} chunks: {r['query']['recall_at_k']} (target >= 0.9): "
                  f"{'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
