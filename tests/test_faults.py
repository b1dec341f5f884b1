"""Faults outside the user's input: a full disk, truncated files, a model too large for memory,
a checkpoint of another vocabulary. Each ends in one ``error:`` line naming the file or key
(docs/bad-input.md)."""

from __future__ import annotations

import errno
import os
import re
import shutil

import numpy as np
import pytest
import yaml

from conftest import REPO, run_stage
from instructretro import errors
from instructretro.errors import PipelineError


def _one_line(r, pattern: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), r.stderr[-2000:]


def _params(tmp_path, edit) -> str:
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    edit(p)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return str(tmp_path / "params.yaml")


# ---------------------------------------------------------------------------- disk full

FULL_DISK_SCRIPT = """
import errno, sys, h5py, numpy as np
from instructretro.errors import cli
from instructretro.io import atomic_path

def full(self, key, value):  # what h5py raises when the disk fills
    raise OSError(28, "Can't synchronously write data (file write failed: errno = 28, "
                      "error message = 'No space left on device')")

@cli
def main(kind, out):
    if kind == "oserror":  # an error that names its file
        raise OSError(errno.ENOSPC, "No space left on device", out)
    h5py.Dataset.__setitem__ = full
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("x", shape=(4,), dtype="f4")[:] = np.ones(4)

main(*sys.argv[1:])
"""


@pytest.mark.parametrize("kind", ["oserror", "h5py"])
def test_a_full_disk_is_one_line_naming_the_file(kind, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "db" / "embeddings.h5"
    r = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT, kind, str(out)], capture_output=True, text=True)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])  # not signal 11 from HDF5's exit handler
    assert r.stderr.splitlines()[-1:] == [f"error: no space left on device writing {out}"], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not out.exists() and not list(out.parent.glob(".*tmp*"))  # no half file, no temporary


def test_short_write_without_errno_names_the_file_when_the_disk_is_full(tmp_path, monkeypatch):
    """numpy's ``OSError('24576 requested and 12256 written')`` carries no errno and no file."""
    from instructretro.embed import BlockCache

    cache = BlockCache(tmp_path / "work", "k")
    cache.save(0, np.zeros(4))  # a finished block

    def short_write(f, array):
        raise OSError("24576 requested and 12256 written")

    monkeypatch.setattr(np, "save", short_write)
    full = os.statvfs_result((4096, 4096, 100, 0, 0, 100, 0, 0, 0, 255))
    monkeypatch.setattr(os, "statvfs", lambda path: full)
    with pytest.raises(PipelineError, match=r"^no space left on device writing .*work/k/block_000001\.npy$"):
        cache.save(1, np.zeros(4))
    monkeypatch.undo()
    assert cache.has(0) and not cache.has(1)  # what was built stays; no half block
    assert not [p for p in cache.dir.iterdir() if ".tmp-" in p.name]


def test_embed_output_on_a_full_disk_names_it_and_keeps_the_blocks(tmp_path, small_tokenizer, monkeypatch):
    import h5py

    from instructretro import tokenizer as T
    from instructretro.embed import Encoder, embed_database
    from instructretro.tokenstore import TokenStoreWriter

    tok = T.Tokenizer(small_tokenizer)
    w = TokenStoreWriter(tmp_path / "db", tok.vocab_size, tok.eod_id)
    for i, text in enumerate(["The tower is in the city of Paris.", "A river runs through the old town."]):
        w.add("train", i, tok.encode(text))
    w.close()
    encoder = Encoder("", precision="float32", batch_size=8)
    real = h5py.Dataset.__setitem__

    def full(self, key, value):
        if self.name == "/embeddings":
            raise OSError(28, "Can't synchronously write data (file write failed: errno = 28, "
                              "error message = 'No space left on device')")
        return real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    out = tmp_path / "db_out" / "embeddings.h5"
    with pytest.raises(PipelineError, match=r"^no space left on device writing .*db_out/embeddings\.h5$"):
        embed_database(tmp_path / "db", small_tokenizer, encoder, 64, 1, out, tmp_path / "work")
    assert not out.exists() and not list(out.parent.iterdir())  # no half file, no temporary
    blocks = list((tmp_path / "work").rglob("block_*.npy"))
    assert len(blocks) == 2  # the embedded blocks are kept for the rerun


