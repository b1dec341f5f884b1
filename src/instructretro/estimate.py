"""Per-GPU memory of a training run before it starts, and the settings that make it fit.

``python -m instructretro.estimate --model 43b --gpus 8 --gpu-mem 80`` (or ``make estimate
MODEL=43b GPUS=8 GPU_MEM=80``) prints, per GPU, the bytes of parameters, gradients, optimizer
state and activations for the preset's GPU recipe (``presets.GPU_RECIPES``), whether that fits,
and the cheapest settings that do (a search over ZeRO stage, activation checkpointing, micro
batch and CPU offload).

Accounting:

- Model state: the ZeRO paper's (Rajbhandari et al. 2020) for mixed precision with Adam, Psi
  parameters on N data-parallel GPUs: 2 Psi bytes of bf16 parameters, 2 Psi of gradients, 12 Psi
  of optimizer state (fp32 master weights, first and second moments); stage 1 partitions the
  optimizer state, stage 2 also the gradients, stage 3 also the parameters (each / N). fp32
  training holds 4 + 4 + 8 bytes per parameter, partitioned the same way. Offloading the
  optimizer moves its state (and ZeRO's fp32 gradient copy) to host memory; offloading the
  parameters (ZeRO-3) keeps only the gathered working set on the GPU. ZeRO-3 gathers the
  parameters of the module running now and the next one (prefetch): twice the largest module.
- Activations: what autograd saves in this model's forward, per token, counted from the code
  (``activation_elements``): a decoder layer keeps ``10 h + 4 f`` values (norm inputs and
  outputs, q/k/v and rotated q/k, the projection input, the SwiGLU input, gate/up, activation
  and product; attention keeps its output's log-sum-exp, no score matrix, as with the flash
  kernel), an encoder layer the same per neighbor token (``k x 2 x chunk_length / chunk_length``
  neighbor tokens per decoder token) plus ``8.2 h`` (embedding, cross-attention), a CCA layer
  ``3 h`` per neighbor token plus ``5.3 h``, the output layer the fp32 log-softmax (vocab
  values). The non-integer terms were fitted to measured saved tensors (hidden 64-128). Korthikanti et al. (2022) give ``s b h (34 + 5 a s / h)`` bytes per
  layer for a Megatron GPT layer with dropout and a stored score matrix; our layers have
  neither. With full checkpointing each layer keeps its input (``h`` values per token), the
  encoded neighbors are kept once, and backward recomputes one layer at a time: its working
  set is added once. The loss adds a transient of the logits in bf16 and fp32.
- Budget: 85% of each GPU's memory (allocator fragmentation, CUDA context, communication
  buffers).

``--hf FOLDER`` sizes an imported Hugging Face decoder: its architecture from ``config.json``,
the Retro additions (CCA layers, encoder, neighbors) and the GPU recipe from ``--model``
(``make estimate HF=<folder> MODEL=843m``).

``tests/test_estimate.py`` checks the parameter counts against the model built on the meta
device (every preset) and the activation count against the tensors a CPU forward saves.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass

from .errors import PipelineError, cli
from .model import ModelConfig

GIB = 1024**3
USABLE_FRACTION = 0.85  # of each GPU's memory
MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
OFFLOADS = (("none", "none"), ("cpu", "none"), ("cpu", "cpu"))  # (optimizer, params)
STAGE_ORDER = (1, 0, 2, 3)  # preferred ZeRO stage among settings that fit equally otherwise


# ----------------------------------------------------------------------------- parameters


def layer_parameters(config: ModelConfig) -> int:
    """Parameters of one decoder (or encoder) layer: two norms, attention, MLP."""
    h, f = config.hidden, config.ffn_hidden
    kv = config.n_kv_heads * config.head_dim
    norm = h if config.norm == "rmsnorm" else 2 * h  # gain (and bias)
    attention = h * (h + 2 * kv) + h * h  # qkv (grouped keys/values), proj
    attention += (h + 2 * kv if config.qkv_bias or config.linear_bias else 0) + (h if config.linear_bias else 0)
    mlp = 3 * h * f if config.mlp == "swiglu" else 2 * h * f  # gate_up + down, or up + down
    mlp += ((2 * f if config.mlp == "swiglu" else f) + h) if config.linear_bias else 0
    return 2 * norm + attention + mlp


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters per part of the model, counted from the architecture (no model is built)."""
    h, V = config.hidden, config.vocab_size
    norm = h if config.norm == "rmsnorm" else 2 * h
    layer = layer_parameters(config)
    cca = norm + 4 * h * h + (1 if config.cca_gate else 0)  # norm, q, kv, proj (and the gate)
    counts = {
        "embedding": V * h + config.learned_positions * h,
        "decoder": config.n_layers * layer + norm,  # + final norm
        "output": 0 if config.tie_embeddings else V * h,
        "cca": len(config.cca_layers) * cca if config.retro else 0,
        "encoder": (config.encoder_layers * layer + norm + 4 * h * h + norm) if config.retro else 0,
    }
    counts["total"] = sum(counts.values())
    return counts


