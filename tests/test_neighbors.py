"""Neighbors: the token reader (chunk + continuation), exclusion, and query-neighbors end to end."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from instructretro.chunks import SampleLayout, chunk_table
from instructretro.data import document_id
from instructretro.dbfile import NeighborTokens
from instructretro.embed import Encoder, embed_database
from instructretro.errors import PipelineError
from instructretro.index import populate, set_search_params, train_index
from instructretro.neighbors import exclude_and_keep, query_neighbors
from instructretro.tokenstore import TokenStore, TokenStoreWriter

from test_embed import make_store, make_texts, shared_encoder


EOD_ID = 999  # the store's end-of-document pads a neighbor (not our SentencePiece's 2)


def test_neighbor_tokens_are_chunk_plus_continuation_within_the_document(tmp_path):
    cl = 4
    docs = [np.arange(10, 20), np.arange(100, 103), np.arange(200, 208)]  # lengths 10, 3, 8
    w = TokenStoreWriter(tmp_path / "db", 1000, EOD_ID)
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
    encoder = shared_encoder()
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


class CountingRows:
    """Wraps a DB array: records the largest contiguous slice and the largest fancy read."""

    def __init__(self, array, log: dict, name: str):
        self.array, self.log, self.name = array, log, name
        self.shape, self.dtype = array.shape, array.dtype

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        first = key[0] if isinstance(key, tuple) else key
        kind = "slice" if isinstance(first, slice) else "fancy"
        n = len(range(*first.indices(self.shape[0]))) if kind == "slice" else int(np.size(first))
        entry = self.log.setdefault(self.name, {"slice": 0, "fancy": 0})
        entry[kind] = max(entry[kind], n)
        return np.asarray(self.array[key])


def counting_db(monkeypatch) -> dict:
    from instructretro import dbfile

    log: dict = {}
    real = dbfile.DBFile._array

    def wrapped(self, name, *args):
        return CountingRows(real(self, name, *args), log, name)

    monkeypatch.setattr(dbfile.DBFile, "_array", wrapped)
    return log


@pytest.mark.parametrize("factory", ["Flat", "IVF3,Flat"])
def test_query_neighbors_reads_the_database_block_by_block(world, factory, monkeypatch):
    """Every read of the DB file is a block (<= block_size rows) or one block's search result;
    replacing any of them by a whole-array read fails here."""
    root, tok, encoder = world
    trained, _ = train_index(root / "emb.h5", factory, 10_000, seed=0)
    index = populate(trained, root / "emb.h5", 100)
    set_search_params(index, nprobe=2)
    reference = query_neighbors(root / "pretrain", tok, encoder, index, root / "emb.h5", 32, 128, 50, 6, 40, 60, 0,
                                root / "plain.h5", root / "wc0")
    log = counting_db(monkeypatch)
    block, n_query = 16, 50
    m = query_neighbors(root / "pretrain", tok, encoder, index, root / "emb.h5", 32, 128, n_query, 6, block, 60, 0,
                        root / "counted.h5", root / "wc")
    with h5py.File(root / "emb.h5") as f:
        n_db = len(f["doc_ids"])
    assert n_db > 4 * block  # a whole-array read would exceed every bound below
    assert set(log) == {"chunks", "doc_ids", "embeddings"}
    for name, seen in log.items():
        assert seen["slice"] <= block and max(seen.values()) > 0, (name, seen)
        assert seen["fancy"] <= block * n_query, (name, seen)
    assert log["embeddings"]["fancy"] <= block  # re-used DB rows and recall scores: one block at a time
    with h5py.File(root / "counted.h5") as a, h5py.File(root / "plain.h5") as b:
        for split in ("train", "valid"):  # the block size changes nothing but the reads
            assert np.array_equal(a[split][:], b[split][:])
    for key in ("recall_at_k", "recall_at_k_same_ids", "train", "valid", "recall_nprobe"):
        assert m[key] == reference[key], key
    if factory != "Flat":  # nprobe 1, 2, then every list: exact
        assert [n for n, _ in m["recall_nprobe"]] == [1, 2, 3] and m["recall_nprobe"][-1][1] == 1.0


def test_join_of_query_chunks_to_db_chunks_matches_a_dict(tmp_path):
    """The vectorised join (sorted documents + searchsorted) against the obvious dict."""
    from instructretro.dbfile import DBFile
    from instructretro.neighbors import DBDocuments

    rng = np.random.default_rng(0)
    rows, ids = [], []
    for d in range(60):  # documents of 1-9 chunks, some chunks dropped (no encoder tokens)
        doc_id = int(rng.integers(1, 2**63))
        n = int(rng.integers(1, 10))
        for c in range(n):
            if rng.random() < 0.2:
                continue
            rows.append((d, 8 * c, 8 if c < n - 1 else int(rng.integers(1, 9))))
            ids.append(doc_id)
    chunks = np.array(rows, dtype=np.int64)
    doc_ids = np.array(ids, dtype=np.uint64)
    with h5py.File(tmp_path / "emb.h5", "w") as f:
        f["chunks"], f["doc_ids"] = chunks, doc_ids
        f["embeddings"] = np.zeros((len(chunks), 4), np.float16)
    where = {(int(d), int(s)): (r, int(l)) for r, (d, s, l) in enumerate(zip(doc_ids, chunks[:, 1], chunks[:, 2]))}
    q_doc = np.concatenate([doc_ids[rng.integers(0, len(doc_ids), 300)], rng.integers(1, 2**63, 50).astype(np.uint64)])
    q_start = 8 * rng.integers(0, 10, len(q_doc))
    q_len = np.where(rng.random(len(q_doc)) < 0.8, 8, rng.integers(1, 9, len(q_doc)))
    q_len = np.where(rng.random(len(q_doc)) < 0.5, [where.get((int(d), int(s)), (0, l))[1] for d, s, l in zip(q_doc, q_start, q_len)], q_len)
    want = np.array([where[(int(d), int(s))][0] if where.get((int(d), int(s)), (0, -1))[1] == l else -1
                     for d, s, l in zip(q_doc, q_start, q_len)])
    got = DBDocuments(DBFile(tmp_path / "emb.h5"), block_size=7).rows_of(q_doc, q_start, q_len)
    assert (want >= 0).sum() > 100 and np.array_equal(got, want)


def test_exact_search_block_by_block_equals_a_flat_index(tmp_path):
    import faiss

    from instructretro.dbfile import DBFile
    from instructretro.neighbors import exact_candidates

    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with h5py.File(tmp_path / "emb.h5", "w") as f:
        f["chunks"] = np.zeros((500, 3), np.int64)
        f["doc_ids"] = np.arange(500, dtype=np.uint64)
        f["embeddings"] = x
    flat = faiss.IndexFlatIP(16)
    flat.add(x)
    want_s, want_i = flat.search(x[:30], 25)
    got_s, got_i = exact_candidates(x[:30], DBFile(tmp_path / "emb.h5"), 25, block_size=37)
    assert np.array_equal(got_i, want_i) and np.allclose(got_s, want_s, atol=1e-5)


# --- invalidation: dvc status on a copy of the repo built up to query-neighbors on a tiny world ---

RETRIEVAL = ["tokenizer", "tokenize@db", "tokenize@pretrain", "embed", "train-index", "add-index", "query-neighbors"]


@pytest.fixture(scope="module")
def built_repo(tmp_path_factory):
    import shutil
    import subprocess

    import yaml
    from e2e import copy_repo, dvc

    repo = copy_repo(tmp_path_factory.mktemp("retrieval-repo"), {"world.num_entities": 20, "query.recall_sample": 50})
    dvc(repo, "repro", "generate-world")
    shutil.copytree(repo / "data" / "world", repo / "corpora")  # corpora a user edits (not stage outputs)
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["corpus"] = {"db": "corpora/reference.jsonl", "pretrain": "corpora/documents.jsonl"}
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    dvc(repo, "repro", "query-neighbors")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)  # the corpora too, so checkout restores them
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "built"], cwd=repo, check=True)
    return repo


def _stale_retrieval_stages(repo) -> set[str]:
    """Stages of tokenizer..query-neighbors that are changed, or downstream of a changed one."""
    import json

    import networkx
    from dvc.repo import Repo
    from e2e import dvc

    direct = set(json.loads(dvc(repo, "status", "--json", "query-neighbors", "--with-deps").stdout or "{}"))
    with Repo(str(repo)) as r:
        g = r.index.graph  # edges point from a stage to the stages it depends on
        ancestors = {s.name: {a.name for a in networkx.ancestors(g, s)} for s in g.nodes}
    stale = set(direct)
    for s in direct:
        stale |= ancestors.get(s, set())
    return stale & set(RETRIEVAL)


def _set_param(repo, key, value):
    import yaml

    p = yaml.safe_load((repo / "params.yaml").read_text())
    *parents, last = key.split(".")
    node = p
    for k in parents:
        node = node[k]
    assert last in node, key
    node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def _append_document(path):
    with open(path, "a") as f:
        f.write('{"text": "A new pretraining document about a lighthouse."}\n')


INVALIDATION = {
    "pretraining corpus": (lambda r: _append_document(r / "corpora" / "documents.jsonl"),
                           {"tokenize@pretrain", "query-neighbors"}),
    "nprobe": (lambda r: _set_param(r, "query.nprobe", 3), {"query-neighbors"}),
    "neighbor counts": (lambda r: (_set_param(r, "query.num_neighbors_save", 5),
                                   _set_param(r, "query.num_neighbors_query", 50)), {"query-neighbors"}),
    "index factory": (lambda r: _set_param(r, "index.factory", "HNSW16"), {"train-index", "add-index", "query-neighbors"}),
    "encoder": (lambda r: _set_param(r, "embed.encoder", "models/other-bert"),
                {"embed", "train-index", "add-index", "query-neighbors"}),
    "chunk length": (lambda r: _set_param(r, "retro.chunk_length", 32),
                     {"embed", "train-index", "add-index", "query-neighbors"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("change", list(INVALIDATION))
def test_a_change_stales_exactly_the_dependent_retrieval_stages(built_repo, change):
    import subprocess

    apply, expected = INVALIDATION[change]
    assert _stale_retrieval_stages(built_repo) == set()
    apply(built_repo)
    try:
        assert _stale_retrieval_stages(built_repo) == expected
    finally:
        subprocess.run(["git", "checkout", "-q", "--", "."], cwd=built_repo, check=True)


@pytest.mark.slow
def test_changing_nprobe_reruns_only_query_neighbors(built_repo):
    import json
    import subprocess

    from e2e import dvc, ran_stages

    _set_param(built_repo, "query.nprobe", 2)
    try:
        out = dvc(built_repo, "repro", "query-neighbors").stdout
        assert ran_stages(out) == ["query-neighbors"]
        m = json.loads((built_repo / "metrics" / "query_neighbors.json").read_text())
        assert m["nprobe"] == 2 and m["recall_at_k"] is not None
    finally:
        subprocess.run(["git", "checkout", "-q", "--", "."], cwd=built_repo, check=True)


class Killed(Exception):
    """Stands for the kill of a query-neighbors run part-way."""


def test_a_killed_query_rerun_after_a_code_change_reuses_no_block(world, monkeypatch, tmp_path):
    """A run killed after its first search block leaves that block in the work folder. Rerun
    with the same code, it is reused; rerun after a line of neighbors.py changed, every block is
    embedded and searched again (the block caches are keyed by the code, ``workdir.resume_key``),
    and the output equals an uninterrupted run's."""
    from instructretro import embed as E, neighbors as N

    root, tok, encoder = world
    trained, _ = train_index(root / "emb.h5", "Flat", 10_000, seed=0)
    index = populate(trained, root / "emb.h5", 100)
    caches, searched, embedded, stop = [], [], [], {"after": None}
    real_init, real_search, real_embed = E.BlockCache.__init__, N.search_block, N.embed_block

    def tracked_init(self, *a, **k):
        real_init(self, *a, **k)
        caches.append(self)

    def search(index, emb, rows, split, *a, **k):
        if stop["after"] is not None and len(searched) == stop["after"]:
            raise Killed
        searched.append((split.store.split, int(rows[0])))
        return real_search(index, emb, rows, split, *a, **k)

    def embed(texts_of, lo, *a, **k):
        embedded.append(lo)
        return real_embed(texts_of, lo, *a, **k)

    monkeypatch.setattr(E.BlockCache, "__init__", tracked_init)
    monkeypatch.setattr(N, "search_block", search)
    monkeypatch.setattr(N, "embed_block", embed)

    def run(out, work, kill_after=None):
        searched.clear(), embedded.clear(), caches.clear()
        stop["after"] = kill_after
        args = (root / "pretrain", tok, encoder, index, root / "emb.h5", 32, 128, 20, 4, 8, 0, 0, out, work)
        if kill_after is None:
            return query_neighbors(*args)
        with pytest.raises(Killed):
            query_neighbors(*args)
        for cache in caches:  # the process died: the kernel drops its locks
            cache.work.release()

    run(tmp_path / "ref.h5", tmp_path / "w_ref")
    every = list(searched)
    assert len([b for b in every if b[0] == "train"]) >= 2  # more than one block to resume from

    run(tmp_path / "a.h5", tmp_path / "w", kill_after=1)
    assert searched == every[:1]
    run(tmp_path / "a.h5", tmp_path / "w", kill_after=1)  # same code: the finished block is reused
    assert searched == every[1:2]

    run(tmp_path / "a.h5", tmp_path / "w", kill_after=1)  # rebuild a killed state of block 0 alone
    changed = tmp_path / "pkg" / "neighbors.py"
    changed.parent.mkdir()
    changed.write_text(Path(N.__file__).read_text() + "\n# a changed line\n")
    monkeypatch.setattr(N, "__file__", str(changed))
    run(tmp_path / "b.h5", tmp_path / "w")
    assert searched == every  # no block searched by the old code was reused
    assert embedded[0] == 0 and len(embedded) == len(every)
    with h5py.File(tmp_path / "b.h5") as b, h5py.File(tmp_path / "ref.h5") as ref:
        for split in ("train", "valid"):
            assert np.array_equal(b[split][:], ref[split][:])
