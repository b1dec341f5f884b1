"""Exact invalidation: after one full build, each change makes exactly the expected stages
stale (the stages `dvc status` reports plus everything downstream of them in the DAG)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from e2e import copy_repo, dvc

ALL = ["generate-world", "tokenizer", "tokenize@db", "tokenize@pretrain", "embed", "train-index",
       "add-index", "query-neighbors", "pretrain", "leakage", "sft", "generate", "score"]
GPT = ["pretrain-gpt"]  # the GPT baseline reads the pretraining tokens only, never the retrieval stages
MODEL = ["pretrain", "sft", "generate", "score"]
FROM_TOKENIZER = ALL[1:] + GPT
FROM_EMBED = ALL[4:]
FROM_INDEX = ALL[5:]
FROM_QUERY = ALL[7:]


def _group(name: str) -> str:
    """Stage name as the tests speak of it: foreach stages per QA task (generate@nq) count as
    their group (generate); the two tokenize stages stay apart."""
    return name if name.startswith("tokenize@") else name.split("@")[0]


def _declared_stages() -> set[str]:
    from dvc.repo import Repo

    from e2e import REPO

    with Repo(str(REPO)) as r:
        return {_group(s.name) for s in r.index.stages}


pytestmark = pytest.mark.skipif(not set(ALL + GPT) <= _declared_stages(),
                                reason="the pipeline does not declare all nine stages yet")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A built pipeline whose corpora, QA and SFT files are plain files (not stage outputs),
    so a test can edit them as a user would."""
    repo = copy_repo(tmp_path_factory.mktemp("inval"))
    dvc(repo, "repro", "generate-world")
    shutil.copytree(repo / "data" / "world", repo / "corpora")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["corpus"] = {"db": "corpora/reference.jsonl", "pretrain": "corpora/documents.jsonl"}
    text = yaml.safe_dump(params, sort_keys=False).replace("data/world/", "corpora/")
    (repo / "params.yaml").write_text(text)
    dvc(repo, "repro")
    assert _stale(repo) == set()
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)  # corpora/ and dvc.lock: restored by checkout
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "built"], cwd=repo, check=True)
    return repo


def _graph(repo):
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        g = r.index.graph
        return {s.name: {a.name for a in __import__("networkx").ancestors(g, s)} for s in g.nodes}


def _stale(repo) -> set[str]:
    out = dvc(repo, "status", "--json").stdout
    direct = set(json.loads(out or "{}"))
    up = _graph(repo)
    stale = set(direct)
    for s in direct:
        stale |= up.get(s, set())
    return {_group(s) for s in stale}


def _set(repo, key, value):
    p = yaml.safe_load((repo / "params.yaml").read_text())
    node = p
    *parents, last = key.split(".")
    for k in parents:
        node = node[k]
    assert last in node, f"params.yaml has no {key}"
    node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def _edit_first_record(path):
    lines = path.read_text().splitlines(keepends=True)
    rec = json.loads(lines[0])
    for k in ("text", "question"):
        if k in rec:
            rec[k] = rec[k] + " Edited."
    if "messages" in rec:
        rec["messages"][-1]["content"] += " Edited."
    lines[0] = json.dumps(rec) + "\n"
    path.write_text("".join(lines))


CHANGES = {
    "pretraining corpus": (lambda r: _edit_first_record(r / "corpora" / "documents.jsonl"),
                           ["tokenize@pretrain"] + FROM_QUERY + GPT),
    "database corpus": (lambda r: _edit_first_record(r / "corpora" / "reference.jsonl"), FROM_TOKENIZER),
    "vocab size": (lambda r: _set(r, "tokenizer.vocab_size", 500), FROM_TOKENIZER),
    "encoder path": (lambda r: _set(r, "embed.encoder", "some/other/encoder"), FROM_EMBED),
    "chunk length": (lambda r: _set(r, "retro.chunk_length", 32), FROM_EMBED + GPT),
    "index factory": (lambda r: _set(r, "index.factory", "Flat"), FROM_INDEX),
    "nprobe": (lambda r: _set(r, "query.nprobe", 7), FROM_QUERY),
    "neighbors": (lambda r: _set(r, "query.num_neighbors_save", 3), FROM_QUERY),
    "pretrain lr": (lambda r: _set(r, "pretrain.lr", 0.0123), MODEL + GPT + ["leakage"]),
    "leakage filter": (lambda r: _set(r, "leakage.max_overlap", 0.5), ["leakage"]),
    "sft lr": (lambda r: _set(r, "sft.lr", 0.0123), MODEL[1:]),
    "sft dataset file": (lambda r: _edit_first_record(r / "corpora" / "sft" / "chat.jsonl"), MODEL[1:]),
    "file next to the sft data": (lambda r: (r / "corpora" / "sft" / "notes.jsonl").write_text("{}\n"), []),
    "generate setting": (lambda r: _set(r, "generate.max_new_tokens", 5), MODEL[2:]),
    "qa file": (lambda r: _edit_first_record(r / "corpora" / "qa.jsonl"), MODEL[2:]),
    "scoring option": (lambda r: _set(r, "score.f1_gold", "first"), MODEL[3:]),
}


@pytest.mark.slow
@pytest.mark.parametrize("change", list(CHANGES))
def test_exactly_the_dependent_stages_are_stale(repo, change):
    apply, expected = CHANGES[change]
    subprocess.run(["git", "checkout", "-q", "--", "."], cwd=repo, check=True)
    assert _stale(repo) == set()
    apply(repo)
    try:
        assert _stale(repo) == set(expected)
    finally:
        subprocess.run(["git", "checkout", "-q", "--", "."], cwd=repo, check=True)
        subprocess.run(["git", "clean", "-fdq", "--", "corpora"], cwd=repo, check=True)  # files a change added


@pytest.mark.slow
def test_adding_a_qa_task_stales_only_its_own_stages(repo):
    subprocess.run(["git", "checkout", "-q", "--", "."], cwd=repo, check=True)
    assert _stale(repo) == set()
    (repo / "corpora" / "nq.jsonl").write_text(json.dumps({"question": "who?", "answer": ["x"]}) + "\n")
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["generate"]["tasks"]["nq"] = {"path": "corpora/nq.jsonl", "style": "short"}
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    try:
        assert set(json.loads(dvc(repo, "status", "--json").stdout or "{}")) == {"generate@nq", "score@nq"}
    finally:
        (repo / "corpora" / "nq.jsonl").unlink()
        subprocess.run(["git", "checkout", "-q", "--", "."], cwd=repo, check=True)


@pytest.mark.slow
def test_one_corpus_for_both_reruns_everything_downstream(repo):
    subprocess.run(["git", "checkout", "-q", "--", "."], cwd=repo, check=True)
    _set(repo, "corpus.db", "corpora/documents.jsonl")
    _set(repo, "tokenize.db_valid_fraction", 0.1)
    dvc(repo, "repro")  # the reference recipe's setting: the DB is the pretraining train split
    assert _stale(repo) == set()
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one corpus"], cwd=repo, check=True)
    _edit_first_record(repo / "corpora" / "documents.jsonl")
    try:
        assert _stale(repo) == set(FROM_TOKENIZER)
    finally:
        subprocess.run(["git", "reset", "-q", "--hard", "HEAD~1"], cwd=repo, check=True)

