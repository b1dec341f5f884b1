"""Stage train-index: build the Faiss index ``index.factory`` names ('auto' sizes it to the DB)
and train it on a seeded sample of ``index.train_points`` DB embeddings; write it empty.
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
    index, metrics = train_index(args.embeddings, factory, train_points, p.get("index.seed", int))
    write_index(index, args.out)
    write_json(args.metrics, metrics)
    print(f"train-index: {metrics['factory']} trained on {metrics['training_points']} points "
          f"in {metrics['train_seconds']} s ({metrics['train_device']})")


if __name__ == "__main__":
    main()
