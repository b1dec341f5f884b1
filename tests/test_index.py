"""Index: the auto factory, clear errors for bad strings, training, populating with chunk ids."""

from __future__ import annotations

from pathlib import Path

import os
import h5py
import numpy as np
import pytest

from instructretro.errors import PipelineError
from instructretro.index import auto_factory, make_index, populate, read_index, set_search_params, train_index, write_index


def clustered(n: int, dim: int = 384, centers: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, dim))
    x = c[rng.integers(0, centers, n)] + 0.3 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_embeddings(path, x):
    with h5py.File(path, "w") as f:
        f["embeddings"] = x
        f["chunks"] = np.stack([np.arange(len(x)), np.zeros(len(x), int), np.full(len(x), 64)], 1).astype(np.int64)
        f["doc_ids"] = np.arange(len(x), dtype=np.uint64)
        f.attrs["dim"] = x.shape[1]
    return path


def test_auto_is_flat_for_tiny_and_ivf_sized_by_training_points():
    assert auto_factory(150, 384, 150) == "Flat"  # about 50 documents
    assert auto_factory(5_000, 384, 5_000) == "Flat"  # exact search is cheapest at this size
    assert auto_factory(20_000, 384, 1_000) == "Flat"  # too few training points for 32 lists
    for n in (20_000, 100_000, 400_000):
        s = auto_factory(n, 384, min(n, 100_000))
        assert s.startswith("IVF") and s.endswith(",Flat")
        nlist = int(s[3:].split(",")[0])
        assert 39 * nlist <= min(n, 100_000) and nlist <= 4 * n ** 0.5 and nlist & (nlist - 1) == 0
    assert "SQ8" in auto_factory(2_000_000, 384, 1_000_000)
    big = auto_factory(50_000_000, 384, 5_000_000)
    assert "PQ32" in big and 384 % 32 == 0


@pytest.mark.parametrize("factory, match", [
    ("IVF16,PQ7", "multiple of the number of subquantizers"),
    ("NotAnIndex", "could not parse"),
    ("IVF4096,Flat", r"cannot be trained on 2000 points \(IVF with 4096 lists needs 39"),
])
def test_bad_factory_strings_say_what_would_work(factory, match):
    with pytest.raises(PipelineError, match=match) as err:
        make_index(factory, 384, 2000, 2000)
    assert "use 'auto' (here: 'Flat')" in str(err.value) and "index.factory" in str(err.value)


def test_train_ivf_is_deterministic_and_populates_with_chunk_ids(tmp_path):
    x = clustered(3000)
    h5 = write_embeddings(tmp_path / "emb.h5", x)
    index, m = train_index(h5, "IVF64,Flat", 100_000, seed=7)
    assert m["factory"] == "IVF64,Flat" and m["factory_param"] == "IVF64,Flat"
    assert m["training_points"] == 3000 and index.is_trained and index.ntotal == 0
    write_index(index, tmp_path / "trained.faiss")
    again, _ = train_index(h5, "IVF64,Flat", 100_000, seed=7)
    write_index(again, tmp_path / "again.faiss")
    assert (tmp_path / "trained.faiss").read_bytes() == (tmp_path / "again.faiss").read_bytes()
    full = populate(read_index(tmp_path / "trained.faiss"), h5, block_size=700)
    assert full.ntotal == 3000
    set_search_params(full, nprobe=16)
    _, ids = full.search(x[:50], 1)
    assert np.mean(ids[:, 0] == np.arange(50)) > 0.95  # a vector finds itself: ids are chunk ids


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF16,SQ8"])
def test_ids_are_chunk_ids_for_every_kind(tmp_path, factory):
    x = clustered(1500, dim=64, seed=3)
    h5 = write_embeddings(tmp_path / "emb.h5", x)
    index, m = train_index(h5, factory, 1000, seed=1)
    assert m["factory"] == factory
    full = populate(index, h5, block_size=400)
    set_search_params(full, nprobe=32, efsearch=64)
    _, ids = full.search(x[1000:1040], 1)
    assert np.mean(ids[:, 0] == np.arange(1000, 1040)) > 0.9


def test_auto_on_fifty_documents_is_flat_and_exact(tmp_path):
    x = clustered(180, seed=2)
    h5 = write_embeddings(tmp_path / "emb.h5", x)
    index, m = train_index(h5, "auto", 100_000, seed=0)
    assert m["factory"] == "Flat" and m["training_points"] == 0
    full = populate(index, h5, 64)
    _, ids = full.search(x, 1)
    assert np.array_equal(ids[:, 0], np.arange(180))


