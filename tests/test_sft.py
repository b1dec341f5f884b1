"""Instruction tuning: blend, prompt format, loss mask, truncation, retrieval modes, training."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from instructretro import prompts, sft
from instructretro.errors import PipelineError
from instructretro.tokenizer import EOD_ID, PAD_ID, Tokenizer

from conftest import REPO


@pytest.fixture(scope="module")
def tok(small_tokenizer) -> Tokenizer:
    return Tokenizer(small_tokenizer)


def _write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _conv(q: str, a: str, system: str = "Be brief.") -> dict:
    return {"system": system, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


class FakeRetriever:
    """The Retriever API over a list of texts: search returns ids by word overlap (deterministic)."""

    def __init__(self, texts: list[str], chunk_length: int = 8):
        self.texts = texts
        self.chunk_length = chunk_length
        self.queries: list[str] = []

    def search(self, texts, n):
        self.queries += list(texts)
        out = []
        for t in texts:
            words = set(t.lower().split())
            scores = [(-len(words & set(x.lower().split())), i) for i, x in enumerate(self.texts)]
            out.append([i for _, i in sorted(scores)[:n]])
        return np.asarray(out, dtype=np.int64)

    def chunk_text(self, i, continuation=True):
        return self.texts[int(i)]

    def neighbor_tokens(self, ids):
        ids = np.asarray(ids)
        r = 2 * self.chunk_length
        tokens = np.where(ids[..., None] >= 0, ids[..., None] % 50 + 3, EOD_ID).repeat(r, -1)
        return tokens.astype(np.int64), np.broadcast_to((ids >= 0)[..., None], tokens.shape).copy()


# ---------------------------------------------------------------------------------------------
# Prompt format and loss mask


def test_prompt_is_the_reference_format():
    turns = [("user", "Who founded Ab?"), ("assistant", " Bo did. "), ("user", "When?"), ("assistant", "In 1900.")]
    text = prompts.render(prompts.prompt_segments("Be brief.", turns, ["ctx one", "ctx two"]))
    assert text == ("System: Be brief.\n\nctx one\n\nctx two\n\nUser: Who founded Ab?\n\nAssistant: Bo did.\n\n"
                    "User: When?\n\nAssistant: In 1900.")
    assert prompts.format_prompt("S", "Q?") == "System: S\n\nUser: Q?\n\nAssistant:"


def test_loss_mask_covers_exactly_the_answers_and_eod(tok):
    turns = [("user", "Where is Tamor?"), ("assistant", "Tamor lies on the coast."),
             ("user", "And its mayor?"), ("assistant", "Its mayor is Lina Oss.")]
    segs = prompts.prompt_segments("Answer briefly.", turns)
    tokens, answer, start = prompts.tokenize_segments(tok, segs)
    assert tok.decode(tokens) == prompts.render(segs)
    assert tokens[-1] == EOD_ID and answer[-1]
    # the masked tokens are exactly the two answers (with their leading space) and the EOD
    runs, cur = [], []
    for t, a in zip(tokens.tolist(), answer.tolist()):
        if a:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    runs.append(cur)
    assert [tok.decode(r) for r in runs] == [" Tamor lies on the coast.", " Its mayor is Lina Oss."]
    assert runs[-1][-1] == EOD_ID
    assert tok.decode(tokens[start:]) == " Its mayor is Lina Oss."
    s = sft.fit_sample(tokens, answer, start, seq_length=512)
    assert s is not None and not s.truncated
    # the model reads tokens[:-1] and is scored on labels tokens[1:] where the mask is on
    assert len(s.inputs) == len(s.labels) == len(s.loss_mask) == len(tokens) - 1
    scored = s.labels[s.loss_mask]
    assert scored[-1] == EOD_ID
    assert int(s.loss_mask.sum()) == int(answer.sum()) - (1 if answer[0] else 0)


# ---------------------------------------------------------------------------------------------
# Truncation


def _toy(prompt_len: int, answer_len: int):
    tokens = np.concatenate([np.arange(10, 10 + prompt_len), np.arange(500, 500 + answer_len - 1), [EOD_ID]])
    answer = np.r_[np.zeros(prompt_len, bool), np.ones(answer_len, bool)]
    return tokens.astype(np.int64), answer, prompt_len


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_answer():
    tokens, answer, start = _toy(prompt_len=20, answer_len=5)
    # exactly fits: 24 inputs
    s = sft.fit_sample(tokens, answer, start, seq_length=24)
    assert not s.truncated and np.array_equal(s.tokens, tokens)
    # one short: the first prompt token goes
    s = sft.fit_sample(tokens, answer, start, seq_length=23)
    assert s.truncated and np.array_equal(s.tokens, tokens[1:]) and len(s.inputs) == 23
    # the answer needs 5 targets: 5 inputs (the last prompt token + 4 answer tokens)
    s = sft.fit_sample(tokens, answer, start, seq_length=5)
    assert s.truncated and np.array_equal(s.tokens, tokens[19:])
    assert sft.fit_sample(tokens, answer, start, seq_length=4) is None


def test_encoder_alignment_puts_the_answer_on_a_chunk_boundary():
    tokens, answer, start = _toy(prompt_len=13, answer_len=6)
    s = sft.fit_sample(tokens, answer, start, seq_length=32, align=8, pad_id=PAD_ID)
    assert not s.truncated
    first_answer = int(np.flatnonzero(s.answer)[0])
    assert first_answer % 8 == 0 and first_answer == 16
    assert (s.tokens[:3] == PAD_ID).all() and not s.answer[:3].any()
    assert len(s.inputs) <= 32
    # room for only one whole chunk of prompt: the last 8 prompt tokens stay, no padding
    s = sft.fit_sample(tokens, answer, start, seq_length=20, align=8)
    assert s.truncated and np.array_equal(s.tokens, tokens[5:])
    assert int(np.flatnonzero(s.answer)[0]) == 8 and len(s.inputs) <= 20
    # no whole chunk of prompt fits: dropped
    assert sft.fit_sample(tokens, answer, start, seq_length=12, align=8) is None


# ---------------------------------------------------------------------------------------------
# Blend: formats, errors, sampling


def test_both_formats_parse_and_a_malformed_record_names_file_and_line(tmp_path):
    root = tmp_path / "sft"
    _write_jsonl(root / "chat.jsonl", [_conv(f"q{i}?", f"a{i}.") for i in range(30)])
    _write_jsonl(root / "alp.jsonl", [{"instruction": "Add.", "input": f"{i} 1", "output": str(i + 1)} for i in range(10)])
    (root / "list.json").write_text(json.dumps([_conv("x?", "y.")] * 3))
    blend = sft.parse_blend({
        "chat": {"path": "chat.jsonl", "format": "conversation", "prob": 8},
        "alp": {"path": "alp.jsonl", "format": "alpaca", "prob": 1},
        "list": {"path": "list.json", "format": "auto", "prob": 1},
    }, root=root)
    assert [round(e.prob, 3) for e in blend] == [0.8, 0.1, 0.1]
    train, valid = sft.load_split(blend[1], 0.0)
    assert len(train) == 10 and not valid
    assert train[3] == {"system": "", "turns": [("user", "Add.\n\n3 1"), ("assistant", "4")]}
    train, valid = sft.load_split(blend[0], 0.3)
    assert len(train) + len(valid) == 30 and 0 < len(valid) < 30
    assert sft.load_split(blend[0], 0.3) == (train, valid)  # deterministic split
    bad = _write_jsonl(root / "bad.jsonl", [_conv("q?", "a."), _conv("q?", "a."),
                                            {"messages": [{"role": "user", "content": "only a question"}]}])
    with pytest.raises(PipelineError, match=r"bad\.jsonl:3:"):
        sft.load_split(sft.BlendEntry("bad", bad, "conversation", 1.0), 0.0)
    (root / "broken.jsonl").write_text(json.dumps(_conv("q?", "a.")) + "\n{not json\n")
    with pytest.raises(PipelineError, match=r"broken\.jsonl:2: malformed JSON"):
        sft.load_split(sft.BlendEntry("broken", root / "broken.jsonl", "auto", 1.0), 0.0)


@pytest.mark.parametrize("blend, message", [
    ({"a": {"path": "missing.jsonl", "format": "auto", "prob": 1}}, r"'sft.blend.a.path': missing.jsonl not found"),
    ({"a": {"path": "sft", "format": "auto", "prob": 1}}, r"'sft.blend.a.path' 'sft' is a folder"),
    ({"a": {"path": "out/x.jsonl", "prob": 1}}, r"'sft.blend.a.path' 'out/x.jsonl' is inside the sft stage's own output"),
    ({"a": {"path": "sft/a.jsonl", "prob": 1}, "b": {"path": "./sft/a.jsonl", "prob": 1}},
     r"'sft.blend.b.path' './sft/a.jsonl' is also the file of 'sft.blend.a'"),
    ({"a": {"path": "sft/a.jsonl", "format": "sharegpt", "prob": 1}}, r"'sft.blend.a.format' is 'sharegpt'"),
    ({"a": {"path": "sft/a.jsonl", "format": "auto", "prob": 0}}, r"'sft.blend.a.prob' must be a number > 0"),
    ({"a": {"path": "sft/a.jsonl", "prob": 1, "weight": 2}}, r"'sft.blend.a' has unknown keys \['weight'\]"),
    ({"a.b": {"path": "sft/a.jsonl", "prob": 1}}, r"dataset name 'a.b'"),
    ({}, r"'sft.blend' must be a non-empty mapping"),
    ([{"name": "a", "path": "sft/a.jsonl", "prob": 1}], r"'sft.blend' is a list; write it as a mapping"),
])
def test_bad_blend_entries_name_the_key(tmp_path, blend, message):
    _write_jsonl(tmp_path / "sft" / "a.jsonl", [_conv("q?", "a.")])
    _write_jsonl(tmp_path / "out" / "x.jsonl", [_conv("q?", "a.")])
    with pytest.raises(PipelineError, match=message):
        sft.parse_blend(blend, root=tmp_path, out="out")


def test_blend_mixes_generated_sets_and_files_anywhere(tmp_path):
    """Each entry names its own file: a generated set beside a user's file in another folder."""
    _write_jsonl(tmp_path / "data" / "world" / "sft" / "chat.jsonl", [_conv("q?", "a.")] * 4)
    _write_jsonl(tmp_path / "mine" / "alpaca_data.jsonl", [{"instruction": "Say hi.", "output": "hi"}] * 2)
    blend = sft.parse_blend({"chat": {"path": "data/world/sft/chat.jsonl", "format": "conversation", "prob": 3},
                             "mine": {"path": "mine/alpaca_data.jsonl", "format": "alpaca", "prob": 1}}, root=tmp_path)
    assert [(e.name, e.path, e.prob) for e in blend] == [
        ("chat", tmp_path / "data/world/sft/chat.jsonl", 0.75), ("mine", tmp_path / "mine/alpaca_data.jsonl", 0.25)]
    assert sft.load_split(blend[1], 0.0)[0][0]["turns"] == [("user", "Say hi."), ("assistant", "hi")]


