"""Exact match / F1 normalisation and the score stage."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from instructretro.errors import PipelineError
from instructretro.score import exact_match, f1_score, normalize_answer, score_answers

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  a   cat,  an apple; the END. ", "cat apple end"),
        ("theatre anthem", "theatre anthem"),  # articles only as whole words
        ("“Paris”—France…", "parisfrance"),  # unicode quotes, em dash, ellipsis are punctuation
        ("Ça-va ¿qué?", "çava qué"),  # accents kept, ¿ removed
        ("The", ""),
        ("", ""),
        ("1,000", "1000"),
        ("A\tB\nC", "b c"),  # 'a' dropped, tabs/newlines collapse
    ],
)
def test_normalize(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_max_over_golds():
    assert exact_match("the Beatles!", ["Rolling Stones", "Beatles"]) == 1.0
    assert exact_match("Beatles band", ["Rolling Stones", "Beatles"]) == 0.0
    assert exact_match("", ["x"]) == 0.0
    assert exact_match("", ["The"]) == 1.0  # both normalise to empty


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
    assert f1_score("the", ["an"]) == 1.0


def test_score_answers_averages_in_percent():
    recs = [
        {"prediction": "Paris.", "answer": ["paris"]},
        {"prediction": "London", "answer": ["Paris"]},
        {"prediction": "the big apple", "answer": ["Big Apple city", "NYC"]},
        {"prediction": "", "answer": ["x"]},
    ]
    s = score_answers(recs)
    assert s["count"] == 4
    assert s["em"] == pytest.approx(25.0)
    assert s["f1"] == pytest.approx(100 * (1 + 0 + 0.8 + 0) / 4)
    assert score_answers([]) == {"em": 0.0, "f1": 0.0, "count": 0}


def test_score_answers_bad_record_names_line():
    with pytest.raises(PipelineError, match=r"f\.jsonl:2: 'answer'"):
        score_answers([{"prediction": "a", "answer": ["a"]}, {"prediction": "a", "answer": []}], source="f.jsonl")


def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def _run_stage(tmp_path, answers, f1_gold="max"):
    params = tmp_path / "params.yaml"
    params.write_text(f"score:\n  f1_gold: {f1_gold}\n")
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
    assert json.loads(out.read_text()) == {"em": 50.0, "f1": pytest.approx(100 * (1 + 2 / 3) / 2, abs=1e-3), "count": 2}
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
