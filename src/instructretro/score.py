"""Exact match and token F1 of QA answers, SQuAD v1.1 style.

Normalisation (applied to prediction and every gold answer): lowercase, remove punctuation
(ASCII and every Unicode punctuation category, so curly quotes, dashes and the like go too),
remove the articles a / an / the as whole words, collapse runs of whitespace.

- Exact match of one question: 1 if the normalised prediction equals any normalised gold.
- F1 of one question: token-unigram F1 between the normalised prediction and a gold, maximum
  over the golds (the SQuAD v1.1 convention). The reference InstructRetro scored F1 against the
  first gold answer only, so its F1 can be lower than ours on questions with several golds;
  ``f1_gold="first"`` (param ``score.f1_gold``) reproduces that. A gold that normalises to
  nothing matches only an empty prediction (F1 1.0), as in SQuAD v2.0's script.

Task scores are averages over questions, reported as percentages (0-100) with the count.
"""

from __future__ import annotations

import collections
import re
import string
import unicodedata
from typing import Iterable

from .errors import PipelineError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = set(string.punctuation)


def _is_punct(ch: str) -> bool:
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if not _is_punct(ch))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Iterable[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        # Both empty counts as a match (a gold that normalises to nothing, e.g. "the").
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Iterable[str], gold: str = "max") -> float:
    """Token-unigram F1 of the normalised prediction, maximum over the gold answers.

    ``gold="first"`` scores against the first gold answer only (the reference's convention).
    """
    golds = list(golds)
    if gold == "first":
        golds = golds[:1]
    elif gold != "max":
        raise ValueError(f"gold must be 'max' or 'first', got {gold!r}")
    pred = normalize_answer(prediction).split()
    return max((_f1(pred, normalize_answer(g).split()) for g in golds), default=0.0)


def score_answers(records: Iterable[dict], source: str = "answers", f1_gold: str = "max") -> dict:
    """Average EM and F1 (0-100) over answer records ``{"prediction": str, "answer": [str]}``.

    ``source`` names the file in error messages (records are numbered from 1, one per line);
    ``f1_gold`` is ``max`` (SQuAD v1.1) or ``first`` (the reference's first-gold-only F1).
    """
    em = f1 = 0.0
    count = 0
    for lineno, rec in enumerate(records, 1):
        pred = rec.get("prediction") if isinstance(rec, dict) else None
        golds = rec.get("answer") if isinstance(rec, dict) else None
        if not isinstance(pred, str):
            raise PipelineError(f"{source}:{lineno}: 'prediction' must be a string")
        if not isinstance(golds, list) or not golds or not all(isinstance(g, str) for g in golds):
            raise PipelineError(f"{source}:{lineno}: 'answer' must be a non-empty list of strings")
        em += exact_match(pred, golds)
        f1 += f1_score(pred, golds, f1_gold)
        count += 1
    if count == 0:
        return {"em": 0.0, "f1": 0.0, "count": 0}
    return {"em": round(100.0 * em / count, 4), "f1": round(100.0 * f1 / count, 4), "count": count}
