"""Progress of long work, on a terminal and in a log file.

On a terminal :func:`progress` is a tqdm bar. When the stream is not a terminal (``make repro >
log``, a batch job) it prints one line at most every ``interval`` seconds (default 30, or the
``INSTRUCTRETRO_PROGRESS_INTERVAL`` environment variable)::

    embed: 4096/10240 (40%) 52.3 chunk/s ETA 1m57s

and one last line when the work ends (``embed: 10240/10240 (100%) in 3m16s, 52.2 chunk/s``).
Both kinds support ``update``, ``set_postfix``, ``close``, iteration and ``with``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Iterable

DEFAULT_INTERVAL = 30.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class LineProgress:
    """Progress as plain lines at a bounded rate, for streams that are not terminals."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, interval: float = DEFAULT_INTERVAL, stream=None,
                 clock: Callable[[], float] = time.monotonic):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = initial
        self.interval = interval
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.start = self.last = clock()
        self.postfix = ""
        self.closed = False

    def _count(self) -> str:
        if self.total:
            return f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)"
        return f"{self.n}"

    def _rate(self, elapsed: float) -> float:
        return (self.n - self.initial) / elapsed if elapsed > 0 else 0.0

    def _print(self, text: str) -> None:
        print(f"{self.desc}: {text}{self.postfix}", file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            rate = self._rate(now - self.start)
            eta = ""
            if self.total and rate > 0:
                eta = f" ETA {_duration((self.total - self.n) / rate)}"
            self._print(f"{self._count()} {rate:.1f} {self.unit}/s{eta}")

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = "".join(f", {k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        elapsed = self.clock() - self.start
        self._print(f"{self._count()} in {_duration(elapsed)}, {self._rate(elapsed):.1f} {self.unit}/s")

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Silent:
    """No output (progress disabled, e.g. on ranks other than 0)."""

    def __init__(self, iterable=None, **_):
        self.iterable = iterable

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, refresh: bool = True, **values) -> None:
        pass

    def close(self) -> None:
        pass

    def __iter__(self):
        return iter(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def interval_from_env() -> float:
    value = os.environ.get("INSTRUCTRETRO_PROGRESS_INTERVAL", "")
    try:
        return float(value) if value else DEFAULT_INTERVAL
    except ValueError:
        return DEFAULT_INTERVAL


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, disable: bool = False, interval: float | None = None, stream=None,
             clock: Callable[[], float] = time.monotonic):
    """A progress reporter: tqdm on a terminal, :class:`LineProgress` otherwise (see the module)."""
    if disable:
        return _Silent(iterable)
    stream = stream if stream is not None else sys.stderr
    if _is_tty(stream):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, mininterval=2.0, file=stream)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial,
                        interval=interval_from_env() if interval is None else interval, stream=stream, clock=clock)
