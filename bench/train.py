"""Training throughput on CPU: our Retro, our GPT (same decoder), transformers' GPT-2.

Not a test. In one process, times training steps (forward, loss, backward, AdamW step) of

- Retro (the given preset, neighbors of k x 2 x chunk_length random tokens per chunk),
- GPT: the same decoder with ``retro=False``,
- ``transformers.GPT2LMHeadModel`` of the same width, depth, heads, vocab and sequence length
  (random init from a GPT2Config, dropout off like ours, SDPA attention; nothing downloaded),

all with plain ``torch.optim.AdamW``. The models are timed in interleaved rounds and the median
per model is reported, so load from other processes hits all of them alike. Prints tokens/s,
model FLOP/s (``model.flops_per_token``; for GPT-2 the same count for its own matmuls) and the
ratios against the targets: Retro FLOP/s >= 0.9 x GPT's, our GPT tokens/s >= 1.0 x GPT-2's.

    .venv/bin/python bench/train.py                     # tiny preset, batch 8
    .venv/bin/python bench/train.py --threads 1 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from instructretro import presets
from instructretro.model import Retro, flops_per_token


def gpt2_flops_per_token(cfg) -> float:
    """Training FLOPs per token of GPT-2 counted like ``flops_per_token`` (4h MLP, tied head)."""
    h, T = cfg.hidden, cfg.seq_length
    layer = 2 * (4 * h * h + 2 * h * 4 * h) + 2 * h * T
    return 3.0 * (cfg.n_layers * layer + 2 * h * cfg.vocab_size)


def build_gpt2(cfg):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.seq_length, n_embd=cfg.hidden,
                        n_layer=cfg.n_layers, n_head=cfg.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=2, eos_token_id=2)
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config)


class Trainer:
    """One model, its optimizer and a fixed batch; ``step()`` runs one training step."""

    def __init__(self, name, model, batch, call):
        self.name, self.model, self.batch, self.call = name, model, batch, call
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def step(self) -> tuple[float, float]:
        """One training step; returns (wall seconds, process CPU seconds)."""
        t0, c0 = time.perf_counter(), time.process_time()
        logits = self.call(self.model, self.batch)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), self.batch["labels"].view(-1))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, time.process_time() - c0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    ap.add_argument("--only", default="", help="comma list of models to run (retro,gpt,gpt2)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    retro_cfg = presets.get(args.preset)
    gpt_cfg = presets.get(args.preset, retro=False)
    B, T, L = args.batch, retro_cfg.seq_length, retro_cfg.chunk_length
    k, R = retro_cfg.num_neighbors, retro_cfg.neighbor_length
    tokens = torch.randint(3, retro_cfg.vocab_size, (B, T))
    neighbors = torch.randint(3, retro_cfg.vocab_size, (B, T // L, k, R))
    mask = torch.ones_like(neighbors, dtype=torch.bool)
    mask[..., -R // 4:] = False  # some continuations cut at a document end
    labels = torch.cat([tokens[:, 1:], torch.full((B, 1), -100)], dim=1)  # next token; last ignored
    batch = {"tokens": tokens, "labels": labels, "neighbors": neighbors, "mask": mask}

    ours = lambda m, b: m(b["tokens"], b.get("neighbors"), b.get("mask"))  # noqa: E731
    trainers = {
        "retro": Trainer("retro", Retro(retro_cfg), batch, ours),
        "gpt": Trainer("gpt", Retro(gpt_cfg), {"tokens": tokens, "labels": labels}, ours),
        "gpt2": Trainer("gpt2", build_gpt2(gpt_cfg), {"tokens": tokens, "labels": labels},
                        lambda m, b: m(input_ids=b["tokens"]).logits),
    }
    if args.only:
        trainers = {n: t for n, t in trainers.items() if n in args.only.split(",")}
    flops = {"retro": flops_per_token(retro_cfg), "gpt": flops_per_token(gpt_cfg),
             "gpt2": gpt2_flops_per_token(gpt_cfg)}

    print(f"preset {args.preset}: layers {retro_cfg.n_layers} hidden {retro_cfg.hidden} heads "
          f"{retro_cfg.heads} vocab {retro_cfg.vocab_size} seq {T} batch {B}; Retro k={k} R={R} "
          f"CCA {retro_cfg.cca_layers} encoder {retro_cfg.encoder_layers} layers; "
          f"threads {torch.get_num_threads()}")
    for t in trainers.values():
        n = sum(p.numel() for p in t.model.parameters())
        print(f"  {t.name:6s} {n:>12,} params  {flops[t.name] / 1e6:8.2f} MFLOP/token")
        for _ in range(2):  # warm-up
            t.step()
    for _ in range(args.rounds):
        for t in trainers.values():
            steps = [t.step() for _ in range(args.steps)]
            t.times.append(sum(w for w, _ in steps) / args.steps)
            t.cpu_times.append(sum(c for _, c in steps) / args.steps)

    # Wall-clock is what a user sees; CPU time per step (process time / threads) is steadier
    # when other processes share the cores, so both are reported.
    threads = torch.get_num_threads()
    for clock in ("wall", "cpu"):
        tps, fps = {}, {}
        print(f"-- {clock} clock" + (f" (process CPU time / {threads} threads)" if clock == "cpu" else ""))
        for name, t in trainers.items():
            times = t.times if clock == "wall" else [c / threads for c in t.cpu_times]
            sec = statistics.median(times)
            tps[name] = B * T / sec
            fps[name] = tps[name] * flops[name]
            print(f"{name:6s} {sec * 1e3:8.1f} ms/step  {tps[name]:9.0f} tokens/s  "
                  f"{fps[name] / 1e9:7.2f} GFLOP/s  (min {min(times) * 1e3:.1f} ms, "
                  f"max {max(times) * 1e3:.1f} ms)")
        if {"retro", "gpt"} <= set(tps):
            print(f"Retro / GPT   tokens/s {tps['retro'] / tps['gpt']:.2f}x   "
                  f"model FLOP/s {fps['retro'] / fps['gpt']:.2f}x  (target >= 0.9x)")
        if {"gpt", "gpt2"} <= set(tps):
            print(f"GPT / GPT-2   tokens/s {tps['gpt'] / tps['gpt2']:.2f}x  (target >= 1.0x)   "
                  f"model FLOP/s {fps['gpt'] / fps['gpt2']:.2f}x")


if __name__ == "__main__":
    main()
