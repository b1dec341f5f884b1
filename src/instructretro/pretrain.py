"""The pretraining run: what ``stages/pretrain.py`` calls.

``run_pretrain`` builds the model (fresh, from a GPT checkpoint's decoder, or loaded for
evaluation only), trains it with DeepSpeed on the samples of ``pretrain_data``, validates it
with two retrieval controls, and exports it. Resume checkpoints live in a work folder keyed by
everything the run depends on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import torch

from .errors import PipelineError
from .pretrain_data import PretrainInputs, PretrainSamples, TrainOrder, all_eval_batches, eval_indices, load_split


def fingerprint(paths, params: dict) -> str:
    """A short hash of ``params`` and the given input files (small files by content, large ones
    by size): the key of a run's resume folder, so a changed input never resumes another run."""
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
            if not f.exists():
                continue
            size = f.stat().st_size
            h.update(str(size).encode())
            if size <= 64 << 20:
                h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def without_retrieval(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without its neighbors: the model then runs with retrieval switched off
    (``neighbors=None``, the same logits as every neighbor masked), i.e. Retro's decoder alone."""
    return {k: v for k, v in batch.items() if k not in ("neighbors", "neighbor_mask")}


def validation_fn(model, valid: PretrainSamples, cfg, rank: int, world: int, device, shuffled: bool = True):
    """``eval_fn`` for the training loop: val loss (and fact-token loss), and for Retro two
    controls on the same samples: shuffled neighbors (``loss_shuffled``: does the model read
    *its* neighbors?) and no neighbors at all (``loss_no_retrieval``: how good is the decoder
    that trained beside retrieval, on its own?)."""
    from .train import evaluate, lm_loss

    batches = eval_indices(len(valid), cfg.eval_batches, cfg.micro_batch, world, rank)
    # Ranks get unequal batch counts (e.g. 160 samples in batches of 8 on 8 ranks: 3 or 2 each);
    # the short ones pad with a batch that counts zero tokens, so every rank runs as many
    # forward passes (ZeRO-3 gathers parameters in each).
    every = all_eval_batches(len(valid), cfg.eval_batches, cfg.micro_batch, world)
    pad_to = -(-len(every) // world)
    controls = shuffled and valid.k > 0
    names = ("loss", "loss_facts") if valid.fact_flags is not None else ("loss",)
    names += ("loss_no_retrieval",) if controls else ()

    def loss_fn(m, batch):  # each batch is built once for both the loss and its no-retrieval control
        out = lm_loss(m, batch)
        if controls:
            out["loss_no_retrieval"] = lm_loss(m, without_retrieval(batch))["loss"]
        return out

    def run() -> dict:
        out = evaluate(model, (valid.batch(b) for b in batches), loss_fn, device, names,
                       pad_to=pad_to, pad_batch=valid.batch(every[0]))
        if controls:
            mixed = evaluate(model, (valid.batch(b, shuffled_neighbors=True) for b in batches), lm_loss, device,
                             ("loss",), pad_to=pad_to, pad_batch=valid.batch(every[0], shuffled_neighbors=True))
            out["loss_shuffled"] = mixed["loss"]
        return out

    return run


def _truncate_live_log(live_dir: Path, step: int) -> None:
    """Drop DVCLive rows logged after ``step`` (a run killed after its last checkpoint)."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines()
        if not lines:
            continue
        header, rows = lines[0], lines[1:]
        col = header.split("\t").index("step") if "step" in header.split("\t") else None
        if col is None:
            continue
        keep = [r for r in rows if int(r.split("\t")[col]) <= step]
        tsv.write_text("\n".join([header, *keep]) + "\n")


def run_pretrain(inputs: PretrainInputs, model_config, cfg, out: str | os.PathLike | None,
                 work_root: str | os.PathLike, live_dir: str | os.PathLike | None,
                 init_from: str = "", skip_train: bool = False, stop_after: int | None = None) -> dict | None:
    """Train (or, with ``skip_train``, only evaluate ``init_from``), export to ``out`` (unless
    None), return the metrics.

    Resume checkpoints live in ``work_root/<fingerprint>``: a restarted run with the same
    inputs and params continues from the last one; any change starts a fresh folder. With
    ``stop_after`` the run stops at that step with a resume checkpoint and returns None.
    """
    from . import train as T
    from .model import Retro

    rank, world = T.init_distributed()
    if skip_train and not init_from:
        raise PipelineError("params.yaml: 'pretrain.skip_train' needs 'pretrain.init_from' (the checkpoint to evaluate)")
    torch.manual_seed(cfg.seed)
    if skip_train:
        model = T.load_model(init_from)
        model_config = model.config
    else:
        model = Retro(model_config)
        fresh = T.init_from_checkpoint(model, init_from) if init_from else []
        if init_from and is_main():
            print(f"pretrain: decoder weights from {init_from}; {len(fresh)} retrieval tensors fresh")
    n_params = sum(p.numel() for p in model.parameters())

    train_set = None if skip_train else load_split(inputs, model_config, "train")
    valid = load_split(inputs, model_config, "valid", fact_flags=True,
                       neighbor_tokens=getattr(train_set, "neighbor_tokens", None))
    if len(valid) == 0:
        raise PipelineError(f"{inputs.tokens}: the valid split is empty (set tokenize.pretrain_valid_fraction > 0)")

    start, summary = 0, {}
    if skip_train:
        device = T.local_device()  # cuda:LOCAL_RANK (no engine to pick it)
        model.to(device, torch.bfloat16 if cfg.precision == "bf16" else torch.float32)
        final = validation_fn(model, valid, cfg, rank, world, device)()
        engine = model
    else:
        key = fingerprint([inputs.tokens, inputs.neighbors if model_config.retro else inputs.tokens,
                           *([Path(init_from) / "model.safetensors"] if init_from else [])],
                          {"train": dataclasses.asdict(cfg), "model": model_config.to_dict(),
                           "init_from": init_from, "world": world})
        work_dir = Path(work_root) / key
        engine = T.build_engine(model, cfg)
        start = T.resume(engine, work_dir)
        live = None
        if is_main() and live_dir is not None:
            from dvclive import Live

            if start:
                T.restore_live(live_dir, work_dir)  # DVC removed the outputs before this run
                _truncate_live_log(Path(live_dir), start)
            if start < cfg.steps:  # a finished run's restored log stays as it is (summary included)
                live = Live(str(live_dir), resume=start > 0, report=None, save_dvc_exp=False, dvcyaml=None)
        if start and is_main():
            print(f"pretrain: resumed from {work_dir} at step {start}")
        order = TrainOrder(len(train_set), cfg.micro_batch, cfg.grad_accum, world, rank, cfg.seed)
        evaluate_now = validation_fn(engine, valid, cfg, rank, world, engine.device)
        summary = T.train(engine, cfg, lambda step, micro: train_set.batch(order.indices(step, micro)),
                          T.lm_loss, evaluate_now, work_dir, start_step=start, live=live, stop_after=stop_after)
        if stop_after is not None and stop_after < cfg.steps:
            if live is not None:
                live.end()
            return None
        kept = work_dir / "summary.json"  # the training numbers of a finished run, for a rerun
        if "val/loss" in summary:
            final = {k[4:]: v for k, v in summary.items() if k.startswith("val/")}
            if is_main():
                kept.write_text(json.dumps({k: summary.get(k) for k in ("train/loss", "mean_tokens_per_s")}))
        else:  # resumed at the end (e.g. only evaluation code changed): evaluate the loaded weights
            final = evaluate_now()
            if kept.is_file():
                summary = json.loads(kept.read_text())
        if live is not None:
            live.end()

    metrics = {
        "model": model_config.name, "retro": bool(model_config.retro), "parameters": int(n_params),
        "steps": cfg.steps if not skip_train else 0, "resumed_at": start,
        "val_loss": final["loss"], "val_ppl": math.exp(final["loss"]),
        "val_loss_shuffled": final.get("loss_shuffled"),
        "val_loss_no_retrieval": final.get("loss_no_retrieval"),
        "val_loss_facts": final.get("loss_facts"),
        "train_loss": summary.get("train/loss"),
        "tokens_per_s": summary.get("mean_tokens_per_s"),
        "valid_samples_evaluated": min(len(valid), cfg.eval_batches * cfg.micro_batch * world),
    }
    metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    if out is not None:
        T.export_checkpoint(engine, model_config, out, extra={"steps": metrics["steps"], "init_from": init_from,
                                                                   "precision": cfg.precision})
    return metrics


def is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def preset_training(preset: dict, world_size: int, micro_batch: int | None = None) -> dict:
    """A preset's pretraining recipe (``presets.training``) as TrainConfig fields, for the
    ``pretrain.*`` params left null: the global batch is split into micro batches per process
    (of ``micro_batch``, ``pretrain.micro_batch``, or else the preset's).

    A global batch that the micro batch times the world size does not divide is an error, not
    rounded down (48 GPUs at micro batch 1 cannot make 128); its ``grad_accum`` is then None
    and :func:`check_global_batch` names the problem.
    """
    steps = int(preset["iterations"])
    micro = int(preset["micro_batch"])
    per_step = (micro_batch or micro) * world_size
    global_batch = int(preset["global_batch"])
    return {
        "steps": steps, "micro_batch": micro,
        "grad_accum": global_batch // per_step if global_batch % per_step == 0 else None,
        "lr": preset["lr"], "min_lr": preset["min_lr"],
        "warmup": int(round(preset.get("warmup_fraction", 0.0) * steps)),
        "weight_decay": preset["weight_decay"], "beta1": preset["betas"][0], "beta2": preset["betas"][1],
        "clip": preset["grad_clip"],
    }


def check_global_batch(p, preset_name: str, preset: dict, world_size: int) -> None:
    """Refuse a ``pretrain.grad_accum: null`` run whose world size cannot make the preset's
    global batch (one line naming the keys), as the sft stage does."""
    if p.get("pretrain.grad_accum", (int, type(None))) is not None:
        return
    micro = p.get("pretrain.micro_batch", (int, type(None))) or int(preset["micro_batch"])
    if int(preset["global_batch"]) % (micro * world_size):
        raise PipelineError(f"{p.source}: the {preset_name} preset's global batch {preset['global_batch']} is not a "
                            f"multiple of micro_batch {micro} x {world_size} processes; set 'pretrain.grad_accum' "
                            "(and 'pretrain.micro_batch') or use a world size that divides it")
