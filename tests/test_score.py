"""Exact match / F1 normalisation and the score stage."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from instructretro.errors import PipelineError
from instructretro.score import exact_match, f1_score, gold_in_context, normalize_answer, score_answers

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "text, squad, unicode",
    [  # expected values worked out by hand from the rules of the official SQuAD v1.1 evaluation
        ("The Eiffel Tower", "eiffel tower", "eiffel tower"),
        ("  a   cat,  an apple; the END. ", "cat apple end", "cat apple end"),
        ("theatre anthem", "theatre anthem", "theatre anthem"),  # articles only as whole words
        ("café!", "café", "café"),  # accents kept, ASCII '!' removed
        ("—", "—", ""),  # an em dash is not ASCII punctuation
        ("“Paris”—France…", "“paris”—france…", "parisfrance"),  # curly quotes, dash, ellipsis
        ("‘Hello’", "‘hello’", "hello"),
        ("Ça-va ¿qué?", "çava ¿qué", "çava qué"),
        ("The", "", ""),
        ("", "", ""),
        ("1,000", "1000", "1000"),
        ("A\tB\nC", "b c", "b c"),  # 'a' dropped, tabs/newlines collapse
    ],
)
def test_normalize(text, squad, unicode):
    assert normalize_answer(text) == squad  # the default is the official rules
    assert normalize_answer(text, "squad") == squad
    assert normalize_answer(text, "unicode") == unicode


def test_exact_match_max_over_golds():
    assert exact_match("the Beatles!", ["Rolling Stones", "Beatles"]) == 1.0
    assert exact_match("Beatles band", ["Rolling Stones", "Beatles"]) == 0.0
    assert exact_match("", ["x"]) == 0.0
    assert exact_match("", ["The"]) == 1.0  # both normalise to empty: equal strings
    assert exact_match("café", ["café!"]) == 1.0


@pytest.mark.parametrize(
    "pred, golds, em_squad, f1_squad, em_unicode, f1_unicode",
    [  # hand-worked from the official rules (squad) and from ours (unicode)
        ("", ["the"], 1.0, 0.0, 1.0, 1.0),  # official F1: no shared token -> 0, even for two empties
        ("the", ["an"], 1.0, 0.0, 1.0, 1.0),
        ("", ["—"], 0.0, 0.0, 1.0, 1.0),  # the dash survives the official normalisation
        ("Paris", ["“Paris”"], 0.0, 0.0, 1.0, 1.0),  # curly quotes stay part of the token
        ("rock — roll", ["rock and roll"], 0.0, 2 / 3, 0.0, 0.8),  # [rock, —, roll] vs [rock, and, roll]
        ("Paris", ["the", "Paris!"], 1.0, 1.0, 1.0, 1.0),
        ("x", ["the"], 0.0, 0.0, 0.0, 0.0),
    ],
)
def test_official_and_unicode_rules(pred, golds, em_squad, f1_squad, em_unicode, f1_unicode):
    assert exact_match(pred, golds, "squad") == em_squad
    assert f1_score(pred, golds, normalize="squad") == pytest.approx(f1_squad)
    assert f1_score(pred, golds) == pytest.approx(f1_squad)  # the default
    assert exact_match(pred, golds, "unicode") == em_unicode
    assert f1_score(pred, golds, normalize="unicode") == pytest.approx(f1_unicode)


def test_f1_token_level_and_max_over_golds():
    # pred "new york city" vs gold "york": p=1/3, r=1 -> 0.5
    assert f1_score("New York City", ["York"]) == pytest.approx(0.5)
    # max over golds picks the exact one
    assert f1_score("New York City", ["York", "new york city"]) == pytest.approx(1.0)
    # the reference's convention: first gold only
    assert f1_score("New York City", ["York", "new york city"], gold="first") == pytest.approx(0.5)
    # repeated tokens are counted with multiplicity
    assert f1_score("a b b", ["b"]) == pytest.approx(2 * (1 / 2) * 1 / (1 / 2 + 1))
    assert f1_score("", ["Paris"]) == 0.0
    assert f1_score("Paris", ["London"]) == 0.0


def test_gold_in_context_matches_whole_tokens():
    assert gold_in_context(["Paris"], ["The capital is Paris, France."])
    assert gold_in_context(["New York"], ["x", "he moved to new  york."])
    assert not gold_in_context(["Paris"], ["Parisian food"])  # not a whole token
    assert not gold_in_context(["the"], ["the the"])  # an empty-normalising gold is never found
    assert not gold_in_context(["Paris"], [])


def test_score_answers_averages_in_percent():
    recs = [
        {"prediction": "Paris.", "answer": ["paris"], "contexts": ["Paris is big"]},
        {"prediction": "London", "answer": ["Paris"], "contexts": []},
        {"prediction": "the big apple", "answer": ["Big Apple city", "NYC"], "contexts": ["nyc"]},
        {"prediction": "", "answer": ["x"], "contexts": ["y"]},
    ]
    s = score_answers(recs)
    assert s["count"] == 4
    assert s["em"] == pytest.approx(25.0)
    assert s["f1"] == pytest.approx(100 * (1 + 0 + 0.8 + 0) / 4)
    assert s["gold_in_context"] == 0.5
    no_ctx = [{k: v for k, v in r.items() if k != "contexts"} for r in recs]
    assert score_answers(no_ctx)["gold_in_context"] is None  # closed-book: no retrieval to judge


def test_score_answers_bad_record_names_line():
    with pytest.raises(PipelineError, match=r"f\.jsonl:2: 'answer'"):
        score_answers([{"prediction": "a", "answer": ["a"]}, {"prediction": "a", "answer": []}], source="f.jsonl")
    with pytest.raises(PipelineError, match=r"f\.jsonl:1: 'answer' holds an empty gold"):
        score_answers([{"prediction": "a", "answer": ["a", " "]}], source="f.jsonl")
    with pytest.raises(PipelineError, match=r"f\.jsonl: no answers"):
        score_answers([], source="f.jsonl")


def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def _run_stage(tmp_path, answers, f1_gold="max", normalize="squad"):
    params = tmp_path / "params.yaml"
    params.write_text(f"score:\n  f1_gold: {f1_gold}\n  normalize: {normalize}\n")
    out = tmp_path / "metrics" / "score" / f"{answers.stem}.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "score.py"), "--params", str(params),
         "--answers", str(answers), "--metrics", str(out)],
        capture_output=True, text=True,
    )
    return proc, out


def test_score_stage_writes_em_f1_count(tmp_path):
    answers = tmp_path / "nq.jsonl"
    _write(answers, [{"question": "q", "prediction": "Paris", "answer": ["Paris"]},
                     {"question": "q", "prediction": "x Paris", "answer": ["Rome", "Paris"]}])
    proc, out = _run_stage(tmp_path, answers)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text()) == {"em": 50.0, "f1": pytest.approx(100 * (1 + 2 / 3) / 2, abs=1e-3), "count": 2,
                                           "gold_in_context": None}
    first = out.read_bytes()
    proc, out = _run_stage(tmp_path, answers)
    assert out.read_bytes() == first  # deterministic bytes
    proc, out = _run_stage(tmp_path, answers, f1_gold="first")  # the reference's F1: first gold only
    assert json.loads(out.read_text())["f1"] == 50.0


def test_score_stage_malformed_line_names_file_and_line(tmp_path):
    answers = tmp_path / "nq.jsonl"
    answers.write_text('{"prediction": "a", "answer": ["a"]}\n{oops\n')
    proc, out = _run_stage(tmp_path, answers)
    assert proc.returncode == 1
    assert "nq.jsonl:2: malformed JSON" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()
    proc, out = _run_stage(tmp_path, answers, f1_gold="mean")
    assert proc.returncode == 1 and "score.f1_gold" in proc.stderr


def test_score_stage_normalize_param_and_gold_in_context(tmp_path):
    answers = tmp_path / "nq.jsonl"
    _write(answers, [{"question": "q", "prediction": "Paris", "answer": ["“Paris”"], "contexts": ["“Paris” is big"]},
                     {"question": "q", "prediction": "", "answer": ["the"], "contexts": ["Rome"]}])
    proc, out = _run_stage(tmp_path, answers)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text()) == {"em": 50.0, "f1": 0.0, "count": 2, "gold_in_context": 0.5}
    proc, out = _run_stage(tmp_path, answers, normalize="unicode")
    assert json.loads(out.read_text()) == {"em": 100.0, "f1": 100.0, "count": 2, "gold_in_context": 0.5}
    proc, out = _run_stage(tmp_path, answers, normalize="ascii")
    assert proc.returncode == 1 and "score.normalize" in proc.stderr


@pytest.mark.parametrize("content, message", [
    (b'{"prediction": "a", "answer": ["a"]}\n{"prediction": "\xff\xfe", "answer": ["a"]}\n',
     "nq.jsonl:2: invalid UTF-8"),
    (b"", "nq.jsonl: no answers to score"),
    (b"\n\n", "nq.jsonl: no answers to score"),
])
def test_score_stage_bad_answers_file_is_one_line(tmp_path, content, message):
    answers = tmp_path / "nq.jsonl"
    answers.write_bytes(content)
    proc, out = _run_stage(tmp_path, answers)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()
