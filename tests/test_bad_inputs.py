"""Bad input ends in one ``error:`` line naming the file, line or key (exit 1, no traceback), or
in a documented, counted handling (docs/bad-input.md)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, run_stage
from instructretro import data, params as P, tokenizer as T
from instructretro.errors import PipelineError


def shipped_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def assert_one_line_error(r, pattern: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-2000:]
    assert re.search(pattern, errors[0]), errors[0]


# ---------------------------------------------------------------------------- corpus files

def _surrogate(d: Path) -> Path:
    (d / "c.jsonl").write_text('{"text": "fine"}\n{"text": "a \\ud800 b"}\n')
    return d / "c.jsonl"


def _deep(d: Path) -> Path:
    (d / "c.jsonl").write_text('{"text": "fine"}\n' + "[" * 100_000 + "\n")
    return d / "c.jsonl"


def _deep_json_list(d: Path) -> Path:
    (d / "c.json").write_text("[" * 100_000)
    return d / "c.json"


CORPUS_CASES = {
    "lone surrogate": (_surrogate, r"c\.jsonl:2: lone UTF-16 surrogate \\ud800"),
    "100k nested [": (_deep, r"c\.jsonl:2: JSON nested too deeply"),
    "100k nested [ in a .json file": (_deep_json_list, r"c\.json:1: JSON nested too deeply"),
}


def write_params(d: Path, edit) -> Path:
    p = shipped_params()
    edit(p)
    path = d / "params.yaml"
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path


@pytest.mark.parametrize("case", sorted(CORPUS_CASES))
def test_tokenizer_stage_bad_corpus_is_one_line(case, tmp_path):
    make, pattern = CORPUS_CASES[case]
    corpus = make(tmp_path)
    params = write_params(tmp_path, lambda p: p["corpus"].update(db=str(corpus)))
    r = run_stage("tokenizer.py", "--params", params, "--out", tmp_path / "spm.model")
    assert_one_line_error(r, pattern)


def test_garbage_tokenizer_model_names_the_users_file(tmp_path):
    bad = tmp_path / "mine.model"
    bad.write_bytes(b"\x00\x01 this is not a protobuf \xff" * 40)
    params = write_params(tmp_path, lambda p: p["tokenizer"].update(model=str(bad)))
    r = run_stage("tokenizer.py", "--params", params, "--out", tmp_path / "out" / "spm.model")
    assert_one_line_error(r, re.escape(str(bad)) + ": not a SentencePiece model")
    assert ".tmp" not in r.stderr


def test_json_list_files_refuse_deep_nesting_and_surrogates(tmp_path):
    """QA and instruction files may be one JSON list (data._records)."""
    path = tmp_path / "qa.json"
    path.write_text("[" * 100_000)
    with pytest.raises(PipelineError, match=r"qa\.json: JSON nested too deeply"):
        list(data._records(path))
    path.write_text('[{"question": "\\udfff?", "answer": ["a"]}]')
    with pytest.raises(PipelineError, match=r"qa\.json: lone UTF-16 surrogate \\udfff"):
        list(data._records(path))


# ---------------------------------------------------------------------------- params

def _set(section, key, value):
    def edit(p):
        p[section][key] = value
    return edit


PARAM_CASES = {
    # name: (stage, edit, pattern)
    "pretrain.stpes": ("pretrain.py", _set("pretrain", "stpes", 2),
                       r"unknown param 'pretrain\.stpes' \(did you mean 'pretrain\.steps'\?\)"),
    "unknown section": ("pretrain.py", lambda p: p.update(pretrian={"steps": 2}),
                        r"unknown section 'pretrian' \(did you mean 'pretrain'\?\)"),
    "embed.batchsize": ("embed.py", _set("embed", "batchsize", 2),
                        r"unknown param 'embed\.batchsize' \(did you mean 'embed\.batch_size'\?\)"),
    "model.rotary_percent abc": ("pretrain.py", _set("model", "rotary_percent", "abc"),
                                 r"param 'model\.rotary_percent' must be float or null, got str 'abc'"),
    "model.cca_layers abc": ("pretrain.py", _set("model", "cca_layers", "abc"),
                             r"param 'model\.cca_layers' must be a list of integers, got 'abc'"),
    "model.cca_layers 5": ("pretrain.py", _set("model", "cca_layers", 5),
                           r"param 'model\.cca_layers' must be a list of integers, got 5"),
    "model.norm_eps x": ("pretrain.py", _set("model", "norm_eps", "x"),
                         r"param 'model\.norm_eps' must be float or null, got str 'x'"),
    "model.hiden": ("pretrain.py", _set("model", "hiden", 64),
                    r"unknown param 'model\.hiden' \(did you mean 'model\.hidden'\?\)"),
    "pretrain.lr 4e-3 (YAML text)": ("pretrain.py", _set("pretrain", "lr", "4e-3"),
                                     r"param 'pretrain\.lr' must be float or null, got str '4e-3' \(YAML reads 4e-3 "
                                     r"as text: write it with a dot, e\.g\. 0\.004\)"),
    "sft.steps ten": ("sft.py", _set("sft", "steps", "ten"), r"param 'sft\.steps' must be int or null, got str 'ten'"),
    "section not a mapping": ("sft.py", lambda p: p.update(score=3), r"section 'score' must be a mapping"),
    "pretrain.seed -1": ("pretrain.py", _set("pretrain", "seed", -1),
                         r"param 'pretrain\.seed' must be in \[0, 2147483648\), got -1"),
    "query.seed 2**31": ("query_neighbors.py", _set("query", "seed", 2**31),
                         r"param 'query\.seed' must be in \[0, 2147483648\), got 2147483648"),
    "retro.chunk_length 1000": ("embed.py", _set("retro", "chunk_length", 1000),
                                r"param 'retro\.seq_length' \(256\) must be a multiple of 'retro\.chunk_length' "
                                r"\(1000\), at least one chunk"),
}


@pytest.mark.parametrize("case", sorted(PARAM_CASES))
def test_bad_param_is_one_line_before_any_work(case, tmp_path):
    stage, edit, pattern = PARAM_CASES[case]
    params = write_params(tmp_path, edit)
    # every input path points nowhere: the stage must stop at reading params
    r = run_stage(stage, "--params", params, "--out", tmp_path / "out", "--metrics", tmp_path / "m.json",
                  "--tokenizer", tmp_path / "none.model")
    assert_one_line_error(r, re.escape(str(params)) + ": " + pattern)


def test_shipped_params_have_exactly_the_known_keys():
    shipped = {s: set(body) for s, body in shipped_params().items()}
    assert shipped == {s: set(keys) for s, keys in P.KNOWN.items()}
    P.load(REPO / "params.yaml")  # and every shipped value has its table type


def test_known_keys_cover_the_dataclasses_that_read_them():
    from instructretro.model import ModelConfig
    from instructretro.sft import TRAIN_KEYS
    from instructretro.train import TrainConfig

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(P.OPTIONAL["model"]) == fields - {"vocab_size", "seq_length", "chunk_length", "retro", "name"}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= set(P.KNOWN["pretrain"])
    assert set(TRAIN_KEYS) <= set(P.KNOWN["sft"])


def test_every_numeric_param_has_its_range_checked_at_load():
    """Numbers are never only type-checked: each has a ``Num`` range in KNOWN / OPTIONAL, and a
    value outside it (a negative count or seed, a seed Faiss cannot take, an infinite float) is
    refused by ``load`` naming the key."""
    plain = {int, float, P.INT_OR_NULL, P.FLOAT_OR_NULL}
    for section, keys in P.known_keys().items():
        for key, spec in keys.items():
            assert not (isinstance(spec, type) and spec in plain) and spec not in (P.INT_OR_NULL, P.FLOAT_OR_NULL), \
                f"{section}.{key} is only type-checked"
            if not isinstance(spec, P.Num):
                continue
            bad = [-1] if spec.typ is int else [-1.0, float("inf")]
            if spec.typ is int and spec.hi is None:
                assert spec(f"{section}.{key}", 2**40, "p") == 2**40
            for value in bad + ([2**31] if spec is P.SEED or spec is P.SEED_OR_NULL else []):
                p = shipped_params()
                p.setdefault(section, {})[key] = value
                with pytest.raises(PipelineError, match=rf"param '{section}\.{key}' must be"):
                    P.check_known(p)
    for key in ("world.seed", "index.seed", "query.seed", "sft.seed", "pretrain.seed"):
        section, name = key.split(".")
        assert P.known_keys()[section][name] in (P.SEED, P.SEED_OR_NULL), key


def test_seed_bound_is_what_numpy_and_faiss_take():
    import faiss

    np.random.default_rng(2**31 - 1)
    np.random.seed(2**31 - 1)  # the legacy generator takes < 2**32
    cp = faiss.ClusteringParameters()
    cp.seed = 2**31 - 1
    assert cp.seed == 2**31 - 1
    with pytest.raises((OverflowError, TypeError)):
        cp.seed = 2**31  # a C int


def test_chunk_length_must_divide_seq_length_at_load(tmp_path):
    for chunk, seq, ok in [(64, 256, True), (64, 64, True), (64, 96, False), (512, 256, False)]:
        params = write_params(tmp_path, lambda p: p["retro"].update(chunk_length=chunk, seq_length=seq))
        if ok:
            P.load(params)
        else:
            with pytest.raises(PipelineError, match=r"'retro\.seq_length' \(\d+\) must be a multiple of"):
                P.load(params)


def test_user_entry_names_inside_lists_are_not_taken_for_keys():
    p = shipped_params()
    p["sft"]["blend"]["my_own_set"] = {"path": "x.jsonl", "anything": 1}
    p["generate"]["tasks"] = {"nq_open": {"path": "nq.jsonl"}}  # a mapping keyed by task name
    P.check_known(p)  # their own parsers check the entries


# ---------------------------------------------------------------------------- checkpoints

@pytest.fixture
def checkpoint(tmp_path):
    from instructretro import presets
    from instructretro.model import Retro
    from instructretro.checkpoint import export_checkpoint

    cfg = presets.get("tiny", vocab_size=64, n_layers=2, hidden=16, heads=2, cca_layers=(2,), num_neighbors=1)
    export_checkpoint(Retro(cfg), cfg, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _edit_config(folder: Path, **values) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


CHECKPOINT_CASES = {
    "hidden as a string": (lambda c: _edit_config(c, hidden="16"), r"config\.json: 'hidden' must be a positive integer"),
    "rotary_percent as a string": (lambda c: _edit_config(c, rotary_percent="abc"),
                                   r"config\.json: 'rotary_percent' must be a number, got 'abc'"),
    "cca_layers a number": (lambda c: _edit_config(c, cca_layers=5), r"config\.json: 'cca_layers' must be a list"),
    "config a list": (lambda c: (c / "config.json").write_text("[1, 2]"), r"config\.json: expected a JSON object"),
    "config not JSON": (lambda c: (c / "config.json").write_text("{"), r"config\.json: malformed JSON"),
    "weights not safetensors": (lambda c: (c / "model.safetensors").write_bytes(b"garbage" * 100),
                                r"model\.safetensors: not a readable safetensors file"),
    "vocab_size 2**31": (lambda c: _edit_config(c, vocab_size=2**31),
                         r"config\.json: 'vocab_size' gives a model of [\d,]+ parameters .* more than this machine's"),
    "weights of another shape": (lambda c: _edit_config(c, ffn_hidden=56),
                                 r"weight '.*' has shape .* config\.json gives"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_bad_exported_checkpoint_names_the_file(case, checkpoint):
    from instructretro.checkpoint import load_model

    spoil, pattern = CHECKPOINT_CASES[case]
    load_model(checkpoint)  # fine before
    spoil(checkpoint)
    with pytest.raises(PipelineError, match=pattern):
        load_model(checkpoint)


# ---------------------------------------------------------------------------- corpus folder rules

def test_corpus_folder_rules(tmp_path):
    """Extensions in any case; subfolders read recursively; hidden files/folders and other
    extensions skipped and counted."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "a.txt").write_text("plain text")
    (root / "d.JSONL").write_text('{"text": "upper-case extension"}\n')
    (root / "sub" / "e.jsonl").write_text('{"text": "in a subfolder"}\n')
    (root / ".hidden.jsonl").write_text('{"text": "hidden file"}\n')
    (root / ".git" / "f.txt").write_text("in a hidden folder")
    (root / "notes.md").write_text("not a corpus format")
    files = data.SkipCounter()
    texts = [d.text for d in data.iter_documents(root, skipped_files=files)]
    assert texts == ["plain text", "upper-case extension", "in a subfolder"]
    assert files == {"hidden_file": 2, "other_extension": 1}


