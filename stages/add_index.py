"""Stage add-index: add every DB chunk embedding to the trained index in blocks, ids = chunk ids,
and check the index holds exactly the number of DB chunks.

The output is one folder (one DVC output), ``--out``: ``index.faiss``, ``index.json`` (the
record) and, for an IVF index whose codes exceed ``index.ondisk_above`` bytes, its on-disk
inverted lists ``lists.ivfdata`` (their size and SHA-256 in the record; readers refuse lists
that do not match).
"""

from __future__ import annotations

import argparse
import time
from instructretro import params as P
from instructretro.errors import cli
from instructretro.index import LISTS_FILE, code_bytes, populate, read_index, write_populated
from instructretro.io import atomic_path, write_json


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--embeddings", default="data/db/embeddings.h5")
    ap.add_argument("--trained", default="data/index/trained.faiss")
    ap.add_argument("--out", default="data/index/populated", help="the populated index folder")
    ap.add_argument("--metrics", default="metrics/add_index.json")
    args = ap.parse_args(argv)
    p = P.load(args.params)
    block_size = P.positive("index.add_block_size", p.get("index.add_block_size", int))
    ondisk_above = P.positive("index.ondisk_above", p.get("index.ondisk_above", int))
    t0 = time.perf_counter()
    trained = read_index(args.trained)
    with atomic_path(args.out) as tmp:
        tmp.mkdir(parents=True)
        ivfdata = tmp / LISTS_FILE
        index = populate(trained, args.embeddings, block_size, ondisk_above=ondisk_above, ivfdata=ivfdata)
        record = write_populated(index, tmp, ivfdata if ivfdata.is_file() else None)
    ondisk = record["lists"] is not None
    metrics = {"ntotal": int(index.ntotal), "seconds": round(time.perf_counter() - t0, 3),
               "code_bytes": code_bytes(index, index.ntotal),
               "ondisk_lists": f"{args.out}/{LISTS_FILE}" if ondisk else None}
    write_json(args.metrics, metrics)
    print(f"add-index: {index.ntotal} chunks in the index")


if __name__ == "__main__":
    main()
