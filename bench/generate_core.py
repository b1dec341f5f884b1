"""Greedy decoding speed of the decoding core: KV cache vs full recomputation per token.

Not a test. Same model, same prompts (a batch of different lengths), same neighbors: new
tokens/s of ``greedy_generate(use_cache=True)`` against ``use_cache=False`` (the reference's
approach: the whole sequence, encoder included, again for every new token), and checks that
both give the same tokens. Target (issue 6): >= 5x at 64 new tokens.

    .venv/bin/python bench/generate_core.py                 # tiny preset, Retro
    .venv/bin/python bench/generate_core.py --gpt --batch 16
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from instructretro import presets
from instructretro.decoding import greedy_generate
from instructretro.model import Retro


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--gpt", action="store_true", help="retro=false")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--prompt", type=int, default=150, help="longest prompt; others shorter")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = presets.get(args.preset, retro=not args.gpt)
    model = Retro(cfg).eval()
    rng = np.random.default_rng(0)
    lengths = np.linspace(args.prompt // 3, args.prompt, args.batch).astype(int)
    prompts = [[int(t) for t in rng.integers(3, cfg.vocab_size, n)] for n in lengths]
    k, R = cfg.num_neighbors, cfg.neighbor_length
    calls = {"n": 0}

    def neighbors_fn(b, j, chunk_tokens):
        calls["n"] += 1
        g = np.random.default_rng(abs(hash(tuple(chunk_tokens))) % 2**32)
        return g.integers(3, cfg.vocab_size, (k, R)), np.ones((k, R), dtype=bool)

    fn = None if args.gpt else neighbors_fn
    results = {}
    for use_cache in (True, False, True):  # cached twice: first run warms up
        calls["n"] = 0
        t0 = time.perf_counter()
        out = greedy_generate(model, prompts, args.new, eod_id=-1, neighbors_fn=fn, use_cache=use_cache)
        sec = time.perf_counter() - t0
        results[use_cache] = (out, sec, calls["n"])
    new_tokens = args.batch * args.new
    (c_out, c_sec, c_calls), (u_out, u_sec, u_calls) = results[True], results[False]
    print(f"{'GPT' if args.gpt else 'Retro'} preset {args.preset}: batch {args.batch}, prompts "
          f"{lengths.min()}..{lengths.max()} tokens, {args.new} new tokens each, threads {torch.get_num_threads()}")
    print(f"cached     {c_sec:7.2f} s  {new_tokens / c_sec:8.1f} new tokens/s  neighbors_fn calls {c_calls}")
    print(f"recompute  {u_sec:7.2f} s  {new_tokens / u_sec:8.1f} new tokens/s  neighbors_fn calls {u_calls}")
    print(f"speedup {u_sec / c_sec:.1f}x (target >= 5x); same tokens: {c_out == u_out}")


if __name__ == "__main__":
    main()
