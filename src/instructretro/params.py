"""Read typed values from ``params.yaml``; a wrong type or a missing key names the key."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .errors import PipelineError

_MISSING = object()


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one
    silently; e.g. two ``sft.blend`` datasets of the same name)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load(path: str | os.PathLike = "params.yaml") -> "Params":
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: params file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PipelineError(f"{where}: not valid YAML ({problem})") from None
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
