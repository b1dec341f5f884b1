"""One error type for bad input: stages print its message on one line and exit 1."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sys
from pathlib import Path


class PipelineError(Exception):
    """Bad input or settings. The message names the file, line or param key at fault."""


class DiskFull(PipelineError):
    """No space left writing a file (the message names it)."""


def cli(main):
    """Wrap a stage's ``main`` so a PipelineError becomes a one-line message and exit code 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except DiskFull as exc:
            _exit_now(f"error: {exc}")
        except PipelineError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
        except OSError as exc:
            if not disk_full(exc):
                raise
            _exit_now(f"error: {no_space_message(exc.filename)}")
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper


def _exit_now(line: str) -> None:
    """Print ``line`` and exit 1 without the interpreter's exit handlers: after a failed write
    HDF5's own exit handler flushes the half-written file again and crashes (signal 11)."""
    print(line, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException, path: str | os.PathLike | None = None) -> bool:
    """Whether ``exc`` says the disk (or the user's quota) is full.

    ``errno`` ENOSPC/EDQUOT (h5py's OSError carries it too). Writers that lose the errno
    (numpy's ``OSError('n requested and m written')``, Faiss's and torch's RuntimeError) count
    when the file system of ``path`` has less than 1 MiB left.
    """
    if isinstance(exc, OSError) and (exc.errno in _FULL or any(f"errno = {e}," in str(exc) for e in _FULL)):
        return True
    if path is None or not isinstance(exc, (OSError, RuntimeError)):
        return False
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stat = os.statvfs(folder)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < 1 << 20


def no_space_message(path) -> str:
    return f"no space left on device writing {path}" if path else \
        "no space left on device (the system did not name the file)"


@contextlib.contextmanager
def writing(path: str | os.PathLike):
    """Turn a full disk while the block writes ``path`` into one line naming ``path``.

    Wrap writes whose own error does not name the file (h5py, ``np.save``, ``torch.save``,
    DeepSpeed's checkpoint files). Whatever was finished before stays: outputs are written to a
    temporary and renamed (``io.atomic_path``), resumable work keeps its finished blocks.
    """
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if disk_full(exc, path):
            raise DiskFull(no_space_message(path)) from None
        raise


def damaged(path, stage: str, detail: str) -> PipelineError:
    """The error for a pipeline file that cannot be read whole (cut short by a full disk, a copy
    that stopped, an edit): names the file and the stage that writes it."""
    return PipelineError(f"{path}: truncated or damaged ({detail}); stage {stage} writes it: "
                         f"rebuild it with dvc repro -f {stage}")