def test_too_few_points_for_explicit_ivf(tmp_path):
    h5 = write_embeddings(tmp_path / "emb.h5", clustered(500, dim=32))
    with pytest.raises(PipelineError, match="IVF with 256 lists needs 39 points per list"):
        train_index(h5, "IVF256,Flat", 100_000, seed=0)
    with pytest.raises(PipelineError, match="embeddings file not found"):
        train_index(tmp_path / "missing.h5", "auto", 10, 0)


def test_auto_on_the_default_corpus(tmp_path):
    """The default world's database (params.yaml as shipped) gets an index auto can build and train."""
    from instructretro import data, params, tokenizer
    from instructretro.chunks import chunk_table
    from instructretro.world import write_world

    p = params.load(Path(__file__).resolve().parents[1] / "params.yaml")
    write_world(tmp_path / "world", **{k: p.get(f"world.{k}") for k in
                ("num_entities", "docs_per_entity", "qa_questions", "sft_conversations", "seed")})
    texts = [d.text for d in data.iter_documents(tmp_path / "world" / "reference.jsonl")]
    (tmp_path / "spm.model").write_bytes(tokenizer.train(iter(texts), p.get("tokenizer.vocab_size"), 5_000_000))
    tok = tokenizer.Tokenizer(tmp_path / "spm.model")
    lengths = np.array([len(t) for t in tok.encode_batch(texts)])
    n = len(chunk_table(lengths, p.get("retro.chunk_length")))
    factory = auto_factory(n, 384, min(n, p.get("index.train_points")))
    assert factory == "Flat"  # a few hundred DB chunks: exact search is the right index
    x = clustered(n, seed=4)
    h5 = write_embeddings(tmp_path / "emb.h5", x)
    index, m = train_index(h5, p.get("index.factory"), p.get("index.train_points"), p.get("index.seed"))
    assert m["factory"] == factory and populate(index, h5, 256).ntotal == n


def _has_faiss_gpu() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def test_training_sample_is_capped_by_what_the_index_uses_and_read_in_blocks(tmp_path, monkeypatch):
    from test_neighbors import counting_db

    x = clustered(6000, dim=32, seed=5)
    h5 = write_embeddings(tmp_path / "emb.h5", x)
    log = counting_db(monkeypatch)
    index, m = train_index(h5, "IVF16,Flat", 100_000, seed=0, block_size=500)
    assert m["training_points"] == 256 * 16 < 6000  # k-means keeps 256 points per list
    assert "256 points per list" in m["training_points_bound"]
    assert log["embeddings"]["fancy"] <= 500 and log["embeddings"]["slice"] <= 500
    _, m = train_index(h5, "IVF16,Flat", 1000, seed=0, block_size=500)
    assert m["training_points"] == 1000 and m["training_points_bound"] == "index.train_points"
    assert m["devices"] == {"ivf_kmeans": "cpu", "coarse_quantizer": "cpu (flat over the centroids)"}
    full = populate(index, h5, block_size=700)
    assert full.ntotal == 6000 and log["embeddings"]["slice"] <= 700


def test_hnsw_quantizer_is_built_on_cpu_over_the_centroids(tmp_path):
    x = clustered(4000, dim=32, seed=6)
    h5 = write_embeddings(tmp_path / "emb.h5", x)
    index, m = train_index(h5, "IVF64_HNSW16,SQ8", 100_000, seed=0, gpus=0)
    assert m["devices"] == {"ivf_kmeans": "cpu", "coarse_quantizer": "cpu (HNSW over the centroids)", "codes": "cpu"}
    import faiss

    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    assert quantizer.ntotal == 64 and hasattr(quantizer, "hnsw")


@pytest.mark.skipif(_has_faiss_gpu(), reason="checks the error when no GPU Faiss is there")
def test_asking_for_gpus_without_faiss_gpu_is_an_error_not_a_cpu_fallback(tmp_path):
    h5 = write_embeddings(tmp_path / "emb.h5", clustered(3000, dim=32))
    with pytest.raises(PipelineError, match="GPU.*faiss-gpu"):
        train_index(h5, "IVF16,Flat", 100_000, seed=0, gpus=1)


def test_training_failure_is_an_error(tmp_path, monkeypatch):
    import faiss

    h5 = write_embeddings(tmp_path / "emb.h5", clustered(3000, dim=32))

    def broken(self, x):
        raise RuntimeError("Error in train at IndexIVF.cpp:1: training broke")

    monkeypatch.setattr(faiss.IndexIVFFlat, "train", broken)
    with pytest.raises(PipelineError, match="training failed.*training broke"):
        train_index(h5, "IVF16,Flat", 100_000, seed=0)