def test_symlinked_folders_are_skipped_and_counted(tmp_path, small_tokenizer):
    """A folder holding ``a.jsonl`` and ``books -> ../shared_books``: DVC does not hash inside a
    symlinked folder (a change there would never rerun tokenize), so it is skipped, counted and
    named in the summary line; a symlinked file is read (DVC hashes its content)."""
    shared = tmp_path / "shared_books"
    shared.mkdir()
    (shared / "b.jsonl").write_text('{"text": "a shared book"}\n')
    (shared / "c.jsonl").write_text('{"text": "a linked file"}\n')
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.jsonl").write_text('{"text": "own document"}\n{"text": "second own document"}\n')
    (root / "books").symlink_to(Path("..") / "shared_books", target_is_directory=True)
    (root / "c.jsonl").symlink_to(shared / "c.jsonl")
    (root / "gone.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
    files = data.SkipCounter()
    texts = [d.text for d in data.iter_documents(root, skipped_files=files)]
    assert texts == ["own document", "second own document", "a linked file"]
    assert files == {"symlinked_folder": 1, "broken_symlink": 1}
    params = write_params(tmp_path, lambda p: p["corpus"].update(db=str(root)))
    r = run_stage("tokenize_corpus.py", "db", "--params", params, "--tokenizer", small_tokenizer,
                  "--out", tmp_path / "tokens", "--metrics", tmp_path / "m.json")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["train_documents"] == 3 and m["skipped_files"] == 2
    assert m["skipped_files_by_reason"] == {"symlinked_folder": 1, "broken_symlink": 1}
    assert "a symlinked folder is skipped: DVC does not look inside it" in r.stdout


@pytest.mark.parametrize("name", ["c.ndjson", "c.jsonlines", "c.json-lines", "c.NDJSON", "c.data"])
def test_json_lines_under_other_extensions_are_json_lines(name, tmp_path):
    """The common JSON-lines extensions, and a single file of another extension by its content."""
    lines = [{"text": f"document {i}"} for i in range(5)]
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert [d.text for d in data.iter_documents(tmp_path / name)] == [r["text"] for r in lines]
    if not name.endswith(".data"):  # in a folder: by extension
        assert len(list(data.iter_documents(tmp_path))) == 5


def test_single_file_of_other_extension_is_text_or_an_error(tmp_path):
    (tmp_path / "book.md").write_text("# A book\n\nPlain text, one document.\n")
    assert [d.text for d in data.iter_documents(tmp_path / "book.md")] == ["# A book\n\nPlain text, one document.\n"]
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01binary\x00" * 100)
    with pytest.raises(PipelineError, match=r"blob\.bin: neither JSON lines nor UTF-8 text"):
        list(data.iter_documents(tmp_path / "blob.bin"))
    (tmp_path / "latin1.dat").write_bytes("caf\xe9 au lait, d\xe9j\xe0 vu".encode("latin-1"))
    with pytest.raises(PipelineError, match=r"latin1\.dat: neither JSON lines nor UTF-8 text"):
        list(data.iter_documents(tmp_path / "latin1.dat"))


def test_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeffHello".encode("utf-8"))
    (tmp_path / "b.jsonl").write_bytes("\ufeff".encode("utf-8") + b'{"text": "World"}\n')
    assert [d.text for d in data.iter_documents(tmp_path)] == ["Hello", "World"]


def test_tokenize_stage_reports_skipped_files(tmp_path, small_tokenizer):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "d.JSONL").write_text('{"text": "one document"}\n{"text": "another document"}\n')
    (root / ".hidden.txt").write_text("skipped")
    params = write_params(tmp_path, lambda p: p["corpus"].update(db=str(root)))
    r = run_stage("tokenize_corpus.py", "db", "--params", params, "--tokenizer", small_tokenizer,
                  "--out", tmp_path / "tokens", "--metrics", tmp_path / "m.json")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["train_documents"] == 2
    assert m["skipped_files_by_reason"] == {"hidden_file": 1}
    assert "1 files skipped" in r.stdout + r.stderr