# ---------------------------------------------------------------------------- truncated files

def test_truncated_embeddings_file_names_it_and_the_stage(tmp_path):
    import h5py

    path = tmp_path / "embeddings.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("chunks", data=np.zeros((300, 3), np.int64))
        f.create_dataset("doc_ids", data=np.zeros(300, np.uint64))
        f.create_dataset("embeddings", data=np.ones((300, 32), np.float16))
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    params = _params(tmp_path, lambda p: None)
    r = run_stage("train_index.py", "--params", params, "--embeddings", path, "--out", tmp_path / "t.faiss",
                  "--metrics", tmp_path / "m.json")
    _one_line(r, re.escape(str(path)) + r": truncated or damaged .*dvc repro -f embed")


def test_truncated_index_names_it_and_the_stage(tmp_path):
    import faiss

    from instructretro.index import read_index

    index = faiss.IndexFlatL2(8)
    index.add(np.random.default_rng(0).random((100, 8), dtype=np.float32))
    path = tmp_path / "populated.faiss"
    faiss.write_index(index, str(path))
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(PipelineError, match=r"populated\.faiss: truncated or damaged \(Faiss: .*\); stage add-index"):
        read_index(path)
    from instructretro.index import INDEX_FILE, write_populated

    folder = tmp_path / "populated"  # the add-index output: a folder
    write_populated(index, folder)
    (folder / INDEX_FILE).write_bytes((folder / INDEX_FILE).read_bytes()[:2000])
    with pytest.raises(PipelineError, match=r"populated/index\.faiss: truncated or damaged .*stage add-index"):
        read_index(folder)
    trained = tmp_path / "trained.faiss"
    trained.write_bytes(b"\0" * 100)
    with pytest.raises(PipelineError, match=r"trained\.faiss: truncated or damaged .*dvc repro -f train-index"):
        read_index(trained)


# ---------------------------------------------------------------------------- safetensors

def _cut(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_encoder_folder_with_truncated_weights_is_one_line(tmp_path):
    from instructretro.embed import Encoder, default_encoder_path

    folder = tmp_path / "encoder"
    shutil.copytree(default_encoder_path(), folder)
    _cut(folder / "model.safetensors")
    with pytest.raises(PipelineError, match=r"embed\.encoder '.*encoder': cannot load a Hugging Face model"):
        Encoder(folder)


def test_every_safetensors_reader_names_a_truncated_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    from instructretro.checkpoint import read_safetensors, read_tensor, safetensors_handle

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(4000), "b": torch.ones(4000)}, str(path))
    _cut(path, 0.6)  # the header is whole, the second tensor is cut
    with pytest.raises(PipelineError, match=re.escape(str(path)) + ": not a readable safetensors file"):
        read_safetensors(path)
    with pytest.raises(PipelineError, match=re.escape(str(path)) + ": not a readable safetensors file"):
        with safetensors_handle(path) as f:  # tensor by tensor (train's weight loading, hf import)
            [read_tensor(f, path, k) for k in sorted(f.keys())]
    _cut(path, 0.01)  # the header itself is cut
    with pytest.raises(PipelineError, match=re.escape(str(path)) + ": not a readable safetensors file"):
        safetensors_handle(path)


# ---------------------------------------------------------------------------- checkpoints and sizes