def largest_module(config: ModelConfig) -> int:
    """Parameters of the largest module ZeRO-3 gathers at once (a layer, the embedding or the output)."""
    h = config.hidden
    layer = layer_parameters(config) + (4 * h * h + 2 * h if config.retro else 0)
    return max(layer, config.vocab_size * h)


# ----------------------------------------------------------------------------- activations


def neighbor_tokens_per_token(config: ModelConfig) -> float:
    return config.num_neighbors * config.neighbor_length / config.chunk_length if config.retro else 0.0


def activation_elements(config: ModelConfig) -> dict[str, float]:
    """Values autograd saves per decoder token in a training forward without checkpointing
    (see the module docstring); ``logits`` are fp32, the rest in the training precision."""
    h, f = config.hidden, config.ffn_hidden
    n = neighbor_tokens_per_token(config)
    out = {
        "decoder": config.n_layers * layer_elements(config) + 2 * h + 12,  # + final norm, token ids
        "cca": len(config.cca_layers) * (3 * h * n + 5.3 * h) if config.retro else 0.0,
        "encoder": n * (config.encoder_layers * layer_elements(config) + 8.2 * h) if config.retro else 0.0,
        "logits": float(config.vocab_size),
    }
    return out


def layer_elements(config: ModelConfig) -> float:
    """Values a decoder (or encoder) layer saves per token: 10 h + 4 f, plus the attention's
    log-sum-exp per head and the two norms' statistics."""
    return 10 * config.hidden + 4 * config.ffn_hidden + config.heads + 4


def activation_bytes(config: ModelConfig, micro_batch: int, seq_length: int, precision: str = "bf16",
                     checkpointing: bool = False) -> dict[str, float]:
    """Activation bytes per GPU for one micro batch: ``saved`` (kept from forward to backward)
    and ``working`` (the transient peak on top: the loss's logits copies, and with
    checkpointing one layer's recomputed activations)."""
    e = 2 if precision == "bf16" else 4
    tokens = micro_batch * seq_length
    el = activation_elements(config)
    logits = 4 * el["logits"] * tokens  # fp32 log-softmax output
    h, f = config.hidden, config.ffn_hidden
    n = neighbor_tokens_per_token(config)
    loss_peak = (e + (4 if e != 4 else 0)) * config.vocab_size * tokens  # the logits and their fp32 copy
    if not checkpointing:
        saved = e * tokens * (el["decoder"] + el["cca"] + el["encoder"]) + logits
        return {"saved": saved, "working": loss_peak}
    # each decoder layer keeps its input; the encoded neighbors are kept once; final norm + head
    saved = e * tokens * (config.n_layers * h + n * h + 2 * h) + logits
    layer = layer_elements(config)
    recompute = layer
    if config.retro:  # the first CCA layer recomputes the encoder, itself one layer at a time
        recompute += 3 * h * n + 5.3 * h + n * (config.encoder_layers * h + layer + 8.2 * h)
    return {"saved": saved, "working": max(loss_peak, e * tokens * recompute)}


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Settings:
    zero_stage: int
    micro_batch: int
    activation_checkpointing: bool
    offload_optimizer: str = "none"
    offload_params: str = "none"
    precision: str = "bf16"

    def describe(self) -> str:
        off = ([f"optimizer->{self.offload_optimizer}"] if self.offload_optimizer != "none" else []) + \
              ([f"params->{self.offload_params}"] if self.offload_params != "none" else [])
        return (f"{self.precision}, ZeRO {self.zero_stage}, micro batch {self.micro_batch}, "
                f"checkpointing {'on' if self.activation_checkpointing else 'off'}"
                + (f", offload {' '.join(off)}" if off else ""))


