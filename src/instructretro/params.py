"""Read typed values from ``params.yaml``; a wrong type or a missing key names the key."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .errors import PipelineError

_MISSING = object()


def load(path: str | os.PathLike = "params.yaml") -> "Params":
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return Params(data, str(path))


class Params:
    """Dotted-key access with type checks: ``p.get("embed.batch_size", int)``."""

    def __init__(self, data: dict, source: str = "params.yaml"):
        self.data = data
        self.source = source

    def get(self, key: str, typ=None, default=_MISSING, choices=None):
        node = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is not _MISSING:
                    return default
                raise PipelineError(f"{self.source}: missing param '{key}'")
            node = node[part]
        if typ is not None:
            node = _check(key, node, typ, self.source)
        if choices is not None and node not in choices:
            raise PipelineError(
                f"{self.source}: param '{key}' is {node!r}; expected one of {sorted(choices)}"
            )
        return node

    def section(self, key: str) -> dict:
        node = self.get(key, dict)
        return dict(node)


def _check(key, value, typ, source):
    types = typ if isinstance(typ, tuple) else (typ,)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if bool not in types and isinstance(value, bool):
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        names = " or ".join(t.__name__ for t in types)
        raise PipelineError(
            f"{source}: param '{key}' must be {names}, got {type(value).__name__} {value!r}"
        )
    return value


def positive(key: str, value, source: str = "params.yaml"):
    if value <= 0:
        raise PipelineError(f"{source}: param '{key}' must be > 0, got {value!r}")
    return value