# ---------------------------------------------------------------------------- text handling

def test_five_megabyte_one_line_document_trains_a_tokenizer():
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(500)]
    text = " ".join(rng.choice(words) for _ in range(900_000))  # one line of about 5 MB
    assert len(text.encode()) > 4_500_000 and "\n" not in text
    stats = {}
    model = T.train([text], 600, 10_000_000, stats)
    assert stats["long_lines_split"] == 1
    assert len(model) > 1000


def test_long_line_split_keeps_every_character_and_cuts_at_spaces():
    line = ("word " * 10_000) + "中文" * 10_000
    pieces = T.split_long_line(line, 1000)
    assert "".join(pieces) == line
    assert all(len(p.encode()) <= 1000 for p in pieces)
    assert all(p.endswith(" ") for p in pieces[:4])


def _store_of(tmp_path, tok, texts):
    from instructretro.tokenstore import TokenStore, TokenStoreWriter

    w = TokenStoreWriter(tmp_path / "store", tok.vocab_size, tok.eod_id)
    for i, text in enumerate(texts):
        w.add("train", i, tok.encode(text))
    w.close()
    return TokenStore(tmp_path / "store", "train")


def test_chunk_texts_hold_whole_characters(tmp_path, small_tokenizer):
    """Emoji, Chinese and Arabic fall back to bytes in an English tokenizer; a chunk edge may cut
    a character's bytes. Each character is decoded whole in the chunk where it starts, so the
    texts hold no U+FFFD and together spell the document; the chunk tokens are unchanged."""
    from instructretro.chunks import chunk_table, chunk_tokens
    from instructretro.embed import chunk_texts

    tok = T.Tokenizer(small_tokenizer)
    doc = "Emoji 😀🎉👍🏽 then 中文字符测试 and العربية نص here " * 6
    store = _store_of(tmp_path, tok, [doc])
    assert tok.decode(store.doc(0)) == doc
    for length in (5, 7, 8, 64):
        rows = chunk_table(store.doc_lengths(), length)
        texts = chunk_texts(store, rows, length, tok)
        assert not any("\ufffd" in t for t in texts), length
        assert "".join(texts) == doc
        plain = [tok.decode(t[:n]) for t, n in zip(chunk_tokens(store, rows, length), rows["length"])]
        if length < 64:
            assert any("\ufffd" in t for t in plain)  # the cut the fix is for
    assert chunk_texts(store, np.array([(-1, 0, 0)], dtype=rows.dtype), 64, tok) == [""]


