"""The pretrain stage's data and run: samples with neighbors, fact tokens, shuffled-neighbor
validation, the sample order, and the stage end to end (train, resume, eval-only, init_from).

Inputs are built here from the small synthetic world: token stores of its documents, random
neighbor ids (so the stage runs before/without the retrieval stages), and the DB files in the
layout of the contracts when the neighbors module is available.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from instructretro import data
from instructretro.chunks import SampleLayout, chunk_table
from instructretro.errors import PipelineError
from instructretro.pretrain_data import (PretrainSamples, TrainOrder, eval_indices, fact_flags_for_store,
                                         fact_token_flags, token_char_spans)
from instructretro.tokenizer import EOD_ID, Tokenizer
from instructretro.tokenstore import TokenStore, TokenStoreWriter

from conftest import REPO, read_jsonl, run_stage

CL, SEQ = 64, 256


def write_store(corpus: Path, tok: Tokenizer, out: Path, valid_fraction: float) -> Path:
    w = TokenStoreWriter(out, tok.vocab_size, tok.eod_id)
    for doc in data.iter_documents(corpus):
        split = "valid" if data.is_valid_split(doc.doc_id, valid_fraction) else "train"
        w.add(split, doc.doc_id, tok.encode(doc.text))
    w.close({"corpus": str(corpus)})
    return out


def write_neighbor_inputs(root: Path, pretrain_tokens: Path, db_tokens: Path, k_save: int = 3, seed: int = 0) -> None:
    """Random neighbor ids per query chunk, plus ``db/embeddings.h5`` (chunks, doc_ids)."""
    db = TokenStore(db_tokens, "train")
    table = chunk_table(db.doc_lengths(), CL)
    (root / "db").mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "db" / "embeddings.h5", "w") as f:
        f["chunks"] = np.stack([table["doc"], table["start"], table["length"]], axis=1).astype(np.int64)
        f["doc_ids"] = db.doc_ids[table["doc"]]
        f["embeddings"] = np.zeros((len(table), 4), np.float32)
        f.attrs.update(encoder="none", chunk_length=CL, dim=4)
    rng = np.random.default_rng(seed)
    (root / "neighbors").mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "neighbors" / "neighbors.h5", "w") as f:
        for split in ("train", "valid"):
            n = len(SampleLayout(TokenStore(pretrain_tokens, split), CL, SEQ).chunks)
            ids = rng.integers(0, len(table), (n, k_save))
            ids[:, -1] = -1  # the last column is always "none"
            f[split] = ids


def simple_neighbor_tokens(db_tokens: Path):
    """Neighbor tokens as the contract defines them (chunk + continuation, -1 masked)."""
    db = TokenStore(db_tokens, "train")
    table = chunk_table(db.doc_lengths(), CL)

    def fn(ids):
        ids = np.asarray(ids)
        toks = np.full(ids.shape + (2 * CL,), EOD_ID, np.int64)
        mask = np.zeros(ids.shape + (2 * CL,), bool)
        for pos, i in np.ndenumerate(ids):
            if i < 0:
                continue
            doc, start, _ = table[i]
            seg = db.doc(doc)[start : start + 2 * CL]
            toks[pos][: len(seg)] = seg
            mask[pos][: len(seg)] = True
        return toks, mask

    return fn


@pytest.fixture(scope="module")
def inputs(small_world, small_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_inputs")
    tok = Tokenizer(small_tokenizer)
    write_store(small_world / "documents.jsonl", tok, root / "tokens" / "pretrain", 0.15)
    write_store(small_world / "reference.jsonl", tok, root / "tokens" / "db", 0.0)
    write_neighbor_inputs(root, root / "tokens" / "pretrain", root / "tokens" / "db")
    return root


# ------------------------------------------------------------------------------ fact tokens


def test_token_char_spans_cover_text_including_byte_fallback(small_tokenizer):
    tok = Tokenizer(small_tokenizer)
    text = "Entity 漢字 founded in 1832 by Ünïcode people.\nNext line."
    ids, spans = token_char_spans(tok, text)
    assert ids == tok.encode(text)
    assert spans[0, 0] == 0 and spans[-1, 1] == len(text)
    assert (spans[:, 1] > spans[:, 0]).all()
    assert (np.diff(spans[:, 0]) >= 0).all()


def test_fact_flags_mark_exactly_the_tokens_inside_the_span(small_tokenizer):
    tok = Tokenizer(small_tokenizer)
    text = "The capital is Zorbatown and the river is long."
    start = text.index("Zorbatown")
    ids, flags = fact_token_flags(tok, text, [[start, start + len("Zorbatown")]], "x")
    _, spans = token_char_spans(tok, text)
    covered = "".join(text[a:b] for (a, b), f in zip(spans, flags) if f)
    assert covered.strip() == "Zorbatown" or "Zorbatown" in covered
    assert len(covered) < len("Zorbatown") + 3  # at most the adjoining space
    with pytest.raises(PipelineError, match="fact_spans"):
        fact_token_flags(tok, text, [[5, 999]], "doc.jsonl:3")


def test_fact_mask_points_at_labels_that_are_fact_tokens(inputs, small_world, small_tokenizer):
    tok = Tokenizer(small_tokenizer)
    store = TokenStore(inputs / "tokens" / "pretrain", "valid")
    flags = fact_flags_for_store(small_world / "documents.jsonl", tok, store)
    assert flags is not None and len(flags) == len(store)
    samples = PretrainSamples(store, CL, SEQ, fact_flags=flags)
    total = 0
    for s in range(len(samples)):
        b = samples.batch([s])
        fm, labels, lm = b["fact_mask"][0].numpy(), b["labels"][0].numpy(), b["loss_mask"][0].numpy()
        assert (fm <= lm).all()  # fact positions are loss positions
        for j, (doc, start, length) in enumerate(samples.layout.sample_rows(s)):
            for i in range(length):
                pos = j * CL + i
                nxt = start + i + 1
                expect = nxt < len(flags[doc]) and flags[doc][nxt]
                assert fm[pos] == expect
                if expect:
                    assert labels[pos] == store.doc(doc)[nxt]
        total += fm.sum()
    share = total / sum(len(store.doc(i)) for i in range(len(store)))
    assert 0.05 < share < 0.9  # the world states facts in a good share of its tokens


def test_fact_flags_reject_a_store_built_with_another_tokenizer(inputs, small_world, tmp_path):
    other = tmp_path / "other.model"
    from instructretro import tokenizer

    other.write_bytes(tokenizer.train(["completely different text " * 50], 300, 10**6))
    store = TokenStore(inputs / "tokens" / "pretrain", "valid")
    with pytest.raises(PipelineError, match="tokens differ"):
        fact_flags_for_store(small_world / "documents.jsonl", Tokenizer(other), store)


# ------------------------------------------------------------------------------ samples, neighbors


def test_batches_carry_each_chunks_own_neighbors_and_shuffled_ones_come_from_elsewhere(inputs):
    store = TokenStore(inputs / "tokens" / "pretrain", "valid")
    with h5py.File(inputs / "neighbors" / "neighbors.h5") as f:
        ids = f["valid"][...]
    nt = simple_neighbor_tokens(inputs / "tokens" / "db")
    samples = PretrainSamples(store, CL, SEQ, ids, nt, num_neighbors=2)
    n, m = len(samples), SEQ // CL
    assert n >= 2
    b = samples.batch([0, 1])
    assert b["neighbors"].shape == (2, m, 2, 2 * CL) and b["neighbor_mask"].dtype == torch.bool
    want, want_mask = nt(ids[m : 2 * m, :2])
    assert np.array_equal(b["neighbors"][1].numpy(), want)
    assert np.array_equal(b["neighbor_mask"][1].numpy(), want_mask)
    shuffled = samples.batch([0, 1], shuffled_neighbors=True)
    other = (1 + n // 2) % n
    assert other != 1
    assert np.array_equal(shuffled["neighbors"][1].numpy(), nt(ids[other * m : (other + 1) * m, :2])[0])
    assert torch.equal(shuffled["tokens"], b["tokens"])  # only the neighbors move


def test_no_retrieval_validation_is_the_decoder_alone(inputs):
    """``loss_no_retrieval`` equals a GPT holding the Retro's decoder weights, and differs from
    the loss with neighbors once chunked cross-attention does something."""
    from types import SimpleNamespace

    from instructretro import presets
    from instructretro.model import Retro, load_decoder_weights
    from instructretro.pretrain import validation_fn

    store = TokenStore(inputs / "tokens" / "pretrain", "valid")
    with h5py.File(inputs / "neighbors" / "neighbors.h5") as f:
        ids = f["valid"][...]
    samples = PretrainSamples(store, CL, SEQ, ids, simple_neighbor_tokens(inputs / "tokens" / "db"), num_neighbors=1)
    config = presets.get("tiny", vocab_size=store.vocab_size, seq_length=SEQ, chunk_length=CL,
                         n_layers=2, cca_layers=(2,), encoder_layers=1)
    torch.manual_seed(0)
    retro = Retro(config)
    with torch.no_grad():  # make CCA matter: at the init std (0.02) it barely moves the loss
        for name, p in retro.named_parameters():
            if "cca" in name:
                p.normal_(0, 0.2)
    gpt = Retro(dataclasses.replace(config, retro=False))
    assert load_decoder_weights(gpt, retro.state_dict()) == []
    cfg = SimpleNamespace(eval_batches=2, micro_batch=2)
    out = validation_fn(retro, samples, cfg, 0, 1, None)()
    plain = validation_fn(gpt, PretrainSamples(store, CL, SEQ), cfg, 0, 1, None)()
    assert out["loss_no_retrieval"] == pytest.approx(plain["loss"], abs=1e-5)
    assert abs(out["loss"] - out["loss_no_retrieval"]) > 1e-3
    assert "loss_no_retrieval" not in plain


def test_samples_reject_neighbors_of_another_layout(inputs):
    store = TokenStore(inputs / "tokens" / "pretrain", "valid")
    nt = simple_neighbor_tokens(inputs / "tokens" / "db")
    with pytest.raises(PipelineError, match="rerun query-neighbors"):
        PretrainSamples(store, CL, SEQ, np.zeros((3, 2), np.int64), nt, num_neighbors=2)
    with h5py.File(inputs / "neighbors" / "neighbors.h5") as f:
        ids = f["valid"][...]
    with pytest.raises(PipelineError, match="num_neighbors_save"):
        PretrainSamples(store, CL, SEQ, ids, nt, num_neighbors=5)


def test_train_order_is_a_permutation_per_epoch_split_over_ranks_and_resumable():
    n, mb, ga, world = 10, 2, 2, 2
    orders = [TrainOrder(n, mb, ga, world, r, seed=3) for r in range(world)]
    seen = []
    for step in range(5):  # 5 steps x 2 micro x 2 ranks x 2 samples = 40 samples = 4 epochs
        for micro in range(ga):
            for o in orders:
                seen.extend(o.indices(step, micro).tolist())
    for e in range(4):
        assert sorted(seen[e * n : (e + 1) * n]) == list(range(n))
    assert seen[:n] != seen[n : 2 * n]  # a fresh permutation each epoch
    fresh = TrainOrder(n, mb, ga, world, 1, seed=3)  # a restarted process
    assert np.array_equal(fresh.indices(3, 1), orders[1].indices(3, 1))


def test_eval_indices_are_fixed_spread_and_split_over_ranks():
    a = eval_indices(100, eval_batches=3, micro_batch=4, world_size=2, rank=0)
    b = eval_indices(100, eval_batches=3, micro_batch=4, world_size=2, rank=1)
    allidx = np.concatenate(a + b)
    assert len(allidx) == 24 and len(np.unique(allidx)) == 24
    assert allidx.min() == 0 and allidx.max() == 99
    small = eval_indices(5, eval_batches=3, micro_batch=4, world_size=1, rank=0)
    assert sorted(np.concatenate(small).tolist()) == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------ the stage


def write_params(path: Path, world: Path, **pretrain) -> Path:
    import yaml

    base = yaml.safe_load((REPO / "params.yaml").read_text())
    base["corpus"]["pretrain"] = str(world / "documents.jsonl")
    base["pretrain"].update(dict(steps=6, micro_batch=2, grad_accum=1, warmup=2, eval_interval=3,
                                 eval_batches=2, save_interval=3, init_from="", skip_train=False))
    base["pretrain"].update(pretrain)
    path.write_text(yaml.safe_dump(base))
    return path


def stage_args(inputs: Path, tmp: Path, params: Path, tag: str, tokenizer: Path) -> list:
    return ["--params", params, "--tokens", inputs / "tokens" / "pretrain",
            "--neighbors", inputs / "neighbors" / "neighbors.h5", "--db-tokens", inputs / "tokens" / "db",
            "--embeddings", inputs / "db" / "embeddings.h5", "--tokenizer", tokenizer,
            "--out", tmp / f"ckpt_{tag}", "--work", tmp / "work", "--live", tmp / f"live_{tag}",
            "--metrics", tmp / f"metrics_{tag}.json"]


def have_neighbors_module() -> bool:
    try:
        import instructretro.neighbors  # noqa: F401 (needs faiss)
    except ImportError:
        return False
    return True


@pytest.fixture
def one_thread(monkeypatch):
    """Stage subprocesses with one intra-op thread (a busy shared CPU makes OpenMP threads that
    wait on each other 10x slower on tiny ops) and no inherited torch.distributed settings."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # a single process picks its own free port


