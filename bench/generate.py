"""Benchmark (not a test): new tokens/s of greedy generation, on the same prompts, for

1. ours, Retro, KV cache (encoder run once per chunk)            -- what the generate stage uses
2. ours, Retro, full recomputation per new token                  -- the reference's approach
3. ours, GPT (model.retro=false), KV cache
4. transformers GPT2LMHeadModel.generate, KV cache, a randomly initialised GPT-2 of the same
   layers / hidden / heads / vocab (built from GPT2Config, nothing downloaded)

Every row generates exactly ``--new-tokens`` tokens (EOD is never the stop token here) from the
same left-padded batch of prompts of different lengths; Retro gets ``k`` random neighbors for
every chunk. Ratios are against (2), measured in the same process.

    python bench/generate.py                      # tiny preset, 4 prompts of 100..300 tokens, 64 new
    python bench/generate.py --preset tiny --hidden 512 --layers 8 --heads 8
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from instructretro import presets
from instructretro.decoding import greedy_generate
from instructretro.model import Retro


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = np.random.default_rng(seed)
    lengths = np.linspace(lo, hi, n).astype(int)
    return [[int(t) for t in g.integers(3, vocab, length)] for length in lengths]


def random_neighbors(k: int, R: int, vocab: int):
    """A neighbors_fn giving k random neighbors per chunk, fixed by the chunk's tokens."""

    def fn(b, j, chunk_tokens):
        g = np.random.default_rng(abs(hash(tuple(chunk_tokens))) % 2**32)
        return g.integers(3, vocab, (k, R)), np.ones((k, R), dtype=bool)

    return fn


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def hf_gpt2(config, prompts: list[list[int]], new_tokens: int):
    """A same-size GPT-2 from transformers and a closure generating from the same prompts."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gcfg = GPT2Config(vocab_size=config.vocab_size, n_positions=max(1024, config.seq_length * 2),
                      n_embd=config.hidden, n_layer=config.n_layers, n_head=config.heads,
                      n_inner=config.ffn_hidden, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gcfg).eval()
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1

    def run():
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                                  pad_token_id=0, eos_token_id=None, use_cache=True)

    return model, run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=300)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1, help="best of this many runs per method")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = dict(n_layers=args.layers, hidden=args.hidden, heads=args.heads,
                     seq_length=64 * -(-(args.max_len + args.new_tokens) // 64) + 64)
    if args.layers:
        overrides["cca_layers"] = tuple(range(2, args.layers + 1, 2))
    config = presets.get(args.preset, **overrides)
    gpt_config = presets.get(args.preset, **overrides, retro=False)
    torch.manual_seed(0)
    retro, gpt = Retro(config).eval(), Retro(gpt_config).eval()
    prompts = make_prompts(args.prompts, args.min_len, args.max_len, config.vocab_size)
    n_new = args.prompts * args.new_tokens
    neighbors = random_neighbors(config.num_neighbors, config.neighbor_length, config.vocab_size)
    print(f"preset {args.preset}: {config.n_layers} layers, hidden {config.hidden}, heads {config.heads}, "
          f"vocab {config.vocab_size}, chunk {config.chunk_length}, k={config.num_neighbors}; "
          f"Retro {retro.num_parameters():,} params, GPT {gpt.num_parameters():,}; torch threads {torch.get_num_threads()}")
    print(f"{args.prompts} prompts of {args.min_len}..{args.max_len} tokens, {args.new_tokens} new tokens each", flush=True)

    runs = {
        "retro_cached": lambda: greedy_generate(retro, prompts, args.new_tokens, -1, neighbors_fn=neighbors, use_cache=True),
        "retro_recompute": lambda: greedy_generate(retro, prompts, args.new_tokens, -1, neighbors_fn=neighbors, use_cache=False),
        "gpt_cached": lambda: greedy_generate(gpt, prompts, args.new_tokens, -1, use_cache=True),
    }
    hf_model, runs["hf_gpt2_generate"] = hf_gpt2(gpt_config, prompts, args.new_tokens)
    print(f"transformers GPT-2 of the same size: {sum(p.numel() for p in hf_model.parameters()):,} params")

    results, outputs = {}, {}
    for name, fn in runs.items():
        if args.repeats > 1:
            fn()  # warm-up
        seconds, outputs[name] = timed(fn, args.repeats)
        results[name] = n_new / seconds
        print(f"  {name}: {seconds:.2f} s", flush=True)
    assert outputs["retro_cached"] == outputs["retro_recompute"], "cached and recomputed tokens differ"
    base = results["retro_recompute"]
    print(f"{'method':<20} {'new tok/s':>10} {'vs recompute':>13}")
    for name, tps in results.items():
        print(f"{name:<20} {tps:>10.1f} {tps / base:>12.2f}x")
    print("cached == recomputed tokens: yes")


if __name__ == "__main__":
    main()