def memory(config: ModelConfig, settings: Settings, gpus: int, seq_length: int) -> dict[str, float]:
    """Bytes per GPU (and host bytes per GPU) of a run with ``settings`` on ``gpus`` GPUs."""
    psi = parameter_counts(config)["total"]
    N = max(1, gpus)
    if settings.precision == "bf16":
        p_b, g_b, o_b = 2, 2, 12
    else:
        p_b, g_b, o_b = 4, 4, 8
    stage = settings.zero_stage
    params = p_b * psi / (N if stage >= 3 else 1)
    grads = g_b * psi / (N if stage >= 2 else 1)
    optim = o_b * psi / (N if stage >= 1 else 1)
    host = 0.0
    if settings.offload_optimizer != "none":
        host += optim + 4 * psi / N  # state and ZeRO's fp32 gradient partition
        optim = 0.0
    gathered = 2 * p_b * largest_module(config) if stage == 3 else 0.0  # current + prefetched module
    if settings.offload_params != "none":
        host += params
        params = 0.0
    act = activation_bytes(config, settings.micro_batch, seq_length, settings.precision,
                           settings.activation_checkpointing)
    out = {"parameters": params, "gradients": grads, "optimizer": optim, "zero3_gathered": gathered,
           "activations": act["saved"], "working": act["working"]}
    out["total"] = sum(out.values())
    out["host"] = host
    return out


def check_settings(settings: Settings) -> str | None:
    """Why ``settings`` cannot run (None if they can): the rules of ``TrainConfig.validate_memory``."""
    if settings.offload_params != "none" and settings.zero_stage != 3:
        return "parameter offload needs ZeRO-3"
    if settings.offload_optimizer != "none" and settings.zero_stage < 1:
        return "optimizer offload needs ZeRO >= 1"
    return None


def search(config: ModelConfig, gpus: int, gpu_mem_gib: float, seq_length: int,
           global_batch: int | None = None) -> list[tuple[Settings, dict]]:
    """Every setting that fits, fastest first by rule of thumb: no offload before offload, no
    checkpointing (a third more compute) before checkpointing, ZeRO 0-2 before ZeRO-3 (which
    gathers every layer's parameters in forward and backward: 1.5x the traffic), a larger micro
    batch before a smaller one, then ZeRO 1 (the traffic of plain data parallelism, less
    memory), 0, 2.
    ``global_batch`` (optional) must be a multiple of micro x gpus."""
    budget = USABLE_FRACTION * gpu_mem_gib * GIB
    found = []
    for (opt, par), ckpt, stage, micro in itertools.product(OFFLOADS, (False, True), (0, 1, 2, 3), MICRO_BATCHES):
        s = Settings(stage, micro, ckpt, opt, par)
        if check_settings(s) is not None:
            continue
        if global_batch and global_batch % (micro * gpus):
            continue
        m = memory(config, s, gpus, seq_length)
        if m["total"] <= budget:
            found.append((s, m))
    order = {o: i for i, o in enumerate(OFFLOADS)}
    found.sort(key=lambda sm: (order[(sm[0].offload_optimizer, sm[0].offload_params)],
                               sm[0].activation_checkpointing, sm[0].zero_stage == 3, -sm[0].micro_batch,
                               STAGE_ORDER.index(sm[0].zero_stage)))
    return found


def recipe_settings(name: str) -> Settings:
    from . import presets

    r = presets.device_recipe(name, gpu=True)
    return Settings(r["zero_stage"], r["micro_batch"], r["activation_checkpointing"], r["offload_optimizer"],
                    r["offload_params"], r["precision"])


# ----------------------------------------------------------------------------- report


def _gb(x: float) -> str:
    return f"{x / GIB:8.1f}"


