"""DeepSpeed training on CPU, in this process: the engine from params, the schedule, the generic
loop (loss goes down), resume (same step count, same weights), export/load, GPT -> Retro."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from instructretro import presets
from instructretro import checkpoint, dist
from instructretro import train as T
from instructretro.errors import PipelineError
from instructretro.model import Retro
from instructretro.params import Params

VOCAB, CL, SEQ = 64, 16, 64
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def tiny_config(retro: bool):
    return presets.get("tiny", vocab_size=VOCAB, hidden=32, heads=2, n_layers=2, cca_layers=(2,),
                       encoder_layers=1, seq_length=SEQ, chunk_length=CL, retro=retro, num_neighbors=1)


def cfg(**kw) -> T.TrainConfig:
    base = dict(steps=12, micro_batch=4, grad_accum=2, lr=3e-3, min_lr=3e-4, warmup=2, eval_interval=6,
                eval_batches=1, save_interval=4, seed=0)
    base.update(kw)
    return T.TrainConfig(**base)


def batch_fn(step: int, micro: int) -> dict:
    """A learnable pattern: the next token is the current one plus 1 (mod VOCAB); neighbors are
    copies of the sequence's chunk, so Retro could copy."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    start = torch.randint(3, VOCAB, (4, 1), generator=g)
    seq = (start + torch.arange(SEQ + 1)) % VOCAB
    tokens, labels = seq[:, :-1], seq[:, 1:]
    nb = tokens.view(4, SEQ // CL, 1, CL).repeat(1, 1, 1, 2)
    return {"tokens": tokens, "labels": labels, "loss_mask": torch.ones(4, SEQ),
            "neighbors": nb, "neighbor_mask": torch.ones_like(nb, dtype=torch.bool)}


@pytest.fixture(scope="module", autouse=True)
def distributed():
    """One gloo process; one intra-op thread (on a busy shared CPU, OpenMP threads that wait on
    each other make tiny ops 10x slower)."""
    saved = {k: os.environ.get(k) for k in DIST_ENV}
    dist.init_distributed()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for k, v in saved.items():  # stage subprocesses started later must not reuse our port
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_config_from_params_names_the_bad_key_and_fills_nulls_from_the_preset():
    good = {f.name: getattr(cfg(), f.name) for f in dataclasses.fields(T.TrainConfig)}
    assert T.TrainConfig.from_params(Params({"pretrain": good}), "pretrain") == cfg()
    for key, value in [("lr", 0.0), ("zero_stage", 4), ("precision", "fp16"), ("warmup", -1), ("beta2", 1.0)]:
        with pytest.raises(PipelineError, match=f"pretrain.{key}"):
            T.TrainConfig.from_params(Params({"pretrain": {**good, key: value}}), "pretrain")
    with pytest.raises(PipelineError, match="pretrain.steps' must be int"):
        T.TrainConfig.from_params(Params({"pretrain": {**good, "steps": "ten"}}), "pretrain")
    filled = T.TrainConfig.from_params(Params({"pretrain": {**good, "lr": None}}), "pretrain", {"lr": 0.5})
    assert filled.lr == 0.5
    with pytest.raises(PipelineError, match="pretrain.lr' is null"):
        T.TrainConfig.from_params(Params({"pretrain": {**good, "lr": None}}), "pretrain")


def test_a_warmup_longer_than_the_run_is_clamped_with_one_note(capsys):
    """pretrain and SFT agree: warmup > steps is clamped to steps, and one line says so."""
    from instructretro import sft

    good = {f.name: getattr(cfg(), f.name) for f in dataclasses.fields(T.TrainConfig)}
    clamped = T.TrainConfig.from_params(Params({"pretrain": {**good, "steps": 5, "warmup": 10}}), "pretrain")
    assert clamped.warmup == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pretrain.warmup' is 10" in err[0] and "clamped to 5" in err[0]
    settings = sft.sft_settings("tiny", {"steps": 4, "warmup": 30, "global_batch": 8, "micro_batch": 8})
    assert sft.train_config(settings, 1, seed=0, eval_interval=2, save_interval=2).warmup == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sft.warmup' is 30" in err[0] and "clamped to 4" in err[0]
    assert T.lr_multiplier(clamped)(4) == 1.0  # the peak at the last step


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    c = cfg(steps=103, warmup=2, lr=1.0, min_lr=0.1)
    f = T.lr_multiplier(c)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0)
    assert f(2) == pytest.approx(1.0)
    assert f(52) == pytest.approx(0.55)  # halfway through the decay
    assert f(102) == pytest.approx(0.1)
    vals = [f(s) for s in range(2, 103)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_deepspeed_config_carries_the_recipe():
    d = T.deepspeed_config(cfg(zero_stage=2, precision="bf16", clip=0.5), world_size=4)
    assert d["train_batch_size"] == 4 * 2 * 4
    assert d["zero_optimization"]["stage"] == 2 and d["bf16"]["enabled"] and d["gradient_clipping"] == 0.5
    assert d["optimizer"]["type"] == "AdamW" and d["optimizer"]["params"]["torch_adam"] is True
    assert d["optimizer"]["params"]["betas"] == [0.9, 0.95]


def test_norms_get_no_weight_decay():
    model = Retro(tiny_config(True))
    decay, no_decay = T.param_groups(model, 0.1)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_retrieval_warmup_ramps_the_encoder_and_cca_on_top_of_the_schedule():
    c = cfg(steps=103, warmup=2, lr=1.0, min_lr=0.1, retrieval_warmup=10)
    base, ramped = T.lr_multiplier(c), T.lr_multiplier(c, retrieval=True)
    assert T.lr_multiplier(c, retrieval=False)(0) == base(0) == pytest.approx(0.5)
    for step in range(103):
        assert ramped(step) == pytest.approx(base(step) * min(1.0, (step + 1) / 10))
    assert T.lr_multiplier(cfg(retrieval_warmup=0), retrieval=True)(0) == T.lr_multiplier(cfg())(0)
    with pytest.raises(PipelineError, match=r"param 'pretrain\.retrieval_warmup' must be >= 0, got -1"):
        cfg(retrieval_warmup=-1).validate("param 'pretrain.")


@pytest.mark.parametrize("freeze", [False, True])
def test_retrieval_warmup_gives_the_encoder_and_cca_their_own_learning_rate(freeze):
    """The optimizer's groups: the decoder's at the schedule's lr, Retro's encoder and CCA (and
    only they) ramped; with the decoder frozen, only the retrieval groups."""
    c = cfg(steps=20, warmup=2, retrieval_warmup=8, freeze_decoder=freeze)
    model = Retro(tiny_config(True))
    engine = T.build_engine(model, c)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = engine.optimizer.param_groups
    kinds = [{Retro.is_retro_parameter(names[id(p)]) for p in g["params"]} for g in groups]
    assert all(len(k) == 1 for k in kinds)  # no group mixes decoder and retrieval parameters
    retrieval = [k == {True} for k in kinds]
    assert retrieval == ([True, True] if freeze else [False, False, True, True])
    lrs = engine.get_lr()
    for lr, is_retrieval in zip(lrs, retrieval):
        assert lr == pytest.approx(c.lr * T.lr_multiplier(c, retrieval=is_retrieval)(0))
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    if not freeze:
        assert lrs[0] == pytest.approx(8 * lrs[2])  # step 0: the ramp's first eighth


@pytest.mark.parametrize("zero,precision", [(2, "bf16"), (3, "fp32")])
def test_retrieval_warmup_schedules_the_groups_under_zero(zero, precision):
    """ZeRO keeps the four groups (it partitions each one), and the scheduler moves the
    retrieval groups along their ramp."""
    c = cfg(steps=3, warmup=1, retrieval_warmup=8, zero_stage=zero, precision=precision)
    torch.manual_seed(0)
    engine = T.build_engine(Retro(tiny_config(True)), c)
    expected = lambda step: [c.lr * T.lr_multiplier(c, retrieval=r)(step) for r in (False, False, True, True)]  # noqa: E731
    assert engine.get_lr() == pytest.approx(expected(0))
    out = T.train(engine, c, batch_fn, T.lm_loss, None, None, progress=False)
    assert math.isfinite(out["train/loss"]) and engine.get_lr() == pytest.approx(expected(c.steps))


def test_retrieval_warmup_leaves_a_gpt_and_the_default_groups_alone():
    gpt = T.build_engine(Retro(tiny_config(False)), cfg(retrieval_warmup=8))
    assert len(gpt.optimizer.param_groups) == 2
    retro = T.build_engine(Retro(tiny_config(True)), cfg())
    assert len(retro.optimizer.param_groups) == 2 and len(set(retro.get_lr())) == 1


@pytest.mark.parametrize("retro,precision,zero", [(True, "fp32", 0), (False, "bf16", 2)])
def test_training_lowers_the_loss(retro, precision, zero, tmp_path):
    torch.manual_seed(0)
    c = cfg(precision=precision, zero_stage=zero)
    engine = T.build_engine(Retro(tiny_config(retro)), c)
    held_out = [batch_fn(999, 0)]
    before = T.evaluate(engine, held_out, T.lm_loss, engine.device)["loss"]
    out = T.train(engine, c, batch_fn, T.lm_loss, lambda: T.evaluate(engine, held_out, T.lm_loss, engine.device),
                  tmp_path / "work", progress=False)
    assert out["step"] == c.steps and math.isfinite(out["train/loss"])
    assert out["val/loss"] < before - 0.3, (before, out["val/loss"])
    assert out["train/lr"] == pytest.approx(c.min_lr, rel=1e-6)  # the last step runs at min_lr


def test_resume_continues_the_same_step_count_and_weights(tmp_path):
    c = cfg()
    torch.manual_seed(0)
    full = T.build_engine(Retro(tiny_config(True)), c)
    T.train(full, c, batch_fn, T.lm_loss, None, tmp_path / "full", progress=False)

    torch.manual_seed(0)
    part = T.build_engine(Retro(tiny_config(True)), c)
    T.train(part, c, batch_fn, T.lm_loss, None, tmp_path / "part", progress=False, stop_after=5)
    assert sorted(p.name for p in (tmp_path / "part").glob("step*")) == ["step00000005"]  # only the last kept

    torch.manual_seed(123)  # a restarted process: other fresh weights, then the checkpoint
    again = T.build_engine(Retro(tiny_config(True)), c)
    start = T.resume(again, tmp_path / "part")
    assert start == 5
    assert again.get_lr()[0] == pytest.approx(c.lr * T.lr_multiplier(c)(5))
    out = T.train(again, c, batch_fn, T.lm_loss, None, tmp_path / "part", start_step=start, progress=False)
    assert out["step"] == c.steps
    a, b = full.module.state_dict(), again.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert T.resume(again, tmp_path / "empty") == 0


@pytest.mark.parametrize("zero,precision", [(1, "bf16"), (2, "fp32"), (3, "fp32")])
def test_resume_loads_weights_only_at_every_zero_stage(zero, precision, tmp_path):
    """The optimizer states of ZeRO 1-3 hold DeepSpeed objects: the allowlist covers them."""
    c = cfg(steps=3, save_interval=1, zero_stage=zero, precision=precision, grad_accum=1)
    torch.manual_seed(0)
    full = T.build_engine(Retro(tiny_config(True)), c)
    T.train(full, c, batch_fn, T.lm_loss, None, None, progress=False)
    torch.manual_seed(0)
    part = T.build_engine(Retro(tiny_config(True)), c)
    T.train(part, c, batch_fn, T.lm_loss, None, tmp_path, progress=False, stop_after=1)
    torch.manual_seed(5)
    again = T.build_engine(Retro(tiny_config(True)), c)
    assert T.resume(again, tmp_path) == 1
    T.train(again, c, batch_fn, T.lm_loss, None, tmp_path, start_step=1, progress=False)
    a, b = checkpoint.full_state_dict(full), checkpoint.full_state_dict(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("latest", ["", "garbage\x00", "step00000099"])
def test_a_broken_latest_file_falls_back_to_the_newest_complete_step(latest, tmp_path, capsys):
    """DeepSpeed writes ``latest`` in place: a full disk can leave it empty. The run resumes from
    the intact step folder beside it (one note line), and with none it starts afresh."""
    c = cfg(steps=4)
    torch.manual_seed(0)
    engine = T.build_engine(Retro(tiny_config(False)), c)
    work = T.open_work(tmp_path / "root", {"params": {"a": 1}, "inputs": [], "code": []}, c.steps, 0)
    T.train(engine, c, batch_fn, T.lm_loss, None, work.dir, progress=False, stop_after=2)
    work.release()
    (work.dir / "latest").write_text(latest)
    work = T.open_work(tmp_path / "root", {"params": {"a": 1}, "inputs": [], "code": []}, c.steps, 0)
    assert "resuming from the newest complete one, step00000002" in capsys.readouterr().err
    assert T.resume(T.build_engine(Retro(tiny_config(False)), c), work.dir) == 2
    work.release()
    (work.dir / "latest").write_text("")
    shutil.rmtree(work.dir / "step00000002")
    work = T.open_work(tmp_path / "root", {"params": {"a": 1}, "inputs": [], "code": []}, c.steps, 0)
    assert "no complete step folder" in capsys.readouterr().err
    assert T.resume(T.build_engine(Retro(tiny_config(False)), c), work.dir) == 0
    work.release()


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_resume_refuses_a_checkpoint_that_unpickles_code(tmp_path):
    c = cfg(steps=4)
    engine = T.build_engine(Retro(tiny_config(False)), c)
    T.train(engine, c, batch_fn, T.lm_loss, None, tmp_path, progress=False, stop_after=2)
    [states] = tmp_path.glob("step*/mp_rank_00_model_states.pt")
    torch.save(Payload(tmp_path / "pwned"), states)
    with pytest.raises(PipelineError) as exc:
        T.resume(T.build_engine(Retro(tiny_config(False)), c), tmp_path)
    assert str(states) in str(exc.value) and "refused" in str(exc.value) and "\n" not in str(exc.value)
    assert "posix.system" in str(exc.value)
    assert not (tmp_path / "pwned").exists()


def test_export_then_load_gives_the_same_model_and_deterministic_bytes(tmp_path):
    torch.manual_seed(0)
    model = Retro(tiny_config(True))
    checkpoint.export_checkpoint(model, model.config, tmp_path / "a", extra={"steps": 0})
    checkpoint.export_checkpoint(model, model.config, tmp_path / "b", extra={"steps": 0})
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "a" / "config.json").read_text())["cca_layers"] == [2]
    loaded = checkpoint.load_model(tmp_path / "a")
    assert loaded.config == model.config
    b = batch_fn(0, 0)
    with torch.no_grad():
        assert torch.equal(loaded(b["tokens"], b["neighbors"]), model(b["tokens"], b["neighbors"]))
    with pytest.raises(PipelineError, match="no config.json"):
        checkpoint.load_model(tmp_path)


