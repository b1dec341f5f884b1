"""Stage add-index: add every DB chunk embedding to the trained index in blocks, ids = chunk ids,
and check the index holds exactly the number of DB chunks.
"""

from __future__ import annotations

import argparse
import time

from instructretro import params as P
from instructretro.errors import cli
from instructretro.index import populate, read_index, write_index
from instructretro.io import write_json


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--embeddings", default="data/db/embeddings.h5")
    ap.add_argument("--trained", default="data/index/trained.faiss")
    ap.add_argument("--out", default="data/index/populated.faiss")
    ap.add_argument("--metrics", default="metrics/add_index.json")
    args = ap.parse_args(argv)
    p = P.load(args.params)
    block_size = P.positive("index.add_block_size", p.get("index.add_block_size", int))
    t0 = time.perf_counter()
    index = populate(read_index(args.trained), args.embeddings, block_size)
    write_index(index, args.out)
    metrics = {"ntotal": int(index.ntotal), "seconds": round(time.perf_counter() - t0, 3)}
    write_json(args.metrics, metrics)
    print(f"add-index: {index.ntotal} chunks in the index")


if __name__ == "__main__":
    main()