def set_model(params: Path, **model) -> Path:
    import yaml

    cfg = yaml.safe_load(params.read_text())
    cfg["model"].update(model)
    params.write_text(yaml.safe_dump(cfg))
    return params


def test_stage_trains_gpt_then_retro_continues_from_it(inputs, small_world, small_tokenizer, tmp_path, one_thread):
    """GPT run: metrics, export, DVCLive plots. Then Retro with ``init_from`` the GPT export
    (continued pretraining), and eval-only of the GPT export (the reference's --skip-train)."""
    params = set_model(write_params(tmp_path / "params.yaml", small_world), retro=False)
    r = run_stage("pretrain.py", *stage_args(inputs, tmp_path, params, "gpt", small_tokenizer))
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "metrics_gpt.json").read_text())
    assert m["steps"] == 6 and m["retro"] is False and m["resumed_at"] == 0
    assert m["val_ppl"] == pytest.approx(np.exp(m["val_loss"]))
    assert m["val_loss_facts"] is not None and m["val_loss_shuffled"] is None and m["val_loss_no_retrieval"] is None
    assert m["tokens_per_s"] > 0 and m["train_loss"] is not None
    ckpt = tmp_path / "ckpt_gpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors", "train.json"]
    assert json.loads((ckpt / "config.json").read_text())["retro"] is False
    live = tmp_path / "live_gpt" / "plots" / "metrics"
    assert len((live / "train" / "loss.tsv").read_text().splitlines()) == 1 + 6
    vrows = (live / "val" / "loss.tsv").read_text().splitlines()
    assert vrows[0].split("\t")[0] == "step" and [row.split("\t")[0] for row in vrows[1:]] == ["3", "6"]

    if have_neighbors_module():
        params = set_model(write_params(tmp_path / "params.yaml", small_world, init_from=str(ckpt)), retro=True)
        r = run_stage("pretrain.py", *stage_args(inputs, tmp_path, params, "cont", small_tokenizer))
        assert r.returncode == 0, r.stderr[-3000:]
        assert "decoder weights from" in r.stderr + r.stdout
        mc = json.loads((tmp_path / "metrics_cont.json").read_text())
        assert mc["retro"] is True and mc["val_loss_shuffled"] is not None
        assert mc["val_loss"] < m["val_loss"] + 0.5  # it started from the trained decoder, not from scratch

    r = run_stage("pretrain.py", *stage_args(inputs, tmp_path, params, "c", small_tokenizer)[:-2],
                  "--metrics", tmp_path / "metrics_eval.json", "--eval-only", ckpt)
    assert r.returncode == 0, r.stderr[-3000:]
    me = json.loads((tmp_path / "metrics_eval.json").read_text())
    assert me["steps"] == 0 and me["retro"] is False
    assert me["val_loss"] == pytest.approx(m["val_loss"], abs=1e-4)
    assert not (tmp_path / "ckpt_c").exists()