def test_gpt_checkpoint_starts_retro_with_the_same_decoder(tmp_path):
    torch.manual_seed(0)
    gpt = Retro(tiny_config(False))
    checkpoint.export_checkpoint(gpt, gpt.config, tmp_path / "gpt")
    torch.manual_seed(1)
    retro = Retro(tiny_config(True))
    encoder_before = retro.encoder.layers[0].mlp.down.weight.clone()
    fresh = checkpoint.init_from_checkpoint(retro, tmp_path / "gpt")
    assert fresh and all(Retro.is_retro_parameter(n) for n in fresh)
    assert torch.equal(retro.embed.weight, gpt.embed.weight)
    assert torch.equal(retro.encoder.layers[0].mlp.down.weight, encoder_before)
    b = batch_fn(0, 0)
    with torch.no_grad():  # with retrieval off, Retro is now exactly the GPT
        assert torch.allclose(retro(b["tokens"]), gpt(b["tokens"]), atol=1e-5)
    other = Retro(dataclasses.replace(tiny_config(False), hidden=64, ffn_hidden=0))
    checkpoint.export_checkpoint(other, other.config, tmp_path / "wide")
    with pytest.raises(PipelineError, match="shape"):
        checkpoint.init_from_checkpoint(Retro(tiny_config(True)), tmp_path / "wide")


