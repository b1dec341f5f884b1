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
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
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
                    PYTHONHASHSEED="0",
                    PYTHONPATH=os.pathsep.join(p for p in (str(cwd / "src"), os.environ.get("PYTHONPATH", "")) if p))
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


def gpu_tests_row(repo: Path, work: Path, deadline: float | None = None, tests: str = "tests") -> Row:
    """The tests marked ``gpu`` (pytest in ``repo``); skipped tests are listed with their reasons."""
    row = Row("tests marked gpu", detail=f"pytest -m gpu {tests}")
    t0 = time.perf_counter()
    rc, out = run([PY, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider", tests], repo,
                  work / "gpu_tests.log", _timeout(180, deadline))
    summary = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    reasons = sorted({m.strip() for m in re.findall(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", out, flags=re.M)})
    ran = summary and re.search(r"\d+ passed", summary[-1])
    row.status = "pass" if rc == 0 and ran else "skipped" if rc in (0, 5) and not ran and rc != 124 else "FAIL"
    row.detail = (summary[-1].strip("= ") if summary else f"exit {rc}, see {work / 'gpu_tests.log'}") + \
        ("".join(f"; skipped: {r}" for r in reasons))
    row.seconds = time.perf_counter() - t0
    return row


STEP_KEYS = r"^(tokens/s|MFU|peak memory|step|time per step)\s+(.*)$"


def step_bench_row(repo: Path, work: Path, mem: float, deadline: float | None = None, name: str = "843m step benchmark (1 GPU)",
                   extra: list[str] | None = None, log: str = "gpu_step.log") -> Row:
    """bench/gpu_step.py (default: 843m Retro, bf16, seq 2048, the micro batch that fits ``mem``
    GiB); the row's values hold tokens/s, the seconds per step and the process's wall time."""
    extra = extra if extra is not None else ["--seq-length", "2048", *step_benchmark_args(mem)]
    row = Row(name, detail="python bench/gpu_step.py " + " ".join(extra))
    t0 = time.perf_counter()
    rc, out = run([PY, "bench/gpu_step.py", *extra], repo, work / log, _timeout(150, deadline))
    got = dict(re.findall(STEP_KEYS, out, flags=re.M))
    row.seconds = time.perf_counter() - t0
    row.status = "pass" if rc == 0 and "tokens/s" in got else "FAIL"
    if row.status == "pass":
        row.values = {"tokens_per_s": float(got["tokens/s"].replace(",", "")),
                      "seconds_per_step": float(got["time per step"].split()[0]) / 1000, "wall_s": row.seconds,
                      "mfu": got.get("MFU", "n/a").split(" of ")[0], "peak_memory": got.get("peak memory", "n/a")}
        row.detail = (f"{got['tokens/s']} tokens/s, MFU {row.values['mfu']}, peak {row.values['peak_memory']}; "
                      f"{got.get('step', '')}")
    else:
        row.detail = f"exit {rc}, see {work / log}"
    return row


def _timeout(limit: float, deadline: float | None) -> float:
    """``limit`` seconds, cut to what is left before ``deadline`` (a ``time.perf_counter`` value)."""
    return limit if deadline is None else max(1.0, min(limit, deadline - time.perf_counter()))


def check(args) -> int:
    n, name, mem = (0, "", 0.0) if args.dry_run else gpu_info()
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
    rows = [environment_row()]
    why = "dry run" if args.dry_run else "no CUDA GPU" if n == 0 else ""

    tests = Row("tests marked gpu", detail="pytest -m gpu tests")
    if not why:
        tests = gpu_tests_row(REPO, work)
        tests.status = "pass" if tests.status == "pass" and "skipped" not in tests.detail else "FAIL"
    rows.append(tests)

    bench = Row("843m step benchmark (1 GPU)", detail="python bench/gpu_step.py (843m Retro, bf16, seq 2048)")
    if not why:
        bench = step_bench_row(REPO, work, mem)
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


# ----------------------------------------------------------------------------- torch


# Torch APIs the training and test code call that older releases lack, with the release that
# added them. The node's own PyTorch is checked against this list before anything runs.
TORCH_APIS = (
    ("torch.backends.cuda.matmul.fp32_precision", "2.9"),  # TF32 switch in train.build_engine
    ("torch.backends.cudnn.conv.fp32_precision", "2.9"),
    ("torch.serialization.safe_globals", "2.5"),  # weights-only resume checkpoints (train.resume)
    ("torch.nn.attention.sdpa_kernel", "2.3"),  # tests/test_gpu.py (flash kernel)
    ("torch.cuda.set_sync_debug_mode", "1.10"),
    ("torch.random.fork_rng", "1.0"),
)


def missing_torch_apis() -> list[str]:
    """``name (torch >= version)`` of every entry of TORCH_APIS this torch lacks."""
    import importlib

    import torch

    missing = []
    for name, since in TORCH_APIS:
        parts, obj = name.split("."), None
        for i in range(len(parts), 0, -1):  # import the longest module prefix, then walk attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            try:
                for attr in parts[i:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                obj = None
            break
        if obj is None:
            missing.append(f"{name} (torch >= {since})")
    del torch
    return missing


# ----------------------------------------------------------------------------- fidelity inputs


VARIANTS = ("GPT", "Retro", "Retro retrofit")
PREPARED = "data/prepared"  # QA and SFT files with their retrieved passages (ctxs), in the prepared repo


def world_plan(args) -> dict:
    """Params of the fidelity runs' inputs (the world, tokenizer, database, neighbors)."""
    if args.tiny:
        return {"world.num_entities": 40, "world.docs_per_entity": 3, "world.qa_questions": 16,
                "world.sft_conversations": 120, "tokenizer.vocab_size": 512, "embed.block_size": 256,
                "retro.seq_length": 256, "model.name": "tiny", "query.num_neighbors_save": 4}
    return {"world.num_entities": args.entities, "world.docs_per_entity": 3, "world.qa_questions": 200,
            "world.sft_conversations": 4000, "tokenizer.vocab_size": 4096, "embed.block_size": 4096,
            "retro.seq_length": args.seq_length, "model.name": args.preset, "query.num_neighbors_save": 4}


def fidelity_plan(args, world: dict | None = None) -> dict:
    """Params of every run: the world (``world``, else ``world_plan``), the pretraining and SFT
    recipe (``args.steps`` steps)."""
    steps, micro = args.steps, args.micro_batch
    pretrain = {"pretrain.steps": steps, "pretrain.warmup": max(1, steps // 20),
                "pretrain.retrieval_warmup": steps // 4,  # the default run's share
                "pretrain.micro_batch": micro, "pretrain.grad_accum": 1, "pretrain.lr": args.lr,
                "pretrain.min_lr": args.lr / 10, "pretrain.eval_interval": steps,
                "pretrain.eval_batches": args.eval_batches, "pretrain.save_interval": steps,
                "pretrain.precision": None, "pretrain.zero_stage": None}
    sft = {"sft.steps": args.sft_steps, "sft.warmup": max(1, min(10, args.sft_steps // 10)), "sft.micro_batch": micro,
           "sft.global_batch": micro, "sft.eval_interval": args.sft_steps, "sft.save_interval": args.sft_steps,
           "sft.valid_samples": 50 if not args.tiny else 4, "generate.max_questions": 0,
           "generate.max_new_tokens": 16}
    return {"world": world or world_plan(args), "pretrain": pretrain, "sft": sft}


def prepare(work: Path, world: dict, timeout: float) -> Path:
    """The fidelity runs' inputs, built on a CPU or GPU machine with the full install: a repo copy
    (``work/repo``) where DVC builds the world, tokenizer, token stores, database, index and the
    neighbors of every pretraining chunk, and ``contexts`` then writes the QA and SFT files with
    their retrieved passages, so the runs need neither the encoder nor Faiss."""
    t0 = time.perf_counter()
    repo = copy(work, world)
    rc, _ = run([BIN / "dvc", "repro", "query-neighbors", "add-index"], repo, work / "inputs.log", timeout)
    if rc:
        raise SystemExit(f"error: building the inputs failed (exit {rc}); see {work / 'inputs.log'}")
    rc, _ = run([PY, "bench/gpu_suite.py", "contexts"], repo, work / "contexts.log", timeout)
    if rc:
        raise SystemExit(f"error: retrieving the QA and SFT contexts failed (exit {rc}); see {work / 'contexts.log'}")
    log(f"inputs built in {time.perf_counter() - t0:.0f} s: {(repo / 'metrics/tokenize_pretrain.json').read_text()}")
    return repo


def contexts(params_path: str = "params.yaml", out: str = PREPARED) -> dict:
    """In a repo where DVC built the index: every QA question and every SFT record of the blend
    with its retrieved passages (``ctxs``: the top chunks, each with its continuation), searched
    exactly as the generate and sft stages search them (same encoder, index, query text and
    settings). Writes the files under ``out`` and ``out/params.json``, the param overrides that
    point the runs at them; returns those overrides."""
    import numpy as np

    from instructretro import data, params as P, sft
    from instructretro.embed import encoder_from_params
    from instructretro.generate import parse_tasks
    from instructretro.io import write_json, write_jsonl
    from instructretro.retrieval import Retriever

    p = P.load(params_path)
    chunk_length = p.get("retro.chunk_length", int)
    encoder = encoder_from_params(p)

    def retriever(section: str) -> Retriever:
        return Retriever("data/db/embeddings.h5", "data/index/populated", "data/tokens/db",
                         "data/tokenizer", encoder=encoder, chunk_length=chunk_length,
                         nprobe=p.get(f"{section}.nprobe", int), efsearch=p.get(f"{section}.efsearch", int))

    def texts(r: Retriever, ids) -> list[str]:
        return [r.chunk_text(int(i), continuation=True) for i in ids if i >= 0]

    overrides: dict = {}
    r, n = retriever("generate"), p.get("generate.num_contexts", int)
    tasks = {}
    for task in parse_tasks(p.get("generate.tasks", dict)):
        records = [rec for _, rec in data._records(Path(task.path))]  # noqa: SLF001 (the raw records, every field kept)
        ids = np.asarray(r.search([rec["question"] for rec in records], n), dtype=np.int64)
        dest = Path(out) / f"qa_{task.name}.jsonl"
        write_jsonl(dest, [{**rec, "ctxs": texts(r, row)} for rec, row in zip(records, ids)])
        tasks[task.name] = {"path": str(dest), "style": task.style}
    overrides["generate.tasks"] = tasks
    r, n = retriever("sft"), p.get("sft.num_contexts", int)
    for entry in sft.parse_blend(p.get("sft.blend", dict)):
        records = [rec for _, rec in data._records(entry.path)]  # noqa: SLF001
        convs = list(data.iter_conversations(entry.path, entry.format))
        ids = sft.search_batched(r, [sft.last_user_turn(c) for c in convs], n, desc=f"retrieve {entry.name}")
        dest = Path(out) / "sft" / f"{entry.name}.jsonl"
        write_jsonl(dest, [{**rec, "ctxs": texts(r, row)} for rec, row in zip(records, ids)])
        overrides[f"sft.blend.{entry.name}.path"] = str(dest)
    write_json(Path(out) / "params.json", overrides)
    return overrides


# ----------------------------------------------------------------------------- fidelity runs


@dataclass
class Sizing:
    """How big the fidelity runs are: what the step benchmark measured and what it implies."""

    seeds: int
    steps: int
    retrofit_steps: int
    seconds_per_seed: float
    note: str


def size_runs(seconds_left: float, tokens_per_s: float, startup_s: float, tokens_per_step: int, *,
              sft_steps: int, eval_tokens: int, qa_tokens: int, max_seeds: int = 2, min_steps: int = 200,
              max_steps: int | None = None) -> Sizing:
    """Pretraining steps for GPT and Retro (the retrofit trains half as many) that fill the time
    left, at the measured ``tokens_per_s`` of the same model and batch shape.

    Per seed, three variants each pay four process starts (``startup_s``: pretrain, SFT,
    generate, score), SFT (``sft_steps`` of one pretraining step's tokens), the final validation
    (``eval_tokens`` forward only, a third of a training token each, three passes: the loss and
    its two controls) and QA (``qa_tokens`` forward); the rest is 2.5 pretraining runs' worth
    of steps. Two seeds when that leaves each at least ``min_steps``, else one.
    """
    fixed_per_variant = 4 * startup_s + (sft_steps * tokens_per_step + eval_tokens + qa_tokens / 3) / tokens_per_s
    steps = 0
    for seeds in range(max_seeds, 0, -1):
        per_seed = seconds_left / seeds
        pretrain_s = per_seed - 3 * fixed_per_variant
        steps = int(max(0.0, pretrain_s) * tokens_per_s / (2.5 * tokens_per_step))
        if max_steps is not None:
            steps = min(steps, max_steps)
        if steps >= min_steps or seeds == 1:
            break
    steps = max(steps, 1)
    note = (f"{tokens_per_s:,.0f} tokens/s measured, {startup_s:.0f} s per process start, {seconds_left:.0f} s left: "
            f"{seeds} seed{'s' if seeds > 1 else ''} of {steps} steps x {tokens_per_step} tokens "
            f"(retrofit {max(1, steps // 2)}), {fixed_per_variant:.0f} s per run besides pretraining")
    return Sizing(seeds, steps, max(1, steps // 2), seconds_left / seeds, note)


def run_overrides(repo: Path) -> dict:
    """The param overrides of ``contexts`` (prepared QA and SFT files), if the repo has them."""
    path = repo / PREPARED / "params.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def fidelity_runs(repo: Path, work: Path, args, plan: dict, seeds: list[int], deadline: float | None,
                  rows: list[Row]) -> None:
    """Every variant of every seed through pretrain -> SFT -> generate -> score (``one_run``),
    in order; a run that would start after ``deadline`` is skipped, one that reaches it stops."""
    base = {**plan["pretrain"], **plan["sft"], **run_overrides(repo)}
    runs = [(v, s) for s in seeds for v in VARIANTS]
    for (variant, seed), row in zip(runs, rows):
        if deadline is not None and deadline - time.perf_counter() < 5:
            row.detail = "skipped: time budget"
            continue
        log(f"fidelity: {variant} seed {seed}")
        t0 = time.perf_counter()
        row.status, row.detail = one_run(repo, work, variant, seed, args, base, row.values, deadline)
        row.seconds = time.perf_counter() - t0
        log(f"fidelity: {variant} seed {seed}: {row.status} {row.detail} "
            + " ".join(f"{k}={_cell(v)}" for k, v in row.values.items()))


def one_run(repo: Path, work: Path, variant: str, seed: int, args, base: dict, values: dict,
            deadline: float | None = None) -> tuple[str, str]:
    """Pretrain -> SFT -> generate -> score for one variant and seed, via the stage scripts."""
    tag = f"{variant.replace(' ', '_').lower()}_s{seed}"
    pre = f"runs/ckpt/pre_{tag}"
    over = {**base, "model.retro": variant != "GPT", "pretrain.seed": seed, "sft.seed": seed}
    if variant == "Retro retrofit":
        over.update({"pretrain.init_from": f"runs/ckpt/pre_gpt_s{seed}", "pretrain.freeze_decoder": True,
                     "pretrain.steps": args.retrofit_steps, "pretrain.save_interval": args.retrofit_steps,
                     "pretrain.eval_interval": args.retrofit_steps,
                     "pretrain.warmup": max(1, args.retrofit_steps // 20),
                     "pretrain.retrieval_warmup": args.retrofit_steps // 4})
        if not (repo / over["pretrain.init_from"]).is_dir():
            return "skipped", "no GPT checkpoint of this seed"

    def stage(what: str, cmd: list, limit: float) -> str | None:
        rc, _ = run([PY, *cmd], repo, work / f"{what}_{tag}.log", _timeout(limit, deadline))
        if rc == 124 and deadline is not None and time.perf_counter() >= deadline - 1:
            return f"stopped in {what}: time budget"
        return f"{what} exit {rc} ({work / f'{what}_{tag}.log'})" if rc else None

    params = write_params(repo, f"pre_{tag}", over)
    failed = stage("pre", ["stages/pretrain.py", "--params", params, "--out", pre, "--work", f"runs/work/{tag}",
                           "--live", f"runs/live/pre_{tag}", "--metrics", f"runs/pre_{tag}.json"], 900)
    if failed:
        return ("stopped" if "budget" in failed else "FAIL"), failed
    m = json.loads((repo / f"runs/pre_{tag}.json").read_text())
    values.update(val_loss=m["val_loss"], shuffled=m.get("val_loss_shuffled"), no_retr=m.get("val_loss_no_retrieval"),
                  facts=m.get("val_loss_facts"), steps=m["steps"], tokens_per_s=m.get("tokens_per_s"))
    sft_params = write_params(repo, f"sft_{tag}", {**over, "sft.init_from": pre, "generate.checkpoint": f"runs/ckpt/sft_{tag}"})
    for what, cmd in (("sft", ["stages/sft.py", "--params", sft_params, "--out", f"runs/ckpt/sft_{tag}", "--metrics",
                               f"runs/sft_{tag}.json", "--live", f"runs/live/sft_{tag}", "--work", f"runs/work/sft_{tag}"]),
                      ("gen", ["stages/generate.py", "--params", sft_params, "--task", "world_qa", "--out",
                               f"runs/answers_{tag}.jsonl", "--metrics", f"runs/gen_{tag}.json"]),
                      ("score", ["stages/score.py", "--params", sft_params, "--answers", f"runs/answers_{tag}.jsonl",
                                 "--metrics", f"runs/score_{tag}.json"])):
        failed = stage(what, cmd, 900)
        if failed:
            return ("stopped" if "budget" in failed else "FAIL"), failed
    values["qa_em"] = json.loads((repo / f"runs/score_{tag}.json").read_text())["em"]
    return "pass", ""


COLUMNS = ("val_loss", "shuffled", "no_retr", "facts", "qa_em")


def verdict(rows: list[Row]) -> dict:
    """The decision rule of docs/findings.md ("The GPU comparison") applied to the table."""
    by = {}
    for r in rows:
        variant, seed = r.name.rsplit(" seed ", 1)
        if r.status == "pass":
            by.setdefault(variant, {})[int(seed)] = r.values
    gpt, retro = by.get("GPT", {}), by.get("Retro", {})
    seeds = sorted(set(gpt) & set(retro))
    if not seeds:
        return {"decided": False, "why": "no seed with both GPT and Retro finished"}

    def mean(variant: dict, key: str) -> float | None:
        xs = [variant[s].get(key) for s in seeds]
        return sum(xs) / len(xs) if all(x is not None for x in xs) else None

    lead = mean(gpt, "val_loss") - mean(retro, "val_loss")
    spans = [abs(v[seeds[0]]["val_loss"] - v[seeds[-1]]["val_loss"]) for v in (gpt, retro)]
    spread = max(spans) if len(seeds) > 1 else None
    shuffled_gap = mean(retro, "shuffled") - mean(retro, "val_loss") if mean(retro, "shuffled") is not None else None
    no_retr_gap = mean(retro, "no_retr") - mean(retro, "val_loss") if mean(retro, "no_retr") is not None else None
    facts_lead = (mean(gpt, "facts") - mean(retro, "facts")) if mean(retro, "facts") is not None else None
    em_lead = mean(retro, "qa_em") - mean(gpt, "qa_em") if mean(retro, "qa_em") is not None else None
    retrofit = {s: v for s, v in by.get("Retro retrofit", {}).items() if s in seeds}
    retrofit_lead = (sum(gpt[s]["val_loss"] - v["val_loss"] for s, v in retrofit.items()) / len(retrofit)
                     if retrofit else None)
    out = {"seeds": seeds, "retro_lead": lead, "seed_spread": spread, "shuffled_gap": shuffled_gap,
           "no_retrieval_gap": no_retr_gap, "fact_token_lead": facts_lead, "qa_em_lead": em_lead,
           "retrofit_lead": retrofit_lead}
    if spread is None:
        out.update(decided=False, why="one seed: no spread to compare the lead with")
        return out
    uses = all(g is not None and g > spread for g in (shuffled_gap, no_retr_gap))
    if lead > spread and uses:
        out.update(decided=True, result="Retro beats GPT by retrieval",
                   why=f"lead {lead:.4f} > spread {spread:.4f}, and shuffled / no-retrieval cost more than the spread")
    elif lead > spread:
        out.update(decided=True, result="Retro ahead, but not by retrieval",
                   why=f"lead {lead:.4f} > spread {spread:.4f}, but a control is within the spread: a better decoder")
    else:
        out.update(decided=True, result="no Retro advantage at this budget",
                   why=f"lead {lead:.4f} <= spread {spread:.4f}")
    return out


def markdown_table(title: str, rows: list[Row], columns: tuple[str, ...]) -> str:
    names = ["run", "result", "time", *columns, "detail"]
    lines = [f"### {title}", "", "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for r in rows:
        cells = [r.name, r.status, f"{r.seconds:.0f} s", *(_cell(r.values.get(c)) for c in columns), r.detail]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: dict, checks: list[Row], runs: list[Row]) -> None:
    """``out/results.json`` (everything) and ``out/results.md`` (the two tables, the verdict)."""
    out.mkdir(parents=True, exist_ok=True)
    results = {**results, "checks": [asdict(r) for r in checks], "fidelity": [asdict(r) for r in runs],
               "verdict": verdict(runs)}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    v = results["verdict"]
    md = [f"# GPU results: {results.get('environment', '')}", "", *([markdown_table("Checks", checks, ())] if checks else []),
          markdown_table(f"Fidelity: {results.get('plan_note', '')}", runs, COLUMNS),
          "Verdict (the rule of docs/findings.md, \"The GPU comparison and its decision rule\"): "
          + (f"**{v['result']}**: {v['why']}" if v.get("decided") else f"undecided: {v['why']}"), "",
          " ".join(f"{k} {_cell(v.get(k))};" for k in ("retro_lead", "seed_spread", "shuffled_gap", "no_retrieval_gap",
                                                       "fact_token_lead", "qa_em_lead", "retrofit_lead"))]
    (out / "results.md").write_text("\n".join(md) + "\n")


def _describe(name: str) -> str:
    from instructretro import estimate, presets

    c = presets.get(name)
    return (f"{c.n_layers} layers, hidden {c.hidden}, {estimate.parameter_counts(c)['total'] / 1e6:.0f} M "
            f"parameters as Retro at vocab {c.vocab_size}")


def fidelity(args) -> int:
    """bench/gpu_fidelity.sh: inputs built here (``prepare``), then the runs."""
    if args.tiny:
        args.preset = "tiny"
    plan = fidelity_plan(args)
    seeds = list(range(1, args.seeds + 1))
    rows = [Row(f"{v} seed {s}", values={}) for s in seeds for v in VARIANTS]
    n, name, mem = (0, "", 0.0) if args.dry_run else gpu_info()
    print(f"gpu_fidelity plan: preset {args.preset} ({_describe(args.preset)}), "
          f"world of {plan['world']['world.num_entities']} entities, seq {plan['world']['retro.seq_length']}, "
          f"{args.steps} pretraining steps of {args.micro_batch} samples (GPT and Retro from scratch; the retrofit "
          f"starts from the same seed's GPT with the decoder frozen for {args.retrofit_steps} steps), SFT "
          f"{args.sft_steps} steps, QA with retrieved contexts in the prompt; seeds {seeds}; time budget {args.budget_s} s")
    for section, values in plan.items():
        print(f"  {section}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    if args.dry_run or (n == 0 and not args.cpu):
        for r in rows:
            r.detail = "dry run" if args.dry_run else "no CUDA GPU"
        print_table("gpu_fidelity: " + ("dry run, nothing trained" if args.dry_run else "no CUDA GPU"), rows, COLUMNS)
        return 0 if args.dry_run else 1

    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-fidelity-"))
    t_start = time.perf_counter()
    repo = prepare(work, plan["world"], args.budget_s)
    deadline = t_start + args.budget_s
    fidelity_runs(repo, work, args, plan, seeds[:1], None, rows[:3])
    if len(seeds) > 1 and time.perf_counter() - t_start < 0.55 * args.budget_s:
        fidelity_runs(repo, work, args, plan, seeds[1:], deadline, rows[3:])
    else:
        for r in rows[3:]:
            r.detail = "skipped: time budget"
    where = f"{n} x {name}" if n else "CPU (--cpu: a check of the script, not the comparison)"
    title = f"gpu_fidelity: {where}; val on the valid split, QA EM on the world's questions (contexts in the prompt)"
    print_table(title, rows, COLUMNS)
    if args.out:
        write_results(Path(args.out), {"environment": environment_row().detail, "plan": plan, "plan_note": title},
                      [], rows)
    return 0 if all(r.status in ("pass", "skipped") for r in rows) else 1


# ----------------------------------------------------------------------------- the GPU bundle's run


def node(args) -> int:
    """``gpu-bundle/run.sh``: everything on one GPU of a node without a package index, within
    ``--budget-s``: the environment and torch check, the ``gpu`` tests that need neither Faiss nor
    the encoder, the 843m step benchmark, the step benchmark of the fidelity runs' own model and
    batch (which sizes them), then GPT, Retro and the retrofit through pretrain, SFT, generate and
    score on the prepared inputs. ``results.json`` and ``results.md`` go to ``--out`` whatever
    happens (a run the budget cuts is marked ``stopped``)."""
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("error: stopped by SIGTERM"))  # still writes the results
    out = Path(args.out)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-node-"))
    n, name, mem = gpu_info()
    env = environment_row()
    checks, runs, results = [env], [], {"environment": env.detail, "budget_s": args.budget_s}
    log(f"environment: {env.detail}")
    try:
        missing = missing_torch_apis()
        if missing:
            env.status, env.detail = "FAIL", f"{env.detail}; this torch lacks {', '.join(missing)}"
            raise SystemExit(f"error: torch {env.detail.split('torch ')[1].split()[0]} lacks {', '.join(missing)}; "
                             "the GPU runs need torch >= 2.9")
        if n == 0 and not args.cpu:
            raise SystemExit("error: no CUDA GPU visible (pass --cpu --tiny to check the bundle on a CPU)")
        repo = work / "repo"
        if not repo.is_dir():
            shutil.copytree(args.repo, repo)  # runs write checkpoints and params files beside the inputs
        log("gpu tests (those that need neither faiss-gpu nor the encoder)")
        checks.append(gpu_tests_row(repo, work, deadline, "tests/test_gpu.py"))
        log(f"gpu tests: {checks[-1].status} {checks[-1].detail}")
        if n:
            log("843m step benchmark")
            checks.append(step_bench_row(repo, work, mem, deadline))
            log(f"843m step benchmark: {checks[-1].status} {checks[-1].detail}")
        else:  # the same script runs below at the fidelity runs' (tiny) shape
            checks.append(Row("843m step benchmark (1 GPU)", detail="no CUDA GPU: the script runs in the next row"))
        plan_args = argparse.Namespace(**vars(args))
        world = json.loads((repo / "bundle.json").read_text())["world"]
        preset, seq = world["model.name"], world["retro.seq_length"]
        micro = args.micro_batch
        shape = ["--preset", preset, "--seq-length", str(seq), "--micro-batch", str(micro)]
        shape += ["--warmup", "3", "--steps", "5"] if n else ["--precision", "fp32", "--warmup", "1", "--steps", "2"]
        log(f"step benchmark of the fidelity runs ({preset} Retro, micro batch {micro} x seq {seq})")
        sizing_row = step_bench_row(repo, work, mem, deadline, f"{preset} step benchmark (fidelity runs' shape)", shape,
                                    "fidelity_step.log")
        checks.append(sizing_row)
        log(f"fidelity step benchmark: {sizing_row.status} {sizing_row.detail}")
        if sizing_row.status != "pass":
            raise SystemExit("error: the fidelity runs' step benchmark failed; nothing to size them by")
        v = sizing_row.values
        startup = max(1.0, v["wall_s"] - v["seconds_per_step"] * (8 if n else 3))
        tokens_per_step = micro * seq
        left = deadline - time.perf_counter() - 10  # 10 s to write the results
        sizing = size_runs(left, v["tokens_per_s"], startup, tokens_per_step, sft_steps=args.sft_steps,
                           eval_tokens=args.eval_batches * tokens_per_step,
                           qa_tokens=world["world.qa_questions"] * seq, max_seeds=args.seeds,
                           min_steps=args.min_steps, max_steps=args.max_steps)
        if args.steps:
            sizing = Sizing(sizing.seeds, args.steps, max(1, args.steps // 2), sizing.seconds_per_seed,
                            f"--steps {args.steps} given; " + sizing.note)
        plan_args.steps, plan_args.retrofit_steps = sizing.steps, sizing.retrofit_steps
        plan = fidelity_plan(plan_args, world)
        results.update(plan=plan, sizing=asdict(sizing), plan_note=f"{preset} on {name or 'CPU'}; {sizing.note}")
        log(f"fidelity plan: {sizing.note}")
        seeds = list(range(1, sizing.seeds + 1))
        runs = [Row(f"{var} seed {s}", values={}) for s in seeds for var in VARIANTS]
        fidelity_runs(repo, work, plan_args, plan, seeds, deadline, runs)
    except SystemExit as exc:
        results["error"] = str(exc)
        print(exc, file=sys.stderr)
    finally:
        results["seconds"] = round(time.perf_counter() - t_start, 1)
        results["work"] = str(work)
        write_results(out, results, checks, runs)
        print_table(f"gpu bundle: {env.detail}", checks)
        if runs:
            print_table(f"fidelity: {results.get('plan_note', '')}", runs, COLUMNS)
        v = verdict(runs)
        print("\nverdict: " + (f"{v['result']}: {v['why']}" if v.get("decided") else f"undecided: {v['why']}"))
        print(f"results: {out / 'results.json'}, {out / 'results.md'} ({results['seconds']:.0f} s)")
    failed = [r.name for r in checks + runs if r.status == "FAIL"]
    return 1 if failed or "error" in results else 0


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("check", help="bench/gpu_check.sh")
    f = sub.add_parser("fidelity", help="bench/gpu_fidelity.sh")
    pr = sub.add_parser("prepare", help="build the fidelity runs' inputs into --work/repo (make gpu-bundle)")
    sub.add_parser("contexts", help="(in a prepared repo) write the QA and SFT files with retrieved ctxs")
    nd = sub.add_parser("node", help="gpu-bundle/run.sh: checks and fidelity runs on prepared inputs")
    c.add_argument("--cpu", action="store_true", help="run the 2-process pipeline row on 2 CPU ranks (checks the script)")
    for p in (c, f):
        p.add_argument("--dry-run", action="store_true", help="print the table without running anything on a GPU")
    for p in (c, f, pr, nd):
        p.add_argument("--work", default=None, help="folder for the repo copy and logs (default: a temp folder)")
    for p in (f, pr, nd):
        p.add_argument("--tiny", action="store_true", help="the tiny preset on a small world (a CPU check of the script)")
    for p in (f, pr):
        p.add_argument("--preset", default="100m", help="model.name")
        p.add_argument("--entities", type=int, default=6000, help="world.num_entities (3 documents each)")
        p.add_argument("--seq-length", type=int, default=512)
    for p in (f, nd):
        p.add_argument("--cpu", action="store_true", help="run without a GPU (to check the script itself, with small sizes)")
        p.add_argument("--micro-batch", type=int, default=16)
        p.add_argument("--lr", type=float, default=1e-3)
        p.add_argument("--sft-steps", type=int, default=200)
        p.add_argument("--eval-batches", type=int, default=16, help="validation micro batches")
        p.add_argument("--seeds", type=int, default=2, help="at most this many seeds")
        p.add_argument("--out", default=None, help="folder for results.json and results.md")
    f.add_argument("--steps", type=int, default=600, help="pretraining steps of GPT and Retro")
    f.add_argument("--retrofit-steps", type=int, default=300, help="steps of the retrofit (decoder frozen)")
    f.add_argument("--budget-s", type=int, default=540, help="a second seed starts only before 55%% of this")
    pr.add_argument("--budget-s", type=int, default=7200, help="time limit of the DVC build")
    nd.add_argument("--repo", required=True, help="the bundle's prepared repo (code and inputs)")
    nd.add_argument("--budget-s", type=int, default=480, help="hard limit of the whole run, results included")
    nd.add_argument("--steps", type=int, default=0, help="pretraining steps (0: sized by the step benchmark)")
    nd.add_argument("--min-steps", type=int, default=200, help="fewer steps than this per run: one seed")
    nd.add_argument("--max-steps", type=int, default=None, help="cap on the sized steps")
    args = ap.parse_args(argv)
    if args.what == "contexts":
        print(json.dumps(contexts(), indent=1))
        return 0
    if args.what == "prepare":
        if args.tiny:
            args.preset = "tiny"
        repo = prepare(Path(args.work or tempfile.mkdtemp(prefix="gpu-prepare-")), world_plan(args), args.budget_s)
        print(repo)
        return 0
    if args.what == "node":
        if args.tiny:
            args.micro_batch, args.sft_steps, args.eval_batches = 2, 2, 2
            args.min_steps, args.max_steps = 1, args.max_steps or 4
        args.out = args.out or "gpu-results"
        return node(args)
    if args.what == "fidelity" and args.tiny:
        args.steps, args.retrofit_steps, args.sft_steps, args.micro_batch, args.eval_batches = 4, 2, 2, 2, 2
    return check(args) if args.what == "check" else fidelity(args)


if __name__ == "__main__":
    sys.exit(main())
