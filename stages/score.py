"""Stage score@<task>: exact match and F1 (0-100) of one task's answers.

Reads ``--answers`` (``data/answers/<task>.jsonl`` from generate@<task>: records with
``prediction``, the gold ``answer`` list and, with retrieval, the ``contexts`` shown) and writes
``{"em", "f1", "count", "gold_in_context"}`` to ``--metrics`` (``metrics/score/<task>.json``),
which ``dvc metrics show`` and ``dvc exp show`` list per task. ``score.normalize`` picks the
answer normalisation (``squad``: the official SQuAD v1.1 rules; ``unicode``), ``score.f1_gold``
the gold F1 is taken against; see ``instructretro.score``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from instructretro import params as P
from instructretro.errors import PipelineError, cli
from instructretro.io import write_json
from instructretro.score import NORMALIZE, score_answers


def read_answers(path: Path):
    """Yield the answer records of one task file; invalid UTF-8 or a malformed line names the
    file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PipelineError(f"{path}:{lineno}: invalid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
                raise PipelineError(f"{path}:{lineno}: malformed JSON ({reason})") from None


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--answers", required=True, help="one task's answers (JSON lines)")
    ap.add_argument("--metrics", required=True)
    args = ap.parse_args(argv)
    p = P.load(args.params)
    f1_gold = p.get("score.f1_gold", str, choices=("max", "first"))
    normalize = p.get("score.normalize", str, choices=NORMALIZE)
    path = Path(args.answers)
    if not path.is_file():
        raise PipelineError(f"{path}: answers not found; run the generate stage")
    s = score_answers(read_answers(path), source=str(path), f1_gold=f1_gold, normalize=normalize)
    write_json(args.metrics, s)
    gic = "" if s["gold_in_context"] is None else f"  gold in context {s['gold_in_context']:.3f}"
    print(f"score {path.stem}: em {s['em']:.2f}  f1 {s['f1']:.2f}{gic}  ({s['count']} questions)")


if __name__ == "__main__":
    main()
