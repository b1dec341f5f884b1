"""The pretraining run: what ``stages/pretrain.py`` calls.

``run_pretrain`` builds the model (fresh, from the decoder of a GPT checkpoint or of a Hugging
Face folder, or loaded for evaluation only), trains it with DeepSpeed on the samples of ``pretrain_data``, validates it
with two retrieval controls, and exports it. Resume checkpoints live in a work folder keyed by
everything the run depends on.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch

from . import hf
from .checkpoint import check_tokenizer, init_from_checkpoint, load_model, tokenizer_record
from .dist import init_distributed, is_rank0, local_device
from .errors import PipelineError
from .pretrain_data import PretrainInputs, PretrainSamples, TrainOrder, all_eval_batches, eval_indices, load_split
from .tokenizer import Tokenizer
from .tokenstore import TokenStore
from .workdir import code_files, library_versions


def run_key(inputs: PretrainInputs, model_config, cfg, init_from: str, world: int, code=()) -> dict:
    """What the resume key of a training run hashes: params, input files, code (``workdir``)."""
    paths = [getattr(inputs, f.name) for f in dataclasses.fields(inputs)]
    return {"params": {"train": dataclasses.asdict(cfg), "model": model_config.to_dict(), "init_from": init_from,
                       "world": world, "versions": library_versions("torch", "deepspeed")},
            "inputs": [*paths, *([init_from] if init_from else [])],
            "code": code_files(__file__, *code)}


def init_decoder(model, init_from: str) -> list[str]:
    """Copy the decoder weights of ``init_from`` into ``model``: an exported checkpoint of ours or
    a Hugging Face folder (converted by ``hf``). Returns the names left fresh (encoder, CCA)."""
    if hf.is_hf_folder(init_from):
        from .model import load_decoder_weights

        try:
            return load_decoder_weights(model, hf.read_hf_state_dict(init_from, model.config))
        except PipelineError as exc:
            raise PipelineError(f"{init_from}: {exc}") from None
    return init_from_checkpoint(model, init_from)


def load_for_eval(init_from: str, model_config):
    """The model of ``init_from`` to evaluate (``skip_train``): our export, or a Hugging Face
    folder with ``model_config``'s Retro additions."""
    if hf.is_hf_folder(init_from):
        from .presets import retro_additions

        return hf.load_hf_model(init_from, **retro_additions(model_config))
    return load_model(init_from)


def empty_valid_message(tokens) -> str:
    """Why the pretraining corpus's valid split is empty, from the token store's counts."""
    meta = TokenStore(tokens, "valid").meta
    n_train, fraction = meta.get("train_documents", 0), meta.get("valid_fraction")
    if fraction == 0:
        return f"{tokens}: the valid split is empty: set tokenize.pretrain_valid_fraction > 0"
    few = "; a .txt file is one document: give JSON lines or a folder of files" if n_train < 20 else ""
    return (f"{tokens}: the valid split has 0 documents: the pretraining corpus has {n_train} document{'' if n_train == 1 else 's'}, each "
            f"put in valid with probability tokenize.pretrain_valid_fraction{f' ({fraction})' if fraction else ''} by a hash of its "
            f"text, and none was{few}")