def test_checkpoint_vocabulary_smaller_than_the_tokenizer_is_one_line(tmp_path, small_tokenizer):
    from instructretro import presets
    from instructretro.checkpoint import export_checkpoint
    from instructretro.model import Retro

    cfg = presets.get("tiny", vocab_size=300, n_layers=2, hidden=16, heads=2, cca_layers=(2,), num_neighbors=1)
    export_checkpoint(Retro(cfg), cfg, tmp_path / "ckpt")
    (tmp_path / "qa.jsonl").write_text('{"question": "who?", "answer": ["x"]}\n')
    params = _params(tmp_path, lambda p: (p["generate"].update(checkpoint=str(tmp_path / "ckpt"), retrieval="none",
                                                                tasks={"t": {"path": str(tmp_path / "qa.jsonl")}})))
    r = run_stage("generate.py", "--params", params, "--task", "t", "--tokenizer", small_tokenizer,
                  "--out", tmp_path / "a.jsonl", "--metrics", tmp_path / "m.json")
    _one_line(r, r"vocabulary of 1024 tokens is larger than the embedding of .*ckpt/config.json \(300 rows\)")


def test_model_too_large_for_memory_set_through_params_is_refused_before_allocation():
    from instructretro import presets, train as T

    config = presets.get("tiny", vocab_size=4096, hidden=16384, heads=128)
    with pytest.raises(PipelineError, match=r"model\.hidden 16384, model\.heads 128.* more than this machine's 8\.0 GiB"):
        T.check_fits_training(config, T.TrainConfig(), 1, host_bytes=8 << 30)
    T.check_fits_training(presets.get("tiny", vocab_size=4096), T.TrainConfig(), 1, host_bytes=8 << 30)
    # on GPUs: the per-GPU plan of make estimate (843m in bf16 at ZeRO 0 does not fit 8 GB, ZeRO 3 on 8 GPUs does)
    big = presets.get("843m", vocab_size=4096)
    with pytest.raises(PipelineError, match=r"GiB per GPU \(bf16, ZeRO 0, .*make estimate"):
        T.check_fits_training(big, T.TrainConfig(precision="bf16", micro_batch=1), 1, gpu_bytes=4 << 30)
    T.check_fits_training(big, T.TrainConfig(precision="bf16", micro_batch=1, zero_stage=3,
                                             activation_checkpointing=True), 8, gpu_bytes=80 << 30)


def test_address_space_limit_counts_as_memory():
    import resource

    from instructretro.checkpoint import memory_bytes

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2  # ulimit -v of half the RAM
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        assert memory_bytes() <= limit
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ---------------------------------------------------------------------------- misleading messages

def test_task_name_with_a_dot_is_refused_at_params_load_by_every_stage(tmp_path):
    params = _params(tmp_path, lambda p: p["generate"]["tasks"].update({"qa.v2": {"path": "x.jsonl"}}))
    r = run_stage("tokenizer.py", "--params", params, "--out", tmp_path / "spm.model")
    _one_line(r, r"task name 'qa\.v2' in 'generate\.tasks' may not contain dots .*e\.g\. 'qa_v2'")
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "instructretro.params", params], capture_output=True, text=True)
    _one_line(r, r"task name 'qa\.v2'")


def test_eval_only_with_a_wrong_checkpoint_names_ckpt(tmp_path):
    params = _params(tmp_path, lambda p: None)
    r = run_stage("pretrain.py", "--params", params, "--eval-only", tmp_path / "nope", "--metrics", tmp_path / "m.json")
    _one_line(r, r"^error: --eval-only \(make eval-ppl CKPT=\.\.\.\): .*nope is not a checkpoint folder")
    assert "pretrain.init_from" not in r.stderr


def test_missing_corpus_inside_an_experiment_copy_says_what_to_do(tmp_path):
    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "standalone" / "tmpabc"
    copy.mkdir(parents=True)
    params = _params(tmp_path, lambda p: p["corpus"].update(db="realdata/corpus.jsonl"))
    r = run_stage("tokenizer.py", "--params", params, "--out", tmp_path / "spm.model", cwd=copy)
    _one_line(r, r"realdata/corpus\.jsonl: corpus file not found; this run works in a copy of the repository "
                 r"\(dvc exp run --temp / --queue\).*'dvc add' the data .* or give an absolute path")
    r = run_stage("tokenizer.py", "--params", params, "--out", tmp_path / "spm.model", cwd=tmp_path)
    _one_line(r, r"realdata/corpus\.jsonl: corpus file not found$")
