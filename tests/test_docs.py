"""The docs say only what exists: every command in a fenced bash block of README.md, docs/*.md
and experiments/README.md names a real Make target (and Make variable), DVC stage, script
path (and its options) or param key; README's results table is what `python -m
instructretro.report` prints from the committed metrics; links point at files that exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from instructretro import report

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "experiments").glob("*.md"))]

# commands a doc may run that are not the project's own (installs, git, the shell)
EXTERNAL = {"git", "cd", "ls", "cat", "export", "apt-get", "pip", "nvidia-smi", "torchrun", "mkdir", "cp", "ln", "curl"}
DVC_COMMANDS = {"repro", "exp", "plots", "metrics", "params", "dag", "status", "checkout", "commit", "queue",
                "pull", "push", "init", "gc", "remote", "add", "diff"}
DVC_VALUE_OPTIONS = {"-n", "--name", "-S", "--set-param", "-j", "--jobs", "-o", "--out", "-x", "-y", "-t",
                     "--template", "--title", "--drop", "--keep", "--sort-by", "--html-template", "--x-label",
                     "--y-label", "--precision"}
DVC_STAGE_ARGS = {("repro",), ("exp", "run"), ("checkout",), ("commit",), ("status",)}


def bash_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, command) of every command line in the fenced ```bash blocks of ``path``:
    comments dropped, continuation lines joined, ``$ `` prompts removed."""
    out, inside, pending, start = [], False, "", 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        fence = line.strip()
        if fence.startswith("```"):
            inside = fence in ("```bash", "```sh", "```shell") if not inside else False
            continue
        if not inside:
            continue
        text = line.strip()
        if not pending:
            start = n
            text = text[2:] if text.startswith("$ ") else text
        if text.endswith("\\"):
            pending += text[:-1].rstrip() + " "
            continue
        text = pending + text
        pending = ""
        text = re.sub(r"(^|\s)#.*$", "", text).strip()
        if text:
            out.append((start, text))
    return out


def make_targets_and_vars() -> tuple[set[str], set[str]]:
    text = (REPO / "Makefile").read_text()
    targets = set()
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-/$() ]+?)\s*:(?!=)", line)
        if m and not line.startswith(("\t", "#")):
            targets |= {t for t in m.group(1).split() if not t.startswith((".", "$"))}
    variables = set(re.findall(r"^([A-Z_]+)\s*[:?+]?=", text, flags=re.M))
    return targets, variables


