"""Stage score@<task>: exact match and F1 (0-100) of one task's answers.

Reads ``--answers`` (``data/answers/<task>.jsonl`` from generate@<task>: records with
``prediction`` and the gold ``answer`` list) and writes ``{"em", "f1", "count"}`` to
``--metrics`` (``metrics/score/<task>.json``), which ``dvc metrics show`` and ``dvc exp show``
list per task.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from instructretro import params as P
from instructretro.errors import PipelineError, cli
from instructretro.io import write_json
from instructretro.score import score_answers


def read_answers(path: Path):
    """Yield the answer records of one task file; a malformed line names the file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise PipelineError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--answers", required=True, help="one task's answers (JSON lines)")
    ap.add_argument("--metrics", required=True)
    args = ap.parse_args(argv)
    p = P.load(args.params)
    f1_gold = p.get("score.f1_gold", str, choices=("max", "first"))
    path = Path(args.answers)
    if not path.is_file():
        raise PipelineError(f"{path}: answers not found; run the generate stage")
    s = score_answers(read_answers(path), source=str(path), f1_gold=f1_gold)
    write_json(args.metrics, s)
    print(f"score {path.stem}: em {s['em']:.2f}  f1 {s['f1']:.2f}  ({s['count']} questions)")


if __name__ == "__main__":
    main()
