"""Shared fixtures: a small synthetic world and its tokenizer, built once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    """A 60-entity world (a few hundred chunks)."""
    from instructretro.world import write_world

    out = tmp_path_factory.mktemp("world") / "world"
    write_world(out, num_entities=60, docs_per_entity=3, qa_questions=40, sft_conversations=100, seed=7)
    return out


@pytest.fixture(scope="session")
def small_tokenizer(small_world, tmp_path_factory) -> Path:
    from instructretro import data, tokenizer

    path = tmp_path_factory.mktemp("tok") / "spm.model"
    texts = (d.text for d in data.iter_documents(small_world / "reference.jsonl"))
    path.write_bytes(tokenizer.train(texts, 1024, 5_000_000))
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~50x faster under load.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def run_stage(script: str, *args, cwd=REPO, check=False) -> subprocess.CompletedProcess:
    """Run a stage script as DVC would; return the completed process (text output)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONHASHSEED"] = "0"
    return subprocess.run([PYTHON, str(REPO / "stages" / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, check=check)
