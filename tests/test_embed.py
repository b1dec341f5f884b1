"""Embed: chunk invariants, the encoder, zero-token drops, resume with identical bytes, errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import h5py
import numpy as np
import pytest

from instructretro import tokenizer as T
from instructretro.chunks import chunk_table
from instructretro.data import document_id
from instructretro.embed import Encoder, embed_database, resolve_encoder
from instructretro.dbfile import DBFile
from instructretro.errors import PipelineError
from instructretro.tokenstore import TokenStore, TokenStoreWriter

WORDS = ("city river mountain king queen war battle album band song river lake forest school "
         "university church bridge railway island village festival museum poet painter").split()


def make_texts(n_docs: int, seed: int = 0, words_per_doc=(20, 160)) -> list[str]:
    """Synthetic documents of entity facts; one has a long blank run (a chunk with no BERT tokens)."""
    rng = random.Random(seed)
    texts = []
    for d in range(n_docs):
        name = f"Entity{d}"
        sents = []
        for _ in range(rng.randint(*words_per_doc) // 8 + 1):
            a, b = rng.sample(WORDS, 2)
            sents.append(f"{name} has a {a} near the {b} built in {rng.randint(1000, 2020)}.")
        texts.append(" ".join(sents))
    texts[min(3, n_docs - 1)] += "\n" * 200 + "The end."
    return texts


def make_store(folder: Path, texts: list[str], tok_path: Path, vocab_size: int = 400, valid: list[str] = ()) -> Path:
    """Train a small tokenizer (if missing); write ``texts`` (train) and ``valid`` as a token store."""
    if not tok_path.exists():
        tok_path.parent.mkdir(parents=True, exist_ok=True)
        tok_path.write_bytes(T.train(iter(texts), vocab_size, 1_000_000))
    tok = T.Tokenizer(tok_path)
    w = TokenStoreWriter(folder, tok.vocab_size, tok.eod_id)
    for t in texts:
        w.add("train", document_id(t), tok.encode(t))
    for t in valid:
        w.add("valid", document_id(t), tok.encode(t))
    w.close()
    return folder


_SHARED = {}


def shared_encoder() -> Encoder:
    """One float32 default encoder for all test modules (loading it takes seconds)."""
    if "encoder" not in _SHARED:
        _SHARED["encoder"] = Encoder("", precision="float32", batch_size=32)
    return _SHARED["encoder"]


@pytest.fixture(scope="module")
def encoder():
    return shared_encoder()


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    root = tmp_path_factory.mktemp("db")
    tok = root / "spm.model"
    make_store(root / "tokens", make_texts(24, words_per_doc=(20, 100)), tok)
    return root / "tokens", tok


@pytest.fixture(scope="module")
def reference_h5(db, encoder, tmp_path_factory):
    """The DB embedded in one uninterrupted run (block size 16); returns (path, metrics)."""
    tokens, tok = db
    out = tmp_path_factory.mktemp("ref") / "emb.h5"
    m = embed_database(tokens, tok, encoder, 64, 16, out, out.parent / "work")
    return out, m


def test_chunks_tile_documents_and_never_cross():
    lengths = np.array([0, 1, 63, 64, 65, 200, 128])
    table = chunk_table(lengths, 64)
    for d, n in enumerate(lengths):
        rows = table[table["doc"] == d]
        assert rows["length"].sum() == n
        assert np.all(rows["start"] == np.arange(len(rows)) * 64)
        assert np.all((rows["length"] > 0) & (rows["length"] <= 64))
        assert np.all(rows["start"] + rows["length"] <= n)


def test_encoder_matches_manual_mean_pool(encoder):
    import torch

    texts = ["The river runs past the old mill.", "A king", "Short.", "war " * 50]
    got = encoder.encode(texts)
    assert got.shape == (4, encoder.dim) and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # manual reference: one text at a time, mean over tokens without CLS/SEP
    for i, t in enumerate(texts):
        b = encoder.tokenizer(t, return_tensors="pt")
        with torch.no_grad():
            h = encoder.model(**b).last_hidden_state[0, 1:-1].mean(0)
        ref = (h / h.norm()).numpy()
        assert float(got[i] @ ref) > 0.9999
    # order of the batch does not matter (texts are sorted by length internally)
    again = encoder.encode(texts[::-1])[::-1]
    assert np.allclose(got, again, atol=1e-5)


def test_empty_text_has_no_tokens_and_zero_vector(encoder):
    assert list(encoder.count_tokens(["", "\n\n  ", "word"])) == [0, 0, 1]
    emb = encoder.encode(["", "word"])
    assert np.all(emb[0] == 0) and np.linalg.norm(emb[1]) > 0.99


def test_bfloat16_is_close_to_float32(encoder):
    texts = make_texts(8, seed=5)
    bf = Encoder("", precision="bfloat16", batch_size=32).encode(texts)
    assert np.min(np.sum(bf * encoder.encode(texts), axis=1)) > 0.99


def test_embed_database_contract(db, encoder, reference_h5):
    tokens, tok = db
    path, m = reference_h5
    store = TokenStore(tokens, "train")
    table = chunk_table(store.doc_lengths(), 64)
    with h5py.File(path) as f:
        chunks, ids, emb = f["chunks"][:], f["doc_ids"][:], f["embeddings"][:]
        assert chunks.dtype == np.int64 and chunks.shape[1] == 3
        assert ids.dtype == np.uint64 and emb.dtype == np.float16  # embed.dtype's default
        assert f.attrs["dim"] == encoder.dim == emb.shape[1] and f.attrs["chunk_length"] == 64
        assert f.attrs["dtype"] == "float16" and len(f.attrs["fingerprint"]) == 32
        fingerprint = f.attrs["fingerprint"]
        assert all(f[n].chunks is None and f[n].compression is None for n in ("chunks", "doc_ids", "embeddings"))
    assert m["chunks_dropped_no_encoder_tokens"] >= 1  # the blank run
    assert m["chunks_embedded"] + m["chunks_dropped_no_encoder_tokens"] == len(table) == m["chunks_total"]
    assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    db_file = DBFile(path)  # contiguous datasets: read at their offsets, same values as h5py reads
    assert type(db_file.embeddings).__name__ == "_FileRows" and np.array_equal(db_file.embeddings[5:9], emb[5:9])
    assert np.array_equal(db_file.embeddings[[7, 2, 7]], emb[[7, 2, 7]]) and np.array_equal(db_file.doc_ids[60:], ids[60:])
    assert np.array_equal(db_file.chunks[[3, 1]], chunks[[3, 1]]) and db_file.fingerprint == fingerprint
    assert np.array_equal(ids, store.doc_ids[chunks[:, 0]])
    # the kept rows are the chunk table minus the dropped rows, in order
    full = {tuple(r) for r in np.stack([table["doc"], table["start"], table["length"]], 1).tolist()}
    assert {tuple(r) for r in chunks.tolist()} <= full
    assert np.all(np.diff(chunks[:, 0] * 10**6 + chunks[:, 1]) > 0)
    assert not any((path.parent / "work").iterdir())  # finished blocks are removed on success


def test_float32_storage_keeps_the_encoder_output_and_changes_the_fingerprint(db, encoder, reference_h5, tmp_path):
    tokens, tok = db
    embed_database(tokens, tok, encoder, 64, 16, tmp_path / "f32.h5", tmp_path / "w", dtype="float32")
    with h5py.File(tmp_path / "f32.h5") as f32, h5py.File(reference_h5[0]) as f16:
        assert f32["embeddings"].dtype == np.float32
        assert np.allclose(f32["embeddings"][:], f16["embeddings"][:].astype(np.float32), atol=1e-3)
        assert f32.attrs["fingerprint"] != f16.attrs["fingerprint"]
    with pytest.raises(PipelineError, match="embed.dtype"):
        embed_database(tokens, tok, encoder, 64, 16, tmp_path / "x.h5", tmp_path / "w", dtype="int8")


def test_resume_after_interruption_gives_identical_bytes(db, encoder, reference_h5, tmp_path, monkeypatch):
    tokens, tok = db
    calls = {"n": 0}
    real = Encoder.encode

    def dying(self, texts, progress=False):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, texts, progress)

    monkeypatch.setattr(Encoder, "encode", dying)
    with pytest.raises(KeyboardInterrupt):
        embed_database(tokens, tok, encoder, 64, 16, tmp_path / "b.h5", tmp_path / "wb")
    assert not (tmp_path / "b.h5").exists()
    finished = sorted(p.name for p in (tmp_path / "wb").rglob("block_*.npy"))
    assert len(finished) == 2
    monkeypatch.setattr(Encoder, "encode", real)
    counted = {"n": 0}

    def counting(self, texts, progress=False):
        counted["n"] += 1
        return real(self, texts, progress)

    monkeypatch.setattr(Encoder, "encode", counting)
    embed_database(tokens, tok, encoder, 64, 16, tmp_path / "b.h5", tmp_path / "wb")
    n_blocks = -(-len(chunk_table(TokenStore(tokens).doc_lengths(), 64)) // 16)
    assert n_blocks >= 4
    assert counted["n"] == n_blocks - 2  # finished blocks were not embedded again
    assert reference_h5[0].read_bytes() == (tmp_path / "b.h5").read_bytes()


def test_stale_blocks_are_not_reused(db, encoder, reference_h5, tmp_path):
    tokens, tok = db
    # a leftover block from a run with other inputs must be neither picked up nor kept
    (tmp_path / "w" / "deadbeef").mkdir(parents=True)
    np.save(tmp_path / "w" / "deadbeef" / "block_000000.npy", np.zeros((40, 384), np.float32))
    embed_database(tokens, tok, encoder, 64, 16, tmp_path / "b.h5", tmp_path / "w")
    assert not (tmp_path / "w" / "deadbeef").exists()
    assert reference_h5[0].read_bytes() == (tmp_path / "b.h5").read_bytes()


def test_encoder_path_that_does_not_exist_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="embed.encoder .*not an existing folder"):
        resolve_encoder(tmp_path / "no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="config.json"):
        Encoder(tmp_path / "empty")
    with pytest.raises(PipelineError, match="embed.precision"):
        Encoder("", precision="fp8")


def test_prefetch_computes_the_next_item_while_the_caller_works():
    """The consumer of item 0 waits for fn(1) to have started: without a worker thread this
    would never happen (the wait times out and the test fails)."""
    import threading

    from instructretro.embed import prefetched

    started = {i: threading.Event() for i in range(3)}

    def fn(i):
        started[i].set()
        return i * 10

    got = []
    for item, result in prefetched(fn, range(3)):
        if item + 1 < 3:
            assert started[item + 1].wait(timeout=30), "the next item was not prefetched"
        got.append((item, result))
    assert got == [(0, 0), (1, 10), (2, 20)]


def test_gpu_batch_size_applies_only_on_a_gpu():
    enc = Encoder("", precision="float32", batch_size=8, gpu_batch_size=512, device="cpu")
    assert enc.batch_size == 8


@pytest.mark.gpu
def test_gpu_encoder_matches_cpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    texts = make_texts(40, seed=9)
    cpu = Encoder("", precision="float32", device="cpu").encode(texts)
    gpu_enc = Encoder("", precision="float32", batch_size=8, gpu_batch_size=16, device="cuda:0")
    assert gpu_enc.batch_size == 16
    gpu = gpu_enc.encode(texts)
    assert gpu.dtype == np.float32 and np.min(np.sum(cpu * gpu, axis=1)) > 0.999
