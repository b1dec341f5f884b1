"""Stage query-neighbors: neighbor ids of every pretraining query chunk (train and valid), with
every DB chunk of the query sample's own documents excluded; recall vs exact search in metrics.

Past one machine: ``deepspeed --num_gpus N stages/query_neighbors.py`` (or ``torchrun``) splits
the query blocks over N ranks: each embeds and searches its blocks; rank 0 assembles the outputs
(the bytes of one process), the others exit 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from instructretro import params as P
from instructretro.embed import encoder_from_params
from instructretro.errors import PipelineError, cli
from instructretro.index import read_index, set_search_params
from instructretro.io import atomic_path, write_json
from instructretro.neighbors import file_key, query_neighbors


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--pretrain", default="data/tokens/pretrain")
    ap.add_argument("--tokenizer", default="data/tokenizer")
    ap.add_argument("--embeddings", default="data/db/embeddings.h5")
    ap.add_argument("--index", default="data/index/populated", help="the populated index folder (add-index)")
    ap.add_argument("--out", default="data/neighbors/neighbors.h5")
    ap.add_argument("--work", default="data/work/query")
    ap.add_argument("--metrics", default="metrics/query_neighbors.json")
    ap.add_argument("--recall-nprobe", default="metrics/recall_nprobe.csv", help="recall_at_k of the recall sample per nprobe")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = ap.parse_args(argv)
    p = P.load(args.params)
    chunk_length = P.positive("retro.chunk_length", p.get("retro.chunk_length", int))
    seq_length = P.positive("retro.seq_length", p.get("retro.seq_length", int))
    n_query = P.positive("query.num_neighbors_query", p.get("query.num_neighbors_query", int))
    n_save = P.positive("query.num_neighbors_save", p.get("query.num_neighbors_save", int))
    nprobe = P.positive("query.nprobe", p.get("query.nprobe", int))
    efsearch = P.positive("query.efsearch", p.get("query.efsearch", int))
    block_size = P.positive("query.block_size", p.get("query.block_size", int))
    recall_sample = p.get("query.recall_sample", int)
    recall_nprobe_max = p.get("query.recall_nprobe_max", int)
    if recall_nprobe_max < 0:
        raise PipelineError(f"{p.source}: param 'query.recall_nprobe_max' must be >= 0, got {recall_nprobe_max}")
    if recall_sample < 0:
        raise PipelineError(f"{p.source}: param 'query.recall_sample' must be >= 0, got {recall_sample}")
    if not Path(args.index).exists():
        raise PipelineError(f"{args.index}: populated index not found; run the train-index / add-index stages")

    def open_index():  # called by query_neighbors once it knows this process's rank
        index = read_index(args.index)
        set_search_params(index, nprobe, efsearch)
        return index

    encoder = encoder_from_params(p)
    metrics = query_neighbors(args.pretrain, args.tokenizer, encoder, open_index, args.embeddings,
                              chunk_length, seq_length, n_query, n_save, block_size, recall_sample,
                              p.get("query.seed", int), args.out, args.work, index_key=file_key(args.index),
                              recall_nprobe_max=recall_nprobe_max)
    if metrics is None:
        return  # a rank other than 0: its blocks are written, rank 0 writes the outputs
    curve = metrics.pop("recall_nprobe")
    metrics.update(nprobe=nprobe, efsearch=efsearch, precision=encoder.precision)
    write_json(args.metrics, metrics)
    with atomic_path(args.recall_nprobe) as tmp:
        Path(tmp).write_text("nprobe,recall_at_k\n" + "".join(f"{n},{'' if r is None else r}\n" for n, r in curve))
    print(f"query-neighbors: {metrics['train']['query_chunks']} train / {metrics['valid']['query_chunks']} valid "
          f"query chunks, recall@{metrics['k']} {metrics.get('recall_at_k')}, "
          f"fewer than k: {metrics['fraction_fewer_than_k']}")
    if metrics.get("warning"):
        print(f"query-neighbors: warning: {metrics['warning']}", file=sys.stderr)


if __name__ == "__main__":
    main()
