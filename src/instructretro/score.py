"""Exact match and token F1 of QA answers, and how often the gold was in the contexts.

Two sets of rules, chosen by ``normalize`` (param ``score.normalize``):

- ``squad`` (the default): the rules of the official SQuAD v1.1 evaluation, which published
  NQ-open / TriviaQA numbers use. Normalisation: lowercase, delete the ASCII punctuation
  characters (Python's ``string.punctuation``; other characters such as curly quotes, dashes
  or ``¿`` stay), replace the whole words a / an / the by a space, collapse whitespace. Exact
  match compares normalised strings, so a gold that normalises to nothing ("the", "!") matches
  an empty prediction. F1 counts the tokens the two share; when they share none it is 0, so an
  empty-normalising gold never gets F1 above 0.
- ``unicode``: the same, but every Unicode punctuation character (category P*) is deleted too,
  and F1 of an empty prediction against an empty-normalising gold is 1 (as SQuAD v2.0 counts
  an unanswerable question answered with nothing).

Exact match of a question is the maximum over its gold answers; F1 too (SQuAD v1.1), or with
``f1_gold="first"`` (param ``score.f1_gold``) against the first gold only, as the reference
InstructRetro scored it. Task scores are averages over questions in percent (0-100).

``gold_in_context`` is the fraction (0-1) of questions whose normalised gold answer (any of
them) occurs, as whole tokens, in the normalised text of the contexts the model was shown: the
prompt contexts (the answer record's ``contexts``) and, in encoder mode, the retrieved
neighbors (its ``encoder_neighbors``, ``{id, text}``). It measures retrieval, independent of
the model; a task answered without retrieval (records without either field) has None.
"""

from __future__ import annotations

import collections
import re
import string
import unicodedata
from typing import Iterable

from .errors import PipelineError

NORMALIZE = ("squad", "unicode")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = frozenset(string.punctuation)


def _is_unicode_punct(ch: str) -> bool:
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str, normalize: str = "squad") -> str:
    """Lowercase, drop punctuation (ASCII for ``squad``, all of Unicode for ``unicode``), drop
    the articles a/an/the, collapse whitespace."""
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    text = text.lower()
    if normalize == "squad":
        text = "".join(ch for ch in text if ch not in _ASCII_PUNCT)
    else:
        text = "".join(ch for ch in text if not _is_unicode_punct(ch))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Iterable[str], normalize: str = "squad") -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction, normalize)
    return float(any(pred == normalize_answer(g, normalize) for g in golds))


def _f1(pred_tokens: list[str], gold_tokens: list[str], normalize: str) -> float:
    if normalize == "unicode" and not pred_tokens and not gold_tokens:
        return 1.0
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:  # also every case with an empty side under the squad rules
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Iterable[str], gold: str = "max", normalize: str = "squad") -> float:
    """Token-unigram F1 of the normalised prediction, maximum over the gold answers.

    ``gold="first"`` scores against the first gold answer only (the reference's convention).
    """
    golds = list(golds)
    if gold == "first":
        golds = golds[:1]
    elif gold != "max":
        raise ValueError(f"gold must be 'max' or 'first', got {gold!r}")
    pred = normalize_answer(prediction, normalize).split()
    return max((_f1(pred, normalize_answer(g, normalize).split(), normalize) for g in golds), default=0.0)


def gold_in_context(golds: Iterable[str], contexts: Iterable[str], normalize: str = "squad") -> bool:
    """Whether any normalised gold occurs as whole tokens in the normalised joined contexts."""
    text = f" {' '.join(normalize_answer(c, normalize) for c in contexts)} "
    return any(g and f" {g} " in text for g in (normalize_answer(x, normalize) for x in golds))


def score_answers(records: Iterable[dict], source: str = "answers", f1_gold: str = "max",
                  normalize: str = "squad") -> dict:
    """Average EM and F1 (0-100) over answer records ``{"prediction": str, "answer": [str]}``.

    ``source`` names the file in error messages (records are numbered from 1, one per line);
    ``f1_gold`` is ``max`` (SQuAD v1.1) or ``first`` (the reference's first-gold-only F1);
    ``normalize`` is ``squad`` (the official rules) or ``unicode``. ``gold_in_context`` is the
    fraction of questions whose gold occurs in the record's ``contexts`` and
    ``encoder_neighbors`` texts, or None when the records carry neither (retrieval ``none``). An
    empty set of records is an error.
    """
    em = f1 = 0.0
    count = found = with_contexts = 0
    for lineno, rec in enumerate(records, 1):
        where = f"{source}:{lineno}"
        if not isinstance(rec, dict):
            raise PipelineError(f"{where}: expected a JSON object")
        pred, golds = rec.get("prediction"), rec.get("answer")
        if not isinstance(pred, str):
            raise PipelineError(f"{where}: 'prediction' must be a string")
        if not isinstance(golds, list) or not golds or not all(isinstance(g, str) for g in golds):
            raise PipelineError(f"{where}: 'answer' must be a non-empty list of strings")
        if any(not g.strip() for g in golds):
            raise PipelineError(f"{where}: 'answer' holds an empty gold answer")
        if "contexts" in rec or "encoder_neighbors" in rec:
            contexts, neighbors = rec.get("contexts", []), rec.get("encoder_neighbors", [])
            if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
                raise PipelineError(f"{where}: 'contexts' must be a list of strings")
            if not isinstance(neighbors, list) or not all(isinstance(n, dict) and isinstance(n.get("text"), str)
                                                           for n in neighbors):
                raise PipelineError(f"{where}: 'encoder_neighbors' must be a list of {{id, text}}")
            with_contexts += 1
            found += gold_in_context(golds, contexts + [n["text"] for n in neighbors], normalize)
        em += exact_match(pred, golds, normalize)
        f1 += f1_score(pred, golds, f1_gold, normalize)
        count += 1
    if count == 0:
        raise PipelineError(f"{source}: no answers to score")
    out = {"em": round(100.0 * em / count, 4), "f1": round(100.0 * f1 / count, 4), "count": count}
    # every record of a task with retrieval carries its contexts (an empty list when none fit)
    out["gold_in_context"] = round(found / count, 4) if with_contexts == count else None
    return out
