"""Stage generate-world: write the embedded default data set (a seeded synthetic world) to ``--out``.

See ``instructretro.world`` for what it contains and why it is shaped that way.
"""

from __future__ import annotations

import argparse

from instructretro import params as P
from instructretro.errors import cli
from instructretro.world import write_world


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="data/world")
    args = ap.parse_args(argv)
    p = P.load(args.params)
    counts = write_world(
        args.out,
        num_entities=P.positive("world.num_entities", p.get("world.num_entities", int)),
        docs_per_entity=p.get("world.docs_per_entity", int),
        qa_questions=P.positive("world.qa_questions", p.get("world.qa_questions", int)),
        sft_conversations=P.positive("world.sft_conversations", p.get("world.sft_conversations", int)),
        seed=p.get("world.seed", int),
    )
    print("generate-world: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
