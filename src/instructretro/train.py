"""Training with DeepSpeed: the engine, a generic loop, resumable checkpoints, and export.

The same code trains on one CPU process (no launcher, gloo backend) and on many GPUs under the
``deepspeed`` launcher. Read top to bottom:

1. ``TrainConfig``: the hyperparameters, read from one params section (``pretrain`` or ``sft``).
2. ``build_model`` (partitioned at creation under ZeRO-3) and ``build_engine``: AdamW (torch's
   fused kernel on GPU, multi-tensor on CPU), warmup + cosine schedule, ZeRO stage and offload,
   activation checkpointing, a frozen decoder for retrofitting, TF32 on GPUs, bf16/fp32,
   micro batch, gradient accumulation and clipping, as one DeepSpeed config.
3. ``train``: the loop. It is generic over ``batch_fn(step, micro) -> batch`` (a deterministic
   function of the position, so a resumed run sees exactly the batches it would have seen) and
   ``loss_fn(model, batch) -> {name: (loss_sum, count)}``; the key ``"loss"`` is optimised.
4. Checkpoints: DeepSpeed checkpoints for resume (``save_checkpoint`` / ``resume``). The
   exported checkpoint later stages load (``config.json`` + ``model.safetensors``) is
   ``checkpoint.py``; starting processes is ``dist.py``.
5. A run, the scaffold pretraining and SFT share: resume key -> work folder (``open_work``) ->
   engine -> resume -> DVCLive -> train (``fit``) -> export -> finish (``finish``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .checkpoint import PRECISIONS, export_checkpoint
from .dist import accelerator_name, barrier, init_distributed, is_rank0
from .errors import PipelineError, writing
from .workdir import DigestCache, WorkDir, rank0_key, resume_key

OFFLOAD_DEVICES = ("none", "cpu", "nvme")

# --------------------------------------------------------------------------------------------
# 1. Hyperparameters


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (the keys of a ``pretrain:`` or ``sft:`` section)."""

    steps: int = 100  # optimizer steps
    micro_batch: int = 8  # samples per process per forward/backward
    grad_accum: int = 1  # micro batches per optimizer step
    lr: float = 1e-3  # peak learning rate, reached after ``warmup`` steps
    min_lr: float = 1e-4  # end of the cosine decay, at ``steps``
    warmup: int = 10
    weight_decay: float = 0.1  # on matrices only (not on norms or biases)
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0  # global gradient-norm clipping; 0 disables
    zero_stage: int = 0
    precision: str = "fp32"
    seed: int = 1234
    eval_interval: int = 50  # steps between validations (and always at the last step)
    eval_batches: int = 8  # validation micro batches per process
    save_interval: int = 50  # steps between resume checkpoints (and always at the last step)
    # Memory for big models (defaults: the preset's GPU recipe on a GPU, off on CPU)
    activation_checkpointing: bool = False  # recompute each decoder/encoder layer in backward
    offload_optimizer: str = "none"  # none | cpu | nvme: where ZeRO keeps optimizer state (stage >= 1)
    offload_params: str = "none"  # none | cpu | nvme: where ZeRO-3 keeps the parameters
    offload_nvme_path: str = "data/work/nvme"  # folder for the nvme offload (a fast local disk)
    freeze_decoder: bool = False  # retrofit: train only encoder and CCA (Retro), decoder frozen
    retrieval_warmup: int = 0  # Retro: encoder and CCA reach the schedule's lr after this many steps (0: at once)

    @classmethod
    def from_params(cls, p, section: str, defaults: dict | None = None) -> "TrainConfig":
        """Read every field from ``section.<field>`` of a ``Params`` object and validate it.

        A key set to null takes its value from ``defaults`` (e.g. the model preset's recipe).
        """
        values = {}
        for f in dataclasses.fields(cls):
            typ = {"float": float, "int": int, "bool": bool}.get(f.type, str)
            value = p.get(f"{section}.{f.name}", (typ, type(None)))
            if value is None:
                if not defaults or f.name not in defaults:
                    raise PipelineError(f"{p.source}: param '{section}.{f.name}' is null and has no preset default")
                value = typ(defaults[f.name])
            values[f.name] = value
        cfg = cls(**values)
        cfg.validate(f"{p.source}: param '{section}.")
        cfg.validate_memory(f"{p.source}: param '{section}.")
        return cfg

    def validate_memory(self, where: str = "param '") -> None:
        """Check the memory options (offload needs the ZeRO stage that partitions the state)."""
        for key in ("offload_optimizer", "offload_params"):
            if getattr(self, key) not in OFFLOAD_DEVICES:
                raise PipelineError(f"{where}{key}' must be one of {OFFLOAD_DEVICES}, got {getattr(self, key)!r}")
        if self.offload_optimizer != "none" and self.zero_stage < 1:
            raise PipelineError(f"{where}offload_optimizer' needs zero_stage >= 1, got {self.zero_stage}")
        if self.offload_params != "none" and self.zero_stage != 3:
            raise PipelineError(f"{where}offload_params' needs zero_stage 3, got {self.zero_stage}")

    def validate(self, where: str = "param '") -> None:
        """Raise PipelineError naming the offending key.

        A ``warmup`` longer than the run is clamped to ``steps`` (pretraining and SFT alike),
        with one note line on stderr: the schedule then warms up over the whole run.
        """
        for key in ("steps", "micro_batch", "grad_accum", "eval_interval", "eval_batches", "save_interval"):
            if getattr(self, key) <= 0:
                raise PipelineError(f"{where}{key}' must be > 0, got {getattr(self, key)}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise PipelineError(f"{where}lr' must be > 0 and min_lr in [0, lr], got lr={self.lr} min_lr={self.min_lr}")
        for key in ("warmup", "retrieval_warmup"):
            if getattr(self, key) < 0:
                raise PipelineError(f"{where}{key}' must be >= 0, got {getattr(self, key)}")
        if self.warmup > self.steps:
            if os.environ.get("RANK", "0") == "0":
                print(f"note: {where}warmup' is {self.warmup}, more than the {self.steps} steps: "
                      f"warmup clamped to {self.steps}", file=sys.stderr)
            self.warmup = self.steps
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise PipelineError(f"{where}{key}' must be in [0, 1), got {getattr(self, key)}")
        if self.weight_decay < 0 or self.clip < 0:
            raise PipelineError(f"{where}weight_decay' and clip must be >= 0")
        if self.zero_stage not in (0, 1, 2, 3):
            raise PipelineError(f"{where}zero_stage' must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise PipelineError(f"{where}precision' must be one of {PRECISIONS}, got {self.precision!r}")


def lr_multiplier(cfg: TrainConfig, retrieval: bool = False) -> Callable[[int], float]:
    """Learning rate / peak lr after ``step`` optimizer steps: linear warmup, then cosine to min_lr.

    Step 0 (the first update) uses lr/warmup, step ``warmup - 1`` the peak, and the last step
    (``steps - 1``) ends at ``min_lr``, as in Megatron's warmup + cosine schedule. With
    ``retrieval`` (Retro's encoder and CCA parameters) the schedule is also multiplied by a linear
    ramp over ``retrieval_warmup`` steps: ``(step + 1) / retrieval_warmup`` until it reaches 1.
    """
    floor = cfg.min_lr / cfg.lr
    ramp = cfg.retrieval_warmup if retrieval else 0

    def multiplier(step: int) -> float:
        if step < cfg.warmup:
            value = (step + 1) / cfg.warmup
        else:
            decay_steps = max(1, cfg.steps - 1 - cfg.warmup)
            progress = min(1.0, (step - cfg.warmup) / decay_steps) if cfg.steps - 1 > cfg.warmup else 1.0
            value = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return value * ((step + 1) / ramp) if step + 1 < ramp else value

    return multiplier


# --------------------------------------------------------------------------------------------
# 2. The DeepSpeed engine (processes: dist.py)


def deepspeed_config(cfg: TrainConfig, world_size: int, device: str | None = None) -> dict:
    """The DeepSpeed JSON config for ``cfg``: the whole optimisation recipe in one dict.

    ``device`` (default: the accelerator) picks the optimizer: torch's fused AdamW on a GPU,
    its multi-tensor (foreach) AdamW on CPU, DeepSpeed's CPU Adam when the optimizer state is
    offloaded (ZeRO runs the update where the state lives).
    """
    cfg.validate_memory()
    device = device or accelerator_name()
    zero: dict = {"stage": cfg.zero_stage}
    for key, name in (("offload_optimizer", "offload_optimizer"), ("offload_params", "offload_param")):
        target = getattr(cfg, key)
        if target != "none":
            zero[name] = {"device": target, "pin_memory": device != "cpu"}
            if target == "nvme":
                zero[name]["nvme_path"] = str(cfg.offload_nvme_path)
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    adam = {"lr": cfg.lr, "betas": [cfg.beta1, cfg.beta2], "eps": 1e-8, "weight_decay": cfg.weight_decay}
    if cfg.offload_optimizer == "none":
        # torch_adam: torch.optim.AdamW instead of DeepSpeed's FusedAdam (no C++/CUDA build);
        # fused on a GPU (one kernel for the whole update), else one multi-tensor update.
        adam.update(torch_adam=True, **({"fused": True} if device == "cuda" else {"foreach": True}))
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "optimizer": {"type": "AdamW", "params": adam},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def enable_tf32(device: str) -> bool:
    """On a GPU, let fp32 matmuls and convolutions use TF32 tensor cores (the rest of an fp32
    run stays fp32); returns whether it did. CPU math is left alone."""
    if device != "cuda":
        return False
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    return True


def param_groups(model: torch.nn.Module, weight_decay: float, retrieval_apart: bool = False) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights) only, not on norms or biases.
    Frozen parameters (``requires_grad`` False) are left out of the optimizer.

    ``retrieval_apart``: Retro's encoder and CCA parameters (``Retro.is_retro_parameter``) in
    groups of their own after the decoder's (their own learning-rate schedule:
    ``retrieval_warmup``); empty groups are then left out. Each group's ``retrieval`` says
    whether it holds them."""
    from .model import Retro, full_shape

    groups = {(r, d): [] for r in (False, True) for d in (True, False)}
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            retrieval = retrieval_apart and Retro.is_retro_parameter(name)
            groups[(retrieval, len(full_shape(p)) >= 2)].append(p)
    out = [{"params": params, "weight_decay": weight_decay if decay else 0.0, "retrieval": retrieval}
           for (retrieval, decay), params in groups.items() if not retrieval or params]
    return out if not retrieval_apart else [g for g in out if g["params"]]


def freeze_decoder(model: torch.nn.Module) -> int:
    """Retrofitting (RETRO section 4.4): freeze every decoder parameter, so only the encoder and
    the chunked cross-attention train. Returns the number of frozen tensors."""
    from .model import Retro

    module = getattr(model, "module", model)
    if not getattr(getattr(module, "config", None), "retro", False):
        raise PipelineError("param 'pretrain.freeze_decoder' needs a Retro model (model.retro: true): "
                            "a GPT has nothing left to train")
    frozen = 0
    for name, p in module.named_parameters():
        if not Retro.is_retro_parameter(name):
            p.requires_grad_(False)
            frozen += 1
    return frozen


def check_fits_training(config, cfg: TrainConfig, world_size: int = 1, source: str = "params.yaml",
                        gpu_bytes: int | None = None, host_bytes: int | None = None) -> dict:
    """Refuse a model that would not fit before anything is allocated, naming the keys that size it.

    The bytes are ``estimate.memory``'s, the plan ``make estimate`` prints, for ``cfg``'s
    precision, ZeRO stage, micro batch, checkpointing and offloads. On a GPU (``gpu_bytes``, the
    device's memory; 85% of it is usable) the per-GPU total must fit and the offloaded state of
    all local ranks must fit host memory. On CPU every rank's model state (weights, gradients,
    optimizer state) must fit this machine's memory (``checkpoint.memory_bytes``: physical
    memory, an address-space or cgroup limit). Returns the estimate.
    """
    from .checkpoint import memory_bytes
    from .estimate import GIB, USABLE_FRACTION, Settings, memory, parameter_counts

    settings = Settings(cfg.zero_stage, cfg.micro_batch, cfg.activation_checkpointing, cfg.offload_optimizer,
                        cfg.offload_params, cfg.precision)
    m = memory(config, settings, max(1, world_size), config.seq_length)
    host_limit = memory_bytes() if host_bytes is None else host_bytes
    n = parameter_counts(config)["total"]
    size = (f"model.n_layers {config.n_layers}, model.hidden {config.hidden}, model.heads {config.heads}, "
            f"vocab {config.vocab_size}: {n:,} parameters")
    plan = f"{settings.describe()}; make estimate prints the plan and settings that fit"
    if gpu_bytes is not None:
        budget = USABLE_FRACTION * gpu_bytes
        if m["total"] > budget:
            raise PipelineError(f"{source}: {size} need {m['total'] / GIB:.1f} GiB per GPU ({plan}), more than "
                                f"{budget / GIB:.1f} GiB usable of this GPU's {gpu_bytes / GIB:.1f} GiB")
        host = m["host"] * max(1, min(world_size, torch.cuda.device_count() or 1))
    else:
        host = (m["parameters"] + m["gradients"] + m["optimizer"] + m["host"]) * max(1, world_size)
    if host > host_limit:
        raise PipelineError(f"{source}: {size} need {host / GIB:.1f} GiB of host memory for weights, gradients "
                            f"and optimizer state ({plan}), more than this machine's {host_limit / GIB:.1f} GiB")
    return m


def build_model(config, cfg: TrainConfig, world_size: int | None = None, weights: str | os.PathLike | None = None):
    """A model for training with ``cfg``: at ZeRO-3 built under ``deepspeed.zero.Init``, so
    every rank holds only its shard from the start (initialisation gathers one tensor at a
    time; ``Retro.reset_parameters``); activation checkpointing as ``cfg`` says. ``weights``:
    an exported checkpoint folder whose weights replace the initialisation, read one tensor at
    a time (rank 0 reads, ZeRO-3 scatters), so no rank ever holds the whole model. A model
    that would not fit memory is refused first (``check_fits_training``)."""
    world = world_size or (torch.distributed.get_world_size() if torch.distributed.is_initialized()
                           else int(os.environ.get("WORLD_SIZE", "1")))
    gpu = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory \
        if torch.cuda.is_available() else None
    check_fits_training(config, cfg, world, gpu_bytes=gpu)
    model = _build(config, cfg, world_size)
    if weights is not None:
        _load_weights(model, weights)
    return model.set_checkpointing(cfg.activation_checkpointing)


def _load_weights(model, folder) -> None:
    from .checkpoint import read_tensor, safetensors_handle
    from .model import assign_parameter, full_shape, is_partitioned

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise PipelineError(f"{folder}: not an exported checkpoint (no model.safetensors)")
    own = dict(model.named_parameters())
    with safetensors_handle(path) as f:
        names = set(f.keys())
        if names != set(own):
            raise PipelineError(f"{folder}: weights do not match config.json ({len(names ^ set(own))} names differ)")
        reader = not any(is_partitioned(p) for p in own.values()) or not torch.distributed.is_initialized() \
            or torch.distributed.get_rank() == 0
        for name, p in own.items():
            value = read_tensor(f, path, name) if reader else None
            if value is not None and tuple(value.shape) != tuple(full_shape(p)):
                raise PipelineError(f"{folder}: {name} has shape {tuple(value.shape)}, config.json gives {tuple(full_shape(p))}")
            assign_parameter(p, value)


def _build(config, cfg: TrainConfig, world_size: int | None):
    from .model import Retro

    if cfg.zero_stage == 3:
        import deepspeed

        if not torch.distributed.is_initialized():
            init_distributed()
        world = world_size or torch.distributed.get_world_size()
        with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, world)):
            return Retro(config)
    return Retro(config)


def build_engine(model: torch.nn.Module, cfg: TrainConfig):
    """Wrap ``model`` in a DeepSpeed engine configured by ``cfg``; returns the engine.

    Applies the model-side settings of ``cfg`` too: activation checkpointing, a frozen decoder
    (``freeze_decoder``), TF32 matmuls on a GPU.
    """
    import deepspeed

    if not torch.distributed.is_initialized():
        init_distributed()
    world = torch.distributed.get_world_size()
    device = accelerator_name()
    config = deepspeed_config(cfg, world, device)
    enable_tf32(device)
    if hasattr(model, "set_checkpointing"):
        model.set_checkpointing(cfg.activation_checkpointing)
    if cfg.freeze_decoder:
        freeze_decoder(model)
    # Retro's encoder and CCA get a schedule of their own when retrieval_warmup ramps them
    apart = cfg.retrieval_warmup > 0 and getattr(getattr(model, "config", None), "retro", False)
    groups = param_groups(model, cfg.weight_decay, retrieval_apart=apart)
    multiplier = [lr_multiplier(cfg, retrieval=g["retrieval"]) for g in groups] if apart else lr_multiplier(cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, multiplier),
        config=config,
    )
    return engine


# --------------------------------------------------------------------------------------------
# 3. The loop

Batch = dict  # name -> tensor
LossFn = Callable[[torch.nn.Module, Batch], dict]  # -> {name: (loss_sum tensor, count tensor)}


def to_device(batch: Batch, device) -> Batch:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


# Extra masks a batch may carry, each giving one more loss measured alongside "loss".
EXTRA_LOSS_MASKS = {"fact_mask": "loss_facts"}


def token_losses(model, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy at every position (B, T), fp32, before any loss mask."""
    logits = model(batch["tokens"], batch.get("neighbors"), batch.get("neighbor_mask"))
    labels = batch["labels"]
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
    ).view_as(labels)


