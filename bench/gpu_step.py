"""One Retro training step with DeepSpeed on a GPU: tokens/s and model FLOPs utilisation.

Not a test. Builds the ``843m`` preset (24 layers, 1024 hidden, 16 heads, vocab 256k, k=2
neighbors of 2 x 64 tokens per chunk) as Retro, wraps it in the same DeepSpeed engine the
pretrain stage uses (``instructretro.train.build_engine``: torch AdamW, ZeRO, bf16, clipping,
warmup + cosine), feeds random tokens and random neighbor tokens, runs ``--warmup`` untimed
steps and then ``--steps`` timed ones, and prints

    tokens/s         decoder tokens per second (all processes)
    model TFLOP/s    ``model.flops_per_token`` (decoder + LM head + encoder + CCA, fwd + bwd) x tokens/s
    MFU              model FLOP/s / the accelerator's dense bf16 peak (``--peak-tflops``)
    peak memory      the accelerator's max allocated bytes

On a GPU machine, one command (single GPU, no launcher needed):

    python bench/gpu_step.py                       # 843m Retro, bf16, micro batch 4, seq 2048
    deepspeed --num_gpus 8 bench/gpu_step.py --zero-stage 1

A CPU dry run of the same code path with the tiny preset (checks the script, not the speed):

    python bench/gpu_step.py --preset tiny --precision fp32 --seq-length 256 --micro-batch 2 --steps 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from instructretro import presets
from instructretro import checkpoint, dist
from instructretro import train as T
from instructretro.model import flops_per_token

# Dense bf16 peak per device (TFLOP/s) by name substring; the first match wins.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10", 125.0)]


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


def random_batch(config, micro_batch: int, seq_length: int, device, gen: torch.Generator) -> dict:
    """Random tokens and neighbor tokens of the shapes a pretraining batch has."""
    C = seq_length // config.chunk_length
    k, R = config.num_neighbors, config.neighbor_length
    tokens = torch.randint(3, config.vocab_size, (micro_batch, seq_length + 1), generator=gen)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(micro_batch, seq_length)}
    if config.retro:
        batch["neighbors"] = torch.randint(3, config.vocab_size, (micro_batch, C, k, R), generator=gen)
        batch["neighbor_mask"] = torch.ones(micro_batch, C, k, R, dtype=torch.bool)
    return T.to_device(batch, device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="843m", choices=presets.NAMES)
    ap.add_argument("--gpt", action="store_true", help="the same decoder without retrieval")
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--precision", default="bf16", choices=checkpoint.PRECISIONS)
    ap.add_argument("--zero-stage", type=int, default=0)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps (allocator, kernels)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the device's dense bf16 peak")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    rank, world = dist.init_distributed()
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    config = presets.get(args.preset, retro=not args.gpt, seq_length=args.seq_length)
    cfg = T.TrainConfig(steps=args.warmup + args.steps, micro_batch=args.micro_batch, grad_accum=1,
                        lr=2.5e-5, min_lr=2.5e-6, warmup=1, weight_decay=0.1, beta1=0.9, beta2=0.95,
                        clip=1.0, zero_stage=args.zero_stage, precision=args.precision, seed=1234,
                        activation_checkpointing=args.checkpointing)
    torch.manual_seed(cfg.seed)
    with torch.device("cpu"):
        model = T.build_model(config, cfg)  # the pretrain stage's build (zero.Init at ZeRO-3)
    n_params = model.num_parameters()
    engine = T.build_engine(model, cfg)
    gen = torch.Generator().manual_seed(rank)
    batch = random_batch(config, args.micro_batch, args.seq_length, engine.device, gen)

    def step() -> float:
        loss_sum, count = T.lm_loss(engine, batch)["loss"]
        loss = loss_sum / count
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    acc.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    acc.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps

    tokens_per_s = args.micro_batch * args.seq_length * world / seconds
    flops = flops_per_token(config, args.seq_length) * tokens_per_s
    name = acc.device_name() if acc.device_name() == "cpu" else torch.cuda.get_device_name()
    peak = args.peak_tflops or peak_tflops(name)
    if rank == 0:
        print(f"device            {name} x {world} ({acc.communication_backend_name()})")
        print(f"model             {args.preset} {'GPT' if args.gpt else 'Retro'}, {n_params / 1e6:.1f} M parameters, "
              f"{config.n_layers} layers, hidden {config.hidden}, CCA layers {list(config.cca_layers) if config.retro else []}, "
              f"k={config.num_neighbors}")
        print(f"step              micro batch {args.micro_batch} x seq {args.seq_length} per process, "
              f"{args.precision}, ZeRO {args.zero_stage}, checkpointing {'on' if args.checkpointing else 'off'}, "
              f"loss {loss:.3f}")
        print(f"time per step     {seconds * 1000:.1f} ms")
        print(f"tokens/s          {tokens_per_s:,.0f}")
        print(f"model TFLOP/s     {flops / 1e12 / world:.1f} per device "
              f"({flops_per_token(config, args.seq_length) / 1e9:.2f} GFLOP per token)")
        if peak:
            print(f"MFU               {flops / world / (peak * 1e12):.1%} of {peak:.0f} TFLOP/s dense bf16")
        else:
            print("MFU               n/a (unknown device peak; pass --peak-tflops)")
        if acc.device_name() != "cpu":
            print(f"peak memory       {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
