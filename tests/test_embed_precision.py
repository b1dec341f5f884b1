"""The embedding precision does not depend on the machine unless asked to, and is recorded."""

from __future__ import annotations

import h5py
import yaml

from instructretro.embed import Encoder, embed_database

from conftest import REPO
from test_embed import make_store, make_texts


def test_the_default_precision_is_float32_on_every_machine():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["embed"]["precision"] == "float32"
    assert Encoder("", batch_size=8).precision == "float32"


def test_the_precision_used_is_recorded_in_the_outputs(tmp_path):
    tokens = make_store(tmp_path / "tokens", make_texts(4, words_per_doc=(20, 40)), tmp_path / "spm.model")
    encoder = Encoder("", precision="float32", batch_size=8)
    out = tmp_path / "emb.h5"
    metrics = embed_database(tokens, tmp_path / "spm.model", encoder, 64, 16, out, tmp_path / "work")
    assert metrics["precision"] == "float32"
    with h5py.File(out, "r") as f:
        assert f.attrs["precision"] == "float32"


def test_query_neighbors_records_the_precision(tmp_path):
    """The stage embeds its query chunks with ``embed.precision``: its metrics say which."""
    import json

    from conftest import run_stage

    texts = make_texts(6, words_per_doc=(20, 40))
    tok = tmp_path / "spm.model"
    make_store(tmp_path / "db", texts, tok)
    make_store(tmp_path / "pretrain", texts[:3], tok, valid=texts[3:4])
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["index"].update(factory="Flat")
    params["query"].update(num_neighbors_query=4, num_neighbors_save=2, recall_sample=0)
    params["retro"].update(seq_length=128)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    common = ["--params", tmp_path / "params.yaml"]
    emb, trained, populated = tmp_path / "emb.h5", tmp_path / "trained.faiss", tmp_path / "populated"
    steps = [("embed.py", "--db", tmp_path / "db", "--tokenizer", tok, "--out", emb, "--work", tmp_path / "w1",
              "--metrics", tmp_path / "m1.json"),
             ("train_index.py", "--embeddings", emb, "--out", trained, "--metrics", tmp_path / "m2.json"),
             ("add_index.py", "--embeddings", emb, "--trained", trained, "--out", populated,
              "--metrics", tmp_path / "m3.json"),
             ("query_neighbors.py", "--pretrain", tmp_path / "pretrain", "--tokenizer", tok, "--embeddings", emb,
              "--index", populated, "--out", tmp_path / "nb.h5", "--work", tmp_path / "w2",
              "--metrics", tmp_path / "m4.json", "--recall-nprobe", tmp_path / "recall_nprobe.csv")]
    for script, *args in steps:
        r = run_stage(script, *common, *args)
        assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "m1.json").read_text())["precision"] == "float32"
    assert json.loads((tmp_path / "m4.json").read_text())["precision"] == "float32"
