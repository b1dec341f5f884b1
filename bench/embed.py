"""Benchmark: our chunk encoder vs sentence-transformers ``encode`` on the same chunks, same model.

Reads chunk texts from a token store (default: the pretraining corpus of a built repo, the
"few thousand default chunks"), embeds them in one process with
  1. ``SentenceTransformer(<local all-MiniLM-L6-v2>).encode`` (float32, its default batching),
  2. ``instructretro.embed.Encoder`` in float32,
  3. ``instructretro.embed.Encoder`` with ``precision`` as params.yaml resolves it (auto),
and prints chunks/s of each, the ratio to (1), and the cosine agreement of the embeddings.
Rounds alternate the contenders so that load from other processes hits all of them alike.

    python bench/embed.py [--repo .] [--n 3000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from instructretro.chunks import chunk_table
from instructretro.embed import Encoder, chunk_texts, default_encoder_path
from instructretro.tokenizer import Tokenizer
from instructretro.tokenstore import TokenStore


def load_chunk_texts(repo: Path, n: int, chunk_length: int) -> list[str]:
    store = TokenStore(repo / "data/tokens/pretrain", "train")
    table = chunk_table(store.doc_lengths(), chunk_length)[:n]
    texts = chunk_texts(store, table, chunk_length, Tokenizer(repo / "data/tokenizer"))
    return [t for t in texts if t.strip()]


def timed(fn, texts):
    t0 = time.perf_counter()
    out = fn(texts)
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=".", help="a repo where tokenize has run")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--chunk-length", type=int, default=64)
    args = ap.parse_args()
    from sentence_transformers import SentenceTransformer

    texts = load_chunk_texts(Path(args.repo), args.n, args.chunk_length)
    print(f"{len(texts)} chunk texts, mean {np.mean([len(t) for t in texts]):.0f} characters; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    st = SentenceTransformer(str(default_encoder_path()), device="cpu")
    ours32 = Encoder("", precision="float32")
    ours = Encoder("", precision="auto")
    runs = {
        "sentence-transformers encode (fp32)": lambda t: st.encode(t, normalize_embeddings=True, convert_to_numpy=True),
        "ours, float32": ours32.encode,
        f"ours, precision auto -> {ours.precision}": ours.encode,
    }
    for fn in runs.values():  # warm-up (thread pools, oneDNN kernels)
        fn(texts[:64])
    seconds = {k: 0.0 for k in runs}
    outs = {}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            outs[name], s = timed(fn, texts)
            seconds[name] += s
            print(f"  round: {name}: {len(texts) / s:.1f} chunks/s", flush=True)
    base = next(iter(runs))
    for name in runs:
        rate = args.rounds * len(texts) / seconds[name]
        print(f"{name:42s} {rate:8.1f} chunks/s   x{seconds[base] / seconds[name]:.2f} vs sentence-transformers")
    names = list(runs)
    cos = lambda a, b: np.sum(outs[a] * outs[b], axis=1)
    print(f"cosine ours-fp32 vs ours-{ours.precision}: min {cos(names[1], names[2]).min():.5f} mean {cos(names[1], names[2]).mean():.6f}")
    print(f"cosine ours-fp32 vs sentence-transformers (it pools CLS/SEP too): min {cos(names[0], names[1]).min():.4f} "
          f"mean {cos(names[0], names[1]).mean():.4f}")


if __name__ == "__main__":
    main()
