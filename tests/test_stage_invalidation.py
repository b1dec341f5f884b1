"""Which stages DVC reruns when a QA task is added or a file next to the SFT data appears.

Fast: instead of building the pipeline, each stage under test is recorded in dvc.lock with
``dvc commit`` over placeholder files for its deps and outs, then ``dvc status`` is asked about
it after the change. (tests/test_invalidation.py checks the same on a real build.)
"""

from __future__ import annotations

import json

import pytest
import yaml

from e2e import copy_repo, dvc


def _stages(repo) -> dict:
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        return {s.name: s for s in r.index.stages}


def _commit(repo, *names):
    """Placeholder files for every missing dep and out of ``names``, then record them in dvc.lock."""
    stages = _stages(repo)
    for name in names:
        for item in list(stages[name].deps) + list(stages[name].outs):
            f = repo / item.def_path
            if f.exists():
                continue
            if f.suffix:
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(f"placeholder {item.def_path}\n")
            else:
                f.mkdir(parents=True)
                (f / "part").write_text("placeholder\n")
    dvc(repo, "commit", "-f", *names)


def _changed(repo, *names) -> set[str]:
    return set(json.loads(dvc(repo, "status", "--json", *names).stdout or "{}"))


def _edit_params(repo, fn):
    p = yaml.safe_load((repo / "params.yaml").read_text())
    fn(p)
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


@pytest.fixture
def repo(tmp_path):
    return copy_repo(tmp_path / "repo")


def test_one_generate_and_score_stage_per_task_named_by_it(repo):
    assert {"generate@world_qa", "score@world_qa"} <= set(_stages(repo))
    _commit(repo, "generate@world_qa", "score@world_qa")
    assert _changed(repo, "generate@world_qa", "score@world_qa") == set()

    (repo / "qa").mkdir()
    (repo / "qa" / "nq.jsonl").write_text(json.dumps({"question": "who?", "answer": ["x"]}) + "\n")
    _edit_params(repo, lambda p: p["generate"]["tasks"].update(nq={"path": "qa/nq.jsonl", "style": "short"}))
    stages = _stages(repo)
    assert {"generate@nq", "score@nq"} <= set(stages)
    assert "qa/nq.jsonl" in {d.def_path for d in stages["generate@nq"].deps}
    # adding a task leaves the first task's stages up to date
    assert _changed(repo, "generate@world_qa", "score@world_qa") == set()

    # its own entry and the shared settings do stale it
    _edit_params(repo, lambda p: p["generate"]["tasks"]["world_qa"].update(style="long"))
    assert _changed(repo, "generate@world_qa") == {"generate@world_qa"}
    _edit_params(repo, lambda p: p["generate"]["tasks"]["world_qa"].update(style="short"))
    assert _changed(repo, "generate@world_qa") == set()
    _edit_params(repo, lambda p: p["generate"].update(max_new_tokens=7))
    assert _changed(repo, "generate@world_qa") == {"generate@world_qa"}


def test_sft_depends_on_each_blend_file_not_on_its_folder(repo):
    """Each blend file is the dependency of its own sft-blend@<name> stage, whose record sft
    depends on: an unrelated file next to the SFT data stales nothing, an edited blend file
    stales its record stage (and so sft)."""
    blend = yaml.safe_load((repo / "params.yaml").read_text())["sft"]["blend"]
    records = [f"sft-blend@{name}" for name in blend]
    _commit(repo, "sft", *records)
    assert _changed(repo, "sft", *records) == set()

    chat = repo / "data" / "world" / "sft" / "chat.jsonl"  # the default blend's generated chat set
    (chat.parent / "notes.txt").write_text("an unrelated file next to the SFT data\n")
    (chat.parent / "other.jsonl").write_text("{}\n")
    assert _changed(repo, "sft", *records) == set()

    chat.write_text(chat.read_text() + "changed\n")
    assert _changed(repo, "sft", *records) == {"sft-blend@chat"}
    stages = _stages(repo)
    assert {e["path"] for e in blend.values()} == {d.def_path for s in records for d in stages[s].deps
                                                   if not d.def_path.startswith(("stages/", "src/", "params.yaml"))}
    assert "data/sft-blend" in {d.def_path for d in stages["sft"].deps}