def test_stage_resumes_a_killed_run_and_ends_where_an_uninterrupted_run_ends(
        inputs, small_world, small_tokenizer, tmp_path, one_thread):
    """Retro, 6 steps. A run stopped after step 3 (``--stop-after``, as if killed after its
    checkpoint) and restarted continues at step 3 and ends with the same weights as one run.
    A finished run leaves no work folder, so running it again (``dvc repro -f``) trains from
    scratch; a changed param or code file never resumes another run's checkpoint."""
    if not have_neighbors_module():
        pytest.skip("instructretro.neighbors not there yet")
    params = set_model(write_params(tmp_path / "params.yaml", small_world, steps=6, save_interval=3), retro=True)
    full = stage_args(inputs, tmp_path / "full", params, "full", small_tokenizer)
    r = run_stage("pretrain.py", *full)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "full" / "metrics_full.json").read_text())
    assert m["retro"] is True and m["val_loss_shuffled"] is not None and m["val_loss_facts"] is not None
    assert m["val_loss_no_retrieval"] is not None
    assert not [p for p in (tmp_path / "full" / "work").iterdir() if p.is_dir()]  # finished: nothing to resume
    weights = (tmp_path / "full" / "ckpt_full" / "model.safetensors").read_bytes()

    part = stage_args(inputs, tmp_path / "part", params, "part", small_tokenizer)
    r = run_stage("pretrain.py", *part, "--stop-after", 3)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "part" / "ckpt_part").exists()
    r = run_stage("pretrain.py", *part)
    assert r.returncode == 0, r.stderr[-3000:]
    mp = json.loads((tmp_path / "part" / "metrics_part.json").read_text())
    assert mp["resumed_at"] == 3 and mp["val_loss"] == m["val_loss"]
    assert (tmp_path / "part" / "ckpt_part" / "model.safetensors").read_bytes() == weights
    rows = (tmp_path / "part" / "live_part" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert [row.split("\t")[0] for row in rows[1:]] == ["1", "2", "3", "4", "5", "6"]

    # The same run again (a forced rerun): trained from scratch, same bytes, a complete log.
    r = run_stage("pretrain.py", *part)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((tmp_path / "part" / "metrics_part.json").read_text())
    assert "resumed" not in r.stderr and again["resumed_at"] == 0
    assert {k: v for k, v in again.items() if k not in ("resumed_at", "tokens_per_s")} == \
        {k: v for k, v in mp.items() if k not in ("resumed_at", "tokens_per_s")}
    assert (tmp_path / "part" / "ckpt_part" / "model.safetensors").read_bytes() == weights
    rows = (tmp_path / "part" / "live_part" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert [row.split("\t")[0] for row in rows[1:]] == ["1", "2", "3", "4", "5", "6"]

    # A changed code file (the stage script's bytes) never resumes the old run's checkpoint.
    script = tmp_path / "stage" / "pretrain.py"
    script.parent.mkdir()
    shutil.copy(REPO / "stages" / "pretrain.py", script)
    r = run_stage(script, *part, "--stop-after", 3)
    assert r.returncode == 0, r.stderr[-3000:]
    script.write_text(script.read_text() + "# changed\n")
    r = run_stage(script, *part)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" not in r.stderr
    assert json.loads((tmp_path / "part" / "metrics_part.json").read_text())["resumed_at"] == 0
    assert (tmp_path / "part" / "ckpt_part" / "model.safetensors").read_bytes() == weights
    assert len([p for p in (tmp_path / "part" / "work").iterdir() if p.is_dir()]) == 1  # the old run's, kept

    # A changed param never resumes the other run's checkpoint.
    set_model(write_params(tmp_path / "params.yaml", small_world, steps=6, save_interval=3, lr=5e-4), retro=True)
    r = run_stage("pretrain.py", *part, "--stop-after", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" not in r.stderr
    assert len([p for p in (tmp_path / "part" / "work").iterdir() if p.is_dir()]) == 2


def test_stage_refuses_a_planted_pickle_in_a_resume_checkpoint(inputs, small_world, small_tokenizer, tmp_path,
                                                                one_thread):
    """Resume loads checkpoint files weights-only: a pickle that would run code is refused with a
    one-line error, and its code never runs."""
    params = set_model(write_params(tmp_path / "params.yaml", small_world, steps=4, save_interval=2), retro=False)
    args = stage_args(inputs, tmp_path, params, "p", small_tokenizer)
    r = run_stage("pretrain.py", *args, "--stop-after", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    [states] = (tmp_path / "work").glob("*/step*/mp_rank_00_model_states.pt")
    marker = tmp_path / "pwned"
    torch.save(Payload(str(marker)), states)
    r = run_stage("pretrain.py", *args)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and "mp_rank_00_model_states.pt" in err[-1] and "refused" in err[-1], err[-5:]
    assert "Traceback" not in r.stderr
    assert not marker.exists()


class Payload:
    """Unpickling this runs ``os.system('touch <path>')``."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.path}",)


def test_stage_errors_name_the_param(inputs, small_world, small_tokenizer, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_stage", REPO / "stages" / "pretrain.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    for bad, key in [(dict(lr=-1.0), "pretrain.lr"), (dict(skip_train=True), "pretrain.init_from"),
                     (dict(init_from=str(tmp_path / "nope")), "pretrain.init_from")]:
        params = write_params(tmp_path / "params.yaml", small_world, **bad)
        with pytest.raises(SystemExit) as exc:
            stage.main([str(a) for a in stage_args(inputs, tmp_path, params, "x", small_tokenizer)])
        assert exc.value.code == 1
        err = capsys.readouterr().err
        assert key in err and len(err.strip().splitlines()) == 1, err


def test_eval_and_continued_pretraining_refuse_a_checkpoint_of_another_tokenizer(inputs, small_world, small_tokenizer,
                                                                                  tmp_path, capsys):
    import importlib.util

    from instructretro import presets
    from instructretro.checkpoint import export_checkpoint
    from instructretro.model import Retro

    spec = importlib.util.spec_from_file_location("pretrain_stage", REPO / "stages" / "pretrain.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    cfg = presets.get("tiny", vocab_size=Tokenizer(small_tokenizer).vocab_size, n_layers=2, cca_layers=(2,), retro=False)
    export_checkpoint(Retro(cfg), cfg, tmp_path / "gpt", extra={"tokenizer": {"path": "other.model", "sha256": "f" * 64}})
    for params, extra in [(write_params(tmp_path / "cont.yaml", small_world, init_from=str(tmp_path / "gpt")), []),
                          (write_params(tmp_path / "eval.yaml", small_world), ["--eval-only", tmp_path / "gpt"])]:
        with pytest.raises(SystemExit) as exc:
            stage.main([str(a) for a in stage_args(inputs, tmp_path, params, "x", small_tokenizer) + extra])
        assert exc.value.code == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {tmp_path / 'gpt'}: trained with tokenizer other.model (sha256 ffffffffffff), "
                              f"but the tokenizer here is {small_tokenizer}") and "\n" not in err, err


def test_gpt_flag_trains_the_baseline_without_reading_neighbors(inputs, small_world, small_tokenizer, tmp_path,
                                                                 one_thread):
    """Stage pretrain-gpt: ``--gpt`` trains GPT whatever model.retro says, and needs no
    neighbors, DB tokens or embeddings (its dvc.yaml deps list none of them)."""
    params = set_model(write_params(tmp_path / "params.yaml", small_world, steps=2, eval_interval=2), retro=True)
    args = stage_args(inputs, tmp_path, params, "gpt", small_tokenizer)
    for flag in ("--neighbors", "--db-tokens", "--embeddings"):
        args[args.index(flag) + 1] = tmp_path / "absent"
    r = run_stage("pretrain.py", *args, "--gpt")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "metrics_gpt.json").read_text())
    assert m["retro"] is False and m["steps"] == 2 and m["val_loss_shuffled"] is None
    assert json.loads((tmp_path / "ckpt_gpt" / "config.json").read_text())["retro"] is False


def test_retro_and_gpt_runs_see_identical_samples_and_evaluation_batches(inputs, small_world, small_tokenizer,
                                                                         tmp_path, monkeypatch):
    """What ``run_pretrain`` hands the training loop for Retro and for GPT (stages pretrain and
    pretrain-gpt): the same decoder weights at step 0, the same training batches (tokens,
    labels, loss masks, fact masks) in the same order for every step and micro batch, and the
    same evaluation batches; only Retro's carry neighbors."""
    from instructretro import presets
    from instructretro import train as T
    from instructretro.pretrain import run_pretrain
    from instructretro.pretrain_data import PretrainInputs

    if not have_neighbors_module():
        pytest.skip("needs the neighbors module")
    seen: dict[bool, dict] = {}

    def record_evaluate(model, batches, *args, **kwargs):
        seen[model.module.config.retro]["eval"].append(list(batches))
        return {"loss": 1.0}

    def record_train(engine, cfg, batch_fn, loss_fn, eval_fn=None, *args, **kwargs):
        run = seen[engine.module.config.retro] = {"eval": []}
        run["weights"] = {k: v.clone() for k, v in engine.module.state_dict().items()}
        run["train"] = [batch_fn(step, micro) for step in range(cfg.steps) for micro in range(cfg.grad_accum)]
        eval_fn()
        return {"val/loss": 1.0, "train/loss": 1.0}

    monkeypatch.setattr(T, "evaluate", record_evaluate)
    monkeypatch.setattr(T, "train", record_train)
    paths = PretrainInputs(str(inputs / "tokens" / "pretrain"), str(inputs / "neighbors" / "neighbors.h5"),
                           str(inputs / "tokens" / "db"), str(inputs / "db" / "embeddings.h5"),
                           str(small_tokenizer), str(small_world / "documents.jsonl"))
    cfg = T.TrainConfig(steps=3, micro_batch=2, grad_accum=2, warmup=1, eval_batches=2, seed=7)
    vocab = TokenStore(inputs / "tokens" / "pretrain", "train").vocab_size
    for retro in (True, False):
        config = presets.get("tiny", vocab_size=vocab, hidden=32, heads=2, n_layers=2, cca_layers=(2,),
                             encoder_layers=1, seq_length=SEQ, chunk_length=CL, retro=retro)
        run_pretrain(paths, config, cfg, None, tmp_path / ("work_retro" if retro else "work_gpt"), None)
    retro, gpt = seen[True], seen[False]
    assert set(gpt["weights"]) < set(retro["weights"])
    assert all(torch.equal(retro["weights"][k], v) for k, v in gpt["weights"].items())

    def same(a: list[dict], b: list[dict]) -> None:
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert "neighbors" in x and "neighbors" not in y
            assert set(x) - {"neighbors", "neighbor_mask"} == set(y)
            for key in y:
                assert x[key].dtype == y[key].dtype and x[key].numpy().tobytes() == y[key].numpy().tobytes(), key

    same(retro["train"], gpt["train"])
    assert len(gpt["eval"]) == 1 and len(retro["eval"]) == 2  # Retro: its neighbors, then shuffled ones
    assert all("fact_mask" in b for b in gpt["eval"][0])
    same(retro["eval"][0], gpt["eval"][0])
    same(retro["eval"][1], gpt["eval"][0])