def lm_loss(model, batch: Batch) -> dict:
    """Next-token cross-entropy: ``{"loss": (sum over loss_mask, tokens)}``, plus one entry per
    extra mask in the batch (``fact_mask`` -> ``"loss_facts"``). Logits are upcast to fp32."""
    ce = token_losses(model, batch)
    mask = batch["loss_mask"].float()
    out = {"loss": ((ce * mask).sum(), mask.sum())}
    for key, name in EXTRA_LOSS_MASKS.items():
        if key in batch:
            extra = batch[key].float() * mask
            out[name] = ((ce * extra).sum(), extra.sum())
    return out


def without_loss(batch: Batch) -> Batch:
    """``batch`` with every token out of the loss: a padding batch that counts zero tokens."""
    return {**batch, "loss_mask": torch.zeros_like(batch["loss_mask"])}


@torch.no_grad()
def evaluate(model, batches: Iterable[Batch], loss_fn: LossFn, device=None, names: Iterable[str] = (),
             pad_to: int = 0, pad_batch: Batch | None = None) -> dict:
    """Token-weighted mean of every loss ``loss_fn`` returns, summed over all processes.

    Returns ``{name: mean loss}`` plus ``{name + "_count": tokens}``; a name with no tokens
    anywhere has mean ``nan``. With several processes every rank must make the same collective
    calls: pass every expected loss ``names`` (a process with no batch still takes part in the
    sum), and ``pad_to``, the most batches any rank has: a rank with fewer runs ``pad_batch``
    with its loss mask zeroed until it has run ``pad_to`` forward passes (under ZeRO-3 every
    forward gathers parameters from all ranks). The sums stay on ``device`` (the engine's), the
    device the all-reduce needs (NCCL refuses host tensors).
    """
    was_training = model.training
    model.eval()
    names = sorted(set(names))
    sums: dict[str, torch.Tensor] = {}
    zero = torch.zeros(2, dtype=torch.float64, device=device)
    n = 0
    for batch in batches:
        n += 1
        _accumulate(sums, loss_fn(model, to_device(batch, device) if device is not None else batch))
    if n < pad_to:
        if pad_batch is None:
            raise PipelineError(f"evaluate: this rank has {n} of {pad_to} batches and no pad_batch")
        padding = without_loss(to_device(pad_batch, device) if device is not None else pad_batch)
        for _ in range(pad_to - n):
            _accumulate(sums, loss_fn(model, padding))
    names = sorted(set(names) | set(sums))
    totals = torch.stack([sums.get(name, zero) for name in names]) if names else zero.reshape(0, 2)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # every process must evaluate the same loss names
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    out = {}
    for name, (s, c) in zip(names, totals.tolist()):
        out[name] = s / c if c > 0 else float("nan")
        out[f"{name}_count"] = int(c)
    return out