def _logged(live_dir, name):
    """{step: value} of the DVCLive metric ``name`` (``train/grad_norm`` ...)."""
    lines = [line.split("\t") for line in (live_dir / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()]
    col = lines[0].index("step")
    return {int(row[col]): float(row[-1]) for row in lines[1:]}


@pytest.mark.parametrize("zero", [0, 3])
def test_gradient_norms_are_logged_and_the_parts_add_up_to_the_total(zero, tmp_path):
    """Every step logs the norm before clipping; Retro's decoder and retrieval parts are the
    two halves of it (their squares add up), and the total is the norm of the gradient of the
    step's mean loss, as plain torch computes it."""
    from dvclive import Live

    c = cfg(steps=2, zero_stage=zero, clip=0.5, lr=1e-2)
    torch.manual_seed(0)
    engine = T.build_engine(Retro(tiny_config(True)), c)
    torch.manual_seed(0)
    reference = Retro(tiny_config(True))
    live = Live(str(tmp_path / "live"), report=None, save_dvc_exp=False, dvcyaml=None)
    T.train(engine, c, batch_fn, T.lm_loss, None, None, live=live, progress=False)
    live.end()
    total, dec, ret = (_logged(tmp_path / "live", f"train/grad_norm{s}") for s in ("", "_decoder", "_retrieval"))
    assert sorted(total) == sorted(dec) == sorted(ret) == [1, 2]
    for step in total:
        assert dec[step] > 0 and ret[step] > 0
        assert dec[step] ** 2 + ret[step] ** 2 == pytest.approx(total[step] ** 2, rel=1e-5)
    losses = [T.lm_loss(reference, batch_fn(0, m))["loss"] for m in range(c.grad_accum)]
    (sum(s for s, _ in losses) / sum(n for _, n in losses)).backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()]))
    assert total[1] == pytest.approx(float(norm), rel=1e-4)  # step 1: before clipping (norm > clip)
    assert total[1] > c.clip


