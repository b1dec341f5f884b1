"""One run at a time per workspace: what the Makefile's stage targets run their DVC commands under.

Two ``dvc repro`` / ``dvc exp run`` at once in one workspace share ``params.yaml``, ``data/``
and ``dvc.lock``: the second run's ``-S`` rewrites the params the first is reading, and each
removes outputs the other is writing (DVC's own locks do not cover this: DVC releases its
repository lock while a stage's command runs). So ``python -m instructretro.workspace -- CMD``
refuses to start, in one line, while the workspace is held by

- another command run this way (an exclusive ``flock`` on ``.dvc/tmp/instructretro-run.lock``,
  held for the whole command and dropped by the kernel when its holder dies), or
- a DVC command started by hand: DVC's repository lock ``.dvc/tmp/lock`` is held, or DVC's
  stage lock file ``.dvc/tmp/rwlock`` names a process that is still alive;

and otherwise runs ``CMD`` holding the lock and exits with its status. ``--check`` only checks.
Experiments that should run side by side go to DVC's queue (``dvc exp run --queue``, then
``dvc queue start``: each in its own temporary copy) or to separate clones.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

from .errors import PipelineError, cli
from .io import pid_alive
from .workdir import try_acquire

LOCK_NAME = "instructretro-run.lock"
ADVICE = ("two runs in one workspace overwrite each other's params.yaml and outputs: wait for it to end, "
          "or queue experiments (dvc exp run --queue, then dvc queue start) or use a separate clone")


def dvc_holder(root: str | os.PathLike = ".") -> str | None:
    """Who holds the workspace in DVC's own lock files (``pid N: cmd``), or None."""
    tmp = Path(root) / ".dvc" / "tmp"
    lock = tmp / "lock"
    if lock.is_file():
        fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                pid = lock.read_text(errors="replace").strip() or "unknown"
                return f"pid {pid}: a dvc command holds {lock}"
            raise
        finally:
            os.close(fd)
    try:
        rw = json.loads((tmp / "rwlock").read_text())
    except (OSError, ValueError):
        return None
    infos = list((rw.get("write") or {}).values()) + [i for v in (rw.get("read") or {}).values() for i in v]
    for info in infos:
        if isinstance(info, dict) and isinstance(info.get("pid"), int) and info["pid"] != os.getpid() \
                and pid_alive(info["pid"]):
            return f"pid {info['pid']}: {info.get('cmd', 'dvc')}"
    return None


def hold(root: str | os.PathLike = ".") -> int:
    """Check the workspace is free and take its lock; returns the fd that holds it (closing it,
    or the process ending, releases it). PipelineError naming the holder otherwise."""
    tmp = Path(root) / ".dvc" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / LOCK_NAME
    fd = try_acquire(path)
    if fd is None:
        holder = path.read_text(errors="replace").strip() or "unknown"
        raise PipelineError(f"{Path(root).resolve()}: this workspace is in use by another run "
                            f"(pid {holder}); {ADVICE}")
    who = dvc_holder(root)
    if who is not None:
        os.close(fd)
        raise PipelineError(f"{Path(root).resolve()}: this workspace is in use by another DVC run ({who}); {ADVICE}")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {' '.join(sys.argv[1:])[:200]}\n".encode())
    return fd


@cli
def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    root = "."
    if args[:1] == ["--root"]:
        root, args = args[1], args[2:]
    if args[:1] == ["--check"]:
        os.close(hold(root))
        return
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        raise PipelineError("usage: python -m instructretro.workspace [--root DIR] (--check | -- COMMAND ...)")
    fd = hold(root)
    try:
        rc = subprocess.call(args, pass_fds=())
    finally:
        os.close(fd)
    sys.exit(rc)


if __name__ == "__main__":
    main()