def _accumulate(sums: dict, losses: dict) -> None:
    """Add ``{name: (loss_sum, count)}`` to the float64 ``sums`` on the losses' device."""
    for name, (loss_sum, count) in losses.items():
        value = torch.stack([loss_sum.detach().double(), torch.as_tensor(count).to(loss_sum.device).double()])
        sums[name] = sums[name] + value if name in sums else value


def grad_norm_groups(model: torch.nn.Module) -> dict[str, list]:
    """The parameter groups whose gradient norms the loop logs besides the total: for Retro
    ``decoder`` (everything GPT has, the token embedding included) and ``retrieval`` (encoder
    and chunked cross-attention, ``Retro.is_retro_parameter``); none for a GPT."""
    from .model import Retro

    module = getattr(model, "module", model)
    if not getattr(getattr(module, "config", None), "retro", False):
        return {}
    groups: dict[str, list] = {"decoder": [], "retrieval": []}
    for name, p in module.named_parameters():
        if p.requires_grad:
            groups["retrieval" if Retro.is_retro_parameter(name) else "decoder"].append(p)
    return groups


def grad_norms(engine, groups: dict[str, list]) -> dict[str, float]:
    """Gradient 2-norms of the step, measured after the last backward and before clipping and
    the optimizer step: ``{"grad_norm": total, "grad_norm_<group>": ...}``.

    ZeRO 0 (fp32 or bf16): the total and every group from the full gradients each rank holds
    (already averaged over ranks), so the groups' squares add up to the total. ZeRO 3: each
    rank sums the squares of its own gradient partition per group and the sums are
    all-reduced (exact, no gradient moves). ZeRO 1 and 2 keep the reduced gradients in
    flattened optimizer partitions: only the total is logged, DeepSpeed's own norm, read after
    the step (:func:`grad_norm_after_step`).
    """
    from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

    stage = zero_stage_of(engine)
    if stage in (1, 2):
        return {}
    params = [p for p in engine.module.parameters() if p.requires_grad]
    in_group = {id(p): name for name, ps in groups.items() for p in ps}
    names = ["grad_norm", *(f"grad_norm_{g}" for g in groups)]
    sums = torch.zeros(len(names), dtype=torch.float64, device=engine.device)
    slot = {g: 1 + i for i, g in enumerate(groups)}
    for p in params:
        g = safe_get_local_grad(p) if stage == 3 else safe_get_full_grad(p)
        if g is None:
            continue
        sq = g.detach().double().pow(2).sum()
        sums[0] += sq
        if id(p) in in_group:
            sums[slot[in_group[id(p)]]] += sq
    if stage == 3 and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(sums)
    return {name: float(v) for name, v in zip(names, sums.sqrt().tolist())}


