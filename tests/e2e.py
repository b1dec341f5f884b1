"""Helpers for end-to-end tests: a throwaway copy of the repo with small params, and dvc."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Params that make the whole pipeline run in a few minutes on 2 cores. Keys that do not
# exist in params.yaml are ignored, so this list may name stages that are not built yet.
SMALL = {
    "world.num_entities": 30,
    "world.qa_questions": 12,
    "world.sft_conversations": 60,
    "tokenizer.vocab_size": 512,
    "embed.block_size": 128,
    "pretrain.steps": 6,
    "pretrain.warmup": 1,
    "pretrain.save_interval": 3,
    "pretrain.eval_interval": 3,
    "pretrain.eval_batches": 2,
    "pretrain.micro_batch": 2,
    "pretrain.grad_accum": 1,
    "sft.steps": 4,
    "sft.warmup": 1,
    "sft.eval_interval": 2,
    "sft.valid_samples": 4,
    "sft.eval_batches": 1,
    "sft.micro_batch": 2,
    "generate.max_new_tokens": 8,
    "generate.max_questions": 6,
}


def set_param(params: dict, key: str, value) -> bool:
    node = params
    *parents, last = key.split(".")
    for p in parents:
        if not isinstance(node.get(p), dict):
            return False
        node = node[p]
    if last not in node:
        return False
    node[last] = value
    return True


def copy_repo(dest: Path, overrides: dict | None = None) -> Path:
    """Copy the tracked and untracked-but-not-ignored files of the repo to ``dest``, make it a
    git repo with one commit (DVC experiments need one), and apply small params."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for f in files:
        src = REPO / f
        # stage outputs tracked in git (metrics, DVCLive curves) and dvc.lock are left behind:
        # the copy starts as a fresh clone that has never run the pipeline
        if f and src.is_file() and not f.startswith(("dvc.lock", "metrics/", "dvclive/")):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for k, v in {**SMALL, **(overrides or {})}.items():
        set_param(params, k, v)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:1] + ["init", "-q", "-b", "main"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


def dvc(cwd: Path, *args, check=True, timeout=1800) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               PYTHONHASHSEED="0")
    r = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, capture_output=True, text=True, env=env,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]
