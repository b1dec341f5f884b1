"""Readers: every documented format parses; bad input names file and line."""

from __future__ import annotations

import json

import pytest

from instructretro import data, params
from instructretro.errors import PipelineError


def test_jsonl_corpus_ignores_other_fields_and_counts_blank_documents(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "one", "url": "x"}) + "\n\n" + json.dumps({"text": "  \n "}) + "\n"
                 + json.dumps({"text": "two"}) + "\n")
    skipped = data.SkipCounter()
    docs = list(data.iter_documents(p, skipped))
    assert [d.text for d in docs] == ["one", "two"]
    assert skipped == {"blank_document": 1}
    assert docs[0].doc_id == data.document_id("one") != docs[1].doc_id


def test_folder_of_text_files_is_one_document_per_file(tmp_path):
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "a.txt").write_text("first file\nwith two lines")
    (tmp_path / "empty.txt").write_text("   ")
    assert [d.text for d in data.iter_documents(tmp_path)] == ["first file\nwith two lines", "second file"]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": "broken"\n', "c.jsonl:2: malformed JSON"),
    ('{"text": "ok"}\n["not", "an object"]\n', "c.jsonl:2: expected a JSON object with a 'text' field"),
    ('{"text": 5}\n', "c.jsonl:1: 'text' must be a string"),
])
def test_bad_corpus_lines_name_file_and_line(tmp_path, content, message):
    p = tmp_path / "c.jsonl"
    p.write_text(content)
    with pytest.raises(PipelineError, match=message):
        list(data.iter_documents(p))


def test_invalid_utf8_names_file_and_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(PipelineError, match=r"c.jsonl:2: invalid UTF-8"):
        list(data.iter_documents(p))
    t = tmp_path / "d.txt"
    t.write_bytes(b"line one\nbad \xff byte")
    with pytest.raises(PipelineError, match=r"d.txt:2: invalid UTF-8"):
        list(data.iter_documents(t))


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="corpus file not found"):
        list(data.iter_documents(tmp_path / "nope.jsonl"))


def test_split_is_stable_and_close_to_the_fraction():
    ids = [data.document_id(f"doc {i}") for i in range(20000)]
    frac = sum(data.is_valid_split(i, 0.1) for i in ids) / len(ids)
    assert 0.09 < frac < 0.11
    assert not any(data.is_valid_split(i, 0.0) for i in ids)


def test_qa_records(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text(json.dumps({"question": "who?", "answer": ["A", "B"]}) + "\n"
                 + json.dumps({"question": "when?", "answer": ["1900"], "ctxs": [{"title": "T", "text": "x"}, "y"]}) + "\n")
    recs = list(data.iter_qa(p))
    assert recs[0] == {"question": "who?", "answer": ["A", "B"]}
    assert recs[1]["ctxs"] == ["T\nx", "y"]
    p.write_text(json.dumps({"question": "who?", "answer": []}) + "\n")
    with pytest.raises(PipelineError, match="qa.jsonl:1: 'answer'"):
        list(data.iter_qa(p))


def test_conversation_and_alpaca_records(tmp_path):
    p = tmp_path / "sft.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"system": "S", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"instruction": "Add", "input": "1 2", "output": "3"},
    ]) + "\n")
    recs = list(data.iter_conversations(p))
    assert recs[0] == {"system": "S", "turns": [("user", "hi"), ("assistant", "hello")]}
    assert recs[1]["turns"] == [("user", "q"), ("assistant", "a")]
    assert recs[2]["turns"] == [("user", "Add\n\n1 2"), ("assistant", "3")]
    j = tmp_path / "list.json"
    j.write_text(json.dumps([{"instruction": "x", "output": "y"}]))
    assert list(data.iter_conversations(j))[0]["turns"] == [("user", "x"), ("assistant", "y")]
    p.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "a"}]}) + "\n")
    assert list(data.iter_conversations(p)) == [{"system": "Be brief.", "turns": [("user", "q"), ("assistant", "a")]}]
    p.write_text(json.dumps({"messages": [{"role": "system", "content": "only a system message"}]}) + "\n")
    with pytest.raises(PipelineError, match="sft.jsonl:1: turns must alternate"):
        list(data.iter_conversations(p))
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    with pytest.raises(PipelineError, match="sft.jsonl:1: turns must alternate"):
        list(data.iter_conversations(p))


def test_wrong_param_type_names_the_key(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("tokenizer:\n  vocab_size: big\nretro:\n  chunk_length: 64\n")
    with pytest.raises(PipelineError, match="param 'tokenizer.vocab_size' must be int, got str"):
        params.load(p)  # the known-keys table types every key when the file is loaded
    p.write_text("tokenizer:\n  vocab_size: 4096\nretro:\n  chunk_length: 64\n")
    prm = params.load(p)
    with pytest.raises(PipelineError, match="param 'tokenizer.vocab_size' must be str, got int"):
        prm.get("tokenizer.vocab_size", str)
    with pytest.raises(PipelineError, match="missing param 'retro.seq_length'"):
        prm.get("retro.seq_length", int)
    assert prm.get("retro.chunk_length", float) == 64.0


@pytest.mark.parametrize("content, message", [
    ("", "qa.jsonl: no questions"),
    ("\n  \n", "qa.jsonl: no questions"),
    ('{"question": "who?", "answer": ["A"]}\n{"question": "why?", "answer": ["B", ""]}\n',
     "qa.jsonl:2: 'answer' holds an empty gold answer"),
    ('{"question": "who?", "answer": " "}\n', "qa.jsonl:1: 'answer' holds an empty gold answer"),
    ('{"answer": ["A"]}\n', "qa.jsonl:1: 'question' must be a non-empty string"),
])
def test_bad_qa_files_name_file_and_line(tmp_path, content, message):
    p = tmp_path / "qa.jsonl"
    p.write_text(content)
    with pytest.raises(PipelineError, match=message):
        list(data.iter_qa(p))


@pytest.mark.parametrize("record, message", [
    ({"instruction": "x", "output": "y", "system": 5}, "sft.jsonl:2: 'system' must be a string, got int"),
    ({"instruction": "x", "output": ""}, r"sft.jsonl:2: alpaca 'output' \(the assistant answer\) is empty"),
    ({"instruction": "x", "output": "  \n"}, "sft.jsonl:2: alpaca 'output'"),
    ({"instruction": "", "output": "y"}, "sft.jsonl:2: alpaca 'instruction' is empty"),
    ({"system": 5, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "sft.jsonl:2: 'system' must be a string"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
     "sft.jsonl:2: empty assistant message"),
    ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]},
     "sft.jsonl:2: empty user message"),
])
def test_bad_instruction_records_name_file_and_line(tmp_path, record, message):
    p = tmp_path / "sft.jsonl"
    good = {"instruction": "Add", "input": "1 2", "output": "3"}
    p.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(PipelineError, match=message):
        list(data.iter_conversations(p))


def test_instruction_file_without_records_and_null_system(tmp_path):
    p = tmp_path / "sft.jsonl"
    p.write_text("\n")
    with pytest.raises(PipelineError, match="sft.jsonl: no records"):
        list(data.iter_conversations(p))
    p.write_text(json.dumps({"instruction": "x", "input": None, "output": "y", "system": None}) + "\n")
    assert list(data.iter_conversations(p)) == [{"system": "", "turns": [("user", "x"), ("assistant", "y")]}]
