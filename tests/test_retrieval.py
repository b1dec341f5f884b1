"""Retriever: free-text search over the DB, exclusion by document, neighbor tokens and texts."""

from __future__ import annotations

import numpy as np
import pytest

from instructretro.embed import Encoder, embed_database
from instructretro.errors import PipelineError
from instructretro.index import populate, train_index, write_index
from instructretro.retrieval import Retriever
from instructretro.tokenstore import TokenStore

from test_embed import make_store, make_texts, shared_encoder


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    root = tmp_path_factory.mktemp("ret")
    tok = root / "spm.model"
    texts = make_texts(12, seed=4, words_per_doc=(20, 60))
    texts[5] = "The lighthouse keeper Entity5 painted the lighthouse red and white every spring."
    make_store(root / "db", texts, tok)
    encoder = shared_encoder()
    embed_database(root / "db", tok, encoder, 16, 64, root / "emb.h5", root / "w")
    trained, _ = train_index(root / "emb.h5", "Flat", 1000, 0)
    write_index(populate(trained, root / "emb.h5", 100), root / "pop.faiss")
    return Retriever(root / "emb.h5", root / "pop.faiss", root / "db", tok, encoder, 16, nprobe=4, efsearch=16), root


def test_search_finds_the_matching_chunk_and_excludes_documents(retriever):
    r, root = retriever
    store = TokenStore(root / "db")
    ids = r.search(["who painted the lighthouse red and white?", ""], 3)
    assert ids.shape == (2, 3) and ids.dtype == np.int64
    best = ids[0, 0]
    assert "lighthouse" in r.chunk_text(best)
    assert np.all(ids[1] == -1)  # an empty query has no neighbors
    doc5 = int(store.doc_ids[5])
    assert r.doc_ids[best] == doc5
    excluded = r.search(["who painted the lighthouse red and white?"], 3, exclude_doc_ids=[doc5])
    assert not np.isin(r.doc_ids[excluded[excluded >= 0]], [doc5]).any()
    per_text = r.search(["lighthouse", "lighthouse"], len(r), exclude_doc_ids=[[doc5], []])
    assert doc5 not in r.doc_ids[per_text[0][per_text[0] >= 0]] and doc5 in r.doc_ids[per_text[1]]
    assert np.all(per_text[1] >= 0) and (per_text[0] == -1).sum() == (r.doc_ids == doc5).sum()


def test_neighbor_tokens_and_text(retriever):
    r, _ = retriever
    tokens, mask = r.neighbor_tokens(np.array([[0, -1]]))
    assert tokens.shape == (1, 2, 32) and not mask[0, 1].any() and mask[0, 0, 0]
    assert r.chunk_text(-1) == ""
    short, full = r.chunk_text(0, continuation=False), r.chunk_text(0)
    assert full.startswith(short) and len(full) > len(short)


def test_retriever_rejects_another_encoder(retriever, tmp_path):
    _, root = retriever
    with pytest.raises(PipelineError, match="not an existing folder"):
        Retriever(root / "emb.h5", root / "pop.faiss", root / "db", root / "spm.model", tmp_path / "nope", 16)
