"""Validation curves of Retro and GPT against training steps, as one DVC plot.

Not a test. Runs the pretrain stage twice on the pipeline's data (``dvc repro query-neighbors``
first) with the repo's params, once as Retro and once as GPT (``model.retro=false``, the same
decoder), each with ``--steps`` steps and validation every ``--eval-interval`` steps, and merges
their DVCLive logs into ``<out>/val_loss.tsv``::

    step  retro  gpt  retro_shuffled  retro_facts  gpt_facts

(``retro_shuffled``: Retro validated with other samples' neighbors; ``*_facts``: loss on the
tokens that state facts). It prints the table and the first step from which Retro stays below
GPT. Show it with DVC:

    .venv/bin/dvc plots show experiments/out/curves/val_loss.tsv -x step -y retro -y gpt -y retro_shuffled

    .venv/bin/python experiments/curves.py --steps 1000 --eval-interval 50      # both runs (long)
    .venv/bin/python experiments/curves.py --retro-live A --gpt-live B          # merge finished runs
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
COLUMNS = [("retro", "retro", "loss"), ("gpt", "gpt", "loss"), ("retro_shuffled", "retro", "loss_shuffled"),
           ("retro_facts", "retro", "loss_facts"), ("gpt_facts", "gpt", "loss_facts")]


def read_curve(live_dir: Path, name: str) -> dict[int, float]:
    """``{step: value}`` of the DVCLive metric ``val/<name>`` (empty if it was not logged)."""
    path = live_dir / "plots" / "metrics" / "val" / f"{name}.tsv"
    if not path.is_file():
        return {}
    with open(path) as f:
        return {int(row["step"]): float(row[name]) for row in csv.DictReader(f, delimiter="\t")}


def run_stage(retro: bool, params: Path, steps: int, eval_interval: int, out: Path, threads: int) -> Path:
    """One pretrain run with ``model.retro`` and the step counts overridden; returns its DVCLive dir."""
    tag = "retro" if retro else "gpt"
    p = yaml.safe_load(params.read_text())
    p["model"]["retro"] = retro
    p["pretrain"].update(steps=steps, eval_interval=eval_interval, save_interval=max(eval_interval, steps // 4),
                         warmup=min(p["pretrain"]["warmup"], steps))
    run_params = out / f"params_{tag}.yaml"
    run_params.write_text(yaml.safe_dump(p))
    live = out / f"live_{tag}"
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, str(REPO / "stages" / "pretrain.py"), "--params", str(run_params),
           "--out", str(out / f"ckpt_{tag}"), "--work", str(out / "work"), "--live", str(live),
           "--metrics", str(out / f"metrics_{tag}.json")]
    print(f"curves: {tag}: {' '.join(cmd)}", file=sys.stderr)
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return live


def merge(retro_live: Path, gpt_live: Path, out: Path) -> list[dict]:
    """Write ``out/val_loss.tsv`` from the two runs' DVCLive logs; return its rows."""
    curves = {col: read_curve(retro_live if who == "retro" else gpt_live, metric) for col, who, metric in COLUMNS}
    steps = sorted(set(curves["retro"]) | set(curves["gpt"]))
    rows = [{"step": s, **{col: curves[col].get(s, "") for col, _, _ in COLUMNS}} for s in steps]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "val_loss.tsv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", *[c for c, _, _ in COLUMNS]], delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return rows


def crossing(rows: list[dict]) -> int | None:
    """The first step from which Retro's val loss stays below GPT's (None if never)."""
    both = [r for r in rows if r["retro"] != "" and r["gpt"] != ""]
    for i, r in enumerate(both):
        if all(x["retro"] < x["gpt"] for x in both[i:]):
            return r["step"]
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-interval", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per run (0: torch's default)")
    ap.add_argument("--out", default=str(REPO / "experiments" / "out" / "curves"))
    ap.add_argument("--retro-live", default=None, help="merge this finished Retro run's DVCLive dir")
    ap.add_argument("--gpt-live", default=None, help="merge this finished GPT run's DVCLive dir")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.retro_live and args.gpt_live:
        retro_live, gpt_live = Path(args.retro_live), Path(args.gpt_live)
    else:
        params = Path(args.params)
        retro_live = run_stage(True, params, args.steps, args.eval_interval, out, args.threads)
        gpt_live = run_stage(False, params, args.steps, args.eval_interval, out, args.threads)
    rows = merge(retro_live, gpt_live, out)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "-"  # noqa: E731
    print("step   " + "  ".join(f"{c:>14}" for c, _, _ in COLUMNS))
    for r in rows:
        print(f"{r['step']:<6} " + "  ".join(f"{fmt(r[c]):>14}" for c, _, _ in COLUMNS))
    cross = crossing(rows)
    print(f"Retro below GPT from step {cross} on" if cross is not None else "Retro never stays below GPT")
    print(f"plot: dvc plots show {out / 'val_loss.tsv'} -x step -y retro -y gpt -y retro_shuffled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
