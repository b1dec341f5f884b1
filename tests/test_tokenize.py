"""Tokenizer and token store on the default data; the stage's outputs and error messages."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from instructretro import data
from instructretro.tokenizer import EOD_ID, PAD_ID, Tokenizer
from instructretro.tokenstore import TokenStore

from conftest import run_stage


def test_round_trip_on_the_default_data(small_world, small_tokenizer):
    tok = Tokenizer(small_tokenizer)
    assert tok.sp.pad_id() == PAD_ID and tok.sp.eos_id() == EOD_ID
    for doc in list(data.iter_documents(small_world / "documents.jsonl"))[:200]:
        assert tok.decode(tok.encode(doc.text)) == doc.text
    weird = "Tabs\tand  double  spaces\n\nünïcödé — 東京 🙂"
    assert tok.decode(tok.encode(weird)) == weird


def _params(tmp_path, corpus, extra=""):
    p = tmp_path / "params.yaml"
    p.write_text(f"corpus:\n  db: {corpus}\n  pretrain: {corpus}\ntokenizer:\n  vocab_size: 512\n"
                 f"  sample_bytes: 1000000\n  model: ''\ntokenize:\n  db_valid_fraction: 0.2\n"
                 f"  pretrain_valid_fraction: 0.2\n{extra}")
    return p


def _tokenize(tmp_path, corpus, name="out"):
    p = _params(tmp_path, corpus)
    tok = tmp_path / "spm.model"
    r = run_stage("tokenizer.py", "--params", p, "--out", tok)
    assert r.returncode == 0, r.stderr
    r = run_stage("tokenize_corpus.py", "pretrain", "--params", p, "--tokenizer", tok,
                  "--out", tmp_path / name, "--metrics", tmp_path / f"{name}.json")
    return r


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_store_reproduces_every_document_and_is_deterministic(tmp_path, small_world):
    corpus = small_world / "documents.jsonl"
    assert _tokenize(tmp_path, corpus, "a").returncode == 0
    assert _tokenize(tmp_path, corpus, "b").returncode == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    tok = Tokenizer(tmp_path / "spm.model")
    train, valid = TokenStore(tmp_path / "a", "train"), TokenStore(tmp_path / "a", "valid")
    assert train.tokens.dtype == np.uint16
    by_id = {}
    for store in (train, valid):
        for i in range(len(store)):
            by_id[int(store.doc_ids[i])] = (store.split, store.doc(i))
    docs = list(data.iter_documents(corpus))
    assert len(by_id) == len(docs)
    for d in docs:
        split, toks = by_id[d.doc_id]
        assert toks.tolist() == tok.encode(d.text)
        assert (split == "valid") == data.is_valid_split(d.doc_id, 0.2)
    m = json.loads((tmp_path / "a.json").read_text())
    assert m["train_documents"] + m["valid_documents"] == len(docs) and m["dropped_documents"] == 0


def test_bad_input_is_one_line_and_keeps_previous_output(tmp_path, small_world):
    assert _tokenize(tmp_path, small_world / "documents.jsonl").returncode == 0
    before = _digest(tmp_path / "out")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine document"}\n{"text": oops}\n')
    p = _params(tmp_path, bad)
    r = run_stage("tokenize_corpus.py", "pretrain", "--params", p, "--tokenizer", tmp_path / "spm.model",
                  "--out", tmp_path / "out", "--metrics", tmp_path / "m.json")
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "bad.jsonl:2: malformed JSON" in r.stderr
    assert "Traceback" not in r.stderr
    assert _digest(tmp_path / "out") == before  # nothing already built is lost


def test_empty_corpus_and_wrong_param_type(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "   "}\n')
    r = run_stage("tokenizer.py", "--params", _params(tmp_path, empty), "--out", tmp_path / "t.model")
    assert r.returncode == 1 and ("corpus is empty" in r.stderr or "no text to train on" in r.stderr)
    assert not (tmp_path / "t.model").exists()
    p = _params(tmp_path, empty)
    p.write_text(p.read_text().replace("vocab_size: 512", "vocab_size: '512'"))
    r = run_stage("tokenizer.py", "--params", p, "--out", tmp_path / "t.model")
    assert r.returncode == 1 and "param 'tokenizer.vocab_size' must be int" in r.stderr
    r = run_stage("tokenizer.py", "--params", _params(tmp_path, tmp_path / "missing.jsonl"), "--out", tmp_path / "t.model")
    assert r.returncode == 1 and "missing.jsonl: corpus file not found" in r.stderr
