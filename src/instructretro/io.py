"""Atomic file output and small JSON helpers.

Every output a stage declares is written to a temporary sibling and renamed into place, so a
crash never leaves a half-written file where DVC expects a finished one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

from .errors import PipelineError, writing

_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")  # what atomic_path writes: .<name>.tmp-<pid>


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    Works for files and directories. The temporary is removed if the block raises; the
    temporaries of ``path`` that killed processes left behind are removed first. A full disk
    while the block writes is one line naming ``path`` (``errors.writing``); the previous
    ``path`` and everything else already finished stay as they were.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    remove_stale_temporaries(path.parent, name=path.name)
    try:
        with writing(path):
            yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (a zombie or another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None, recursive: bool = False) -> int:
    """Remove the ``.<name>.tmp-<pid>`` files and folders of ``atomic_path`` in ``folder`` (and
    its subfolders with ``recursive``) whose writer is no longer running; only those of
    ``name`` if given. A temporary of a live pid (another run writing) is left alone; a pid
    reused by an unrelated process also keeps its temporary until that process ends. Returns
    how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for p in list(folder.iterdir()):
        m = _TMP.match(p.name)
        if m and (name is None or m["name"] == name):
            if int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"])):
                _remove(p)
                removed += 1
        elif recursive and p.is_dir() and not p.is_symlink():
            removed += remove_stale_temporaries(p, name, recursive)
    return removed


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as sorted, indented JSON, atomically (deterministic bytes)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike):
    """The JSON value in ``path``; a missing file or malformed JSON is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: not found")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise PipelineError(f"{path}: malformed JSON ({getattr(exc, 'msg', None) or type(exc).__name__})") from None


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in ``path``; a missing file, malformed JSON or another JSON value is one
    line naming the file."""
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def write_jsonl(path: str | os.PathLike, records) -> int:
    """Write an iterable of dicts as JSON lines, atomically; return the number written."""
    n = 0
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
                n += 1
    return n
