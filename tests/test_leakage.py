"""RETRO's leakage analysis (stage leakage) and the leakage filter: the overlap of a chunk with
its neighbors on hand-built cases and against a brute-force reference; a validation document
planted in the database lands in the 100% bucket and the filter removes exactly its neighbors;
``stages/pretrain.py --eval-only --max-overlap`` reports the filtered loss beside the unfiltered.

Inputs come from the small synthetic world: token stores of its documents, a database of its
reference entries plus an exact copy of one validation document, tiny Retro and GPT checkpoints
with fresh weights (the analysis reads what the model reads, whatever it learned).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from instructretro import data
from instructretro.chunks import SampleLayout, chunk_table
from instructretro.overlap import (BUCKETS, bucket_of, chunk_overlap, filter_neighbors, longest_common_run,
                                   with_ids)
from instructretro.tokenizer import Tokenizer
from instructretro.tokenstore import TokenStore, TokenStoreWriter

from conftest import REPO, run_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CL, SEQ = 64, 256
RNG = np.random.default_rng(0)


def neighbor(tokens, width=2 * CL):
    """One neighbor row of ``width`` (chunk + continuation), -1 after ``tokens``."""
    out = np.full(width, -1, np.int64)
    out[: len(tokens)] = tokens
    return out


# ------------------------------------------------------------------------------ the overlap


def test_identical_text_is_full_overlap_and_disjoint_text_none():
    chunk = RNG.integers(3, 1000, CL)
    same = neighbor(chunk)
    other = neighbor(RNG.integers(1000, 2000, 2 * CL))
    assert chunk_overlap(chunk[None], same[None, None]).tolist() == [1.0]
    assert chunk_overlap(chunk[None], other[None, None]).tolist() == [0.0]


def test_a_shared_run_of_17_tokens_in_a_64_token_chunk_is_17_64():
    chunk = np.arange(100, 100 + CL)
    nb = np.arange(5000, 5000 + 2 * CL)
    nb[30:47] = chunk[20:37]  # 17 shared tokens in a row
    nb[60:70] = chunk[0:10]   # a shorter run elsewhere does not add to it
    assert longest_common_run(chunk[None], nb[None, None]).tolist() == [[17]]
    assert chunk_overlap(chunk[None], nb[None, None])[0] == pytest.approx(17 / 64)


def test_the_continuation_counts():
    """A neighbor is its chunk plus the continuation: a run in the second half is found."""
    chunk = np.arange(100, 100 + CL)
    nb = np.concatenate([np.arange(5000, 5000 + CL), chunk])  # the neighbor's chunk is unrelated
    assert chunk_overlap(chunk[None], nb[None, None]).tolist() == [1.0]
    assert chunk_overlap(chunk[None], nb[None, None, :CL]).tolist() == [0.0]  # without it: nothing


def test_padded_neighbors_and_masked_positions_count_for_nothing():
    chunk = np.arange(100, 100 + CL)
    tokens = np.stack([neighbor(chunk), neighbor(chunk)])[None]  # (1, k=2, R): both hold the chunk
    missing = np.zeros_like(tokens, dtype=bool)  # id -1: an all-False mask
    assert chunk_overlap(chunk[None], with_ids(tokens, missing)).tolist() == [0.0]
    half = missing.copy()
    half[0, 1, :32] = True  # only the first 32 positions of the second neighbor are real
    assert chunk_overlap(chunk[None], with_ids(tokens, half))[0] == pytest.approx(0.5)
    # a short chunk (40 tokens, padded with -1) against its own tokens: 40/40, not 40/64
    short = np.full(CL, -1)
    short[:40] = chunk[:40]
    assert chunk_overlap(short[None], neighbor(chunk)[None, None]).tolist() == [1.0]
    assert chunk_overlap(np.full((1, CL), -1), neighbor(chunk)[None, None]).tolist() == [0.0]


def test_a_run_does_not_continue_from_one_neighbor_into_the_next():
    chunk = np.arange(100, 100 + CL)
    a = np.arange(5000, 5000 + 2 * CL)
    b = np.arange(7000, 7000 + 2 * CL)
    a[-10:] = chunk[:10]   # the end of neighbor 0 ...
    b[:12] = chunk[10:22]  # ... and the start of neighbor 1 together would be 22 in a row
    assert longest_common_run(chunk[None], np.stack([a, b])[None]).tolist() == [[10, 12]]


def _brute_force(a, b) -> int:
    best = 0
    for i in range(len(a)):
        for j in range(len(b)):
            n = 0
            while i + n < len(a) and j + n < len(b) and a[i + n] >= 0 and a[i + n] == b[j + n]:
                n += 1
            best = max(best, n)
    return best


def test_longest_common_run_equals_a_brute_force_search_on_random_text():
    rng = np.random.default_rng(1)
    chunks = rng.integers(0, 4, (20, 16))  # a 4-token vocabulary: many runs of every length
    chunks[3, 10:] = -1
    nbs = rng.integers(0, 4, (20, 2, 24))
    nbs[5, 1] = -1
    got = longest_common_run(chunks, nbs)
    want = [[_brute_force(chunks[i], nbs[i, j]) for j in range(2)] for i in range(20)]
    assert got.tolist() == want


def test_buckets_are_retros_upper_bounds():
    assert BUCKETS == (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
    assert bucket_of(np.array([0.0, 8 / 64, 9 / 64, 17 / 64, 0.5, 0.51, 63 / 64, 1.0])).tolist() == [0, 0, 1, 2, 3, 4, 7, 7]


def test_filter_masks_whole_neighbors_above_the_threshold_only():
    chunk = np.arange(100, 100 + CL)
    copy = neighbor(chunk)
    partial = np.arange(5000, 5000 + 2 * CL)
    partial[:20] = chunk[:20]  # 20/64 = 0.31
    tokens = np.stack([copy, partial])[None]
    mask = tokens >= 0
    kept = filter_neighbors(np.where(mask, tokens, 2), mask, chunk[None], 0.5)
    assert not kept[0, 0].any() and np.array_equal(kept[0, 1], mask[0, 1])
    assert not filter_neighbors(tokens, mask, chunk[None], 0.25)[0].any()
    assert np.array_equal(filter_neighbors(tokens, mask, chunk[None], 1.0), mask)


# ------------------------------------------------------------------------------ a planted copy


def _write_store(docs, tok, out: Path, valid_ids=()) -> Path:
    w = TokenStoreWriter(out, tok.vocab_size, tok.eod_id)
    for doc_id, ids in docs:
        w.add("valid" if doc_id in valid_ids else "train", doc_id, ids)
    w.close({})
    return out


@pytest.fixture(scope="module")
def planted(small_world, small_tokenizer, tmp_path_factory):
    """Token stores, a database holding an exact copy of validation document ``d``, neighbor ids
    (each chunk of ``d`` retrieves its copy in the database, as an exact search finds it; every
    other chunk a random reference chunk), and fresh tiny Retro and GPT checkpoints."""
    from instructretro import presets
    from instructretro.checkpoint import export_checkpoint
    from instructretro.model import Retro

    root = tmp_path_factory.mktemp("leakage")
    tok = Tokenizer(small_tokenizer)
    docs = [(d.doc_id, tok.encode(d.text)) for d in data.iter_documents(small_world / "documents.jsonl")]
    valid_ids = {doc_id for doc_id, _ in docs[::6]}
    _write_store(docs, tok, root / "tokens" / "pretrain", valid_ids)
    valid = TokenStore(root / "tokens" / "pretrain", "valid")
    d = int(np.argmax(valid.doc_lengths()))  # the longest validation document: several chunks
    refs = [(r.doc_id, tok.encode(r.text)) for r in data.iter_documents(small_world / "reference.jsonl")]
    _write_store(refs + [(12345, valid.doc(d).tolist())], tok, root / "tokens" / "db")
    db = TokenStore(root / "tokens" / "db", "train")
    table = chunk_table(db.doc_lengths(), CL)
    (root / "db").mkdir()
    with h5py.File(root / "db" / "embeddings.h5", "w") as f:
        f["chunks"] = np.stack([table["doc"], table["start"], table["length"]], axis=1).astype(np.int64)
        f["doc_ids"] = db.doc_ids[table["doc"]]
        f["embeddings"] = np.zeros((len(table), 4), np.float32)
        f.attrs.update(encoder="none", chunk_length=CL, dim=4)
    copy_rows = np.flatnonzero(table["doc"] == len(refs))  # the copy's chunks, in order
    rng = np.random.default_rng(0)
    (root / "neighbors").mkdir()
    with h5py.File(root / "neighbors" / "neighbors.h5", "w") as f:
        for split in ("train", "valid"):
            rows = SampleLayout(TokenStore(root / "tokens" / "pretrain", split), CL, SEQ).chunks
            ids = rng.integers(0, copy_rows[0], (len(rows), 2))  # reference chunks only
            if split == "valid":
                of_d = np.flatnonzero(rows["doc"] == d)
                ids[of_d, 0] = copy_rows[rows["start"][of_d] // CL]
            f[split] = ids
    cfg = dict(n_layers=2, hidden=32, heads=2, ffn_hidden=64, encoder_layers=1, cca_layers=[2], num_neighbors=2,
               vocab_size=tok.vocab_size, chunk_length=CL, seq_length=SEQ)
    torch.manual_seed(0)
    for name, retro in (("retro", True), ("gpt", False)):
        config = presets.get("tiny", retro=retro, **cfg)
        export_checkpoint(Retro(config), config, root / "ckpt" / name)
    rows = SampleLayout(valid, CL, SEQ).chunks
    pos = np.arange(len(rows))
    # chunks of d that read neighbors (not the first of a sample) retrieved for a chunk of d: all of d but its first
    expected = np.flatnonzero((rows["doc"] == d) & (pos % (SEQ // CL) > 0) & (np.r_[-1, rows["doc"][:-1]] == d))
    return root, d, expected


def _inputs(root):
    from instructretro.pretrain_data import PretrainInputs

    return PretrainInputs(str(root / "tokens" / "pretrain"), str(root / "neighbors" / "neighbors.h5"),
                          str(root / "tokens" / "db"), str(root / "db" / "embeddings.h5"))


def test_a_planted_copy_of_a_validation_document_lands_its_chunks_in_the_100_percent_bucket(planted):
    from instructretro.leakage import run_leakage

    from instructretro.checkpoint import load_model
    from instructretro.leakage import chunk_table
    from instructretro.pretrain_data import load_split

    root, d, expected = planted
    assert len(expected) >= 2
    retro, gpt = load_model(root / "ckpt" / "retro"), load_model(root / "ckpt" / "gpt")
    valid = load_split(_inputs(root), retro.config, "valid")
    table, _ = chunk_table(retro, gpt, valid, [np.arange(len(valid))], "cpu")
    in_top = set(table.rows[bucket_of(table.overlap) == len(BUCKETS) - 1].tolist())
    assert set(expected.tolist()) <= in_top  # every chunk of d that reads the copy of its previous chunk
    # besides them only chunks of a token or two (a document's last chunk), which any common token fills
    assert all(valid.layout.chunks["length"][r] <= 2 for r in in_top - set(expected.tolist()))

    metrics, _ = run_leakage(_inputs(root), root / "ckpt" / "retro", root / "ckpt" / "gpt", max_overlap=0.5)
    top = metrics["buckets"]["87.5-100%"]
    assert top["chunks"] == len(in_top) and top["tokens"] >= 64 * len(expected)
    buckets = metrics["buckets"].values()
    assert sum(b["chunks"] for b in buckets) == metrics["chunks"]  # the buckets hold every evaluated chunk
    assert sum(b["tokens"] for b in buckets) == metrics["tokens"]
    rows = SampleLayout(TokenStore(root / "tokens" / "pretrain", "valid"), CL, SEQ).chunks
    assert metrics["chunks"] + metrics["chunks_without_neighbors"] == (rows["doc"] >= 0).sum()  # the whole split
    for b in buckets:
        if b["chunks"]:
            assert b["retro_lead"] == pytest.approx(b["gpt_loss"] - b["retro_loss"])
            assert all(np.isfinite(b[k]) for k in ("retro_loss", "gpt_loss", "retro_loss_shuffled", "retro_loss_filtered"))
    # the filter at 50% takes the copies away from the planted chunks: their Retro loss changes
    assert top["retro_loss_filtered"] != pytest.approx(top["retro_loss"], abs=1e-6)
    assert metrics["val_loss_filtered"] is not None and metrics["val_loss"] is not None


def test_the_filter_removes_exactly_the_neighbors_above_the_threshold(planted):
    """``batch(max_overlap=...)`` masks the copy (read for the next chunk of d) and nothing that
    does not exceed the threshold; every masked neighbor is the one the model reads for a
    chunk it holds more than that share of."""
    from instructretro import presets
    from instructretro.pretrain_data import load_split

    root, d, expected = planted
    config = presets.get("tiny", num_neighbors=2, chunk_length=CL, seq_length=SEQ)
    valid = load_split(_inputs(root), config, "valid")
    idx = np.arange(len(valid))
    full, kept = valid.batch(idx), valid.batch(idx, max_overlap=0.5)
    read_for = valid.read_for(idx)  # (B, C, CL)
    ids = with_ids(full["neighbors"].numpy(), full["neighbor_mask"].numpy())
    B, C, k, R = ids.shape
    share = longest_common_run(read_for.reshape(B * C, CL), ids.reshape(B * C, k, R)) / np.maximum(
        (read_for.reshape(B * C, CL) >= 0).sum(1), 1)[:, None]
    dropped = full["neighbor_mask"].numpy().any(-1) & ~kept["neighbor_mask"].numpy().any(-1)  # (B, C, k)
    assert np.array_equal(dropped.reshape(B * C, k), (share > 0.5) & full["neighbor_mask"].numpy().any(-1).reshape(B * C, k))
    assert dropped[..., 0].sum() >= len(expected)  # every copy read for a chunk of d is gone
    assert torch.equal(valid.batch(idx, max_overlap=1.0)["neighbor_mask"], full["neighbor_mask"])


def test_stage_writes_metrics_and_the_plot_and_eval_only_reports_the_filtered_loss(planted, small_tokenizer, tmp_path,
                                                                                  monkeypatch, capsys):
    import yaml

    root, d, expected = planted
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["leakage"].update(max_overlap=0.5, batch_size=4)
    params["corpus"]["pretrain"] = ""  # no fact spans
    params["pretrain"].update(eval_batches=100, micro_batch=4)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    data_args = ["--tokens", root / "tokens" / "pretrain", "--neighbors", root / "neighbors" / "neighbors.h5",
                 "--db-tokens", root / "tokens" / "db", "--embeddings", root / "db" / "embeddings.h5"]
    r = run_stage("leakage.py", "--params", tmp_path / "params.yaml", "--retro", root / "ckpt" / "retro",
                  "--gpt", root / "ckpt" / "gpt", *data_args, "--metrics", tmp_path / "leakage.json",
                  "--plot", tmp_path / "leakage.csv")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "leakage.json").read_text())
    assert m["buckets"]["87.5-100%"]["chunks"] >= len(expected) and m["max_overlap"] == 0.5
    lines = (tmp_path / "leakage.csv").read_text().splitlines()
    assert lines[0] == "overlap,retro_loss,gpt_loss,retro_loss_shuffled"
    assert [float(x.split(",")[0]) for x in lines[1:]] == [
        100 * b["max_overlap"] for b in m["buckets"].values() if b["chunks"]]
    assert lines[-1].startswith("100,")
    assert "per 1,000 chunks" in r.stderr

    # the same filter on any checkpoint through the pretrain stage's evaluation
    args = ["--params", tmp_path / "params.yaml", *data_args, "--tokenizer", small_tokenizer,
            "--metrics", tmp_path / "eval.json", "--eval-only", root / "ckpt" / "retro"]
    r = run_stage("pretrain.py", *args, "--max-overlap", "0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    e = json.loads((tmp_path / "eval.json").read_text())
    assert e["max_overlap"] == 0.5 and e["val_loss_filtered"] != pytest.approx(e["val_loss"], abs=1e-6)
    assert e["val_loss"] == pytest.approx(m["val_loss"], abs=1e-5)  # the leakage stage's samples: the whole split
    assert e["val_loss_filtered"] == pytest.approx(m["val_loss_filtered"], abs=1e-5)

    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_stage", REPO / "stages" / "pretrain.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    for bad, says in ((args[:-2] + ["--max-overlap", "0.5"], "--eval-only"), (args + ["--max-overlap", "1.5"], "between 0 and 1")):
        with pytest.raises(SystemExit) as exc:
            stage.main([str(a) for a in bad])
        err = capsys.readouterr().err
        assert exc.value.code == 1 and says in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("value, says", [(1.5, r"must be in \[0.0, 1.0\]"), (-0.1, r"must be in \[0.0, 1.0\]"), ("half", "must be float")])
def test_max_overlap_param_is_a_share_or_null(tmp_path, value, says):
    import yaml

    from instructretro import params as P
    from instructretro.errors import PipelineError

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["leakage"]["max_overlap"] is None  # the filter is off by default
    params["leakage"]["max_overlap"] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineError, match=f"'leakage.max_overlap' {says}"):
        P.load(tmp_path / "params.yaml")
    params["leakage"]["max_overlap"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert P.load(tmp_path / "params.yaml").get("leakage.max_overlap", (float, type(None))) == 1


def test_report_row_is_retros_lead_at_low_overlap(tmp_path):
    from instructretro import report

    (tmp_path / "leakage.json").write_text(json.dumps({"chunks": 10, "buckets": {
        "0-12.5%": {"chunks": 7, "retro_lead": 0.0123}, "12.5-25%": {"chunks": 3, "retro_lead": -0.5}}}))
    assert report.rows(tmp_path) == [("leakage", "Retro's lead over GPT on chunks at <= 12.5% neighbor overlap "
                                      "(7 of 10 chunks)", "0.0123")]


def test_a_chunks_loss_is_the_loss_of_predicting_its_tokens():
    """Column u sums positions u*L-1 .. (u+1)*L-2 (their labels are chunk u's tokens, and all
    read the neighbors of chunk u-1); the last position goes to column C."""
    from instructretro.leakage import chunk_losses

    ce = torch.arange(1.0, 7.0)[None]  # T = 6, L = 2: C = 3
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0, 1.0]])
    assert chunk_losses(ce, mask, 2).tolist() == [[1.0, 2.0 + 3.0, 0.0 + 5.0, 6.0]]
    assert chunk_losses(ce, mask, 2).sum() == (ce * mask).sum()
