"""The GPU acceptance runs behind ``bench/gpu_check.sh`` and ``bench/gpu_fidelity.sh``.

Not a test. ``check``: the tests marked ``gpu``, the 843m step benchmark (tokens/s, MFU) and,
with 2+ GPUs, a 2-GPU pretrain (validation, export) followed by generation, in a throwaway copy
of the repo; one table at the end. ``fidelity``: the papers' comparison at a GPU budget: GPT,
Retro, and Retro retrofitted from that GPT (decoder frozen, ``pretrain.freeze_decoder``), each
pretrained on a generated world, instruction-tuned and asked the world's QA questions with
retrieved contexts (RAG), through the pipeline's own stage scripts with one params file per run;
one table of val_loss, the shuffled-neighbors and no-retrieval controls, and QA EM.

``--dry-run`` prints the same table (and for ``fidelity`` the plan) without a GPU: every row that
needs one reads ``skipped``. Logs of every command go to ``--work`` (default: a temp folder).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "src"))
PY = sys.executable
BIN = Path(PY).parent


@dataclass
class Row:
    name: str
    status: str = "skipped"
    detail: str = ""
    seconds: float = 0.0
    values: dict = field(default_factory=dict)


def print_table(title: str, rows: list[Row], columns: tuple[str, ...] = ()) -> None:
    width = max(len(r.name) for r in rows) + 2
    head = f"{'check':<{width}}{'result':<9}{'time':>7}  " + "".join(f"{c:>12}" for c in columns)
    print(f"\n{title}\n{head}{'detail' if not columns else ''}")
    print("-" * (len(head) + (40 if not columns else 0)))
    for r in rows:
        cells = "".join(f"{_cell(r.values.get(c)):>12}" for c in columns)
        t = f"{r.seconds:5.0f} s" if r.seconds else "      -"
        print(f"{r.name:<{width}}{r.status:<9}{t}  {cells}{r.detail if not columns else ''}"
              + (f"  {r.detail}" if columns and r.detail else ""))


def _cell(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], cwd: Path, logfile: Path, timeout: float, env: dict | None = None) -> tuple[int, str]:
    """Run ``cmd`` with its output in ``logfile``; return (exit code, the log's last 4000 chars)."""
    log(f"running {' '.join(map(str, cmd))} (log {logfile})")
    full_env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1",
                    PYTHONHASHSEED="0", PYTHONPATH=str(cwd / "src"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(k, None)
    full_env.update(env or {})
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "w") as f:
        try:
            rc = subprocess.run(list(map(str, cmd)), cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=full_env,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, logfile.read_text(errors="replace")[-4000:]


def gpu_info() -> tuple[int, str, float]:
    """(number of CUDA GPUs, name of the first, its memory in GiB)."""
    import torch

    if not torch.cuda.is_available():
        return 0, "", 0.0
    p = torch.cuda.get_device_properties(0)
    return torch.cuda.device_count(), p.name, p.total_memory / 2**30


def environment_row() -> Row:
    t0 = time.perf_counter()
    import torch

    n, name, mem = gpu_info()
    try:
        import faiss

        fa = f"faiss {faiss.__version__} sees {faiss.get_num_gpus()} GPUs"
    except ImportError:
        fa = "faiss not installed"
    try:
        import deepspeed

        ds = f"deepspeed {deepspeed.__version__}"
    except ImportError:
        ds = "deepspeed not installed"
    gpus = f"{n} x {name} ({mem:.0f} GiB)" if n else "no CUDA GPU"
    return Row("environment", "ok", f"{gpus}; torch {torch.__version__} (CUDA {torch.version.cuda}); {fa}; {ds}",
               time.perf_counter() - t0)


def copy(work: Path, overrides: dict) -> Path:
    """A fresh-clone copy of the repo in ``work/repo`` with the small test params plus ``overrides``."""
    from e2e import copy_repo

    dest = work / "repo"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    return copy_repo(dest, overrides)


def write_params(repo: Path, name: str, overrides: dict) -> Path:
    from e2e import set_param

    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in overrides.items():
        if not set_param(params, key, value):
            raise SystemExit(f"error: params.yaml has no key {key}")
    path = repo / "runs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- check


def step_benchmark_args(gpu_mem: float) -> list[str]:
    """bench/gpu_step.py settings for 843m at seq 2048 that fit one GPU of ``gpu_mem`` GiB
    (the estimator's pick), largest micro batch up to 4."""
    from instructretro import estimate, presets

    config = presets.get("843m")
    options = [s for s, _ in estimate.search(config, 1, gpu_mem, 2048) if s.micro_batch <= 4
               and s.offload_optimizer == "none" and s.zero_stage == 0]
    if not options:
        return ["--micro-batch", "1", "--checkpointing"]
    s = options[0]
    return ["--micro-batch", str(s.micro_batch)] + (["--checkpointing"] if s.activation_checkpointing else [])


def check(args) -> int:
    n, name, mem = (0, "", 0.0) if args.dry_run else gpu_info()
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
    rows = [environment_row()]
    why = "dry run" if args.dry_run else "no CUDA GPU" if n == 0 else ""

    tests = Row("tests marked gpu", detail="pytest -m gpu tests")
    if not why:
        t0 = time.perf_counter()
        rc, out = run([PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"], REPO,
                      work / "gpu_tests.log", 180)
        summary = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
        tests.status = "pass" if rc == 0 and "skipped" not in (summary[-1] if summary else "") else "FAIL"
        tests.detail = summary[-1].strip("= ") if summary else f"exit {rc}, see {work / 'gpu_tests.log'}"
        tests.seconds = time.perf_counter() - t0
    rows.append(tests)

    bench = Row("843m step benchmark (1 GPU)", detail="python bench/gpu_step.py (843m Retro, bf16, seq 2048)")
    if not why:
        t0 = time.perf_counter()
        extra = step_benchmark_args(mem)
        rc, out = run([PY, "bench/gpu_step.py", "--seq-length", "2048", *extra], REPO, work / "gpu_step.log", 150)
        got = dict(re.findall(r"^(tokens/s|MFU|peak memory|step)\s+(.*)$", out, flags=re.M))
        bench.status = "pass" if rc == 0 and "tokens/s" in got else "FAIL"
        bench.detail = (f"{got.get('tokens/s', '?')} tokens/s, MFU {got.get('MFU', '?').split(' of ')[0]}, "
                        f"peak {got.get('peak memory', '?')}; {got.get('step', '')}" if rc == 0
                        else f"exit {rc}, see {work / 'gpu_step.log'}")
        bench.seconds = time.perf_counter() - t0
    rows.append(bench)

    multi = Row("2-GPU pretrain, export, generate", detail="deepspeed --num_gpus 2 stages/pretrain.py; stages/generate.py")
    if args.cpu and not args.dry_run:  # 2 CPU ranks (gloo): checks this row's commands, not the GPU path
        t0 = time.perf_counter()
        multi.status, multi.detail = two_gpu_pipeline(work)
        multi.detail = "on 2 CPU ranks: " + multi.detail
        multi.seconds = time.perf_counter() - t0
    elif not why and n < 2:
        multi.detail = f"needs 2 GPUs, this machine has {n}"
    elif not why:
        t0 = time.perf_counter()
        multi.status, multi.detail = two_gpu_pipeline(work)
        multi.seconds = time.perf_counter() - t0
    elif args.dry_run:
        multi.detail = "dry run: " + multi.detail
    rows.append(multi)
    for r in rows[1:]:
        if r.status == "skipped" and why and not r.detail.startswith("dry run"):
            r.detail = f"{why}: {r.detail}"
    print_table(f"gpu_check: {rows[0].detail}", rows)
    failed = [r.name for r in rows if r.status == "FAIL"]
    if failed:
        print(f"\nFAILED: {', '.join(failed)} (logs in {work})")
        return 1
    if why == "no CUDA GPU" and not args.cpu:
        print("\nno CUDA GPU here: nothing was checked (use --dry-run to see the plan)")
        return 1
    return 0


def two_gpu_pipeline(work: Path) -> tuple[str, str]:
    """Inputs with DVC, then the pretrain stage under the launcher on 2 GPUs (a few steps with
    validation and export), then generation from the exported checkpoint."""
    repo = copy(work, {"pretrain.steps": 20, "pretrain.eval_interval": 10, "pretrain.save_interval": 10,
                       "pretrain.micro_batch": 4, "generate.checkpoint": "data/checkpoints/pretrain"})
    rc, out = run([BIN / "dvc", "repro", "query-neighbors", "add-index"], repo, work / "inputs.log", 150)
    if rc:
        return "FAIL", f"building the inputs failed (exit {rc}), see {work / 'inputs.log'}"
    rc, out = run([BIN / "deepspeed", "--num_gpus", "2", "stages/pretrain.py", "--out", "data/checkpoints/pretrain",
                   "--work", "data/work/pretrain", "--live", "dvclive/pretrain", "--metrics", "metrics/pretrain.json"],
                  repo, work / "pretrain_2gpu.log", 150)
    if rc:
        return "FAIL", f"2-GPU pretrain failed (exit {rc}), see {work / 'pretrain_2gpu.log'}"
    m = json.loads((repo / "metrics/pretrain.json").read_text())
    export = repo / "data/checkpoints/pretrain"
    if not ((export / "config.json").is_file() and (export / "model.safetensors").is_file()):
        return "FAIL", "pretrain exported no checkpoint"
    rc, out = run([PY, "stages/generate.py", "--task", "world_qa", "--out", "answers.jsonl", "--metrics", "gen.json"],
                  repo, work / "generate.log", 90)
    if rc:
        return "FAIL", f"generate failed (exit {rc}), see {work / 'generate.log'}"
    answers = sum(1 for line in (repo / "answers.jsonl").read_text().splitlines() if line.strip())
    ok = m.get("val_loss") is not None and answers > 0
    return ("pass" if ok else "FAIL"), (f"{m['steps']} steps, val_loss {m['val_loss']:.4f} "
                                        f"(shuffled {m.get('val_loss_shuffled') or float('nan'):.4f}), exported, {answers} answers")


# ----------------------------------------------------------------------------- fidelity


VARIANTS = ("GPT", "Retro", "Retro retrofit")


def fidelity_plan(args) -> dict:
    """Params of every run: the world, the pretraining and SFT recipe of the 100m preset."""
    world = {"world.num_entities": args.entities, "world.docs_per_entity": 3, "world.qa_questions": 200,
             "world.sft_conversations": 4000, "tokenizer.vocab_size": 4096, "embed.block_size": 4096,
             "retro.seq_length": args.seq_length, "model.name": args.preset}
    pretrain = {"pretrain.steps": args.steps, "pretrain.warmup": max(1, args.steps // 20),
                "pretrain.micro_batch": args.micro_batch, "pretrain.grad_accum": 1, "pretrain.lr": args.lr,
                "pretrain.min_lr": args.lr / 10, "pretrain.eval_interval": max(1, args.steps // 4),
                "pretrain.eval_batches": 16, "pretrain.save_interval": args.steps,
                "pretrain.precision": None, "pretrain.zero_stage": None}
    sft = {"sft.steps": args.sft_steps, "sft.warmup": min(10, args.sft_steps // 10), "sft.micro_batch": args.micro_batch,
           "sft.global_batch": args.micro_batch, "sft.eval_interval": args.sft_steps, "sft.valid_samples": 50,
           "generate.max_questions": 0, "generate.max_new_tokens": 16}
    return {"world": world, "pretrain": pretrain, "sft": sft}


def _describe(name: str) -> str:
    from instructretro import estimate, presets

    c = presets.get(name)
    return (f"{c.n_layers} layers, hidden {c.hidden}, {estimate.parameter_counts(c)['total'] / 1e6:.0f} M "
            f"parameters as Retro at vocab {c.vocab_size}")


def fidelity(args) -> int:
    plan = fidelity_plan(args)
    seeds = list(range(1, args.seeds + 1))
    runs = [(v, s) for s in seeds for v in VARIANTS]
    columns = ("val_loss", "shuffled", "no_retr", "facts", "qa_em")
    rows = [Row(f"{v} seed {s}", values={}) for v, s in runs]
    n, name, mem = (0, "", 0.0) if args.dry_run else gpu_info()
    print(f"gpu_fidelity plan: preset {args.preset} ({_describe(args.preset)}), "
          f"world of {args.entities} entities, seq {args.seq_length}, {args.steps} pretraining steps of "
          f"{args.micro_batch} samples (GPT and Retro from scratch; the retrofit starts from the same seed's GPT "
          f"with the decoder frozen for {args.retrofit_steps} steps), SFT {args.sft_steps} steps, QA with "
          f"retrieved contexts in the prompt; seeds {seeds}; time budget {args.budget_s} s")
    for section, values in plan.items():
        print(f"  {section}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    if args.dry_run or (n == 0 and not args.cpu):
        for r in rows:
            r.detail = "dry run" if args.dry_run else "no CUDA GPU"
        print_table("gpu_fidelity: " + ("dry run, nothing trained" if args.dry_run else "no CUDA GPU"), rows, columns)
        return 0 if args.dry_run else 1

    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-fidelity-"))
    t_start = time.perf_counter()
    repo = copy(work, {**plan["world"], **plan["pretrain"], **plan["sft"]})
    rc, _ = run([BIN / "dvc", "repro", "query-neighbors", "add-index"], repo, work / "inputs.log", args.budget_s)
    if rc:
        print(f"error: building the inputs failed (exit {rc}); see {work / 'inputs.log'}")
        return 1
    tokens = json.loads((repo / "metrics/tokenize_pretrain.json").read_text())
    print(f"inputs built in {time.perf_counter() - t_start:.0f} s: {tokens}", file=sys.stderr)
    for (variant, seed), row in zip(runs, rows):
        if time.perf_counter() - t_start > args.budget_s * (0.55 if seed > 1 else 1.0):
            row.detail = "skipped: time budget"
            continue
        t0 = time.perf_counter()
        row.status, row.detail = one_run(repo, work, variant, seed, args, row.values)
        row.seconds = time.perf_counter() - t0
    where = f"{n} x {name}" if n else "CPU (--cpu: a check of the script, not the comparison)"
    print_table(f"gpu_fidelity: {where}; val on the valid split, QA EM on {plan['world']['world.qa_questions']} "
                "questions (contexts in the prompt)", rows, columns)
    return 0 if all(r.status in ("pass", "skipped") for r in rows) else 1


def one_run(repo: Path, work: Path, variant: str, seed: int, args, values: dict) -> tuple[str, str]:
    """Pretrain -> SFT -> generate -> score for one variant and seed, via the stage scripts."""
    tag = f"{variant.replace(' ', '_').lower()}_s{seed}"
    pre = f"runs/ckpt/pre_{tag}"
    over = {"model.retro": variant != "GPT", "pretrain.seed": seed, "sft.seed": seed}
    if variant == "Retro retrofit":
        over.update({"pretrain.init_from": f"runs/ckpt/pre_gpt_s{seed}", "pretrain.freeze_decoder": True,
                     "pretrain.steps": args.retrofit_steps, "pretrain.save_interval": args.retrofit_steps,
                     "pretrain.eval_interval": max(1, args.retrofit_steps // 2)})
        if not (repo / over["pretrain.init_from"]).is_dir():
            return "skipped", "no GPT checkpoint of this seed"
    params = write_params(repo, f"pre_{tag}", over)
    rc, _ = run([PY, "stages/pretrain.py", "--params", params, "--out", pre, "--work", f"runs/work/{tag}",
                 "--live", f"runs/live/pre_{tag}", "--metrics", f"runs/pre_{tag}.json"], repo, work / f"pre_{tag}.log", 900)
    if rc:
        return "FAIL", f"pretrain exit {rc} ({work / f'pre_{tag}.log'})"
    m = json.loads((repo / f"runs/pre_{tag}.json").read_text())
    values.update(val_loss=m["val_loss"], shuffled=m.get("val_loss_shuffled"), no_retr=m.get("val_loss_no_retrieval"),
                  facts=m.get("val_loss_facts"))
    sft_params = write_params(repo, f"sft_{tag}", {**over, "sft.init_from": pre, "generate.checkpoint": f"runs/ckpt/sft_{tag}"})
    rc, _ = run([PY, "stages/sft.py", "--params", sft_params, "--out", f"runs/ckpt/sft_{tag}", "--metrics",
                 f"runs/sft_{tag}.json", "--live", f"runs/live/sft_{tag}"], repo, work / f"sft_{tag}.log", 900)
    if rc:
        return "FAIL", f"sft exit {rc} ({work / f'sft_{tag}.log'})"
    rc, _ = run([PY, "stages/generate.py", "--params", sft_params, "--task", "world_qa", "--out",
                 f"runs/answers_{tag}.jsonl", "--metrics", f"runs/gen_{tag}.json"], repo, work / f"gen_{tag}.log", 600)
    if rc:
        return "FAIL", f"generate exit {rc} ({work / f'gen_{tag}.log'})"
    rc, _ = run([PY, "stages/score.py", "--params", sft_params, "--answers", f"runs/answers_{tag}.jsonl", "--metrics",
                 f"runs/score_{tag}.json"], repo, work / f"score_{tag}.log", 120)
    if rc:
        return "FAIL", f"score exit {rc} ({work / f'score_{tag}.log'})"
    values["qa_em"] = json.loads((repo / f"runs/score_{tag}.json").read_text())["em"]
    return "pass", ""


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("check", help="bench/gpu_check.sh")
    f = sub.add_parser("fidelity", help="bench/gpu_fidelity.sh")
    c.add_argument("--cpu", action="store_true", help="run the 2-process pipeline row on 2 CPU ranks (checks the script)")
    for p in (c, f):
        p.add_argument("--dry-run", action="store_true", help="print the table without running anything on a GPU")
        p.add_argument("--work", default=None, help="folder for the repo copy and logs (default: a temp folder)")
    f.add_argument("--preset", default="100m", help="model.name (tiny: a CPU smoke run of this script with --cpu)")
    f.add_argument("--cpu", action="store_true", help="run without a GPU (to check the script itself, with small sizes)")
    f.add_argument("--entities", type=int, default=6000, help="world.num_entities (3 documents each)")
    f.add_argument("--seq-length", type=int, default=512)
    f.add_argument("--steps", type=int, default=600, help="pretraining steps of GPT and Retro")
    f.add_argument("--retrofit-steps", type=int, default=300, help="steps of the retrofit (decoder frozen)")
    f.add_argument("--micro-batch", type=int, default=16)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--sft-steps", type=int, default=200)
    f.add_argument("--seeds", type=int, default=2)
    f.add_argument("--budget-s", type=int, default=540, help="a second seed starts only before 55%% of this")
    args = ap.parse_args(argv)
    return check(args) if args.what == "check" else fidelity(args)


if __name__ == "__main__":
    sys.exit(main())
