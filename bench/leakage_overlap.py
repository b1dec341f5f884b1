"""Benchmark: the leakage overlap (longest common run of each chunk with its neighbors) against
the evaluation forward passes it sits beside, on the same chunks, in one process.

Builds ``--chunks`` validation-like chunks with random tokens (``--samples`` of
``seq_length // chunk_length`` chunks), each with ``k`` neighbors of chunk + continuation
(a few of them planted copies, some positions masked), and times
  1. the Retro forward pass of the stage (a fresh ``--preset`` model, eval mode, batches of
     ``--batch`` samples): what one evaluation of the chunks costs;
  2. ``overlap.chunk_overlap`` on the same chunks and neighbors, the way stage leakage calls it.
Prints seconds per 1,000 chunks of each and the ratio (2) / (1). Rounds alternate the two so
that load from other processes hits both alike; the best round of each counts.

    python bench/leakage_overlap.py [--chunks 1000] [--k 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from instructretro import presets
from instructretro.model import Retro
from instructretro.overlap import chunk_overlap, with_ids


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--chunks", type=int, default=1000, help="chunks that read neighbors")
    ap.add_argument("--k", type=int, default=2, help="neighbors per chunk")
    ap.add_argument("--batch", type=int, default=8, help="samples per forward pass")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = presets.get(args.preset, num_neighbors=args.k)
    cl, C, V = config.chunk_length, config.seq_length // config.chunk_length, config.vocab_size
    B = -(-args.chunks // (C - 1))  # samples: every chunk but a sample's first reads neighbors
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, V, (B, config.seq_length))
    neighbors = rng.integers(3, V, (B, C, args.k, 2 * cl))
    neighbors[:, :-1, 0, cl:] = tokens.reshape(B, C, cl)[:, 1:]  # the continuation holds the next chunk
    mask = np.ones(neighbors.shape, dtype=bool)
    mask[:, :, -1, 100:] = False  # the last neighbor is cut short (a document end)
    model = Retro(config).eval()

    def forward():
        with torch.no_grad():
            for lo in range(0, B, args.batch):
                model(torch.from_numpy(tokens[lo : lo + args.batch]), torch.from_numpy(neighbors[lo : lo + args.batch]),
                      torch.from_numpy(mask[lo : lo + args.batch]))

    def overlap():
        chunks = tokens.reshape(B, C, cl)[:, 1:].reshape(-1, cl)
        nb = with_ids(neighbors, mask)[:, :-1].reshape(-1, args.k, 2 * cl)
        return chunk_overlap(chunks, nb)

    forward()  # warm up both
    got = overlap()
    assert np.allclose(got.reshape(B, C - 1), 1.0), "the planted continuations are full copies"
    best = {"forward": float("inf"), "overlap": float("inf")}
    for _ in range(args.rounds):
        for name, fn in (("forward", forward), ("overlap", overlap)):
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    n = B * (C - 1)
    per = {k: v * 1000 / n for k, v in best.items()}
    print(f"{args.preset} Retro, {n} chunks of {cl} tokens, k={args.k} neighbors of {2 * cl} tokens, "
          f"{args.threads} thread(s), best of {args.rounds}")
    print(f"  evaluation forward pass: {per['forward']:8.3f} s per 1,000 chunks")
    print(f"  overlap (numpy DP):      {per['overlap']:8.3f} s per 1,000 chunks")
    print(f"  ratio overlap / forward: {per['overlap'] / per['forward']:.3f}")


if __name__ == "__main__":
    main()