def imported_config(folder: str, name: str, retro: bool = True, seq_length: int | None = None):
    """The architecture of the Hugging Face decoder in ``folder`` with the Retro additions of
    preset ``name`` (CCA layers, encoder layers, neighbors, chunk length)."""
    from . import hf, presets

    base = presets.get(name, retro=retro)
    seq = -(-(seq_length or base.seq_length) // base.chunk_length) * base.chunk_length
    return hf.read_hf_config(folder, **{**presets.retro_additions(base), "seq_length": seq})


def report(name: str, gpus: int, gpu_mem_gib: float, seq_length: int | None = None, vocab_size: int | None = None,
           retro: bool = True, hf_folder: str | None = None) -> tuple[str, bool]:
    """The printed plan for preset ``name`` (or the imported ``hf_folder`` with ``name``'s Retro
    additions and GPU recipe); returns (text, whether the recipe fits)."""
    from . import presets

    if hf_folder:
        config = imported_config(hf_folder, name, retro, seq_length)
    else:
        config = presets.get(name, retro=retro, vocab_size=vocab_size)
    seq = seq_length or config.seq_length
    counts = parameter_counts(config)
    budget = USABLE_FRACTION * gpu_mem_gib * GIB
    recipe = recipe_settings(name)
    rows = [("recipe", recipe, memory(config, recipe, gpus, seq))]
    fits = rows[0][2]["total"] <= budget
    options = search(config, gpus, gpu_mem_gib, seq, presets.training(name)["global_batch"])
    if options:
        rows.append(("fits", *options[0]))
    title = f"{hf_folder} (Retro additions and recipe of {name})" if hf_folder else name
    lines = [f"{title} {'Retro' if retro else 'GPT'}: {counts['total']:,} parameters (decoder {counts['decoder']:,}, "
             f"embedding+output {counts['embedding'] + counts['output']:,}, encoder {counts['encoder']:,}, "
             f"CCA {counts['cca']:,}), seq {seq}, {gpus} GPUs x {gpu_mem_gib:g} GiB "
             f"(budget {budget / GIB:.1f} GiB each)",
             f"{'GiB per GPU':<8} {'params':>8} {'grads':>8} {'optim':>8} {'gather':>8} {'activ':>8} "
             f"{'working':>8} {'total':>8} {'host':>8}  settings"]
    for label, s, m in rows:
        lines.append(f"{label:<11} {_gb(m['parameters'])} {_gb(m['gradients'])} {_gb(m['optimizer'])} "
                     f"{_gb(m['zero3_gathered'])} {_gb(m['activations'])} {_gb(m['working'])} {_gb(m['total'])} "
                     f"{_gb(m['host'])}  {s.describe()}"
                     + ("" if label != "recipe" else ("  [fits]" if fits else "  [does NOT fit]")))
    if not options:
        lines.append("no setting fits: more GPUs, a shorter sequence, or NVMe offload (not modelled)")
    return "\n".join(lines), fits


# ----------------------------------------------------------------------------- cost of an SFT run


def machine_flops() -> float:
    """fp32 matmul FLOP/s of this machine (a 0.2 s probe), for cost estimates."""
    import torch

    a = torch.randn(1024, 1024)
    a @ a
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.2:
        a @ a
        n += 1
    return n * 2 * 1024**3 / (time.perf_counter() - t0)


def cost_line(config, settings: dict, flops_per_s: float, where: str) -> str:
    """One line: tokens, FLOPs and time of the full run at ``flops_per_s``."""
    from .model import flops_per_token

    tokens = settings["steps"] * settings["global_batch"] * settings["seq_length"]
    flops = flops_per_token(config, settings["seq_length"]) * tokens
    secs = flops / flops_per_s
    human = f"{secs / 86400:.1f} days" if secs > 86400 else f"{secs / 3600:.1f} h" if secs > 3600 else f"{secs / 60:.1f} min"
    return (f"sft cost: {settings['steps']} steps x {settings['global_batch']} x {settings['seq_length']} tokens "
            f"= {tokens:.2e} tokens, {flops:.2e} FLOPs: about {human} {where}")


def print_cost(config, settings: dict) -> None:
    """The full run's cost here (at this machine's fp32 matmul speed, a lower bound) and on GPUs."""
    here = machine_flops()
    print(cost_line(config, settings, here, f"here at best ({here / 1e9:.0f} GFLOP/s fp32 matmul)"))
    h100 = 8 * 989e12 * 0.4  # 8 H100s, bf16 dense peak, 40% model FLOPs utilisation
    print(cost_line(config, settings, h100, "on 8 H100 GPUs at 40% MFU"))


def main(argv=None) -> int:
    from . import presets

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="43b", help=f"preset, or several comma-separated ({', '.join(presets.NAMES)})")
    ap.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs")
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    ap.add_argument("--seq-length", type=int, default=None, help="tokens per sample (default: the preset's)")
    ap.add_argument("--vocab-size", type=int, default=None, help="default: the preset's")
    ap.add_argument("--gpt", action="store_true", help="the GPT baseline instead of Retro")
    ap.add_argument("--hf", default="", metavar="FOLDER",
                    help="size this Hugging Face decoder folder (config.json); --model gives the Retro additions")
    args = ap.parse_args(argv)
    if args.gpus <= 0 or args.gpu_mem <= 0:
        raise PipelineError(f"--gpus and --gpu-mem must be positive, got {args.gpus} and {args.gpu_mem}")
    for i, name in enumerate(n.strip() for n in args.model.split(",")):
        text, _ = report(name, args.gpus, args.gpu_mem, args.seq_length, args.vocab_size, retro=not args.gpt,
                         hf_folder=args.hf or None)
        print(("\n" if i else "") + text)
    return 0


if __name__ == "__main__":
    sys.exit(cli(main)())
