"""Crash safety (issue 7): SIGKILL embed, add-index and pretrain part-way, rerun `dvc repro`,
and get what an uninterrupted run gives (bytes for the database files; the same step count
and a loss within tolerance for pretraining). No stage leaves a partial output behind."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from e2e import BIN, copy_repo, dvc

CRASH = {"embed.block_size": 8, "pretrain.steps": 24, "pretrain.save_interval": 2, "pretrain.warmup": 2,
         "pretrain.eval_interval": 8}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _start(repo: Path, *args) -> subprocess.Popen:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONHASHSEED="0")
    return subprocess.Popen([str(BIN / "dvc"), "repro", *args], cwd=repo, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_when(proc: subprocess.Popen, ready, timeout=900) -> bool:
    """SIGKILL the whole process group once ``ready()`` holds; False if it finished first."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return False
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("the stage did not reach the kill point in time")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("uninterrupted"), CRASH)
    dvc(repo, "repro", "pretrain")
    return repo


@pytest.mark.slow
def test_killed_stages_resume_to_the_same_outputs(reference, tmp_path):
    repo = copy_repo(tmp_path, CRASH)
    dvc(repo, "repro", "tokenize")
    emb = repo / "data" / "db" / "embeddings.h5"

    blocks = lambda: list((repo / "data" / "work" / "embed").rglob("block_*.npy"))  # noqa: E731
    killed = _kill_when(_start(repo, "embed"), lambda: len(blocks()) >= 2)
    assert killed, "embed finished before it could be killed; make the world larger"
    assert not emb.exists(), "a killed embed left an output where DVC expects a finished one"
    finished = {p: p.stat().st_mtime_ns for p in blocks()}
    # restart, and kill again once it has written a block it had not: the old blocks are reused
    assert _kill_when(_start(repo, "embed"), lambda: len(blocks()) > len(finished))
    assert all(p.exists() and p.stat().st_mtime_ns == t for p, t in finished.items())
    dvc(repo, "repro", "embed")
    assert _sha(emb) == _sha(reference / "data" / "db" / "embeddings.h5")

    populated = repo / "data" / "index" / "populated" / "index.faiss"
    dvc(repo, "repro", "train-index")
    _kill_when(_start(repo, "add-index"), lambda: True)  # as soon as it starts
    assert not populated.exists() or _sha(populated) == _sha(reference / "data" / "index" / "populated" / "index.faiss")
    dvc(repo, "repro", "query-neighbors")
    assert _sha(populated) == _sha(reference / "data" / "index" / "populated" / "index.faiss")

    work = repo / "data" / "work" / "pretrain"
    ckpts = lambda: list(work.glob("*/latest")) if work.exists() else []  # noqa: E731
    # killed as soon as the first resume checkpoint is named (step 2 of 24), well before the export
    killed = _kill_when(_start(repo, "pretrain"), lambda: len(ckpts()) > 0)
    assert killed, "pretrain finished before it could be killed"
    assert not (repo / "data" / "checkpoints" / "pretrain" / "model.safetensors").exists()
    dvc(repo, "repro", "pretrain")
    got = json.loads((repo / "metrics" / "pretrain.json").read_text())
    assert got["resumed_at"] > 0
    want = json.loads((reference / "metrics" / "pretrain.json").read_text())
    assert got["steps"] == want["steps"] == CRASH["pretrain.steps"]
    assert abs(got["val_loss"] - want["val_loss"]) < 0.05
    assert "up to date" in dvc(repo, "status", "pretrain").stdout
    # the curves logged before the kill survive (DVC deleted the DVCLive output before the rerun)
    curve = Path("dvclive/pretrain/plots/metrics/train/loss.tsv")
    steps = lambda r: [line.split("\t")[0] for line in (r / curve).read_text().splitlines()]  # noqa: E731
    assert steps(repo) == steps(reference) == ["step", *map(str, range(1, CRASH["pretrain.steps"] + 1))]
    # a forced rerun trains from scratch (a finished run leaves nothing to resume), all outputs again
    assert not ckpts()
    dvc(repo, "repro", "-f", "-s", "pretrain")
    assert json.loads((repo / "metrics" / "pretrain.json").read_text())["resumed_at"] == 0
    assert steps(repo) == steps(reference)
    assert "up to date" in dvc(repo, "status", "pretrain").stdout