def test_gpt_logs_only_the_total_gradient_norm(tmp_path):
    from dvclive import Live

    c = cfg(steps=1)
    engine = T.build_engine(Retro(tiny_config(False)), c)
    live = Live(str(tmp_path / "live"), report=None, save_dvc_exp=False, dvcyaml=None)
    out = T.train(engine, c, batch_fn, T.lm_loss, None, None, live=live, progress=False)
    live.end()
    assert out["train/grad_norm"] > 0 and "train/grad_norm_decoder" not in out
    assert sorted(p.name for p in (tmp_path / "live" / "plots" / "metrics" / "train").glob("grad_norm*")) == \
        ["grad_norm.tsv"]


def test_live_log_without_dvclive_writes_dvclive_files(tmp_path, monkeypatch):
    """Where DVCLive is not installed (the GPU bundle's node) the curves go to DVCLive's file
    layout, which the resume truncation and the plots read."""
    import sys as _sys

    from instructretro import train as T

    monkeypatch.setitem(_sys.modules, "dvclive", None)  # import dvclive raises ImportError
    live = T.open_live(tmp_path / "live", tmp_path / "work", 0)
    assert isinstance(live, T.TsvLive)
    for step in (1, 2, 3):
        live.step = step
        live.log_metric("train/loss", 4.0 - step)
    live.log_metric("val/loss", 1.5)
    live.end()
    tsv = tmp_path / "live/plots/metrics/train/loss.tsv"
    rows = [line.split("\t") for line in tsv.read_text().splitlines()]
    assert rows[0] == ["timestamp", "step", "loss"] and [r[1:] for r in rows[1:]] == [["1", "3.0"], ["2", "2.0"], ["3", "1.0"]]
    summary = json.loads((tmp_path / "live/metrics.json").read_text())
    assert summary == {"step": 3, "train": {"loss": 1.0}, "val": {"loss": 1.5}}
    T._truncate_live_log(tmp_path / "live", 2)
    assert [line.split("\t")[1] for line in tsv.read_text().splitlines()[1:]] == ["1", "2"]