@pytest.fixture(scope="module")
def encoder():
    from instructretro.embed import Encoder

    return Encoder("", precision="float32", batch_size=8)


def test_emoji_only_texts_are_dropped_and_counted_as_unknown(encoder):
    texts = ["😀🎉", "", "a real sentence", "🎉 👍"]
    emb = encoder.encode(texts)
    assert [bool(np.any(e)) for e in emb] == [False, False, True, False]
    assert encoder.drop_reasons(texts) == {"no_encoder_tokens": 1, "only_unknown_tokens": 2}


def test_embed_database_counts_unknown_only_chunks(tmp_path, small_tokenizer, encoder):
    from instructretro.embed import embed_database

    tok = T.Tokenizer(small_tokenizer)
    _store_of(tmp_path, tok, ["The tower is in the city of Paris and it is tall.", "😀🎉👍", "\n\n\n"])
    import shutil

    shutil.copytree(tmp_path / "store", tmp_path / "db")
    m = embed_database(tmp_path / "db", small_tokenizer, encoder, 64, 16, tmp_path / "emb.h5", tmp_path / "work")
    assert m["chunks_total"] == 3 and m["chunks_embedded"] == 1 and m["chunks_dropped"] == 2
    assert m["chunks_dropped_only_unknown_tokens"] == 1 and m["chunks_dropped_no_encoder_tokens"] == 1


