"""The default data: deterministic, and shaped so that retrieval is what supplies knowledge."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np

from instructretro import data
from instructretro.tokenizer import Tokenizer
from instructretro.world import write_world

from conftest import read_jsonl


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_generator_is_deterministic(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 3), (b, 3), (c, 4)):
        write_world(out, num_entities=30, docs_per_entity=3, qa_questions=10, sft_conversations=20, seed=seed)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_files_parse_in_the_documented_formats(small_world):
    docs = list(data.iter_documents(small_world / "documents.jsonl"))
    refs = list(data.iter_documents(small_world / "reference.jsonl"))
    qa = list(data.iter_qa(small_world / "qa.jsonl"))
    assert len(refs) == 60 and len(docs) >= 180 and len(qa) == 40
    for name in ("chat", "short_qa", "alpaca", "summaries"):
        convs = list(data.iter_conversations(small_world / "sft" / f"{name}.jsonl"))
        assert convs and all(c["turns"][-1][0] == "assistant" for c in convs)
    sizes = {n: len(read_jsonl(small_world / "sft" / f"{n}.jsonl")) for n in ("chat", "short_qa", "alpaca", "summaries")}
    assert sizes["chat"] > 2 * max(sizes["short_qa"], sizes["alpaca"], sizes["summaries"])  # one large source


def test_fact_spans_point_at_the_fact_values(small_world):
    for rec in read_jsonl(small_world / "documents.jsonl"):
        values = {v for _, v in rec["facts"]}
        for start, end in rec["fact_spans"]:
            assert rec["text"][start:end] in values


def test_retrieval_is_what_supplies_the_facts(small_world):
    """Every fact asked in QA or stated in a valid document is stated in the database corpus,
    while each fact appears in only a few pretraining documents."""
    refs = {r["entity"]: r["text"] for r in read_jsonl(small_world / "reference.jsonl")}
    docs = read_jsonl(small_world / "documents.jsonl")
    facts = read_jsonl(small_world / "facts.jsonl")
    for f in facts:  # the database states every fact of its entity
        assert f["value"] in refs[f["entity"]]
    valid = [d for d in docs if data.is_valid_split(data.document_id(d["text"]), 0.1)]
    assert valid, "the 10% valid split of the small world is empty"
    for d in valid:
        for _, value in d["facts"]:
            assert value in refs[d["entity"]]
    for q in read_jsonl(small_world / "qa.jsonl"):
        assert any(a in refs[q["entity"]] for a in q["answer"])
    per_fact = Counter((d["entity"], a, v) for d in docs for a, v in d["facts"])
    assert max(per_fact.values()) <= 3
    assert np.mean(list(per_fact.values())) < 2.0
    # QA entities are held out of the SFT data
    held = {q["entity"] for q in read_jsonl(small_world / "qa.jsonl")}
    questions = [m["content"] for c in read_jsonl(small_world / "sft" / "chat.jsonl")
                 for m in c["messages"] if m["role"] == "user"]
    assert not any(name in q for name in held for q in questions)


def test_documents_span_several_chunks_and_name_the_entity_early(small_world, small_tokenizer):
    tok = Tokenizer(small_tokenizer)
    docs = [d for d in read_jsonl(small_world / "documents.jsonl") if d["entity"]]
    lengths = np.array([len(tok.encode(d["text"])) for d in docs])
    assert np.median(lengths) >= 3 * 64
    for d in docs:
        assert d["entity"] in d["text"][:200]
        if d["fact_spans"]:
            assert max(s for s, _ in d["fact_spans"]) > 150  # facts spread into later paragraphs