def test_the_curves_come_back_from_the_checkpoint_that_latest_names(tmp_path):
    """The DVCLive copy lives in the step folder and is written before DeepSpeed writes
    ``latest``: a run killed the moment ``latest`` names step 8 resumes with the curves up to
    step 8, and a copy in a step folder that ``latest`` does not name yet is not used."""
    live, work = tmp_path / "live", tmp_path / "work"

    class Killed(Exception):
        pass

    class Engine:  # writes its files, then ``latest``, as DeepSpeed does; ``kill`` ends the run there
        def __init__(self, kill=False):
            self.kill = kill

        def save_checkpoint(self, save_dir, tag, client_state):
            (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
            (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
            (Path(save_dir) / "latest").write_text(tag)
            if self.kill:
                raise Killed

    def log(upto):
        tsv = live / "plots" / "metrics" / "train" / "loss.tsv"
        tsv.parent.mkdir(parents=True, exist_ok=True)
        tsv.write_text("\n".join(["step\tloss", *(f"{s}\t{1.0 / s}" for s in range(1, upto + 1))]) + "\n")

    def restored():
        assert T.restore_live(live, work)
        T._truncate_live_log(live, T.latest_step(work))
        rows = (live / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
        return [int(r.split("\t")[0]) for r in rows[1:]]

    log(4)
    T.save_checkpoint(Engine(), work, 4, live_dir=live)
    assert (work / "step00000004" / "live").is_dir() and not (work / "live").exists()
    log(8)
    with pytest.raises(Killed):
        T.save_checkpoint(Engine(kill=True), work, 8, live_dir=live)
    log(10)
    assert restored() == list(range(1, 9))
    # killed inside step 12's save: its folder holds a copy, ``latest`` still names step 8
    (work / "step00000012").mkdir()
    log(12)
    T.snapshot_live(live, work / "step00000012")
    (live / "plots" / "metrics" / "train" / "loss.tsv").unlink()
    assert restored() == list(range(1, 9))
    assert not T.restore_live(live, tmp_path / "nothing_saved")