def test_blend_records_must_match_the_files_and_stale_ones_are_removed(tmp_path):
    """The sft stage checks what the sft-blend@<name> stages recorded against the files."""
    _write_jsonl(tmp_path / "a.jsonl", [_conv("q?", "a.")] * 3)
    blend = sft.parse_blend({"a": {"path": "a.jsonl", "format": "conversation", "prob": 1}}, root=tmp_path)
    records = tmp_path / "records"
    assert sft.check_stamps(blend, records) == []  # no folder: the script run outside DVC
    records.mkdir()
    with pytest.raises(PipelineError, match=r"'sft\.blend\.a': .*a\.json does not record .*stage sft-blend@a"):
        sft.check_stamps(blend, records)
    (records / "a.json").write_text(json.dumps(sft.blend_stamp(blend[0], 3)))
    (records / "gone.json").write_text("{}")
    assert sft.check_stamps(blend, records) == ["gone"] and not (records / "gone.json").exists()
    _write_jsonl(tmp_path / "a.jsonl", [_conv("q?", "b.")] * 3)  # edited after it was recorded
    with pytest.raises(PipelineError, match=r"does not record"):
        sft.check_stamps(blend, records)


def test_blend_sampling_matches_the_probabilities():
    probs = np.array([0.817, 0.05, 0.05, 0.04, 0.03, 0.01, 0.003])
    probs = probs / probs.sum()
    n = 100_000
    which = sft.blend_schedule(probs, n)
    counts = np.bincount(which, minlength=len(probs))
    assert np.all(np.abs(counts - probs * n) <= 1)
    # every prefix of the schedule keeps the proportions too (a short run is still a blend)
    prefix = np.bincount(which[:1000], minlength=len(probs))
    assert np.all(np.abs(prefix - probs * 1000) <= 1)
    # inside a dataset: whole shuffled epochs, so each record is drawn floor or ceil of epochs times
    sizes = [500, 7, 40, 3, 100, 9, 2]
    which, index = sft.draw(sizes, probs, n, seed=5)
    for d, size in enumerate(sizes):
        per_record = np.bincount(index[which == d], minlength=size)
        epochs = counts[d] / size
        assert per_record.min() >= np.floor(epochs) and per_record.max() <= np.ceil(epochs)
    again = sft.draw(sizes, probs, n, seed=5)
    assert np.array_equal(again[1], index)
    assert not np.array_equal(sft.draw(sizes, probs, n, seed=6)[1], index)


