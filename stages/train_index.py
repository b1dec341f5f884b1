"""Stage train-index: build the Faiss index ``index.factory`` names ('auto' sizes it to the DB)
and train it on a seeded sample of at most ``index.train_points`` DB embeddings (fewer when the
index cannot use more), read in one streaming pass; IVF k-means on every GPU Faiss sees, the
coarse quantizer built on CPU over the centroids; write it empty.
"""

from __future__ import annotations

import argparse

from instructretro import params as P
from instructretro.errors import cli
from instructretro.index import train_index, write_index
from instructretro.io import write_json


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--embeddings", default="data/db/embeddings.h5")
    ap.add_argument("--out", default="data/index/trained.faiss")
    ap.add_argument("--metrics", default="metrics/train_index.json")
    args = ap.parse_args(argv)
    p = P.load(args.params)
    factory = p.get("index.factory", str)
    train_points = P.positive("index.train_points", p.get("index.train_points", int))
    block_size = P.positive("index.add_block_size", p.get("index.add_block_size", int))
    index, metrics = train_index(args.embeddings, factory, train_points, p.get("index.seed", int), block_size)
    write_index(index, args.out)
    write_json(args.metrics, metrics)
    print(f"train-index: {metrics['factory']} trained on {metrics['training_points']} points "
          f"({metrics['training_points_bound']}) in {metrics['train_seconds']} s: {metrics['devices']}")


if __name__ == "__main__":
    main()
