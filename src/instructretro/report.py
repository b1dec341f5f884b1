"""The headline numbers of a pipeline run as a markdown table, read from the metrics files.

``python -m instructretro.report`` prints the table; ``--write README.md`` replaces the table
between the README's ``<!-- results:start -->`` and ``<!-- results:end -->`` markers, and the
pipeline picture (``dvc dag --md``) between ``<!-- dag:start -->`` and ``<!-- dag:end -->``
(``make results``). A metrics file that does not exist (a stage not run yet) gives no row.
``--contracts docs/CONTRACTS.md`` replaces the table of every stage and the modules it depends
on (from dvc.yaml) between ``<!-- deps:start -->`` and ``<!-- deps:end -->``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from .errors import PipelineError, cli

START, END = "<!-- results:start -->", "<!-- results:end -->"
DAG_START, DAG_END = "<!-- dag:start -->", "<!-- dag:end -->"
DEPS_START, DEPS_END = "<!-- deps:start -->", "<!-- deps:end -->"


def _read(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def rows(metrics_dir: str | os.PathLike = "metrics") -> list[tuple[str, str, str]]:
    """(stage, measure, value) for every headline number whose metrics file exists."""
    m = Path(metrics_dir)
    out = []
    if q := _read(m / "query_neighbors.json"):
        index = (_read(m / "train_index.json") or {}).get("factory")
        out.append(("query-neighbors", f"recall@{q.get('k')} against exact search" + (f" (index {index})" if index else ""),
                    _num(q.get("recall_at_k"), 3)))
    for stage, name in (("pretrain", "pretrain.json"), ("pretrain-gpt", "pretrain_gpt.json")):
        if p := _read(m / name):
            model = f"{p.get('model')} {'Retro' if p.get('retro') else 'GPT'}, {p.get('steps')} steps"
            out.append((stage, f"{model}: validation loss (perplexity)",
                        f"{_num(p.get('val_loss'), 4)} ({_num(p.get('val_ppl'), 3)})"))
            if p.get("val_loss_shuffled") is not None:
                out.append((stage, "validation loss, shuffled neighbors", _num(p["val_loss_shuffled"], 4)))
            if p.get("val_loss_no_retrieval") is not None:
                out.append((stage, "validation loss, no retrieval", _num(p["val_loss_no_retrieval"], 4)))
    if lk := _read(m / "leakage.json"):
        low = (lk.get("buckets") or {}).get("0-12.5%") or {}
        out.append(("leakage", f"Retro's lead over GPT on chunks at <= 12.5% neighbor overlap ({low.get('chunks', 0)} "
                    f"of {lk.get('chunks')} chunks)", _num(low.get("retro_lead"), 4)))
    if s := _read(m / "sft.json"):
        out.append(("sft", f"validation loss ({s.get('steps')} steps, retrieval {s.get('retrieval')})",
                    _num(s.get("val_loss"), 4)))
    for path in sorted((m / "score").glob("*.json")):
        sc = _read(path)
        out.append(("score", f"{path.stem}: EM / F1 ({sc.get('count')} questions)",
                    f"{_num(sc.get('em'), 1)} / {_num(sc.get('f1'), 1)}"))
        if sc.get("gold_in_context") is not None:
            out.append(("score", f"{path.stem}: gold answer in the contexts shown", _num(sc["gold_in_context"], 3)))
    return out


def table(metrics_dir: str | os.PathLike = "metrics") -> str:
    lines = ["| stage | measure | value |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows(metrics_dir)]
    return "\n".join(lines) + "\n"


def replace_table(text: str, new_table: str, source: str = "README.md", start: str = START, end: str = END) -> str:
    """``text`` with the part between the markers replaced by ``new_table``."""
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise PipelineError(f"{source}: needs one '{start}' line followed by one '{end}' line")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{new_table}{end}{tail}"


def table_in(text: str, start: str = START, end: str = END) -> str:
    """The part of ``text`` between the markers."""
    return text.split(start, 1)[1].split(end, 1)[0].lstrip("\n")


def dag(repo: str | os.PathLike = ".") -> str:
    """The stage graph of ``repo`` from ``dvc dag --md``, as a mermaid flowchart with one line
    per stage (the stage and every stage that reads its outputs: ``a --> b & c``)."""
    exe = Path(sys.executable).parent / "dvc"
    r = subprocess.run([str(exe) if exe.exists() else "dvc", "dag", "--md"], cwd=repo, capture_output=True, text=True)
    if r.returncode != 0:
        raise PipelineError(f"dvc dag --md failed in {repo}: {r.stderr.strip()[-300:]}")
    return compact_flowchart(r.stdout)



def deps_table(dvc_yaml: str | os.PathLike = "dvc.yaml") -> str:
    """A table of every stage of ``dvc_yaml`` (a ``foreach`` stage as ``name@*``), its script and
    the ``instructretro`` modules it depends on, as dvc.yaml lists them."""
    import yaml

    stages = (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages", {})
    lines = ["| stage | script | modules |", "|---|---|---|"]
    for name, stage in stages.items():
        body = stage.get("do", stage) if "foreach" in stage else stage
        deps = [str(d) for d in body.get("deps", [])]
        script = next((d for d in deps if d.startswith("stages/")), "")
        mods = sorted(Path(d).stem for d in deps if d.startswith("src/instructretro/"))
        label = f"{name}@*" if "foreach" in stage else name
        lines.append(f"| {label} | `{script}` | {len(mods)}: {', '.join(mods)} |")
    return "\n".join(lines) + "\n"


def compact_flowchart(md: str) -> str:
    """``dvc dag --md``'s flowchart (a node line per stage, an edge line per dependency) with
    the edges of each stage on one line, the stages named by their labels."""
    labels, edges = {}, {}
    for line in md.splitlines():
        line = line.strip()
        if "-->" in line:
            a, b = line.split("-->")
            edges.setdefault(a.strip(), []).append(b.strip())
        elif line.startswith("node") and "[" in line:
            node, label = line.split("[", 1)
            labels[node] = label.rstrip("]")
    ids = {node: f"s{i}" for i, node in enumerate(labels)}
    lines, named = [], set()

    def ref(node):
        first = node not in named
        named.add(node)
        return f"{ids[node]}[{labels[node]}]" if first else ids[node]

    for node in labels:
        if node in edges:
            lines.append(f"  {ref(node)} --> " + " & ".join(ref(b) for b in edges[node]))
    lines += [f"  {ref(n)}" for n in labels if n not in named]
    return "```mermaid\nflowchart LR\n" + "\n".join(lines) + "\n```\n"


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--metrics", default="metrics", help="folder of the stages' metrics files")
    ap.add_argument("--write", metavar="FILE", default="", help="replace the table between the markers in FILE")
    ap.add_argument("--contracts", metavar="FILE", default="",
                    help="replace the stage/module table between the deps markers in FILE (from dvc.yaml beside it)")
    args = ap.parse_args(argv)
    t = table(args.metrics)
    if args.write:
        path = Path(args.write)
        text = replace_table(path.read_text(), t, args.write)
        text = replace_table(text, dag(path.parent), args.write, DAG_START, DAG_END)
        path.write_text(text)
        print(f"report: wrote the results table and the pipeline picture into {path}")
    if args.contracts:
        path = Path(args.contracts)
        repo = path.resolve().parent.parent  # docs/CONTRACTS.md -> the repository
        path.write_text(replace_table(path.read_text(), deps_table(repo / "dvc.yaml"), args.contracts,
                                      DEPS_START, DEPS_END))
        print(f"report: wrote the stage/module table into {path}")
    if not args.write and not args.contracts:
        print(t, end="")


if __name__ == "__main__":
    main()
