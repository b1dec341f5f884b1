"""Scale benchmark (issue 7): the retrieval-database stages at a base world size and at 4x and
16x it. Prints wall time and peak memory (max RSS) of each stage and the ratios to the base.

    .venv/bin/python bench/scale.py            # base 60 entities: 60, 240, 960
    .venv/bin/python bench/scale.py --base 30 --factors 1 4

Targets: time grows at most about linearly (16x data <= 20x time); peak memory of embed and
query-neighbors stays flat (<= 1.5x from 1x to 16x), since both work block by block.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

# Each stage runs in its own process under this wrapper, which reports the process's peak RSS.
WRAP = ("import resource, runpy, sys, atexit, json; "
        "atexit.register(lambda: print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); "
        "script = sys.argv[1]; sys.argv = sys.argv[1:]; runpy.run_path(script, run_name='__main__')")

PREP = [("generate-world", ["generate_world.py"]),
        ("tokenizer", ["tokenizer.py"]),
        ("tokenize@db", ["tokenize_corpus.py", "db", "--out", "data/tokens/db", "--metrics", "metrics/tokenize_db.json"]),
        ("tokenize@pretrain", ["tokenize_corpus.py", "pretrain", "--out", "data/tokens/pretrain",
                               "--metrics", "metrics/tokenize_pretrain.json"])]
MEASURED = [("embed", ["embed.py"]), ("train-index", ["train_index.py"]), ("add-index", ["add_index.py"]),
            ("query-neighbors", ["query_neighbors.py"])]


def run(workdir: Path, args: list[str]) -> tuple[float, float]:
    t0 = time.perf_counter()
    r = subprocess.run([PY, "-c", WRAP, str(REPO / "stages" / args[0]), *args[1:]], cwd=workdir,
                       capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{args[0]} failed:\n{r.stderr[-2000:]}")
    rss = [int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("MAXRSS_KB")]
    return secs, rss[-1] / 1024


def one_size(entities: int, root: Path) -> dict:
    work = root / f"n{entities}"
    work.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["world"]["num_entities"] = entities
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for _, args in PREP:
        run(work, args)
    out = {}
    for name, args in MEASURED:
        out[name] = run(work, args)
    emb = json.loads((work / "metrics" / "embed.json").read_text())
    out["db_chunks"] = emb.get("chunks_embedded", emb.get("chunks"))
    q = json.loads((work / "metrics" / "query_neighbors.json").read_text())
    out["query_chunks"] = sum(q[s]["query_chunks"] for s in ("train", "valid"))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=int, default=60, help="entities in the base world")
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="scale-"))
    results = {}
    try:
        for f in args.factors:
            n = args.base * f
            print(f"--- {f}x: {n} entities", flush=True)
            results[f] = one_size(n, root)
            r = results[f]
            print(f"    {r['db_chunks']} DB chunks, {r['query_chunks']} query chunks", flush=True)
            for name, _ in MEASURED:
                print(f"    {name:16s} {r[name][0]:8.1f} s  {r[name][1]:8.0f} MiB", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = results[args.factors[0]]
    print("\nratios to the base size (time, peak memory):")
    print(f"{'stage':16s} " + " ".join(f"{f:>5d}x time  mem " for f in args.factors))
    for name, _ in MEASURED:
        cells = [f"{results[f][name][0] / base[name][0]:9.2f} {results[f][name][1] / base[name][1]:5.2f}" for f in args.factors]
        print(f"{name:16s} " + " ".join(cells))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
