"""The GPU bundle end to end on a CPU: ``make gpu-bundle TINY=1`` (bench/gpu_bundle.py --tiny), then
``gpu-bundle/run.sh --cpu --tiny`` with a clean interpreter that has only a CPU torch and a bare
GPU node's packages (transformers, tokenizers, safetensors, sentencepiece, h5py, pyyaml), with
the network off (``unshare -n``, loopback up, where this runs as root).

The clean interpreter: ``$GPU_BUNDLE_PYTHON``, else ``~/.cache/instructretro/gpu-node-venv``
(create it once: ``python3 -m venv ~/.cache/instructretro/gpu-node-venv`` and pip install a
CPU torch and those six packages); the test skips without it, and when the package index is
unreachable for the wheels.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
NODE_VENV = Path.home() / ".cache/instructretro/gpu-node-venv"


def node_python() -> Path:
    py = Path(os.environ.get("GPU_BUNDLE_PYTHON", NODE_VENV / "bin/python"))
    if not py.exists():
        pytest.skip(f"no clean node interpreter at {py}: create {NODE_VENV} with a CPU torch, transformers, tokenizers, "
                    "safetensors, sentencepiece, h5py and pyyaml (or set GPU_BUNDLE_PYTHON)")
    if subprocess.run([str(py), "-c", "import torch, transformers, h5py, yaml, sentencepiece"]).returncode:
        pytest.skip(f"{py} lacks torch or a bare GPU node's packages")
    if subprocess.run([str(py), "-c", "import deepspeed"], capture_output=True).returncode == 0:
        pytest.skip(f"{py} already has deepspeed: not a bare node")
    return py


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """Built once per session: wheels from the package index, the tiny world's inputs."""
    out = tmp_path_factory.mktemp("bundle")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "bench/gpu_bundle.py", "--tiny", "--out", str(out / "gpu-bundle"),
                        "--work", str(out / "work")], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    if r.returncode and "pip" in r.stderr and ("download" in r.stderr or "wheel" in r.stderr):
        pytest.skip(f"the wheels could not be fetched (package index unreachable?): {r.stderr[-300:]}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "MiB (limit 60 MiB)" in r.stdout
    return out / "gpu-bundle"


def test_bundle_runs_offline_on_a_bare_interpreter(tiny_bundle, tmp_path):
    py = node_python()
    out, work = tmp_path / "results", tmp_path / "work"
    cmd = ["bash", str(tiny_bundle / "run.sh"), "--cpu", "--tiny", "--budget-s", "150", "--out", str(out),
           "--work", str(work)]
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip"):
        cmd = ["unshare", "-n", "sh", "-c", "ip link set lo up && exec \"$@\"", "sh", *cmd]  # no network
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": str(py), "OMP_NUM_THREADS": "1",
           "TMPDIR": str(tmp_path)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "installing" in log and "deepspeed==" in log and "pytest==" in log  # offline, from the bundle
    results = json.loads((out / "results.json").read_text())
    checks = {c["name"]: c for c in results["checks"]}
    assert checks["environment"]["status"] == "ok"
    assert checks["tests marked gpu"]["status"] == "skipped" and "needs a CUDA GPU" in checks["tests marked gpu"]["detail"]
    bench = checks["tiny step benchmark (fidelity runs' shape)"]
    assert bench["status"] == "pass" and bench["values"]["tokens_per_s"] > 0
    assert results["sizing"]["steps"] >= 1 and results["plan"]["pretrain"]["pretrain.steps"] == results["sizing"]["steps"]
    runs = {r["name"]: r for r in results["fidelity"]}
    gpt = runs["GPT seed 1"]
    assert gpt["status"] == "pass" and math.isfinite(gpt["values"]["val_loss"]) and gpt["values"]["qa_em"] is not None
    # the budget stops what does not fit, and the results are still written
    assert all(r["status"] in ("pass", "stopped", "skipped") for r in runs.values()), runs
    assert results["seconds"] <= 150 + 5
    assert "| GPT seed 1 | pass |" in (out / "results.md").read_text()
    # the interpreter's own packages were not touched
    assert subprocess.run([str(py), "-c", "import deepspeed"], capture_output=True, env={"PATH": "/usr/bin:/bin"}).returncode
