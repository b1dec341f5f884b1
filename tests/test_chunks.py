"""Chunks tile documents exactly and never cross them; samples are chunk-aligned."""

from __future__ import annotations

import numpy as np

from instructretro.chunks import SampleLayout, chunk_table, chunk_tokens
from instructretro.tokenstore import TokenStore, TokenStoreWriter


EOD_ID = 7  # not our SentencePiece's 2: chunks and samples take the store's end-of-document


def _store(tmp_path, lengths, vocab=300):
    rng = np.random.default_rng(0)
    w = TokenStoreWriter(tmp_path / "s", vocab, EOD_ID)
    docs = []
    for i, n in enumerate(lengths):
        toks = rng.integers(EOD_ID + 1, vocab, n)
        docs.append(toks)
        w.add("train", 1000 + i, toks)
    w.close()
    return TokenStore(tmp_path / "s", "train"), docs


def test_chunks_tile_each_document_exactly():
    lengths = np.array([0, 1, 63, 64, 65, 200, 128])
    t = chunk_table(lengths, 64)
    for d, n in enumerate(lengths):
        rows = t[t["doc"] == d]
        assert rows["length"].sum() == n
        assert (rows["start"] == np.arange(len(rows)) * 64).all()
        assert (rows["length"] > 0).all() and (rows["length"] <= 64).all()
        assert (rows["start"] + rows["length"] <= n).all()  # never crosses the document end
    assert len(t) == sum(-(-n // 64) for n in lengths)


def test_chunk_tokens_pad_with_eod(tmp_path):
    store, docs = _store(tmp_path, [70, 10])
    t = chunk_table(store.doc_lengths(), 64)
    toks = chunk_tokens(store, t, 64)
    assert toks[0].tolist() == docs[0][:64].tolist()
    assert toks[1, :6].tolist() == docs[0][64:].tolist() and (toks[1, 6:] == EOD_ID).all()
    assert toks[2, :10].tolist() == docs[1].tolist()


def test_samples_are_chunk_aligned_with_eod_labels(tmp_path):
    store, docs = _store(tmp_path, [70, 10, 130])
    lay = SampleLayout(store, 4, 8)  # 2 chunks per sample
    assert lay.chunks_per_sample == 2 and len(lay) == -(-len(lay.chunks[lay.chunks["doc"] >= 0]) // 2)
    seen = []
    for s in range(len(lay)):
        tokens, labels, mask = lay.sample(s)
        for j, (doc, start, length) in enumerate(lay.sample_rows(s)):
            o = j * 4
            if doc < 0:
                assert mask[o:o + 4].sum() == 0
                continue
            d = docs[doc]
            assert tokens[o:o + length].tolist() == d[start:start + length].tolist()
            want = list(d[start + 1:start + length + 1]) + ([EOD_ID] if start + length == len(d) else [])
            assert labels[o:o + length].tolist() == [int(x) for x in want][:length]
            assert mask[o:o + length].all() and not mask[o + length:o + 4].any()
            seen.append((doc, start))
        assert set(lay.sample_doc_ids(s)) == {1000 + d for d in lay.sample_rows(s)["doc"] if d >= 0}
    assert len(seen) == len(chunk_table(store.doc_lengths(), 4))
