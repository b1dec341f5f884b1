"""Stage score: exact match and F1 (0-100) of every task's answers in ``--answers``.

Reads each ``<task>.jsonl`` written by the generate stage (records with ``prediction`` and the
gold ``answer`` list) and writes one metrics JSON ``{task: {"em", "f1", "count"}}``, which DVC
shows as ``<task>.em`` / ``<task>.f1`` columns in ``dvc metrics show`` and ``dvc exp show``.
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


def score_folder(folder: Path, f1_gold: str = "max") -> dict:
    """Scores of every ``*.jsonl`` in ``folder``, keyed by task name (the file stem)."""
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise PipelineError(f"{folder}: no answer files (*.jsonl); run the generate stage")
    return {f.stem: score_answers(read_answers(f), source=str(f), f1_gold=f1_gold) for f in files}


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--answers", default="data/answers")
    ap.add_argument("--metrics", default="metrics/score.json")
    args = ap.parse_args(argv)
    p = P.load(args.params)
    f1_gold = p.get("score.f1_gold", str, choices=("max", "first"))
    scores = score_folder(Path(args.answers), f1_gold)
    write_json(args.metrics, scores)
    for task, s in scores.items():
        print(f"score {task}: em {s['em']:.2f}  f1 {s['f1']:.2f}  ({s['count']} questions)")


if __name__ == "__main__":
    main()