def without_retrieval(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without its neighbors: the model then runs with retrieval switched off
    (``neighbors=None``, the same logits as every neighbor masked), i.e. Retro's decoder alone."""
    return {k: v for k, v in batch.items() if k not in ("neighbors", "neighbor_mask")}


def validation_fn(model, valid: PretrainSamples, cfg, rank: int, world: int, device, shuffled: bool = True,
                  max_overlap: float | None = None):
    """``eval_fn`` for the training loop: val loss (and fact-token loss), and for Retro two
    controls on the same samples: shuffled neighbors (``loss_shuffled``: does the model read
    *its* neighbors?) and no neighbors at all (``loss_no_retrieval``: how good is the decoder
    that trained beside retrieval, on its own?). With ``max_overlap`` also ``loss_filtered``:
    the same samples with the leakage filter (neighbors holding more than that fraction of
    the chunk they are read for masked out, ``PretrainSamples.batch``)."""
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
        if max_overlap is not None and valid.k > 0:
            kept = evaluate(model, (valid.batch(b, max_overlap=max_overlap) for b in batches), lm_loss, device,
                            ("loss",), pad_to=pad_to, pad_batch=valid.batch(every[0], max_overlap=max_overlap))
            out["loss_filtered"] = kept["loss"]
        return out

    return run


def run_pretrain(inputs: PretrainInputs, model_config, cfg, out: str | os.PathLike | None,
                 work_root: str | os.PathLike, live_dir: str | os.PathLike | None,
                 init_from: str = "", skip_train: bool = False, stop_after: int | None = None,
                 code=(), max_overlap: float | None = None) -> dict | None:
    """Train (or, with ``skip_train``, only evaluate ``init_from``), export to ``out`` (unless
    None), return the metrics. ``max_overlap`` (evaluation only) adds ``val_loss_filtered``, the
    validation loss with the leakage filter, next to ``val_loss``.

    Resume checkpoints live in ``work_root/<key>``, locked while the run lasts; the key hashes
    the params, every input file by content and the code (this module's imports and the
    ``code`` files, e.g. the stage script: ``workdir``). A run killed part-way and started
    again with the same key continues from its last checkpoint, with the same bytes as an
    uninterrupted run; any change starts a fresh folder. A finished run deletes its folder, so
    a rerun of the same key (``dvc repro -f``) trains from scratch. With ``stop_after`` the
    run stops at that step with a resume checkpoint and returns None.
    """
    from . import train as T
    rank, world = init_distributed()
    if skip_train and not init_from:
        raise PipelineError("params.yaml: 'pretrain.skip_train' needs 'pretrain.init_from' (the checkpoint to evaluate)")
    if init_from:  # continued pretraining or evaluation: the tokens must mean what they meant
        check_tokenizer(init_from, inputs.tokenizer)
    torch.manual_seed(cfg.seed)
    if skip_train:
        model = load_for_eval(init_from, model_config)
        Tokenizer(inputs.tokenizer).check_fits(model.config.vocab_size, Path(init_from) / "config.json")
        model_config = model.config
    else:
        model = T.build_model(model_config, cfg)  # at ZeRO-3 already partitioned
        fresh = init_decoder(model, init_from) if init_from else []
        if init_from and is_rank0():
            print(f"pretrain: decoder weights from {init_from}; {len(fresh)} retrieval tensors fresh")
        if cfg.freeze_decoder:  # retrofitting: only encoder and CCA train
            T.freeze_decoder(model)
            if is_rank0():
                print(f"pretrain: decoder frozen, training {sum(p.requires_grad for p in model.parameters())} "
                      "encoder and CCA tensors")
    n_params = model.num_parameters()

    train_set = None if skip_train else load_split(inputs, model_config, "train")
    valid = load_split(inputs, model_config, "valid", fact_flags=True,
                       neighbor_tokens=getattr(train_set, "neighbor_tokens", None))
    if len(valid) == 0:
        raise PipelineError(empty_valid_message(inputs.tokens))

    start, summary = 0, {}
    if skip_train:
        device = local_device()  # cuda:LOCAL_RANK (no engine to pick it)
        model.to(device, torch.bfloat16 if cfg.precision == "bf16" else torch.float32)
        final = validation_fn(model, valid, cfg, rank, world, device, max_overlap=max_overlap)()
        engine = model
    else:
        work = T.open_work(work_root, run_key(inputs, model_config, cfg, init_from, world, code), cfg.steps, rank)
        order = TrainOrder(len(train_set), cfg.micro_batch, cfg.grad_accum, world, rank, cfg.seed)

        def loop(engine, start, live):
            evaluate_now = validation_fn(engine, valid, cfg, rank, world, engine.device)
            return T.train(engine, cfg, lambda step, micro: train_set.batch(order.indices(step, micro)),
                           T.lm_loss, evaluate_now, work.dir, start_step=start, live=live, stop_after=stop_after)

        engine, start, summary = T.fit(model, cfg, work, live_dir, loop, "pretrain")
        if stop_after is not None and stop_after < cfg.steps:
            work.release()
            return None
        final = {k[4:]: v for k, v in summary.items() if k.startswith("val/")}

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
    if max_overlap is not None:  # the leakage filter (eval-only): filtered loss beside the unfiltered
        metrics.update(max_overlap=max_overlap, val_loss_filtered=final.get("loss_filtered"))
    metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    T.finish(engine, model_config, out, {"steps": metrics["steps"], "init_from": init_from, "precision": cfg.precision,
                                            "tokenizer": tokenizer_record(inputs.tokenizer)},
             None if skip_train else work)
    return metrics


def preset_training(preset: dict, world_size: int, micro_batch: int | None = None,
                    recipe: dict | None = None) -> dict:
    """A preset's pretraining recipe (``presets.training``) as TrainConfig fields, for the
    ``pretrain.*`` params left null: the global batch is split into micro batches per process
    (of ``micro_batch``, ``pretrain.micro_batch``, or else the device recipe's, or else the
    preset's). ``recipe`` (``presets.device_recipe``) adds precision, ZeRO stage,
    checkpointing, offload and (on a GPU) the micro batch.

    A global batch that the micro batch times the world size does not divide is an error, not
    rounded down (48 GPUs at micro batch 1 cannot make 128); its ``grad_accum`` is then None
    and :func:`check_global_batch` names the problem.
    """
    from .presets import train_fields

    fields = train_fields(preset, recipe)
    per_step = (micro_batch or fields["micro_batch"]) * world_size
    global_batch = int(preset["global_batch"])
    return {
        **fields,
        "grad_accum": global_batch // per_step if global_batch % per_step == 0 else None,
        "min_lr": preset["min_lr"],
        "warmup": int(round(preset.get("warmup_fraction", 0.0) * fields["steps"])),
        "retrieval_warmup": int(round(preset.get("retrieval_warmup_fraction", 0.0) * fields["steps"])),
    }


def check_global_batch(p, preset_name: str, preset: dict, world_size: int, recipe_micro: int | None = None) -> None:
    """Refuse a ``pretrain.grad_accum: null`` run whose world size cannot make the preset's
    global batch (one line naming the keys), as the sft stage does. The micro batch is
    ``pretrain.micro_batch``, else the device recipe's (``recipe_micro``), else the preset's."""
    if p.get("pretrain.grad_accum", (int, type(None))) is not None:
        return
    micro = p.get("pretrain.micro_batch", (int, type(None))) or recipe_micro or int(preset["micro_batch"])
    if int(preset["global_batch"]) % (micro * world_size):
        raise PipelineError(f"{p.source}: the {preset_name} preset's global batch {preset['global_batch']} is not a "
                            f"multiple of micro_batch {micro} x {world_size} processes; set 'pretrain.grad_accum' "
                            "(and 'pretrain.micro_batch') or use a world size that divides it")
