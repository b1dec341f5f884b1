"""Work folders: the resume state of a long run (training checkpoints, finished blocks).

A work folder is ``root/<key>``. The key hashes everything the run depends on, the same things
DVC lists as the stage's dependencies:

- the code: the stage script and every ``instructretro`` module it imports, transitively
  (``code_files``; ``tests/test_pipeline_deps.py`` checks that dvc.yaml lists the same files);
- the input files and folders, by content (``DigestCache``: a streaming hash in 1 MiB blocks);
- the params and anything else the caller puts in ``params`` (e.g. the number of processes,
  ``library_versions``: a checkpoint of one DeepSpeed or torch version is not resumed by another).

So a run resumes only a run of the same code, inputs and params; any change starts a fresh
folder. Inputs are hashed by our own streaming hash, not by reusing the md5 that DVC computed:
that hash lives in DVC's private state database (its layout is DVC's business) and does not
exist when a stage runs outside ``dvc repro``. To keep reruns cheap at scale (inputs of TBs),
each digest is cached in ``root/.digests.json`` under the file's (size, mtime_ns, inode): the
same rule DVC's own state cache uses, so a file rewritten in place with the same size within
the file system's timestamp resolution would be missed by both alike.

A work folder is held under an exclusive lock (``fcntl.flock`` on ``root/<key>.lock``, which
records the holder's pid) for the whole run: a second run on the same folder (say a stage
left running as an orphan after ``dvc`` was killed, and a new ``dvc repro``) stops with a
one-line error naming that pid. The kernel drops the lock when the holder dies, so a killed
run never leaves a stale lock. Opening a folder also removes the temporaries that killed
writers left in it (``io.remove_stale_temporaries``).
"""

from __future__ import annotations

import ast
import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from .errors import PipelineError
from .io import atomic_path, remove_stale_temporaries

PACKAGE = Path(__file__).resolve().parent
BLOCK = 1 << 20  # bytes read per update of the streaming hash


# --------------------------------------------------------------------------------------------
# The code a run depends on