# ---------------------------------------------------------------------------- one document

def test_one_txt_file_as_pretraining_corpus_explains_the_empty_valid_split(tmp_path, small_tokenizer):
    from instructretro.pretrain import empty_valid_message

    txt = tmp_path / "book.txt"
    txt.write_text("A whole book in one file.\n\nIt has many paragraphs, and yet it is one document.\n")
    params = write_params(tmp_path, lambda p: p["corpus"].update(pretrain=str(txt)))
    r = run_stage("tokenize_corpus.py", "pretrain", "--params", params, "--tokenizer", small_tokenizer,
                  "--out", tmp_path / "tokens", "--metrics", tmp_path / "m.json")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "m.json").read_text())
    assert (m["train_documents"], m["valid_documents"]) == (1, 0)
    msg = empty_valid_message(tmp_path / "tokens")
    assert "the valid split has 0 documents: the pretraining corpus has 1 document," in msg
    assert "tokenize.pretrain_valid_fraction (0.1)" in msg and "a .txt file is one document" in msg
    assert "set tokenize.pretrain_valid_fraction > 0" not in msg


def test_many_query_chunks_without_k_neighbors_warn():
    from instructretro.neighbors import fewer_than_k_warning

    split = {"query_chunks": 10, "query_chunks_no_neighbor": 10}
    metrics = {"k": 20, "fraction_fewer_than_k": 1.0, "train": split, "valid": {**split, "query_chunks": 0,
                                                                               "query_chunks_no_neighbor": 0}}
    warning = fewer_than_k_warning(metrics, db_documents=1)
    assert warning.startswith("100% of query chunks have fewer than 20 neighbors and 10 of 10 have none")
    assert "the database corpus has 1 document," in warning
    assert fewer_than_k_warning({**metrics, "fraction_fewer_than_k": 0.1}, 1) is None