# ---------------------------------------------------------------------------------------------
# The whole data side with each retrieval mode


def _blend(tmp_path) -> list:
    root = tmp_path / "sft"
    facts = [f"Entity{i} was founded in {1800 + i} by Person{i}." for i in range(20)]
    _write_jsonl(root / "chat.jsonl", [_conv(f"When was Entity{i} founded?", facts[i]) for i in range(20)])
    _write_jsonl(root / "long.jsonl", [_conv("Tell me a story. " * 200, "Once.")] * 2 + [_conv("Hi?", "word " * 600)])
    blend = sft.parse_blend({"chat": {"path": "chat.jsonl", "format": "conversation", "prob": 0.75},
                             "long": {"path": "long.jsonl", "format": "auto", "prob": 0.25}}, root=root)
    return blend, facts


@pytest.mark.parametrize("mode", ["none", "prompt", "encoder"])
def test_build_data_per_mode(tmp_path, tok, mode):
    blend, facts = _blend(tmp_path)
    retriever = FakeRetriever(facts, chunk_length=64) if mode != "none" else None
    d = sft.build_data(blend, tok, seq_length=256, chunk_length=64, num_draws=400, retrieval=mode,
                       retriever=retriever, num_contexts=2, num_neighbors=3, valid_fraction=0.2, seed=1)
    rep = d.report
    assert rep["chat"]["drawn"] == 300 and rep["long"]["drawn"] == 100
    assert rep["long"]["train_dropped"] + rep["long"]["train_truncated"] + rep["long"]["valid_dropped"] \
        + rep["long"]["valid_truncated"] == 3
    assert rep["chat"]["epochs"] == pytest.approx(300 / rep["chat"]["train_samples"], abs=1e-3)
    assert "chat" in sft.format_report(rep)
    for samples in d.train + d.valid:
        for s in samples:
            assert len(s.inputs) <= 256 and s.tokens[-1] == EOD_ID
    s = d.train[0][0]
    text = tok.decode(s.tokens)
    if mode == "prompt":
        # the top-2 facts by overlap with the question are in the prompt, before the user turn
        q = text[text.index("User:"):]
        assert len(s.contexts) == 2 and facts[s.contexts[0]] in text[: text.index("User:")]
        assert "founded" in q
        assert s.neighbors is None
    elif mode == "encoder":
        assert s.neighbors.shape == (-(-len(s.inputs) // 64), 3)
        assert int(np.flatnonzero(s.answer)[0]) % 64 == 0
        assert "Entity" not in text[: text.index("User:")]
    else:
        assert s.neighbors is None and not s.contexts


def test_unknown_mode_and_missing_retriever(tmp_path, tok):
    blend, _ = _blend(tmp_path)
    with pytest.raises(PipelineError, match="sft.retrieval"):
        sft.build_data(blend, tok, seq_length=256, chunk_length=64, num_draws=4, retrieval="both")
    with pytest.raises(PipelineError, match="needs a retriever"):
        sft.build_data(blend, tok, seq_length=256, chunk_length=64, num_draws=4, retrieval="prompt")


def test_presets_and_overrides():
    s = sft.sft_settings("843m")
    assert (s["global_batch"], s["lr"], s["steps"], s["beta1"], s["beta2"], s["weight_decay"], s["clip"]) == \
        (128, 5e-6, 1000, 0.9, 0.98, 0.01, 1.0)
    assert sft.sft_settings("tiny", {"lr": 1e-3, "steps": None})["lr"] == 1e-3
    # the preset's warmup shrinks to a shorter run silently; an explicit one is clamped later, with a note
    assert sft.sft_settings("tiny")["warmup"] == 20
    assert sft.sft_settings("tiny", {"steps": 4, "warmup": None})["warmup"] == 4
    assert sft.sft_settings("tiny", {"steps": 4, "warmup": 30})["warmup"] == 30
    # the retrieval warmup: off in every SFT preset, sft.retrieval_warmup reaches the TrainConfig
    assert sft.sft_settings("tiny")["retrieval_warmup"] == 0
    ramped = sft.sft_settings("tiny", {"retrieval_warmup": 7})
    assert sft.train_config(ramped, 1, seed=3, eval_interval=100, save_interval=10**9).retrieval_warmup == 7
    with pytest.raises(PipelineError, match="model.name"):
        sft.sft_settings("7b")
    with pytest.raises(PipelineError, match="sft.lrate"):
        sft.sft_settings("tiny", {"lrate": 1.0})


# ---------------------------------------------------------------------------------------------
# Training and the stage


def _tiny_model(vocab_size: int, seed: int = 0):
    import torch

    from instructretro import presets
    from instructretro.model import Retro

    torch.manual_seed(seed)
    return Retro(presets.get("tiny", vocab_size=vocab_size, n_layers=2, cca_layers=(2,)))


def test_a_few_sft_steps_lower_the_answer_loss(tmp_path, tok):
    from instructretro import train

    blend, _ = _blend(tmp_path)
    d = sft.build_data(blend[:1], tok, seq_length=128, chunk_length=64, num_draws=12 * 8, valid_fraction=0.0, seed=3)
    model = _tiny_model(tok.vocab_size)
    settings = sft.sft_settings("tiny", {"steps": 12, "global_batch": 8, "micro_batch": 4, "lr": 3e-3,
                                         "lr_schedule": "constant"})
    cfg = sft.train_config(settings, 1, seed=3, eval_interval=100, save_interval=10**9)
    assert (cfg.grad_accum, cfg.min_lr, cfg.beta2) == (2, cfg.lr, 0.98)  # constant lr, the SFT betas
    cosine = sft.train_config(sft.sft_settings("tiny"), 1, seed=3, eval_interval=100, save_interval=10**9)
    assert cosine.min_lr == pytest.approx(cosine.lr / 10)  # the tiny default decays to lr / 10
    engine = train.build_engine(model, cfg)
    loss_fn = sft.make_loss_fn(d.names)
    samples = d.train[0]
    batches = lambda: (sft.collate(samples[i : i + 8], 64, None, [0] * len(samples[i : i + 8]))
                       for i in range(0, len(samples), 8))
    before = train.evaluate(engine, batches(), loss_fn)
    sft.finetune(engine, cfg, d, chunk_length=64, progress=False)
    after = train.evaluate(engine, batches(), loss_fn)
    assert before["loss_count"] == after["loss_count"] == sum(int(s.loss_mask.sum()) for s in d.train[0])
    assert after["loss"] < before["loss"] - 0.5, (before, after)
    assert after["loss_chat"] == pytest.approx(after["loss"])


def test_collate_pads_to_chunks_and_gathers_neighbors(tok):
    r = FakeRetriever(["a", "b", "c"], chunk_length=64)
    a = sft.Sample(np.arange(3, 73), np.r_[np.zeros(60, bool), np.ones(10, bool)], neighbors=np.array([[0, 1], [2, -1]]))
    b = sft.Sample(np.arange(3, 13), np.r_[np.zeros(5, bool), np.ones(5, bool)], neighbors=np.array([[1, 2]]))
    batch = sft.collate([a, b], 64, r, [0, 1])
    assert batch["tokens"].shape == (2, 128) and batch["neighbors"].shape == (2, 2, 2, 128)
    assert batch["loss_mask"].sum().item() == 10 + 5  # the answers; the first token is never a target
    assert not batch["neighbor_mask"][1, 1].any() and not batch["neighbor_mask"][0, 1, 1].any()
    assert batch["neighbor_mask"][0, 0].all()
    # right padding repeats the samples' last token (a real sample's EOD): after every real token, outside the loss
    assert batch["tokens"][1, 9:].eq(int(a.tokens[-1])).all() and batch["dataset"].tolist() == [0, 1]


def _run_stage(*args, cwd):
    """Run stages/sft.py in a fresh process (without this process's torch.distributed settings)."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, str(REPO / "stages" / args[0]), *map(str, args[1:])], cwd=cwd,
                          capture_output=True, text=True, env=dict(env, PYTHONHASHSEED="0"))


def _stage_setup(tmp_path, small_world, small_tokenizer, tok, **sft_params):
    import yaml

    from instructretro import checkpoint

    model = _tiny_model(tok.vocab_size)
    checkpoint.export_checkpoint(model, model.config, tmp_path / "ckpt")
    params = {
        "retro": {"chunk_length": 64},
        "model": {"name": "tiny"},
        "sft": {
            "init_from": str(tmp_path / "ckpt"),
            "blend": {"chat": {"path": str(small_world / "sft" / "chat.jsonl"), "format": "conversation", "prob": 0.7},
                      "short_qa": {"path": str(small_world / "sft" / "short_qa.jsonl"), "format": "conversation",
                                   "prob": 0.2},
                      "alpaca": {"path": str(small_world / "sft" / "alpaca.jsonl"), "format": "alpaca", "prob": 0.1}},
            "valid_fraction": 0.1, "valid_samples": 8, "system": "Be brief.", "retrieval": "none",
            "num_contexts": 2, "num_neighbors": None, "nprobe": 4, "efsearch": 16, "seed": 5, "eval_interval": 2,
            "save_interval": 2,
            **{k: None for k in sft.TRAIN_KEYS},
            "seq_length": 256, "steps": 4, "global_batch": 4, "micro_batch": 2,
        },
    }
    params["sft"].update(sft_params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return ["sft.py", "--params", tmp_path / "params.yaml", "--tokenizer", small_tokenizer,
            "--out", tmp_path / "out", "--metrics", tmp_path / "metrics.json", "--live", tmp_path / "live",
            "--work", tmp_path / "work"]


def test_stage_tunes_exports_and_reports_the_blend(tmp_path, small_world, small_tokenizer, tok):
    from instructretro import checkpoint

    args = _stage_setup(tmp_path, small_world, small_tokenizer, tok)
    proc = _run_stage(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert np.isfinite(m["val_loss"]) and m["steps"] == 4 and m["retrieval"] == "none"
    assert {n: c["drawn"] for n, c in m["blend"].items()} == {"chat": 11, "short_qa": 3, "alpaca": 2}
    assert set(m["val_loss_by_dataset"]) == {"chat", "short_qa", "alpaca"}
    model = checkpoint.load_model(tmp_path / "out")
    assert model.config.seq_length == 256 and model.config.name == "tiny"
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert list((tmp_path / "live" / "plots" / "metrics").rglob("*.tsv"))
    recorded = json.loads((tmp_path / "out" / "train.json").read_text())["tokenizer"]
    assert recorded == checkpoint.tokenizer_record(small_tokenizer)
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    # deterministic: the same run gives the same weights and metrics
    assert _run_stage(*args, cwd=tmp_path).returncode == 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == first
    assert json.loads((tmp_path / "metrics.json").read_text()) == m


def test_stage_killed_after_a_checkpoint_resumes_to_the_same_weights(tmp_path, small_world, small_tokenizer, tok):
    """SIGKILL the stage once it has saved a resume checkpoint; the rerun continues from it and
    ends with the bytes of an uninterrupted run, with the whole DVCLive log."""
    import os
    import signal
    import sys
    import time

    args = _stage_setup(tmp_path, small_world, small_tokenizer, tok, steps=8, save_interval=2)

    def where(tag):  # argparse keeps the last value of a repeated option
        return ["--out", tmp_path / f"out_{tag}", "--work", tmp_path / f"work_{tag}", "--live",
                tmp_path / f"live_{tag}", "--metrics", tmp_path / f"metrics_{tag}.json"]

    proc = _run_stage(*args, *where("full"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    full = json.loads((tmp_path / "metrics_full.json").read_text())
    assert full["resumed_at"] == 0 and not list((tmp_path / "work_full").glob("*/latest"))

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, str(REPO / "stages" / "sft.py"), *map(str, args[1:] + where("part"))]
    run = subprocess.Popen(cmd, cwd=tmp_path, env=dict(env, PYTHONHASHSEED="0"), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not list((tmp_path / "work_part").glob("*/latest")):
        assert run.poll() is None, "the run ended before it saved a checkpoint"
        assert time.time() - t0 < 600
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (tmp_path / "out_part").exists()

    proc = _run_stage(*args, *where("part"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    part = json.loads((tmp_path / "metrics_part.json").read_text())
    assert 0 < part["resumed_at"] < 8 and "resumed from" in proc.stdout
    assert {k: v for k, v in part.items() if k != "resumed_at"} == {k: v for k, v in full.items() if k != "resumed_at"}
    assert (tmp_path / "out_part" / "model.safetensors").read_bytes() == \
        (tmp_path / "out_full" / "model.safetensors").read_bytes()
    rows = (tmp_path / "live_part" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert [row.split("\t")[0] for row in rows[1:]] == [str(i) for i in range(1, 9)]


def test_stage_refuses_a_checkpoint_trained_with_another_tokenizer(tmp_path, small_world, small_tokenizer, tok):
    """One line naming both, before any retrieval or training."""
    args = _stage_setup(tmp_path, small_world, small_tokenizer, tok)
    (tmp_path / "ckpt" / "train.json").write_text(json.dumps({"tokenizer": {"path": "old.model", "sha256": "0" * 64}}))
    proc = _run_stage(*args, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'ckpt'}: trained with tokenizer old.model (sha256 000000000000), "
                           f"but the tokenizer here is {small_tokenizer} (sha256 "), line


def test_stage_refuses_encoder_retrieval_for_a_gpt_checkpoint(tmp_path, small_world, small_tokenizer, tok):
    """One line before any retrieval (it would search for minutes and change nothing)."""
    import torch

    from instructretro import checkpoint, presets
    from instructretro.model import Retro

    torch.manual_seed(0)
    gpt = Retro(presets.get("tiny", vocab_size=tok.vocab_size, n_layers=2, cca_layers=(2,), retro=False))
    checkpoint.export_checkpoint(gpt, gpt.config, tmp_path / "gpt")
    args = _stage_setup(tmp_path, small_world, small_tokenizer, tok, init_from=str(tmp_path / "gpt"),
                        retrieval="encoder")
    proc = _run_stage(*args, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip() == (f"error: {tmp_path / 'params.yaml'}: param 'sft.retrieval' is 'encoder', but the "
                                   "checkpoint is a GPT (model.retro=false: no encoder to feed); use prompt or none, "
                                   "or a Retro checkpoint")
    assert not (tmp_path / "out").exists()


def test_stage_names_a_malformed_record(tmp_path, small_world, small_tokenizer, tok):
    data = tmp_path / "sftdata"
    _write_jsonl(data / "chat.jsonl", [_conv("q?", "a.")] * 3)
    with open(data / "chat.jsonl", "a") as f:
        f.write('{"messages": [{"role": "user", "content": 3}]}\n')
    args = _stage_setup(tmp_path, small_world, small_tokenizer, tok,
                        blend={"chat": {"path": "sftdata/chat.jsonl", "format": "conversation", "prob": 1}})
    proc = _run_stage(*args, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "chat.jsonl:4:" in proc.stderr


def test_stage_checks_the_blend_records_and_trains_on_every_entry(tmp_path, small_world, small_tokenizer, tok):
    """The records the sft-blend@<name> stages write must match the blend files; then the
    generated set and the user's own file train together."""
    _write_jsonl(tmp_path / "mine" / "own.jsonl", [{"instruction": "Say hello.", "output": "hello"}] * 3)
    blend = {"chat": {"path": str(small_world / "sft" / "chat.jsonl"), "format": "conversation", "prob": 1},
             "own": {"path": "mine/own.jsonl", "format": "alpaca", "prob": 1}}
    args = _stage_setup(tmp_path, small_world, small_tokenizer, tok, blend=blend)
    records = tmp_path / "data" / "sft-blend"
    records.mkdir(parents=True)
    for name in blend:
        r = subprocess.run([sys.executable, str(REPO / "stages" / "sft_blend.py"), name, "--params",
                            str(tmp_path / "params.yaml"), "--out", str(records / f"{name}.json")],
                           cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    _write_jsonl(tmp_path / "mine" / "own.jsonl", [{"instruction": "Say hi.", "output": "hi"}] * 3)  # edited
    proc = _run_stage(*args, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "param 'sft.blend.own'" in proc.stderr and "stage sft-blend@own writes it" in proc.stderr
    r = subprocess.run([sys.executable, str(REPO / "stages" / "sft_blend.py"), "own", "--params",
                        str(tmp_path / "params.yaml"), "--out", str(records / "own.json")],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and "3 records" in r.stdout, r.stderr[-2000:]
    proc = _run_stage(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert {n: c["drawn"] for n, c in m["blend"].items()} == {"chat": 8, "own": 8}


def test_make_sft_resolves_the_preset():
    def dry(*args):
        out = subprocess.run(["make", "-n", "sft", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout
        return [line for line in out.splitlines() if "sft" in line or "dvc" in line]

    default = dry()
    assert any(line.endswith("dvc repro sft") for line in default) and not any("-S" in line for line in default)
    big = dry("MODEL=843m")
    assert any("stages/sft.py --estimate --model 843m" in line for line in big)
    assert any(line.endswith("dvc exp run -S model.name=843m sft") for line in big)
    smoke = dry("MODEL=843m", "SMOKE=1")
    assert any("stages/sft.py --smoke --model 843m" in line for line in smoke)
    assert not any("exp run" in line for line in smoke)


def test_a_blend_name_given_twice_is_an_error(tmp_path):
    from instructretro import params

    p = tmp_path / "params.yaml"
    p.write_text("sft:\n  blend:\n    chat: {path: a.jsonl, prob: 1}\n    mine: {path: b.jsonl, prob: 1}\n"
                 "    chat: {path: c.jsonl, prob: 1}\n")
    with pytest.raises(PipelineError, match=r"params\.yaml:5: not valid YAML \(duplicate key 'chat'\)"):
        params.load(p)


def test_records_with_given_passages_need_no_retriever(tmp_path, tok):
    """Prompt mode: records that carry ``ctxs`` (passages retrieved ahead of time, as the GPU
    bundle ships them) put their first n passages in the prompt, as QA records do; no search."""
    root = tmp_path / "sft"
    recs = [{**_conv(f"When was Entity{i} founded?", f"In {1800 + i}."),
             "ctxs": [f"Entity{i} was founded in {1800 + i}.", {"title": "Extra", "text": f"Person{i}."}, "third"]}
            for i in range(12)]
    _write_jsonl(root / "chat.jsonl", recs)
    blend = sft.parse_blend({"chat": {"path": "chat.jsonl", "format": "conversation", "prob": 1.0}}, root=root)
    assert sft.all_given_contexts(blend, "prompt") and not sft.all_given_contexts(blend, "encoder")
    d = sft.build_data(blend, tok, seq_length=256, chunk_length=64, num_draws=12, retrieval="prompt",
                       retriever=None, num_contexts=2, valid_fraction=0.0, seed=1)
    texts = [tok.decode(s.tokens) for s in d.train[0]]
    assert len(texts) == 12
    for i, text in enumerate(sorted(texts, key=lambda t: int(t.split("Entity")[1].split()[0]))):
        assert f"Entity{i} was founded in {1800 + i}." in text and f"Extra\nPerson{i}." in text
        assert "third" not in text  # num_contexts = 2
    _write_jsonl(root / "chat.jsonl", recs[:-1] + [_conv("When?", "Now.")])  # one record without ctxs
    assert not sft.all_given_contexts(blend, "prompt")
    with pytest.raises(PipelineError, match="needs a retriever"):
        sft.build_data(blend, tok, seq_length=256, chunk_length=64, num_draws=4, retrieval="prompt")
