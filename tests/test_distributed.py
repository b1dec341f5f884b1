"""Past one machine: embed and query-neighbors split over ranks give the bytes of one process
(query-neighbors: every rank embeds and searches its own query blocks, rank 0 assembles).

The unit test checks the block assignment in-process (block b -> rank b % world). The slow test
runs both stage scripts once as one process and once under ``deepspeed --num_gpus 2`` (two CPU
ranks with gloo) on a small world and compares the output files byte for byte.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from instructretro.embed import BlockCache, embed_rows_blockwise

from conftest import PYTHON, REPO, run_stage

DEEPSPEED = Path(PYTHON).parent / "deepspeed"
BLOCK_SIZE = 8  # ~80 DB chunks and ~100 query chunks -> many blocks, so both ranks get several


class CountingEncoder:
    """A stand-in encoder: row text "r" -> a vector holding r; records which texts it encoded."""

    dim = 3

    def __init__(self):
        self.seen = []

    def encode(self, texts, progress=False):
        self.seen += list(texts)
        return np.array([[float(t), 1.0, 0.0] for t in texts], dtype=np.float32)


def test_blocks_are_assigned_round_robin_and_union_equals_one_process(tmp_path):
    n_rows, block_size, world = 45, 10, 2  # 5 blocks: rank 0 does 0, 2, 4; rank 1 does 1, 3

    def texts_of(lo, hi):
        return [str(r) for r in range(lo, hi)]

    one = BlockCache(tmp_path / "one", "k")
    embed_rows_blockwise(texts_of, n_rows, CountingEncoder(), block_size, one, "one")
    shared = BlockCache(tmp_path / "shared", "k")
    for rank in range(world):
        enc = CountingEncoder()
        done, _ = embed_rows_blockwise(texts_of, n_rows, enc, block_size, shared, f"rank {rank}",
                                       rank=rank, world=world)
        blocks = sorted({int(t) // block_size for t in enc.seen})
        assert blocks == list(range(rank, 5, world))
        assert done == sum(min(n_rows, (b + 1) * block_size) - b * block_size for b in blocks)
    for b in range(5):
        assert one.path(b).read_bytes() == shared.path(b).read_bytes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(script: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    """Run a stage script under the deepspeed launcher with two CPU ranks (gloo)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONHASHSEED"] = "0"
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(_free_port()),
           str(REPO / "stages" / script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def inputs(small_tokenizer, tmp_path_factory):
    """Token stores of a 30-entity world's DB and pretraining corpora, and a params file."""
    from instructretro.world import write_world

    root = tmp_path_factory.mktemp("dist")
    world = root / "world"
    write_world(world, num_entities=30, docs_per_entity=1, qa_questions=5, sft_conversations=5, seed=3)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    pretrain = root / "pretrain.jsonl"  # 15 documents: ~100 query chunks keep the test near a minute
    pretrain.write_text("".join((world / "documents.jsonl").read_text().splitlines(keepends=True)[:15]))
    params["corpus"].update(db=str(world / "reference.jsonl"), pretrain=str(pretrain))
    params["tokenize"].update(pretrain_valid_fraction=0.25)
    params["retro"].update(chunk_length=64, seq_length=128)
    params["embed"].update(precision="float32", block_size=BLOCK_SIZE)
    params["index"].update(factory="IVF2,Flat")  # an IVF: the recall-per-nprobe curve has rows
    params["query"].update(block_size=BLOCK_SIZE, num_neighbors_query=20, num_neighbors_save=4, recall_sample=50)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for which in ("db", "pretrain"):
        _ok(run_stage("tokenize_corpus.py", which, "--params", root / "params.yaml", "--tokenizer", small_tokenizer,
                      "--out", root / "tokens" / which, "--metrics", root / f"tokenize_{which}.json"))
    return root, small_tokenizer


def _metrics_without_timing(path: Path) -> dict:
    m = json.loads(path.read_text())
    for key in ("chunks_per_s", "query_chunks_per_s", "seconds", "recall_seconds", "search_ms_per_query_chunk"):
        m.pop(key, None)
    return m


@pytest.mark.slow
def test_two_ranks_write_the_bytes_of_one_process(inputs):
    root, tok = inputs
    common = ["--params", root / "params.yaml", "--tokenizer", tok]
    outs = {}
    for mode in ("one", "two"):
        d = root / mode
        args = [*common, "--db", root / "tokens" / "db", "--out", d / "db" / "embeddings.h5",
                "--work", d / "work" / "embed", "--metrics", d / "embed.json"]
        _ok(run_stage("embed.py", *args) if mode == "one" else run_two_ranks("embed.py", *args, cwd=root))
        outs[mode] = d
    one, two = outs["one"], outs["two"]
    metrics = json.loads((one / "embed.json").read_text())
    assert metrics["chunks_total"] > 4 * BLOCK_SIZE  # both ranks embed several blocks
    assert (one / "db" / "embeddings.h5").read_bytes() == (two / "db" / "embeddings.h5").read_bytes()
    assert _metrics_without_timing(one / "embed.json") == _metrics_without_timing(two / "embed.json")
    assert not any((two / "work" / "embed").rglob("*.npy"))  # rank 0 cleared every rank's blocks

    emb = one / "db" / "embeddings.h5"
    _ok(run_stage("train_index.py", "--params", root / "params.yaml", "--embeddings", emb,
                  "--out", root / "trained.faiss", "--metrics", root / "train_index.json"))
    _ok(run_stage("add_index.py", "--params", root / "params.yaml", "--embeddings", emb, "--trained",
                  root / "trained.faiss", "--out", root / "populated", "--metrics", root / "add_index.json"))
    for mode, d in outs.items():
        args = [*common, "--pretrain", root / "tokens" / "pretrain", "--embeddings", emb,
                "--index", root / "populated", "--out", d / "neighbors" / "neighbors.h5",
                "--work", d / "work" / "query", "--metrics", d / "query_neighbors.json",
                "--recall-nprobe", d / "recall_nprobe.csv"]
        _ok(run_stage("query_neighbors.py", *args) if mode == "one" else run_two_ranks("query_neighbors.py", *args, cwd=root))
    q = json.loads((one / "query_neighbors.json").read_text())
    assert q["train"]["query_chunks"] + q["train"]["query_chunks_padding"] > 2 * BLOCK_SIZE
    assert (one / "neighbors" / "neighbors.h5").read_bytes() == (two / "neighbors" / "neighbors.h5").read_bytes()
    assert _metrics_without_timing(one / "query_neighbors.json") == _metrics_without_timing(two / "query_neighbors.json")
    curve = (one / "recall_nprobe.csv").read_text()
    assert curve == (two / "recall_nprobe.csv").read_text()
    assert curve.splitlines()[0] == "nprobe,recall_at_k" and [r.split(",")[0] for r in curve.splitlines()[1:]] == ["1", "2"]
    assert float(curve.splitlines()[-1].split(",")[1]) == 1.0  # probing every list is exact search
    assert not any((two / "work" / "query").rglob("*.npy"))  # every rank's blocks were cleared
