"""Work folders: resume keys by content (code included), the lock, stale temporaries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from instructretro import io, workdir
from instructretro.errors import PipelineError
from instructretro.workdir import DigestCache, WorkDir, code_files, resume_key

from conftest import REPO


def test_same_size_files_of_any_size_give_different_keys(tmp_path):
    """Files over 64 MiB used to be keyed by their size only."""
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    for path, first in ((a, b"x"), (b, b"y")):
        with open(path, "wb") as f:
            f.truncate(65 << 20)  # sparse: cheap to make, still 65 MiB to read
            f.write(first)
    assert a.stat().st_size == b.stat().st_size
    assert resume_key({}, [a]) != resume_key({}, [b])
    assert resume_key({}, [a]) == resume_key({}, [a])


def test_key_covers_params_inputs_and_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.txt").write_text("one")
    code = tmp_path / "stage.py"
    code.write_text("print(1)\n")
    base = resume_key({"lr": 1}, [data], [code])
    assert resume_key({"lr": 2}, [data], [code]) != base
    code.write_text("print(2)\n")
    assert resume_key({"lr": 1}, [data], [code]) != base
    code.write_text("print(1)\n")
    assert resume_key({"lr": 1}, [data], [code]) == base
    (data / "x.txt").write_text("two")
    assert resume_key({"lr": 1}, [data], [code]) != base
    (data / "x.txt").write_text("one")
    (data / "y.txt").write_text("")  # a new file in an input folder
    assert resume_key({"lr": 1}, [data], [code]) != base
    # an unset input ("") is not the current folder
    assert resume_key({}, [""]) != resume_key({}, ["."]) and resume_key({}, [""]) == resume_key({}, [""])


def test_code_files_are_the_stage_deps_dvc_lists():
    """The code a key hashes is what DVC considers the stage's code (script + src modules)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in ("pretrain", "sft"):
        listed = {d for d in stages[name]["deps"] if d.startswith(("stages/", "src/"))}
        got = {p.relative_to(REPO).as_posix() for p in code_files(REPO / "stages" / f"{name}.py")}
        assert got == listed, name


def test_digests_are_cached_by_stat_and_redone_when_a_file_changes(tmp_path, monkeypatch):
    f = tmp_path / "big.bin"
    f.write_bytes(b"a" * 1000)
    calls = []
    real = workdir.sha256_file
    monkeypatch.setattr(workdir, "sha256_file", lambda p: calls.append(p) or real(p))
    first = resume_key({}, [f], cache=DigestCache(tmp_path / "work"))
    assert resume_key({}, [f], cache=DigestCache(tmp_path / "work")) == first
    assert len(calls) == 1  # the second key read the cached digest
    f.write_bytes(b"b" * 1000)  # same size, new bytes
    assert resume_key({}, [f], cache=DigestCache(tmp_path / "work")) != first
    assert len(calls) == 2


HOLD = """
import sys, time
from instructretro.workdir import WorkDir
w = WorkDir(sys.argv[1], "k")
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_run_on_a_locked_folder_stops_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PipelineError) as exc:
            WorkDir(tmp_path, "k")
        message = str(exc.value)
        assert f"pid {holder.pid}" in message and str(tmp_path / "k") in message and "\n" not in message
        with WorkDir(tmp_path, "other"):  # another key is another folder
            pass
    finally:
        holder.kill()
        holder.wait()
    with WorkDir(tmp_path, "k") as w:  # the kernel dropped the dead holder's lock
        assert w.dir.is_dir()
    assert not (tmp_path / "k.lock").exists()  # released: the lock file is gone


def test_remove_others_keeps_a_folder_another_run_holds(tmp_path):
    (tmp_path / "stale").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    try:
        assert holder.stdout.readline().strip() == "held"
        with WorkDir(tmp_path, "mine") as w:
            assert w.remove_others() == 1
        assert (tmp_path / "k").is_dir() and not (tmp_path / "stale").exists()
    finally:
        holder.kill()
        holder.wait()


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = dead_pid()
    (tmp_path / f".out.h5.tmp-{dead}").write_text("half")
    (tmp_path / f".out.h5.tmp-{dead + 10**7}").mkdir()  # no such pid (above pid_max)
    live = tmp_path / f".out.h5.tmp-{os.getppid()}"  # a running writer's
    live.write_text("busy")
    other = tmp_path / f".other.tmp-{dead}"  # another output's: left to that output's next write
    other.write_text("half")
    with io.atomic_path(tmp_path / "out.h5") as tmp:
        tmp.write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.h5", live.name, other.name])

    work = tmp_path / "work"
    (work / "k" / "step1").mkdir(parents=True)
    (work / "k" / "step1" / f".model.pt.tmp-{dead}").write_text("half")
    (work / f".digests.json.tmp-{dead}").write_text("half")
    WorkDir(work, "k").release()
    assert not list(work.rglob("*.tmp-*"))
