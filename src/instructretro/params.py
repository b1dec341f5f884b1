"""Read typed values from ``params.yaml``; a wrong type, a missing key or an unknown key names the key.

:data:`KNOWN` is the table of every key a stage reads, per section, with the type its value
must have. :func:`load` checks the whole file against it, so a misspelt key (``pretrain.stpes``)
or a value of the wrong type (``sft.steps: ten``) is refused before any work starts, naming the
key and, for an unknown key, the closest known one. Keys whose values are lists or mappings of
the user's own entries (``sft.blend``, ``generate.tasks``) are typed ``ANY`` here and checked
entry by entry by the parser that reads them, so entry names are never taken for keys. Every
number has its range in the table (``Num``: counts >= 0, sizes > 0, finite floats, fractions
in [0, 1), seeds in [0, 2**31)), and ``retro.seq_length`` must be a multiple of
``retro.chunk_length``; both are checked at load too.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path

import yaml

from .errors import PipelineError

_MISSING = object()
NONE = type(None)
ANY = object()  # any value: its reader checks it (lists/mappings of user entries)


def int_list(key: str, value, source: str):
    """A list of integers (e.g. ``model.cca_layers: [2, 4]``)."""
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise PipelineError(f"{source}: param '{key}' must be a list of integers, got {value!r}")
    return value


def optional(check):
    """A checker that also accepts null (null: the preset's value)."""
    def check_or_null(key, value, source):
        return value if value is None else check(key, value, source)
    return check_or_null


INT_OR_NULL, FLOAT_OR_NULL, STR_OR_NULL = (int, NONE), (float, NONE), (str, NONE)

SEED_LIMIT = 2**31  # numpy takes any seed >= 0; Faiss's k-means and clustering seeds are C ints


class Num:
    """A number in a range: the type check of ``_check``, then finite (floats) and the bounds
    (``lo``/``hi``, each inclusive unless ``lo_open``/``hi_open``); ``null`` also accepts null.
    ``Num(int, 0)`` is a count (>= 0), ``Num(int, 1)`` a size (> 0)."""

    def __init__(self, typ, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False, null: bool = False):
        self.typ, self.lo, self.hi, self.lo_open, self.hi_open, self.null = typ, lo, hi, lo_open, hi_open, null

    def describe(self) -> str:
        if self.typ is int and self.hi is None and self.lo in (0, 1) and not self.lo_open:
            return "> 0" if self.lo == 1 else ">= 0"
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"

    def __call__(self, key: str, value, source: str):
        value = _check(key, value, (self.typ, NONE) if self.null else self.typ, source)
        if value is None:
            return value
        if self.typ is float and not math.isfinite(value):
            raise PipelineError(f"{source}: param '{key}' must be a finite number, got {value!r}")
        low_bad = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        high_bad = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if low_bad or high_bad:
            raise PipelineError(f"{source}: param '{key}' must be {self.describe()}, got {value!r}")
        return value


COUNT, SIZE = Num(int, 0), Num(int, 1)  # >= 0; > 0
COUNT_OR_NULL, SIZE_OR_NULL = Num(int, 0, null=True), Num(int, 1, null=True)
SEED, SEED_OR_NULL = Num(int, 0, SEED_LIMIT, hi_open=True), Num(int, 0, SEED_LIMIT, hi_open=True, null=True)
FRACTION = Num(float, 0.0, 1.0, hi_open=True)  # [0, 1)
POSITIVE, POSITIVE_OR_NULL = Num(float, 0.0, lo_open=True), Num(float, 0.0, lo_open=True, null=True)
NON_NEGATIVE_OR_NULL = Num(float, 0.0, null=True)
BETA_OR_NULL = Num(float, 0.0, 1.0, hi_open=True, null=True)  # Adam betas: [0, 1)
ZERO_STAGE_OR_NULL = Num(int, 0, 3, null=True)
SHARE_OR_NULL = Num(float, 0.0, 1.0, null=True)  # [0, 1] or null

# Every key of params.yaml: section -> key -> type (a type, a tuple of types, a checker
# ``f(key, value, source) -> value`` such as a ``Num`` range, or ANY). Every number has its
# range here, checked when params.yaml is loaded. A stage that reads a new key adds it here (and
# to params.yaml: tests/test_bad_inputs.py checks that the two agree).
KNOWN: dict[str, dict[str, object]] = {
    "world": {"num_entities": SIZE, "docs_per_entity": SIZE, "qa_questions": SIZE, "sft_conversations": SIZE,
              "seed": SEED},
    "corpus": {"db": str, "pretrain": str},
    "tokenizer": {"vocab_size": SIZE, "sample_bytes": SIZE, "model": str},
    "tokenize": {"db_valid_fraction": FRACTION, "pretrain_valid_fraction": FRACTION},
    "retro": {"chunk_length": SIZE, "seq_length": SIZE},
    "embed": {"encoder": str, "precision": str, "batch_size": SIZE, "gpu_batch_size": SIZE, "max_length": SIZE,
              "block_size": SIZE, "dtype": str},
    "index": {"factory": str, "train_points": SIZE, "seed": SEED, "add_block_size": SIZE, "ondisk_above": SIZE},
    "query": {"num_neighbors_query": SIZE, "num_neighbors_save": SIZE, "nprobe": SIZE, "efsearch": SIZE,
              "block_size": SIZE, "recall_sample": COUNT, "recall_nprobe_max": COUNT, "seed": SEED},
    "model": {"name": str, "retro": bool},
    # TrainConfig fields (null: the preset's recipe) and the run's inputs
    "pretrain": {"steps": SIZE_OR_NULL, "micro_batch": SIZE_OR_NULL, "grad_accum": SIZE_OR_NULL,
                 "lr": POSITIVE_OR_NULL, "min_lr": NON_NEGATIVE_OR_NULL, "warmup": COUNT_OR_NULL,
                 "weight_decay": NON_NEGATIVE_OR_NULL, "beta1": BETA_OR_NULL, "beta2": BETA_OR_NULL,
                 "clip": NON_NEGATIVE_OR_NULL, "zero_stage": ZERO_STAGE_OR_NULL, "precision": STR_OR_NULL,
                 "seed": SEED_OR_NULL, "eval_interval": SIZE_OR_NULL, "eval_batches": SIZE_OR_NULL,
                 "save_interval": SIZE_OR_NULL,
                 "activation_checkpointing": (bool, NONE), "offload_optimizer": STR_OR_NULL,
                 "offload_params": STR_OR_NULL, "offload_nvme_path": str, "freeze_decoder": bool,
                 "retrieval_warmup": COUNT_OR_NULL, "init_from": str, "skip_train": bool},
    "sft": {"init_from": str, "blend": ANY, "valid_fraction": FRACTION, "valid_samples": SIZE,
            "system": str, "retrieval": str, "num_contexts": COUNT, "num_neighbors": SIZE_OR_NULL,
            "nprobe": SIZE, "efsearch": SIZE, "seed": SEED, "eval_interval": SIZE, "save_interval": SIZE,
            # training keys (sft.TRAIN_KEYS; null: the preset's SFT recipe)
            "seq_length": SIZE_OR_NULL, "steps": SIZE_OR_NULL, "global_batch": SIZE_OR_NULL,
            "micro_batch": SIZE_OR_NULL, "lr": POSITIVE_OR_NULL, "lr_schedule": STR_OR_NULL,
            "warmup": COUNT_OR_NULL, "beta1": BETA_OR_NULL, "beta2": BETA_OR_NULL,
            "weight_decay": NON_NEGATIVE_OR_NULL, "clip": NON_NEGATIVE_OR_NULL,
            "zero_stage": ZERO_STAGE_OR_NULL, "precision": STR_OR_NULL, "activation_checkpointing": (bool, NONE),
            "offload_optimizer": STR_OR_NULL, "offload_params": STR_OR_NULL, "retrieval_warmup": COUNT_OR_NULL},
    "generate": {"checkpoint": str, "tasks": ANY, "retrieval": str, "num_contexts": COUNT, "max_new_tokens": SIZE,
                 "batch_size": SIZE, "max_questions": COUNT, "system": STR_OR_NULL, "nprobe": SIZE, "efsearch": SIZE,
                 "threads": COUNT},
    "score": {"f1_gold": str, "normalize": str},
    "leakage": {"max_overlap": SHARE_OR_NULL, "max_samples": COUNT, "batch_size": SIZE},
}


def positive_int_list(key: str, value, source: str):
    """A list of layer numbers (>= 1), e.g. ``model.cca_layers: [2, 4]``."""
    value = int_list(key, value, source)
    if any(v < 1 for v in value):
        raise PipelineError(f"{source}: param '{key}' must be a list of layer numbers >= 1, got {value!r}")
    return value


# Keys a user may add that params.yaml does not ship: overrides of the model preset's
# ModelConfig fields (null: the preset's). vocab_size, seq_length and chunk_length come from the
# tokenizer and retro.*, so they are not params.
OPTIONAL: dict[str, dict[str, object]] = {
    "model": {"n_layers": SIZE_OR_NULL, "hidden": SIZE_OR_NULL, "heads": SIZE_OR_NULL,
              "ffn_hidden": COUNT_OR_NULL,  # 0: the SwiGLU rule
              "cca_layers": optional(positive_int_list), "encoder_layers": SIZE_OR_NULL,
              "num_neighbors": SIZE_OR_NULL, "rotary_percent": Num(float, 0.0, 1.0, lo_open=True, null=True),
              "rotary_base": POSITIVE_OR_NULL, "cca_rotary": (bool, NONE), "norm_eps": POSITIVE_OR_NULL,
              "init_std": POSITIVE_OR_NULL,
              # the architecture switches (docs/model.md); an imported model sets them from its config.json
              "norm": STR_OR_NULL, "mlp": STR_OR_NULL, "kv_heads": COUNT_OR_NULL, "qkv_bias": (bool, NONE),
              "linear_bias": (bool, NONE), "rope_scaling": (dict, NONE), "learned_positions": COUNT_OR_NULL,
              "tie_embeddings": (bool, NONE), "cca_gate": (bool, NONE),
              "encoder_embedding_grad": (bool, NONE)},
}


def known_keys() -> dict[str, dict[str, object]]:
    """KNOWN with OPTIONAL merged in: every key :func:`load` accepts."""
    return {section: {**keys, **OPTIONAL.get(section, {})} for section, keys in KNOWN.items()}


def closest(name: str, known, prefix: str = "") -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known``, or ``""``."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ""


def check_known(data: dict, source: str = "params.yaml", known: dict | None = None) -> None:
    """Refuse unknown sections and keys, and values of the wrong type, naming the key."""
    known = known_keys() if known is None else known
    if not isinstance(data, dict):
        raise PipelineError(f"{source}: expected a mapping of sections at the top level")
    for section, body in data.items():
        if section not in known:
            raise PipelineError(f"{source}: unknown section '{section}'{closest(str(section), known)}; "
                                f"known sections: {', '.join(known)}")
        if not isinstance(body, dict):
            raise PipelineError(f"{source}: section '{section}' must be a mapping of keys, got {type(body).__name__}")
        keys = known[section]
        for key, value in body.items():
            if key not in keys:
                raise PipelineError(f"{source}: unknown param '{section}.{key}'"
                                    f"{closest(str(key), keys, f'{section}.')}")
            spec = keys[key]
            if spec is ANY:
                continue
            if callable(spec) and not isinstance(spec, type):
                spec(f"{section}.{key}", value, source)
            else:
                _check(f"{section}.{key}", value, spec, source)


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
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PipelineError(f"{where}: not valid YAML ({problem})") from None
    check_known(data, str(path))
    check_entry_names(data, str(path))
    check_lengths(data, str(path))
    return Params(data, str(path))


# Mappings keyed by the user's own names. DVC addresses an entry as a dotted param key
# (``generate.tasks.<name>``) before any stage runs, so a dot in a name splits it into keys that
# do not exist and DVC reports ``Parameters 'generate.tasks.qa.v2' are missing``.
ENTRY_MAPPINGS = (("generate", "tasks", "task"), ("sft", "blend", "dataset"))
ENTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def check_entry_names(data: dict, source: str = "params.yaml") -> None:
    """Refuse a task or blend name with a dot (or other characters DVC keys cannot carry)."""
    for section, key, what in ENTRY_MAPPINGS:
        entries = (data.get(section) or {}).get(key) if isinstance(data.get(section), dict) else None
        if not isinstance(entries, dict):
            continue
        for name in entries:
            if not isinstance(name, str) or not ENTRY_NAME.match(name):
                dot = " may not contain dots (DVC reads a dot as a nested key);" if "." in str(name) else ""
                raise PipelineError(f"{source}: {what} name {name!r} in '{section}.{key}'{dot} use letters, digits, "
                                    f"'_' or '-'" + (f", e.g. {str(name).replace('.', '_')!r}" if dot else ""))


def check_lengths(data: dict, source: str = "params.yaml") -> None:
    """``retro.seq_length`` must be a multiple of ``retro.chunk_length`` (so at least one chunk):
    checked at load, before any stage's work (embed, the index stages and query-neighbors all
    read the chunk length)."""
    retro = data.get("retro") if isinstance(data.get("retro"), dict) else {}
    chunk, seq = retro.get("chunk_length"), retro.get("seq_length")
    if isinstance(chunk, int) and isinstance(seq, int) and chunk > 0 and seq > 0:
        if chunk > seq or seq % chunk:
            raise PipelineError(f"{source}: param 'retro.seq_length' ({seq}) must be a multiple of "
                                f"'retro.chunk_length' ({chunk}), at least one chunk")


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
        names = " or ".join("null" if t is NONE else t.__name__ for t in types)
        hint = ""
        if float in types and isinstance(value, str) and _is_number(value):
            hint = f" (YAML reads {value} as text: write it with a dot, e.g. {float(value)!r})"
        raise PipelineError(
            f"{source}: param '{key}' must be {names}, got {type(value).__name__} {value!r}{hint}"
        )
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def positive(key: str, value, source: str = "params.yaml"):
    if value <= 0:
        raise PipelineError(f"{source}: param '{key}' must be > 0, got {value!r}")
    return value


def main(argv=None) -> int:
    """``python -m instructretro.params [params.yaml]``: check the params file as every stage
    does when it starts (the Make targets run this before DVC, whose own errors about params
    come before any stage runs)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    try:
        load(args[0] if args else "params.yaml")
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
