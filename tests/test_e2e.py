"""One end-to-end run of the whole pipeline on a tiny world, in a copy of the repo."""

from __future__ import annotations

import json

import pytest

from e2e import copy_repo, dvc, ran_stages


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("e2e"))
    first = dvc(repo, "repro")
    return repo, first.stdout


@pytest.mark.slow
def test_repro_runs_every_stage_then_nothing(built):
    repo, out = built
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        names = {s.name for s in r.index.stages}
    assert set(ran_stages(out)) == names
    again = dvc(repo, "repro")
    assert ran_stages(again.stdout) == []
    status = dvc(repo, "status")
    assert "up to date" in status.stdout
    tok = json.loads((repo / "metrics" / "tokenize_pretrain.json").read_text())
    assert tok["train_documents"] > 0 and tok["valid_documents"] > 0


@pytest.mark.slow
def test_answers_carry_their_contexts_and_score_reports_gold_in_context(built):
    repo, _ = built
    answers = [json.loads(line) for line in (repo / "data" / "answers" / "world_qa.jsonl").read_text().splitlines()]
    assert answers and all(isinstance(a["contexts"], list) for a in answers)  # the default retrieval is prompt
    assert any(a["contexts"] for a in answers)
    score = json.loads((repo / "metrics" / "score" / "world_qa.json").read_text())
    assert set(score) == {"em", "f1", "count", "gold_in_context"} and 0.0 <= score["gold_in_context"] <= 1.0
    assert score["count"] == len(answers)