def zero_stage_of(engine) -> int:
    """The ZeRO stage of ``engine`` (0 for a plain module)."""
    stage = getattr(engine, "zero_optimization_stage", None)
    return int(stage()) if callable(stage) else 0


def grad_norm_after_step(engine) -> dict[str, float]:
    """``{"grad_norm": ...}`` from DeepSpeed's norm of the step just taken (ZeRO 1 and 2, where
    :func:`grad_norms` measures nothing); empty when DeepSpeed computed none."""
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    if norm is None:
        return {}
    norm = float(norm.item() if torch.is_tensor(norm) else norm)
    return {"grad_norm": norm} if math.isfinite(norm) else {}


def train(engine, cfg: TrainConfig, batch_fn: Callable[[int, int], Batch], loss_fn: LossFn,
          eval_fn: Callable[[], dict] | None = None, work_dir: str | os.PathLike | None = None,
          start_step: int = 0, live=None, progress: bool = True, stop_after: int | None = None) -> dict:
    """Run optimizer steps ``start_step .. cfg.steps - 1``; return the last logged values.

    ``stop_after``: stop (with a resume checkpoint) once that many steps are done, as if the
    run had been killed there; the learning-rate schedule still spans ``cfg.steps``.

    Each step runs ``cfg.grad_accum`` micro batches ``batch_fn(step, micro)`` through
    ``loss_fn``; the mean of ``"loss"`` over every loss token (``loss_mask``) of the step's
    global batch is what is minimised and logged as ``train/loss``, the same objective on one
    process and on many. ``eval_fn()`` runs every
    ``eval_interval`` steps and at the end (its values are logged under ``val/``); a resume
    checkpoint is saved to ``work_dir`` every ``save_interval`` steps before the last one, and
    where ``stop_after`` stops the run. Every step also logs the gradient norm before clipping
    (``train/grad_norm``) and, for Retro, its decoder and retrieval parts
    (``train/grad_norm_decoder``, ``train/grad_norm_retrieval``; :func:`grad_norms`).
    ``live`` is a DVCLive ``Live`` on rank 0 (None elsewhere).
    """
    from .progress import progress as progress_bar

    engine.train()
    last: dict = {}
    tokens_done, seconds = 0, 0.0
    bar = progress_bar(total=cfg.steps, initial=start_step, desc="train", unit="step",
                       disable=not (progress and is_rank0()))
    end = cfg.steps if stop_after is None else max(start_step, min(cfg.steps, stop_after))
    groups = grad_norm_groups(engine)
    for step in range(start_step, end):
        t0 = time.perf_counter()
        losses, tokens = [], 0
        lr = engine.get_lr()[0]
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        batches = [to_device(batch_fn(step, micro), engine.device) for micro in range(cfg.grad_accum)]
        # The step minimises the mean over every loss token of the global batch, whatever its
        # split into ranks and micro batches: DeepSpeed averages the gradients of the
        # world x grad_accum micro batches, so each loss sum is scaled by that number over the
        # step's token count (all-reduced), not divided by its own micro batch's count.
        step_tokens = torch.stack([b["loss_mask"].sum() for b in batches]).double().sum()
        if world > 1:
            torch.distributed.all_reduce(step_tokens)
        scale = (world * cfg.grad_accum) / step_tokens.clamp(min=1)
        norms: dict[str, float] = {}
        for micro, batch in enumerate(batches):
            loss_sum, _ = loss_fn(engine, batch)["loss"]
            engine.backward(loss_sum * scale.to(loss_sum.dtype))
            if micro == len(batches) - 1:  # the step's gradients, before clipping and the update
                norms = grad_norms(engine, groups)
            engine.step()
            losses.append(loss_sum.detach().double())
            tokens += int(batch["tokens"].numel()) if "tokens" in batch else 0
        norms = norms or grad_norm_after_step(engine)
        loss_total = torch.stack(losses).sum()
        if world > 1:
            torch.distributed.all_reduce(loss_total)
        train_loss = float(loss_total / step_tokens.clamp(min=1))  # the global batch's token mean
        dt = time.perf_counter() - t0
        tokens_done += tokens * world
        seconds += dt
        if not math.isfinite(train_loss):
            raise PipelineError(f"training diverged: loss is {train_loss} at step {step + 1} (lower the lr?)")
        done = step + 1
        last = {"step": done, "train/loss": train_loss, "train/lr": lr,
                "train/tokens_per_s": tokens * world / dt if dt > 0 else 0.0,
                **{f"train/{k}": v for k, v in norms.items()}}
        if done % cfg.eval_interval == 0 or done == cfg.steps:
            if eval_fn is not None:
                last.update({f"val/{k}": v for k, v in eval_fn().items() if not k.endswith("_count")})
            engine.train()
        if live is not None:
            live.step = done
            for key, value in last.items():
                if key != "step" and math.isfinite(value):
                    live.log_metric(key, value)
        # The last step needs no resume checkpoint: the caller exports the weights next.
        if work_dir is not None and done < cfg.steps and (done % cfg.save_interval == 0 or done == end):
            save_checkpoint(engine, work_dir, done, live_dir=live.dir if live is not None else None)
        bar.set_postfix(loss=f"{train_loss:.3f}", refresh=False)
        bar.update(1)
    bar.close()
    last["mean_tokens_per_s"] = tokens_done / seconds if seconds > 0 else 0.0
    if live is not None:
        live.make_summary()
    return last


