"""The SFT blend: ``sft.blend`` entries ``name -> {path, format, prob}``, checked and normalised.

dvc.yaml runs one stage ``sft-blend@<name>`` per entry (``stages/sft_blend.py``): it checks
the entry and every record of its file and writes :func:`blend_stamp` to
``data/sft-blend/<name>.json``. The sft stage depends on that folder and, with
:func:`check_stamps`, on the records matching the files, so a blend entry needs params only.
This module holds no training code, so those stages depend on little.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from . import data
from .errors import PipelineError

FORMATS = ("conversation", "alpaca", "auto")


@dataclass(frozen=True)
class BlendEntry:
    name: str
    path: Path
    format: str
    prob: float  # normalised so that the blend sums to 1


_BLEND_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # a param key and a metrics key: no dots


def parse_blend(entries, source: str = "params.yaml", root: str | os.PathLike = ".",
                out: str | os.PathLike | None = None) -> list[BlendEntry]:
    """Validate ``sft.blend`` (a mapping ``name -> {path, format, prob}``) and normalise the probs.

    Each ``path`` names one file, relative to ``root`` (the repository root, where DVC runs the
    stage) or absolute; the generated sets (``data/world/sft/*.jsonl``) and a user's own files
    mix freely. Each file is a dependency of its own stage ``sft-blend@<name>`` in dvc.yaml, whose
    record the sft stage depends on, so an unrelated file next to it does not rerun the stage. A
    missing file, a folder, a file inside the stage's own output ``out``, the same file under two
    names, an unknown format or a prob <= 0 is an error naming the key.
    """
    if isinstance(entries, list):
        raise PipelineError(f"{source}: param 'sft.blend' is a list; write it as a mapping name -> "
                            "{path, format, prob}, e.g. 'chat: {path: data/world/sft/chat.jsonl, format: conversation, prob: 1}'")
    if not isinstance(entries, dict) or not entries:
        raise PipelineError(f"{source}: param 'sft.blend' must be a non-empty mapping name -> {{path, format, prob}}")
    root = Path(root)
    out_dir = (root / out).resolve() if out is not None else None
    result, files = [], {}
    for name, e in entries.items():
        key = f"sft.blend.{name}"
        if not isinstance(name, str) or not _BLEND_NAME.match(name):
            raise PipelineError(f"{source}: dataset name {name!r} in 'sft.blend' must be letters, digits, '_' or '-'")
        if not isinstance(e, dict):
            raise PipelineError(f"{source}: param '{key}' must be a mapping {{path, format, prob}}")
        unknown = set(e) - {"path", "format", "prob"}
        if unknown:
            raise PipelineError(f"{source}: param '{key}' has unknown keys {sorted(unknown)}; expected path, format, prob")
        path, fmt, prob = e.get("path"), e.get("format", "auto"), e.get("prob")
        if not isinstance(path, str) or not path:
            raise PipelineError(f"{source}: param '{key}.path' must be a file path (relative to the repository root)")
        if fmt not in FORMATS:
            raise PipelineError(f"{source}: param '{key}.format' is {fmt!r}; expected one of {list(FORMATS)}")
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not prob > 0 or not math.isfinite(prob):
            raise PipelineError(f"{source}: param '{key}.prob' must be a number > 0, got {prob!r}")
        full = root / path
        if full.is_dir():
            raise PipelineError(f"{source}: param '{key}.path' {path!r} is a folder; name one file of it "
                                "(each file is its own blend entry and DVC dependency)")
        if not full.is_file():
            raise PipelineError(f"{source}: param '{key}.path': {path} not found{data.experiment_copy_hint(full)}")
        resolved = full.resolve()
        if out_dir is not None and resolved.is_relative_to(out_dir):
            raise PipelineError(f"{source}: param '{key}.path' {path!r} is inside the sft stage's own output {out}")
        if resolved in files:
            raise PipelineError(f"{source}: param '{key}.path' {path!r} is also the file of 'sft.blend.{files[resolved]}'")
        files[resolved] = name
        result.append(BlendEntry(name, full, fmt, float(prob)))
    total = sum(e.prob for e in result)
    return [BlendEntry(e.name, e.path, e.format, e.prob / total) for e in result]


def blend_stamp(entry: BlendEntry, records: int) -> dict:
    """What stage ``sft-blend@<name>`` records of one blend entry (``data/sft-blend/<name>.json``):
    the entry as given, its record count and a hash of the file's bytes."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    with open(entry.path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"name": entry.name, "path": str(entry.path), "format": entry.format, "records": records,
            "blake2b": h.hexdigest()}


def check_stamps(blend: list[BlendEntry], folder: str | os.PathLike, source: str = "params.yaml",
                 prune: bool = True) -> list[str]:
    """Check that ``folder`` (``data/sft-blend``, what the ``sft-blend@<name>`` stages write) holds
    an up-to-date record of every blend entry; remove the records of entries no longer in the
    blend and return their names. Skipped (``[]``) when ``folder`` does not exist: the stage
    script run by hand, outside DVC."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    for e in blend:
        stamp = folder / f"{e.name}.json"
        current = blend_stamp(e, 0)
        try:
            recorded = json.loads(stamp.read_text())
        except (OSError, ValueError):
            recorded = None
        if not isinstance(recorded, dict) or recorded.get("blake2b") != current["blake2b"] \
                or recorded.get("path") != current["path"]:
            raise PipelineError(f"{source}: param 'sft.blend.{e.name}': {stamp} does not record {e.path} as it is "
                                f"now; run dvc repro sft (stage sft-blend@{e.name} writes it)")
    names = {e.name for e in blend}
    stale = sorted(f for f in folder.glob("*.json") if f.stem not in names)
    for f in stale if prune else []:
        f.unlink()
    return [f.stem for f in stale]
