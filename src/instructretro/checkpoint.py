"""Exported checkpoint folders: what a training stage writes and every later stage loads.

A folder holds ``config.json`` (the ``ModelConfig``), ``model.safetensors`` (fp32 weights, names
sorted) and optionally ``train.json`` (steps trained, precision, init_from, and the tokenizer it
was trained with: its path and content hash, ``tokenizer_record``; ``check_tokenizer`` refuses
another tokenizer, and a checkpoint without the record loads unchecked). ``export_checkpoint``
writes one atomically (every rank calls it; ZeRO-3 gathers, rank 0 writes); ``read_config``,
``read_state_dict``, ``load_model`` and ``checkpoint_precision`` read it; ``check_fits`` refuses a
config whose weights would not fit in memory; ``init_from_checkpoint`` copies a GPT checkpoint's
decoder into a Retro model. Reading a checkpoint needs only this module and ``model.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .dist import barrier, is_rank0
from .errors import PipelineError
from .io import atomic_path, read_json_object, write_json

PRECISIONS = ("fp32", "bf16")


def full_state_dict(engine_or_model) -> dict[str, torch.Tensor]:
    """The complete model state dict as fp32 CPU tensors (gathers ZeRO-3 shards; all ranks call)."""
    module = getattr(engine_or_model, "module", engine_or_model)
    if hasattr(engine_or_model, "zero_optimization_partition_weights") and \
            engine_or_model.zero_optimization_partition_weights():
        state = engine_or_model._zero3_consolidated_16bit_state_dict()  # noqa: SLF001 (no public API)
        state = state if state is not None else {}
    else:
        state = module.state_dict()
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def export_checkpoint(engine_or_model, config, folder: str | os.PathLike, extra: dict | None = None) -> None:
    """Write ``folder/config.json`` (the ModelConfig) and ``folder/model.safetensors`` atomically.

    Every rank must call this (ZeRO-3 gathers); only rank 0 writes. ``extra`` goes into
    ``folder/train.json`` (e.g. the steps trained), kept apart from the model config.
    """
    from safetensors.torch import save_file

    state = full_state_dict(engine_or_model)
    if is_rank0():
        with atomic_path(folder) as tmp:
            tmp.mkdir(parents=True)
            (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
            save_file(dict(sorted(state.items())), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            if extra:
                write_json(tmp / "train.json", extra)
    barrier()


def read_config(folder: str | os.PathLike):
    """The ModelConfig stored in an exported checkpoint folder."""
    from .model import ModelConfig

    path = Path(folder) / "config.json"
    if not path.is_file():
        raise PipelineError(f"{folder}: not an exported checkpoint (no config.json)")
    return ModelConfig.from_dict(read_json_object(path), str(path))


def _unreadable(path, exc) -> PipelineError:
    first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
    return PipelineError(f"{path}: not a readable safetensors file ({first})")


def safetensors_handle(path: str | os.PathLike):
    """``safe_open`` of a safetensors file, to read tensor by tensor (``keys()``, and
    :func:`read_tensor`); a header that cannot be read is one line naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _unreadable(path, exc) from None


def read_tensor(handle, path: str | os.PathLike, name: str) -> torch.Tensor:
    """Tensor ``name`` of an open :func:`safetensors_handle`; data cut off by a truncated file
    (safetensors raises several kinds of error for it) is one line naming the file and tensor."""
    try:
        return handle.get_tensor(name)
    except Exception as exc:  # noqa: BLE001 (SafetensorError, OSError, RuntimeError, ...)
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise PipelineError(f"{path}: cannot read tensor '{name}' ({first})") from None


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a truncated or foreign file is one line naming it.

    With :func:`safetensors_handle` and :func:`read_tensor`, the one reader of safetensors files
    we load ourselves (exported checkpoints, imported HF weights): ``SafetensorError`` (e.g.
    ``incomplete metadata`` of a cut file) is not an ``OSError``, so callers do not catch the
    file's errors on their own.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _unreadable(path, exc) from None


def read_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise PipelineError(f"{folder}: not an exported checkpoint (no model.safetensors)")
    return read_safetensors(path)


def memory_bytes() -> int:
    """Memory this process may use (bytes): the machine's physical memory, or less where an
    address-space limit (``ulimit -v``, RLIMIT_AS) or a cgroup memory limit says so."""
    import resource

    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft not in (resource.RLIM_INFINITY, -1) and soft > 0:
        limits.append(soft)
    try:
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if text.isdigit():
            limits.append(int(text))
    except OSError:
        pass
    return min(limits)


