"""One run at a time per workspace: the Makefile's stage targets refuse to start while another run
(another make target, or a dvc command started by hand) holds the workspace."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time

from conftest import REPO


def run(root, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-m", "instructretro.workspace", "--root", str(root), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def assert_refused(r, pattern):
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert re.search(pattern, line), line
    assert "dvc exp run --queue" in line and "separate clone" in line


def test_a_second_run_is_refused_while_the_first_holds_the_workspace(tmp_path):
    first = subprocess.Popen([sys.executable, "-m", "instructretro.workspace", "--root", str(tmp_path), "--",
                              sys.executable, "-c", "import time; time.sleep(30)"],
                             env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    try:
        lock = tmp_path / ".dvc" / "tmp" / "instructretro-run.lock"
        t0 = time.time()
        while not (lock.is_file() and lock.read_text().strip()):
            assert time.time() - t0 < 30 and first.poll() is None
            time.sleep(0.05)
        assert_refused(run(tmp_path, "--", "true"), rf"in use by another run \(pid {first.pid} ")
    finally:
        first.kill()
        first.wait()
    r = run(tmp_path, "--", sys.executable, "-c", "import sys; sys.exit(3)")  # released: runs, passes on the status
    assert r.returncode == 3, r.stderr


def test_a_dvc_command_started_by_hand_holds_the_workspace(tmp_path):
    tmp = tmp_path / ".dvc" / "tmp"
    tmp.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        # DVC's stage locks name the dvc process while a stage's command runs
        (tmp / "rwlock").write_text(json.dumps({"write": {"data/tokens/db": {"pid": sleeper.pid,
                                                                              "cmd": "dvc exp run -S corpus.db=x"}},
                                                "read": {}}))
        assert_refused(run(tmp_path, "--check"), rf"another DVC run \(pid {sleeper.pid}: dvc exp run -S corpus\.db=x\)")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert run(tmp_path, "--check").returncode == 0  # a dead pid's entry holds nothing
    with open(tmp / "lock", "w") as f:  # DVC's repository lock (zc.lockfile: flock), held
        f.write(f"{os.getpid()}\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert_refused(run(tmp_path, "--", "true"), r"another DVC run \(pid \d+: a dvc command holds")
    assert run(tmp_path, "--", "true").returncode == 0


def test_make_targets_run_dvc_only_under_the_workspace_lock():
    text = (REPO / "Makefile").read_text()
    recipe = [line for line in text.splitlines() if line.startswith("\t")]
    runs = [line for line in recipe if re.search(r"\$\(DVC\) (repro|exp run)", line)]
    assert not runs, runs  # every dvc repro / exp run goes through $(DVC_RUN)
    plan = subprocess.run(["make", "-n", "repro", "STAMP=Makefile"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout
    assert ".venv/bin/python -m instructretro.workspace -- .venv/bin/dvc repro" in plan
    gpu = subprocess.run(["make", "-n", "pretrain", "GPUS=2", "STAMP=Makefile"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert gpu.count("instructretro.workspace -- bash -c") == 3, gpu
