"""One error type for bad input: stages print its message on one line and exit 1."""

from __future__ import annotations

import functools
import sys


class PipelineError(Exception):
    """Bad input or settings. The message names the file, line or param key at fault."""


def cli(main):
    """Wrap a stage's ``main`` so a PipelineError becomes a one-line message and exit code 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except PipelineError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