# --------------------------------------------------------------------------------------------
# 4. Resume checkpoints


def save_checkpoint(engine, work_dir: str | os.PathLike, step: int, live_dir: str | os.PathLike | None = None) -> None:
    """Save a DeepSpeed resume checkpoint tagged ``step{N}`` and drop the older ones (rank 0).

    The DVCLive folder ``live_dir`` (rank 0's) is copied into the step folder first: DeepSpeed
    writes ``latest`` last, so a checkpoint that ``latest`` names always holds the curves up to
    its own step, wherever a kill lands.
    """
    work_dir = Path(work_dir)
    tag = f"step{step:08d}"
    with writing(work_dir / tag):  # a full disk: one line naming the folder; older checkpoints stay
        if live_dir is not None:
            snapshot_live(live_dir, work_dir / tag)
        engine.save_checkpoint(str(work_dir), tag=tag, client_state={"step": step})
    barrier()
    if is_rank0():
        for old in work_dir.glob("step*"):
            if old.is_dir() and old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    barrier()


def snapshot_live(live_dir: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Copy the DVCLive folder into a resume checkpoint's step folder (``folder/live``).

    DVC deletes a stage's outputs before it reruns the stage, so a run that resumes after a
    kill would otherwise lose the curves logged before the checkpoint;
    :func:`restore_live` puts them back.
    """
    src, dst = Path(live_dir), Path(folder) / "live"
    tmp = dst.with_name("live.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if src.is_dir():
        shutil.copytree(src, tmp)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)


def restore_live(live_dir: str | os.PathLike, work_dir: str | os.PathLike) -> bool:
    """Replace ``live_dir`` by the copy saved in the resume checkpoint that ``latest`` names;
    False if there is none."""
    step = latest_step(work_dir)
    if step is None:
        return False
    src, dst = Path(work_dir) / f"step{step:08d}" / "live", Path(live_dir)
    if not src.is_dir():
        return False
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return True


def complete_steps(work_dir: str | os.PathLike) -> list[int]:
    """Steps of the resume checkpoints in ``work_dir`` whose folder holds DeepSpeed's model
    states (``step<N>/mp_rank_*_model_states.pt``, non-empty), newest first."""
    steps = []
    for folder in Path(work_dir).glob("step*"):
        if folder.is_dir() and folder.name[4:].isdigit() and any(
                f.stat().st_size > 0 for f in folder.glob("mp_rank_*_model_states.pt")):
            steps.append(int(folder.name[4:]))
    return sorted(steps, reverse=True)


def latest_step(work_dir: str | os.PathLike, repair: bool = False) -> int | None:
    """The step of the resume checkpoint named in ``work_dir/latest`` (None if there is none).

    DeepSpeed writes ``latest`` in place, so a full disk at that moment can leave it empty. A
    ``latest`` that is empty, garbled or names a missing folder stands for the newest complete
    step folder beside it (``complete_steps``), or for none. With ``repair`` (rank 0, before
    the engine loads), ``latest`` is rewritten to name that folder, or removed when there is
    none (the run then starts afresh), with one note line on stderr.
    """
    latest = Path(work_dir) / "latest"
    if not latest.is_file():
        return None
    try:
        tag = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        tag = ""
    if tag.startswith("step") and tag[4:].isdigit() and (Path(work_dir) / tag).is_dir():
        return int(tag[4:])
    found = complete_steps(work_dir)
    if repair:
        if found:
            from .io import atomic_path

            with atomic_path(latest) as tmp:
                tmp.write_text(f"step{found[0]:08d}")
            print(f"note: {latest} names {tag[:40]!r}, not a resume checkpoint; resuming from the newest "
                  f"complete one, step{found[0]:08d}", file=sys.stderr)
        else:
            latest.unlink(missing_ok=True)
            print(f"note: {latest} names {tag[:40]!r}, not a resume checkpoint, and no complete step folder is "
                  "beside it; starting afresh", file=sys.stderr)
    return found[0] if found else None


def resume(engine, work_dir: str | os.PathLike) -> int:
    """Load the latest resume checkpoint in ``work_dir`` (if any); return the steps it had done.

    Checkpoint files are read with ``torch.load(weights_only=True)``: tensors, plain containers
    and the few DeepSpeed classes in ``CHECKPOINT_CLASSES``, nothing else is unpickled (a file
    that wants anything else is refused with a one-line error, before anything of it runs).
    """
    work_dir = Path(work_dir)
    if latest_step(work_dir) is None:
        return 0
    saved = engine.checkpoint_engine
    engine.checkpoint_engine = weights_only_checkpoint_engine()
    try:
        path, client_state = engine.load_checkpoint(str(work_dir))
    finally:
        engine.checkpoint_engine = saved
    if path is None:
        raise PipelineError(f"{work_dir}: could not load the resume checkpoint named in 'latest'")
    return int(client_state["step"])


def checkpoint_classes() -> list:
    """The non-tensor classes in DeepSpeed's checkpoint files at ZeRO 0-3, fp32 and bf16 (the
    optimizer states of ZeRO 1-3 hold a loss scaler, the ZeRO stage and fragment addresses)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def weights_only_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True`` and only
    ``checkpoint_classes`` allowed (DeepSpeed's own engine passes ``weights_only=False``)."""
    import pickle

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(checkpoint_classes()):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as exc:
                found = re.search(r"(?:Unsupported global|unsupported GLOBAL|Unsupported operand)[^\n]*", str(exc))
                what = found.group(0)[:160] if found else "not an allowed object"
                raise PipelineError(f"{path}: refused to load a resume checkpoint that holds more than tensors "
                                    f"and DeepSpeed state ({what}); delete the file to start fresh") from None
            except (RuntimeError, EOFError) as exc:
                raise PipelineError(f"{path}: not a readable resume checkpoint ({str(exc).splitlines()[0][:120]}); "
                                    "delete the file to start fresh") from None

    return WeightsOnlyCheckpointEngine()


def open_live(live_dir: str | os.PathLike, work_dir: str | os.PathLike, start: int):
    """The DVCLive ``Live`` of a run that starts at ``start``: fresh at 0; when resuming, the
    log saved with the checkpoint comes back (DVC deletes a stage's outputs before a rerun)
    without the rows logged after that checkpoint. Where DVCLive is not installed (a GPU node
    that has only the training dependencies) the curves go to the same files through
    :class:`TsvLive`."""
    if start:
        restore_live(live_dir, work_dir)
        _truncate_live_log(Path(live_dir), start)
    try:
        from dvclive import Live
    except ImportError:
        return TsvLive(live_dir)
    return Live(str(live_dir), resume=start > 0, report=None, save_dvc_exp=False, dvcyaml=None)


class TsvLive:
    """The part of DVCLive's ``Live`` the training loop uses, in DVCLive's layout: one
    ``plots/metrics/<key>.tsv`` per metric (timestamp, step, value; appended, so a resumed run
    continues its curves) and ``metrics.json`` with the last values."""

    def __init__(self, live_dir: str | os.PathLike):
        self.dir = str(live_dir)
        self.step = 0
        self._last: dict[str, float] = {}

    def log_metric(self, key: str, value: float) -> None:
        path = Path(self.dir) / "plots" / "metrics" / f"{key}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.is_file()
        with open(path, "a") as f:
            if new:
                f.write(f"timestamp\tstep\t{path.stem}\n")
            f.write(f"{int(time.time() * 1000)}\t{self.step}\t{value}\n")
        self._last[key] = float(value)

    def make_summary(self) -> None:
        summary: dict = {"step": self.step}
        for key, value in self._last.items():
            *parents, leaf = key.split("/")
            node = summary
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        Path(self.dir).mkdir(parents=True, exist_ok=True)
        (Path(self.dir) / "metrics.json").write_text(json.dumps(summary, indent=4) + "\n")

    def end(self) -> None:
        self.make_summary()


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


# --------------------------------------------------------------------------------------------
# 5. A run: resume key -> work folder -> engine -> resume -> DVCLive -> train -> export -> finish


def open_work(work_root: str | os.PathLike, what: dict, steps: int, rank: int) -> WorkDir:
    """The locked work folder of a training run, ``work_root/<key>``. The key (rank 0's, for
    every rank) is the ``workdir.resume_key`` of ``what`` (``params``, ``inputs``, ``code``). A
    run of this key that had finished is never resumed (its folder is emptied), so a forced
    rerun trains from scratch."""
    key = rank0_key(lambda: resume_key(what["params"], what["inputs"], what["code"], DigestCache(work_root)))
    work = WorkDir(work_root, key, lock=rank == 0)
    if rank == 0 and (latest_step(work.dir, repair=True) or 0) >= steps:
        work.clear()  # a run of this key that had finished is never resumed: train afresh
    barrier()
    return work


def fit(model, cfg: TrainConfig, work: WorkDir | None, live_dir, loop: Callable, name: str):
    """Wrap ``model`` in its engine, resume from ``work`` (none: start at 0), open DVCLive
    (rank 0, with a work folder and a ``live_dir``) and run ``loop(engine, start, live)`` (the
    training loop, returning its summary). Returns ``(engine, start, summary)``."""
    engine = build_engine(model, cfg)
    start = resume(engine, work.dir) if work is not None else 0
    live = open_live(live_dir, work.dir, start) if is_rank0() and work is not None and live_dir is not None else None
    if start and is_rank0():
        print(f"{name}: resumed from {work.dir} at step {start}")
    summary = loop(engine, start, live)
    if live is not None:
        live.end()
    return engine, start, summary


def finish(engine, model_config, out: str | os.PathLike | None, extra: dict, work: WorkDir | None) -> None:
    """Export the trained model to ``out`` (every rank calls; none: no export), then delete the
    work folder: the run is exported, nothing is left to resume."""
    if out is not None:
        export_checkpoint(engine, model_config, out, extra=extra)
    if work is not None:
        barrier()
        if is_rank0():
            work.finish()