def check_fits(config, source: str, bytes_per_param: int = 4, limit: int | None = None) -> int:
    """Refuse a config whose weights alone (``bytes_per_param`` each) exceed the machine's memory.

    The parameter count comes from the model built on the meta device (nothing allocated), so an
    absurd size (``vocab_size: 2**31``) is an error naming the key instead of a huge allocation.
    Returns the parameter count.
    """
    from .model import Retro

    with torch.device("meta"):
        n = Retro(config).num_parameters()
    limit = memory_bytes() if limit is None else limit
    if n * bytes_per_param > limit:
        embed = 2 * config.vocab_size * config.hidden  # input and output embeddings
        key = "vocab_size" if embed * 2 > n else "n_layers' / 'hidden"
        raise PipelineError(
            f"{source}: '{key}' gives a model of {n:,} parameters ({n * bytes_per_param / 2**30:.1f} GiB of "
            f"weights), more than this machine's {limit / 2**30:.1f} GiB of memory "
            f"(vocab_size {config.vocab_size}, n_layers {config.n_layers}, hidden {config.hidden})")
    return n


def load_model(folder: str | os.PathLike, device=None, dtype: torch.dtype | None = None):
    """Build the model stored in an exported checkpoint and load its weights (fp32 on the CPU,
    or on ``device`` in ``dtype``: the weights are cast after loading, so bf16 rounds the fp32
    export once)."""
    from .model import Retro

    config = read_config(folder)
    check_fits(config, str(Path(folder) / "config.json"))
    state = read_state_dict(folder)
    model = Retro(config)
    expected = model.state_dict()
    if set(state) != set(expected):
        raise PipelineError(f"{folder}: weights do not match config.json "
                            f"({len(set(state) ^ set(expected))} names differ)")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise PipelineError(f"{folder}: weight '{name}' has shape {tuple(tensor.shape)}, config.json gives "
                                f"{tuple(expected[name].shape)}")
    model.load_state_dict(state)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def train_record(folder: str | os.PathLike) -> dict:
    """An exported checkpoint's ``train.json`` ({} when it has none); a malformed one is one line
    naming the file."""
    path = Path(folder) / "train.json"
    return read_json_object(path) if path.is_file() else {}


def checkpoint_precision(folder: str | os.PathLike) -> str:
    """The precision an exported checkpoint was trained in (``train.json``; fp32 if unrecorded)."""
    path = Path(folder) / "train.json"
    precision = train_record(folder).get("precision", "fp32")
    if precision not in PRECISIONS:
        raise PipelineError(f"{path}: precision {precision!r}; expected one of {PRECISIONS}")
    return precision


def tokenizer_digest(path: str | os.PathLike) -> str:
    """The tokenizer's content hash (``Tokenizer.digest``: its own files, by name and bytes), so
    our ``spm.model`` given as the file or as the folder holding it records the same."""
    from .tokenizer import Tokenizer

    return Tokenizer(path).digest


def tokenizer_record(path: str | os.PathLike) -> dict:
    """What ``train.json`` records of the tokenizer a checkpoint was trained with."""
    return {"path": str(path), "sha256": tokenizer_digest(path)}


def check_tokenizer(folder: str | os.PathLike, tokenizer: str | os.PathLike) -> None:
    """Refuse ``tokenizer`` for the checkpoint ``folder`` when its ``train.json`` records another
    one (by content hash). A checkpoint without the record (exported before it was kept, or by
    hand) is not checked."""
    record = train_record(folder).get("tokenizer")
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        return
    digest = tokenizer_digest(tokenizer)
    if digest != record["sha256"]:
        raise PipelineError(f"{folder}: trained with tokenizer {record.get('path')} (sha256 {record['sha256'][:12]}), "
                            f"but the tokenizer here is {tokenizer} (sha256 {digest[:12]}); its token ids mean other "
                            "pieces: use the tokenizer the checkpoint was trained with, or retrain from it")


def init_from_checkpoint(model: torch.nn.Module, folder: str | os.PathLike) -> list[str]:
    """Copy an exported checkpoint's decoder weights into ``model``; return the names left fresh.

    A GPT checkpoint loads into a Retro model with the same decoder: the encoder and chunked
    cross-attention keep their fresh initialisation (InstructRetro's continued pretraining).
    The optimizer state is not part of an exported checkpoint, so it starts fresh too.
    """
    from .model import load_decoder_weights

    try:
        return load_decoder_weights(model, read_state_dict(folder))
    except PipelineError as exc:
        raise PipelineError(f"{folder}: {exc}") from None