def test_ondisk_inverted_lists_give_the_in_ram_results(tmp_path):
    import faiss

    x = clustered(5000, dim=32, seed=7)
    h5 = write_embeddings(tmp_path / "emb.h5", x)
    trained, _ = train_index(h5, "IVF32,SQ8", 100_000, seed=0)
    in_ram = populate(trained, h5, block_size=300)
    ondisk = populate(trained, h5, block_size=300, ondisk_above=1000, ivfdata=tmp_path / "pop.faiss.ivfdata",
                      shard_blocks=4)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(ondisk).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists) and (tmp_path / "pop.faiss.ivfdata").is_file()
    assert not (tmp_path / "pop.faiss.ivfdata.shards").exists()  # shards are merged, then removed
    write_index(ondisk, tmp_path / "pop.faiss")
    reread = read_index(tmp_path / "pop.faiss")
    for index in (in_ram, ondisk, reread):
        set_search_params(index, nprobe=4)
    want = in_ram.search(x[:200], 10)
    for index in (ondisk, reread):
        got = index.search(x[:200], 10)
        assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])
    assert populate(trained, h5, 300, ondisk_above=10**12, ivfdata=tmp_path / "x.ivfdata").ntotal == 5000
    assert not (tmp_path / "x.ivfdata").exists()  # below the threshold: in RAM


def test_populated_index_is_one_folder_and_refuses_lists_of_another_build(tmp_path):
    """add-index writes one folder (index, on-disk lists, record): DVC versions the pair as one
    output, the folder may move, and lists that belong to another build are refused."""
    import shutil

    from conftest import run_stage
    from test_bad_inputs import write_params

    x = clustered(3000, dim=32, seed=3)
    h5 = write_embeddings(tmp_path / "emb.h5", x)
    folders = {}
    for seed in (1234, 99):
        trained, _ = train_index(h5, "IVF8,Flat", 100_000, seed=seed)
        write_index(trained, tmp_path / f"trained{seed}.faiss")
        params = write_params(tmp_path, lambda p: p["index"].update(ondisk_above=1000, add_block_size=1000))
        folders[seed] = tmp_path / f"populated{seed}"
        r = run_stage("add_index.py", "--params", params, "--embeddings", h5, "--trained",
                      tmp_path / f"trained{seed}.faiss", "--out", folders[seed], "--metrics", tmp_path / "m.json")
        assert r.returncode == 0, r.stderr[-2000:]
        assert sorted(f.name for f in folders[seed].iterdir()) == ["index.faiss", "index.json", "lists.ivfdata"]
    moved = tmp_path / "elsewhere" / "populated"
    shutil.move(folders[1234], moved)  # the index finds its lists inside its own folder
    index = read_index(moved)
    set_search_params(index, nprobe=8)
    assert index.ntotal == 3000 and index.search(x[:5], 1)[1][:, 0].tolist() == [0, 1, 2, 3, 4]
    del index  # its lists are mapped from the file that is replaced next
    # a mismatched pair; a new file, as DVC restores one (rewriting a mapped file in place is a SIGBUS)
    shutil.copyfile(folders[99] / "lists.ivfdata", moved / "lists.new")
    os.replace(moved / "lists.new", moved / "lists.ivfdata")
    with pytest.raises(PipelineError, match=r"lists\.ivfdata: not the inverted lists .*index\.faiss was built with.*"
                                            r"rerun add-index"):
        read_index(moved)
    (moved / "lists.ivfdata").unlink()
    with pytest.raises(PipelineError, match=r"on-disk lists but lists\.ivfdata is missing"):
        read_index(moved)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_faiss_gpu(), reason="needs faiss-gpu and a CUDA device")
def test_gpu_kmeans_trains_ivf_centroids_with_cpu_recall(tmp_path):
    x = clustered(20000, dim=64, seed=8)
    h5 = write_embeddings(tmp_path / "emb.h5", x)
    recalls = {}
    for gpus in (0, None):
        index, m = train_index(h5, "IVF64_HNSW16,Flat", 100_000, seed=0, gpus=gpus)
        if gpus is None:
            assert m["devices"]["ivf_kmeans"].startswith("gpu") and m["train_device"] == "gpu"
            assert m["devices"]["coarse_quantizer"] == "cpu (HNSW over the centroids)"
        full = populate(index, h5, 5000)
        set_search_params(full, nprobe=8, efsearch=64)
        _, ids = full.search(x[:500], 1)
        recalls[gpus] = float(np.mean(ids[:, 0] == np.arange(500)))
    assert recalls[None] >= recalls[0] - 0.02 and recalls[None] > 0.9