def _imported_modules(path: Path) -> set[str]:
    """Names of the ``instructretro`` modules that ``path`` imports (anywhere in the file)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    inside = path.resolve().parent == PACKAGE
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level and inside:
                base = "instructretro" + ("." + base if base else "")
            if base == "instructretro":
                mods |= {a.name for a in node.names if (PACKAGE / f"{a.name}.py").is_file()}
            elif base.startswith("instructretro."):
                mods.add(base.split(".")[1])
        elif isinstance(node, ast.Import):
            mods |= {a.name.split(".")[1] for a in node.names if a.name.startswith("instructretro.")}
    return mods


def code_files(*scripts: str | os.PathLike) -> list[Path]:
    """The given scripts plus every ``instructretro`` module they import, transitively (sorted)."""
    files = {Path(s).resolve() for s in scripts}
    todo = [m for s in files for m in _imported_modules(s)]
    seen: set[str] = set()
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += _imported_modules(PACKAGE / f"{m}.py")
    return sorted(files | {PACKAGE / f"{m}.py" for m in seen})


def library_versions(*names: str) -> dict[str, str]:
    """Python's and the given installed packages' versions (part of a training run's key)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


# --------------------------------------------------------------------------------------------
# Content hashes


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (memory stays flat for any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


class DigestCache:
    """File digests remembered under (size, mtime_ns, inode) in ``root/.digests.json``
    (``root=None``: remembered by nothing)."""

    def __init__(self, root: str | os.PathLike | None):
        self.path = Path(root) / ".digests.json" if root is not None else None
        self.entries: dict[str, list] = {}
        if self.path is not None and self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.entries = {}  # a cache only: rebuilt from the files
        self.changed = False

    def digest(self, path: Path) -> str:
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        key = str(path.resolve())
        hit = self.entries.get(key)
        if isinstance(hit, list) and hit[:3] == stamp:
            return hit[3]
        value = sha256_file(path)
        self.entries[key] = [*stamp, value]
        self.changed = True
        return value

    def save(self) -> None:
        if self.path is not None and self.changed:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(self.entries, sort_keys=True))
            self.changed = False


def resume_key(params: dict, inputs: Iterable[str | os.PathLike] = (), code: Iterable[str | os.PathLike] = (),
               cache: DigestCache | None = None) -> str:
    """The key of every work folder and block cache: a 16-hex-digit hash of ``params`` (JSON),
    the input files/folders and the code files (``code_files``), all by content.

    ``params`` may also hold digests the caller already has (a token store's or the DB file's
    fingerprint), so a multi-terabyte input is not hashed again. A folder contributes each
    file's relative path and bytes; a missing path counts as missing (so it appearing later
    changes the key); an empty path (an unset input) as none."""
    cache = cache or DigestCache(None)
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for group, paths in (("input", inputs), ("code", code)):
        for path in paths:
            if str(path) == "":
                h.update(f"\0{group}\0none".encode())
                continue
            path = Path(path)
            h.update(f"\0{group}\0{path.name}\0".encode())
            if path.is_dir():
                for f in sorted(p for p in path.rglob("*") if p.is_file()):
                    h.update(f"{f.relative_to(path).as_posix()}\0{cache.digest(f)}\0".encode())
            elif path.is_file():
                h.update(cache.digest(path).encode())
            else:
                h.update(b"missing")
    cache.save()
    return h.hexdigest()[:16]


def rank0_key(compute) -> str:
    """``compute()`` (a ``resume_key``) on rank 0, sent to every rank (one process: just ``compute()``), so all
    ranks use one folder and only rank 0 reads the inputs."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return compute()
    box = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------------------------
# The locked folder


class WorkDir:
    """``root/<key>``, locked for this process until ``release`` (or the process ends).

    Use as a context manager, or call ``release`` (``finish`` also deletes the folder: a
    finished run leaves nothing to resume). ``lock=False`` (ranks other than 0 of a
    multi-process run, which share rank 0's folder) only names the folder.
    """

    def __init__(self, root: str | os.PathLike, key: str, lock: bool = True):
        self.root = Path(root)
        self.key = key
        self.dir = self.root / key
        self.lock_path = self.root / f"{key}.lock"
        self._fd: int | None = None
        if lock:
            self.root.mkdir(parents=True, exist_ok=True)
            self._fd = acquire(self.lock_path, self.dir)
            remove_stale_temporaries(self.root)
            if self.dir.is_dir():
                remove_stale_temporaries(self.dir, recursive=True)
        self.dir.mkdir(parents=True, exist_ok=True)

    def clear(self) -> None:
        """Empty the folder (keep holding it)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)

    def remove_others(self) -> int:
        """Delete the work folders of other keys under the same root that no live run holds
        (a folder another run holds is left alone); return how many were deleted."""
        removed = 0
        for p in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if not p.is_dir() or p.name == self.key or p.name.startswith("."):
                continue
            lock_path = self.root / f"{p.name}.lock"
            fd = try_acquire(lock_path)
            if fd is None:
                continue
            shutil.rmtree(p, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
            os.close(fd)
            removed += 1
        return removed

    def finish(self) -> None:
        """Delete the folder and release it."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            if _HELD.pop(str(self.lock_path.resolve()), None) is not None:
                self.lock_path.unlink(missing_ok=True)
                os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkDir":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def try_acquire(lock_path: Path) -> int | None:
    """An fd holding an exclusive flock on ``lock_path`` (created if missing), or None if another
    process holds it. The inode is checked after locking: a holder that released (and unlinked)
    the file in between would otherwise leave us locking a file nobody else can see."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


_HELD: dict[str, int] = {}  # lock files this process holds -> fd (a second open in-process reuses it)


def acquire(lock_path: Path, folder: Path) -> int:
    """Lock ``folder`` through ``lock_path`` and write our pid into it; PipelineError naming the
    holder's pid when another process holds it. Re-entrant within one process."""
    held = _HELD.get(str(lock_path.resolve()))
    if held is not None:
        return held
    fd = try_acquire(lock_path)
    if fd is None:
        try:
            holder = lock_path.read_text().strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise PipelineError(f"{folder}: in use by another run (pid {holder}); wait for it to end or stop it, "
                            "then run again")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[str(lock_path.resolve())] = fd
    return fd