def test_adding_a_blend_entry_needs_params_only(repo):
    """`dvc exp run -S '+sft.blend.mine={...}'` writes this entry into params.yaml: a new
    sft-blend@mine stage appears, dvc.yaml unedited, and sft sees it through data/sft-blend."""
    dvc_yaml = (repo / "dvc.yaml").read_text()
    (repo / "mine").mkdir()
    (repo / "mine" / "alpaca.jsonl").write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    _edit_params(repo, lambda p: p["sft"]["blend"].update(mine={"path": "mine/alpaca.jsonl", "format": "alpaca",
                                                               "prob": 0.1}))
    stages = _stages(repo)
    assert "mine/alpaca.jsonl" in {d.def_path for d in stages["sft-blend@mine"].deps}
    assert "sft-blend@mine" in dvc(repo, "dag", "--md", "sft").stdout  # upstream of sft
    assert (repo / "dvc.yaml").read_text() == dvc_yaml
    dvc(repo, "repro", "sft-blend@mine")  # the real stage: checks the file, records it
    record = json.loads((repo / "data" / "sft-blend" / "mine.json").read_text())
    assert record["records"] == 1 and record["format"] == "alpaca"


def _apply_set_flags(params: dict, flags: list[str]) -> None:
    """What `dvc exp run -S` does to params.yaml: `key=value` sets, `+key=value` adds, `~key`
    deletes (values read as YAML)."""
    for flag in flags:
        if flag.startswith("~"):
            *parents, last = flag[1:].split(".")
            node = params
            for part in parents:
                node = node[part]
            del node[last]
            continue
        add = flag.startswith("+")
        key, value = flag.lstrip("+").split("=", 1)
        *parents, last = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        assert add != (last in node), f"{flag}: '+' adds a new key, a plain key=value sets an existing one"
        node[last] = yaml.safe_load(value)


def test_the_readmes_own_data_command_leaves_nothing_synthetic(repo, tmp_path):
    """The README's "Use your own data" command, its -S flags applied to params.yaml as DVC
    applies them, on tiny files: no synthetic task or SFT set is left, and the first stages run."""
    import re
    import shlex

    readme = (repo / "README.md").read_text()
    block = re.search(r"<!-- own-data:start -->\n```bash\n(.*?)```", readme, re.S).group(1)
    words = shlex.split(block.replace("\\\n", " "))
    assert words[:3] == ["dvc", "exp", "run"]
    flags = [words[i + 1] for i, w in enumerate(words) if w == "-S"]
    data_dir = tmp_path / "data"
    flags = [f.replace("/data/", f"{data_dir}/") for f in flags]
    data_dir.mkdir()
    (data_dir / "wiki.jsonl").write_text("".join(
        json.dumps({"text": f"Article {i}. The river {i} flows past the town of Name{i} in the north."}) + "\n"
        for i in range(40)))
    (data_dir / "NQ-open.dev.jsonl").write_text(json.dumps({"question": "where?", "answer": ["north"]}) + "\n")
    (data_dir / "alpaca.jsonl").write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    _edit_params(repo, lambda p: _apply_set_flags(p, flags))
    _edit_params(repo, lambda p: p["tokenizer"].update(vocab_size=300))  # a ceiling for 40 short lines

    stages = set(_stages(repo))
    assert {"generate@nq", "score@nq", "sft-blend@alpaca_real"} <= stages
    assert not {s for s in stages if "world_qa" in s or s.startswith("sft-blend@") and s != "sft-blend@alpaca_real"}
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert "data/world" not in json.dumps({k: params[k] for k in ("corpus", "sft", "generate")})
    dvc(repo, "repro", "tokenize@db", "tokenize@pretrain", "sft-blend@alpaca_real")
    assert json.loads((repo / "data" / "sft-blend" / "alpaca_real.json").read_text())["records"] == 1
    assert not (repo / "data" / "world").exists()  # nothing on the way read the synthetic world
