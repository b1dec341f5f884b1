"""Stage embed: cut the database corpus (train split) into chunks and embed each chunk's text.

Writes ``data/db/embeddings.h5`` (chunk table, stable document ids, L2-normalised embeddings in ``embed.dtype``;
chunk id = row) and the metrics. Finished blocks live in ``--work`` until the file is complete,
so a killed run restarted resumes where it stopped.

Past one machine: ``deepspeed --num_gpus N stages/embed.py`` (or ``torchrun``) splits the blocks
over N ranks; rank 0 writes the same bytes as one process and the metrics, the others exit 0.
"""

from __future__ import annotations

import argparse

from instructretro import params as P
from instructretro.embed import STORAGE_DTYPES, embed_database, encoder_from_params
from instructretro.errors import cli
from instructretro.io import write_json


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--db", default="data/tokens/db")
    ap.add_argument("--tokenizer", default="data/tokenizer")
    ap.add_argument("--out", default="data/db/embeddings.h5")
    ap.add_argument("--work", default="data/work/embed")
    ap.add_argument("--metrics", default="metrics/embed.json")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = ap.parse_args(argv)
    p = P.load(args.params)
    chunk_length = P.positive("retro.chunk_length", p.get("retro.chunk_length", int))
    block_size = P.positive("embed.block_size", p.get("embed.block_size", int))
    dtype = p.get("embed.dtype", str, choices=STORAGE_DTYPES)
    encoder = encoder_from_params(p)
    metrics = embed_database(args.db, args.tokenizer, encoder, chunk_length, block_size, args.out, args.work, dtype)
    if metrics is None:
        return  # a rank other than 0: its blocks are written, rank 0 writes the outputs
    write_json(args.metrics, metrics)
    print(f"embed: {metrics['chunks_embedded']} chunks embedded, {metrics['chunks_dropped_no_encoder_tokens']} dropped "
          f"(no encoder tokens), {metrics['chunks_dropped_only_unknown_tokens']} dropped (only unknown tokens), "
          f"{metrics['chunks_per_s']} chunks/s, encoder {metrics['encoder']}")


if __name__ == "__main__":
    main()
