"""Neighbors: the token reader (chunk + continuation), exclusion, and query-neighbors end to end."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from instructretro.chunks import SampleLayout, chunk_table
from instructretro.data import document_id
from instructretro.embed import Encoder, embed_database
from instructretro.errors import PipelineError
from instructretro.index import populate, set_search_params, train_index
from instructretro.neighbors import NeighborTokens, exclude_and_keep, query_neighbors
from instructretro.tokenizer import EOD_ID
from instructretro.tokenstore import TokenStore, TokenStoreWriter

from test_embed import make_store, make_texts


def test_neighbor_tokens_are_chunk_plus_continuation_within_the_document(tmp_path):
    cl = 4
    docs = [np.arange(10, 20), np.arange(100, 103), np.arange(200, 208)]  # lengths 10, 3, 8
    w = TokenStoreWriter(tmp_path / "db", 1000)
    for i, d in enumerate(docs):
        w.add("train", 1000 + i, d)
    w.close()
    store = TokenStore(tmp_path / "db")
    table = chunk_table(store.doc_lengths(), cl)
    with h5py.File(tmp_path / "emb.h5", "w") as f:
        f["chunks"] = np.stack([table["doc"], table["start"], table["length"]], 1)
        f["doc_ids"] = store.doc_ids[table["doc"]]
        f.attrs["chunk_length"] = cl
    read = NeighborTokens(tmp_path / "db", tmp_path / "emb.h5", cl)
    ids = np.array([[[0, 1], [2, -1]], [[3, 4], [5, 0]]])  # (2, 2, k=2)
    tokens, mask = read(ids)
    assert tokens.shape == mask.shape == (2, 2, 2, 2 * cl) and tokens.dtype == np.int64 and mask.dtype == bool
    for idx in np.ndindex(ids.shape):
        c = ids[idx]
        t, m = tokens[idx], mask[idx]
        if c < 0:
            assert not m.any() and np.all(t == EOD_ID)
            continue
        doc, start, _ = table[c]
        want = docs[doc][start : start + 2 * cl]  # the chunk and the next chunk, cut at the doc end
        assert np.array_equal(t[m], want) and m.sum() == len(want) and np.all(m[: len(want)])
        assert np.all(t[~m] == EOD_ID)
    # chunk 2 is the short last chunk of doc 0: no continuation, never the next document's tokens
    assert list(tokens[0, 1, 0][mask[0, 1, 0]]) == [18, 19]
    with pytest.raises(PipelineError, match="neighbor ids"):
        read(np.array([[99]]))


def test_exclude_and_keep_drops_the_samples_documents_and_pads():
    db_docs = np.array([5, 5, 6, 7, 8], dtype=np.uint64)
    cand = np.array([[0, 2, 1, 3, -1], [4, 3, 2, 1, 0]])
    banned = np.array([[5, 9], [8, 7]], dtype=np.uint64)
    valid = np.array([[True, False], [True, True]])
    out = exclude_and_keep(cand, db_docs, banned, valid, 3)
    assert out.tolist() == [[2, 3, -1], [2, 1, 0]]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A DB corpus and a pretraining corpus that overlap (half the documents are shared)."""
    root = tmp_path_factory.mktemp("world")
    tok = root / "spm.model"
    db_texts = make_texts(32, seed=1, words_per_doc=(20, 90))
    pre_texts = db_texts[:12] + make_texts(20, seed=2, words_per_doc=(20, 90))[8:]
    make_store(root / "db", db_texts, tok)
    make_store(root / "pretrain", pre_texts[:20], tok, valid=pre_texts[20:])
    encoder = Encoder("", precision="float32", batch_size=32)
    embed_database(root / "db", tok, encoder, 32, 64, root / "emb.h5", root / "w")
    return root, tok, encoder


@pytest.mark.parametrize("factory", ["auto", "IVF3,Flat"])
def test_query_neighbors_excludes_sample_documents(world, factory):
    root, tok, encoder = world
    trained, _ = train_index(root / "emb.h5", factory, 10_000, seed=0)
    index = populate(trained, root / "emb.h5", 100)
    set_search_params(index, nprobe=2)
    m = query_neighbors(root / "pretrain", tok, encoder, index, root / "emb.h5", 32, 128, 50, 6, 40, 60, 0,
                        root / f"nb-{factory}.h5", root / "wq")
    with h5py.File(root / "emb.h5") as f:
        db_doc_ids = f["doc_ids"][:]
    with h5py.File(root / f"nb-{factory}.h5") as f:
        for split in ("train", "valid"):
            layout = SampleLayout(TokenStore(root / "pretrain", split), 32, 128)
            nb = f[split][:]
            assert nb.dtype == np.int64 and nb.shape == (len(layout.chunks), 6)
            assert np.all(nb[layout.chunks["doc"] < 0] == -1)
            for s in range(len(layout)):
                rows = nb[s * 4 : (s + 1) * 4]
                got = db_doc_ids[rows[rows >= 0]]
                assert not np.isin(got, layout.sample_doc_ids(s)).any()
            assert (nb[layout.chunks["doc"] >= 0] >= 0).any()
    assert m["train"]["query_chunks_reusing_db_embedding"] > 0  # shared documents reuse DB embeddings
    assert m["recall_at_k"] >= (1.0 if factory == "auto" else 0.5)
    assert 0.0 <= m["fraction_fewer_than_k"] <= 1.0


def test_query_neighbors_is_deterministic_and_checks_the_encoder(world):
    root, tok, encoder = world
    trained, _ = train_index(root / "emb.h5", "Flat", 10_000, seed=0)
    index = populate(trained, root / "emb.h5", 100)
    for name in ("a.h5", "b.h5"):
        query_neighbors(root / "pretrain", tok, encoder, index, root / "emb.h5", 32, 128, 50, 6, 40, 0, 0,
                        root / name, root / "wq2")
    assert (root / "a.h5").read_bytes() == (root / "b.h5").read_bytes()
    with pytest.raises(PipelineError, match="rerun embed"):
        query_neighbors(root / "pretrain", tok, encoder, index, root / "emb.h5", 64, 128, 50, 6, 40, 0, 0,
                        root / "c.h5", root / "wq3")
    with pytest.raises(PipelineError, match="num_neighbors_save"):
        query_neighbors(root / "pretrain", tok, encoder, index, root / "emb.h5", 32, 128, 5, 6, 40, 0, 0,
                        root / "c.h5", root / "wq3")