def dvc_stages() -> set[str]:
    """Stage names as `dvc repro` takes them: plain stages, foreach groups and `group@item`."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    names = set()
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        names.add(name)
        if "foreach" in stage:
            items = stage["foreach"]
            if isinstance(items, str):  # ${generate.tasks}: a list in params.yaml
                node = params
                for part in items.strip("${}").split("."):
                    node = node[part]
                items = node
            keys = list(items) if isinstance(items, dict) else range(len(items))
            names |= {f"{name}@{k}" for k in keys}
    return names


def plot_ids() -> set[str]:
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text()).get("plots", [])
    return {next(iter(p)) if isinstance(p, dict) else p for p in plots}


def param_keys() -> set[str]:
    def flat(d, prefix=""):
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict):
                out |= flat(v, prefix + k + ".")
        return out

    return flat(yaml.safe_load((REPO / "params.yaml").read_text()))


def _script_text(script: Path) -> str:
    """The script and the stage scripts it imports (their options are its options)."""
    text = script.read_text()
    for mod in re.findall(r"^from (\w+) import", text, flags=re.M):
        if (REPO / "stages" / f"{mod}.py").is_file():
            text += (REPO / "stages" / f"{mod}.py").read_text()
    return text


def _check_script(script: str, args: list[str], errors: list[str]) -> None:
    path = REPO / script
    if not path.is_file():
        errors.append(f"script {script} does not exist")
        return
    text = _script_text(path)
    for a in args:
        opt = a.split("=")[0]
        if opt.startswith("--") and f'"{opt}"' not in text and f"'{opt}'" not in text:
            errors.append(f"{script} has no option {opt}")


def _check_param(assignment: str, keys: set[str], errors: list[str]) -> None:
    key = assignment.split("=", 1)[0]
    if key.startswith("+"):  # dvc exp run -S +key=value adds a key: its section must exist
        if key[1:].rsplit(".", 1)[0] not in keys:
            errors.append(f"param section of {key} is not in params.yaml")
    elif key not in keys:
        errors.append(f"param {key} is not in params.yaml")


def _check_dvc(args: list[str], errors: list[str]) -> None:
    if not args or args[0] not in DVC_COMMANDS:
        errors.append(f"dvc has no command {args[:1]}")
        return
    stages, keys = dvc_stages(), param_keys()
    words, i = [], 0
    while i < len(args):
        a = args[i]
        if a in ("-S", "--set-param"):
            _check_param(args[i + 1], keys, errors)
        if a in DVC_VALUE_OPTIONS:
            i += 2
            continue
        if not a.startswith("-"):
            words.append(a)
        i += 1
    sub = tuple(words[:2]) if words[0] in ("exp", "plots", "metrics", "queue", "params") else tuple(words[:1])
    if sub in DVC_STAGE_ARGS:
        for target in words[len(sub):]:
            if target not in stages:
                errors.append(f"dvc.yaml has no stage {target}")
    if sub == ("plots", "show"):
        for target in words[2:]:
            if target not in plot_ids() and not (REPO / target).exists() and "/out/" not in target:
                errors.append(f"dvc.yaml has no plot {target}")


# Scripts that a make target writes (git-ignored), checked by the file they are copied from.
GENERATED = {"gpu-bundle/run.sh": "bench/gpu_bundle_run.sh"}


def check_command(command: str) -> list[str]:
    """What is wrong with one shell command line of the docs ([] if nothing)."""
    errors = []
    targets, variables = make_targets_and_vars()
    for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", command):
        try:
            words = shlex.split(part)
        except ValueError as e:
            return [f"cannot parse {part!r}: {e}"]
        while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value command
            words = words[1:]
        if not words:
            continue
        prog, args = words[0], words[1:]
        name = Path(prog).name
        if prog.startswith(".venv/bin/") or name == prog:
            pass
        else:
            errors.append(f"{prog}: run tools as NAME or .venv/bin/NAME")
        if name == "make":
            for a in args:
                if "=" in a:
                    if a.split("=")[0] not in variables:
                        errors.append(f"Makefile has no variable {a.split('=')[0]}")
                elif not a.startswith("-") and a not in targets:
                    errors.append(f"Makefile has no target {a}")
        elif name == "dvc":
            _check_dvc(args, errors)
        elif name in ("python", "python3"):
            if args[:1] == ["-m"]:
                mod = args[1]
                if mod.startswith("instructretro."):
                    if not (REPO / "src" / Path(*mod.split("."))).with_suffix(".py").is_file():
                        errors.append(f"module {mod} does not exist")
                    else:
                        _check_script(str(Path("src", *mod.split("."))) + ".py", args[2:], errors)
                elif mod == "pytest":
                    for a in args[2:]:
                        if not a.startswith("-") and not (REPO / a.split("::")[0]).exists():
                            errors.append(f"test path {a} does not exist")
                else:
                    errors.append(f"python -m {mod}: not a module of this project")
            elif args:
                _check_script(args[0], args[1:], errors)
        elif name == "deepspeed":
            rest = [a for a in args if not a.startswith("-")]
            script = next((a for a in rest if a.endswith(".py")), None)
            if script is None:
                errors.append("deepspeed without a script")
            else:
                _check_script(script, args[args.index(script) + 1:], errors)
        elif name in ("bash", "sh"):
            if not args or not (REPO / GENERATED.get(args[0], args[0])).is_file():
                errors.append(f"script {args[:1]} does not exist")
        elif name not in EXTERNAL:
            errors.append(f"unknown command {prog}")
    return errors


COMMANDS = [(f"{p.relative_to(REPO)}:{n}", cmd) for p in DOCS for n, cmd in bash_blocks(p)]


def test_the_docs_have_commands():
    assert len(COMMANDS) > 20 and any(c.startswith("make repro") for _, c in COMMANDS)


@pytest.mark.parametrize("where, command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_every_documented_command_names_what_exists(where, command):
    assert check_command(command) == [], f"{where}: {command}"


@pytest.mark.parametrize("command, wrong", [
    ("make no-such-target", "no target no-such-target"),
    ("make sft MODLE=843m", "no variable MODLE"),
    ("dvc repro pretrian", "no stage pretrian"),
    ("dvc repro generate@7", "no stage generate@7"),
    ("dvc exp run -S pretrain.stpes=10", "param pretrain.stpes"),
    ("dvc exp run -n x -S model.retro=false pretrain-gtp", "no stage pretrain-gtp"),
    ("dvc plots show no_such_plot", "no plot no_such_plot"),
    ("dvc explode", "no command"),
    (".venv/bin/python stages/pretrain_typo.py", "does not exist"),
    ("python stages/pretrain.py --stop-aftr 100", "no option --stop-aftr"),
    ("python -m instructretro.nothing", "does not exist"),
    ("frobnicate --all", "unknown command"),
])
def test_a_made_up_name_is_caught(command, wrong):
    errors = check_command(command)
    assert any(wrong in e for e in errors), errors


def test_real_names_pass():
    for command in ("make repro", "make pretrain GPUS=8 HOSTFILE=hosts", "dvc repro tokenize@db",
                    "dvc repro generate@world_qa", "dvc exp run -S model.retro=false -S \"index.factory='IVF16,Flat'\"",
                    "dvc exp run -S +model.num_neighbors=2", "dvc checkout pretrain-gpt",
                    "python stages/pretrain.py --gpt --stop-after 100", "python -m instructretro.report",
                    "OMP_NUM_THREADS=1 .venv/bin/python experiments/neighbor_overlap.py --split train"):
        assert check_command(command) == [], command


def test_bash_blocks_join_continuations_and_drop_comments(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n```bash\nmake repro   # all\ndvc exp run -S a=1 \\\n    -S b=2\n```\n```yaml\nx: 1\n```\n")
    assert bash_blocks(doc) == [(3, "make repro"), (4, "dvc exp run -S a=1 -S b=2")]


def test_readme_results_table_is_the_report_of_the_committed_metrics():
    text = (REPO / "README.md").read_text()
    assert report.table_in(text) == report.table(REPO / "metrics"), "run `make results`"


def test_report_rows_follow_the_metrics_files(tmp_path):
    (tmp_path / "score").mkdir()
    assert report.table(tmp_path).count("\n") == 2  # header only: no stage has run
    (tmp_path / "pretrain_gpt.json").write_text('{"model": "tiny", "retro": false, "steps": 4, "val_loss": 1.5, '
                                                '"val_ppl": 4.4817, "val_loss_shuffled": null}')
    (tmp_path / "score" / "nq.json").write_text('{"em": 12.5, "f1": 20.25, "count": 8}')
    (tmp_path / "score" / "rag.json").write_text('{"em": 10.0, "f1": 15.0, "count": 4, "gold_in_context": 0.75}')
    t = report.table(tmp_path)
    assert "| score | rag: gold answer in the contexts shown | 0.750 |" in t and "nq: gold" not in t
    assert "| pretrain-gpt | tiny GPT, 4 steps: validation loss (perplexity) | 1.5000 (4.482) |" in t
    assert "| score | nq: EM / F1 (8 questions) | 12.5 / 20.2 |" in t and "shuffled" not in t
    readme = f"intro\n{report.START}\nold\n{report.END}\nrest\n"
    assert report.replace_table(readme, t) == f"intro\n{report.START}\n{t}{report.END}\nrest\n"


def test_readme_fits_a_first_read():
    """At most 150 lines of prose; the generated table and pipeline picture come on top."""
    text = (REPO / "README.md").read_text()
    for start, end in ((report.START, report.END), (report.DAG_START, report.DAG_END)):
        text = text.split(start)[0] + text.split(end)[1]
    assert len(text.splitlines()) <= 150, len(text.splitlines())


def test_readme_pipeline_picture_is_the_dag_of_dvc_yaml():
    text = (REPO / "README.md").read_text()
    assert report.table_in(text, report.DAG_START, report.DAG_END) == report.dag(REPO), "run `make results`"


def test_contracts_stage_module_table_is_the_one_of_dvc_yaml(tmp_path):
    text = (REPO / "docs" / "CONTRACTS.md").read_text()
    assert report.table_in(text, report.DEPS_START, report.DEPS_END) == report.deps_table(REPO / "dvc.yaml"), \
        "run `make results`"
    generate = next(line for line in report.deps_table(REPO / "dvc.yaml").splitlines() if line.startswith("| generate@*"))
    for module in ("train", "sft", "presets", "neighbors"):
        assert f" {module}," not in generate and not generate.endswith(f" {module} |"), module
    gpt = next(line for line in report.deps_table(REPO / "dvc.yaml").splitlines() if line.startswith("| pretrain-gpt"))
    assert " embed," not in gpt and " neighbors," not in gpt
    (tmp_path / "dvc.yaml").write_text("stages:\n  a:\n    cmd: python stages/a.py\n    deps:\n      - stages/a.py\n"
                                       "      - src/instructretro/io.py\n")
    assert report.deps_table(tmp_path / "dvc.yaml").splitlines()[-1] == "| a | `stages/a.py` | 1: io |"


def test_the_docs_describe_the_product_not_its_history():
    for path in DOCS:
        text = path.read_text()
        assert not re.search(r"session", text, flags=re.I), f"{path.relative_to(REPO)} speaks of sessions"
        assert not re.search(r"throwaway", text, flags=re.I), f"{path.relative_to(REPO)} describes throwaway work"


def test_relative_links_point_at_files_that_exist():
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (path.parent / target).exists(), f"{path.relative_to(REPO)} links to missing {target}"


def test_compact_flowchart_keeps_every_stage_and_edge():
    md = ("```mermaid\nflowchart TD\n\tnode1[\"a\"]\n\tnode2[\"b\"]\n\tnode3[\"c\"]\n\tnode4[\"lone\"]\n"
          "\tnode1-->node2\n\tnode1-->node3\n\tnode2-->node3\n```\n")
    out = report.compact_flowchart(md)
    assert out.splitlines()[2:-1] == ['  s0["a"] --> s1["b"] & s2["c"]', "  s1 --> s2", '  s3["lone"]']
