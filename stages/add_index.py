"""Stage add-index: add every DB chunk embedding to the trained index in blocks, ids = chunk ids,
and check the index holds exactly the number of DB chunks.

An IVF index whose codes exceed ``index.ondisk_above`` bytes is built with on-disk inverted lists:
``<out>.ivfdata`` beside the index file (the index refers to it by that path).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from instructretro import params as P
from instructretro.errors import cli
from instructretro.index import code_bytes, populate, read_index, write_index
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
    ondisk_above = P.positive("index.ondisk_above", p.get("index.ondisk_above", int))
    t0 = time.perf_counter()
    trained = read_index(args.trained)
    ivfdata = f"{args.out}.ivfdata"
    index = populate(trained, args.embeddings, block_size, ondisk_above=ondisk_above, ivfdata=ivfdata)
    write_index(index, args.out)
    ondisk = Path(ivfdata).is_file() and index.ntotal and code_bytes(index, index.ntotal) > ondisk_above
    if not ondisk:
        Path(ivfdata).unlink(missing_ok=True)  # a leftover of an earlier on-disk build
    metrics = {"ntotal": int(index.ntotal), "seconds": round(time.perf_counter() - t0, 3),
               "code_bytes": code_bytes(index, index.ntotal), "ondisk_lists": ivfdata if ondisk else None}
    write_json(args.metrics, metrics)
    print(f"add-index: {index.ntotal} chunks in the index")


if __name__ == "__main__":
    main()
