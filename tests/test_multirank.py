"""Many processes: pretrain, SFT, evaluation and generation on 2 CPU ranks (gloo) under the
``deepspeed`` launcher, with every collective checked for the engine's device.

Every launched process runs with ``tests/guard`` on PYTHONPATH and
``INSTRUCTRETRO_COLLECTIVE_GUARD=1``: its ``sitecustomize`` installs ``collective_guard``, which
fails a torch.distributed collective handed a host-built tensor (what NCCL refuses on GPUs; see
that module for how a CPU run tells them apart) and prints how many collectives it checked.

The slow tests share one 2-rank ZeRO-0 pretraining run (Retro, tiny preset, random neighbor ids
as in test_pretrain) and compare the other runs with it: ZeRO 2 and 3 with a valid split that
gives the ranks unequal eval batch counts, a run SIGKILLed after a resume checkpoint and rerun,
the same global batch on one process, eval-only, SFT and generation.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from instructretro.chunks import SampleLayout
from instructretro.pretrain_data import eval_indices
from instructretro.tokenizer import Tokenizer
from instructretro.tokenstore import TokenStore

from conftest import PYTHON, REPO, read_jsonl
from test_pretrain import CL, SEQ, set_model, stage_args, write_neighbor_inputs, write_params, write_store

DEEPSPEED = Path(PYTHON).parent / "deepspeed"
GUARD = REPO / "tests" / "guard"
STEPS, SAVE = 8, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def guarded_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONHASHSEED="0", OMP_NUM_THREADS="1", INSTRUCTRETRO_COLLECTIVE_GUARD="1",
               PATH=f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join([str(GUARD), *filter(None, [env.get("PYTHONPATH")])]))
    return env


def command(script, *args, ranks: int = 2) -> list[str]:
    script = str(REPO / "stages" / script) if not Path(script).is_absolute() else str(script)
    if ranks == 1:
        return [PYTHON, script, *map(str, args)]
    return [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(_free_port()), script, *map(str, args)]


def launch(script, *args, ranks: int = 2, cwd=REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a stage script on ``ranks`` processes (the launcher for 2) with the guard; the whole
    process group is killed at ``timeout`` (a collective that never completes hangs forever)."""
    proc = subprocess.Popen(command(script, *args, ranks=ranks), cwd=cwd, env=guarded_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{script} on {ranks} ranks did not finish in {timeout} s (a hung collective?)\n"
                             + err[-3000:]) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def ok(proc: subprocess.CompletedProcess, ranks: int = 2) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if ranks > 1:  # the guard was on in every rank and saw the collectives
        for rank in range(ranks):
            assert f"collective guard: rank {rank} checked" in proc.stderr, proc.stderr[-3000:]
    return proc


def read_curve(live: Path, name: str) -> dict[int, float]:
    rows = (live / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()[1:]
    return {int(r.split("\t")[0]): float(r.split("\t")[-1]) for r in rows}


def read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


# ------------------------------------------------------------------------------ the guard


def test_guard_fails_a_collective_on_a_host_built_or_wrong_device_tensor(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text("""
import sys, torch, torch.distributed as dist
from instructretro.dist import init_distributed, local_device
init_distributed()
device = local_device()
dist.all_reduce(torch.zeros(2, device=device))               # placed: fine
dist.all_reduce(torch.tensor([1.0, 2.0]).to(device) * 2)      # moved, then computed on: fine
cases = {"host": lambda: torch.tensor([1.0, 2.0], dtype=torch.float64),
         "host_op": lambda: torch.tensor([1.0]).double().reshape(1, 1),
         "numpy": lambda: torch.from_numpy(__import__("numpy").zeros(3)),
         "cpu": lambda: torch.zeros(2, device=device).cpu(),
         "meta": lambda: torch.zeros(2, device="meta")}
for name, make in cases.items():
    try:
        dist.all_reduce(make())
    except RuntimeError as exc:  # one write per line: the two ranks share the pipe
        sys.stdout.write(f"{name} refused: {exc}\\n")
""")
    proc = ok(launch(script, ranks=2, cwd=tmp_path))
    for name in ("host", "host_op", "numpy", "cpu", "meta"):
        assert proc.stdout.count(f"{name} refused: collective guard:") == 2, proc.stdout


# ------------------------------------------------------------------------------ in one process


def test_local_device_is_the_accelerator_of_the_local_rank(monkeypatch):
    import deepspeed.accelerator

    from instructretro import dist

    class Fake:
        selected = None

        def device_name(self, index=None):
            return "cuda" if index is None else f"cuda:{index}"

        def set_device(self, index):
            Fake.selected = index

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: Fake())
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert dist.local_device() == torch.device("cuda:3") and Fake.selected == 3


def test_generation_loads_the_checkpoint_in_its_training_precision(tmp_path):
    from instructretro import checkpoint, presets
    from instructretro.errors import PipelineError
    from instructretro.model import Retro

    cfg = presets.get("tiny", vocab_size=128, n_layers=2, hidden=16, heads=2, seq_length=128, chunk_length=64,
                      cca_layers=(2,), num_neighbors=1)
    model = Retro(cfg)
    checkpoint.export_checkpoint(model, cfg, tmp_path / "bf16", extra={"precision": "bf16"})
    checkpoint.export_checkpoint(model, cfg, tmp_path / "plain")
    assert checkpoint.checkpoint_precision(tmp_path / "bf16") == "bf16" and checkpoint.checkpoint_precision(tmp_path / "plain") == "fp32"
    loaded = checkpoint.load_model(tmp_path / "bf16", device=torch.device("cpu"), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    (tmp_path / "bf16" / "train.json").write_text('{"precision": "fp8"}')
    with pytest.raises(PipelineError, match="train.json: precision 'fp8'"):
        checkpoint.checkpoint_precision(tmp_path / "bf16")


def test_evaluate_pads_a_short_rank_with_batches_that_count_no_tokens():
    from instructretro import train

    calls = []

    def loss_fn(model, batch):
        calls.append(batch["loss_mask"].sum().item())
        mask = batch["loss_mask"].float()
        return {"loss": ((batch["tokens"].float() * mask).sum(), mask.sum())}

    real = [{"tokens": torch.full((2, 3), 2.0), "loss_mask": torch.ones(2, 3)}]
    out = train.evaluate(torch.nn.Linear(1, 1), real, loss_fn, torch.device("cpu"), ["loss", "other"],
                         pad_to=3, pad_batch={"tokens": torch.full((2, 3), 9.0), "loss_mask": torch.ones(2, 3)})
    assert calls == [6, 0, 0]  # one real batch, two padding forwards
    assert out["loss"] == 2.0 and out["loss_count"] == 6
    assert np.isnan(out["other"]) and out["other_count"] == 0
    with pytest.raises(Exception, match="pad_batch"):
        train.evaluate(torch.nn.Linear(1, 1), [], loss_fn, None, ["loss"], pad_to=1)


def test_pretrain_refuses_a_global_batch_its_world_cannot_make(tmp_path):
    from instructretro import params as P, presets
    from instructretro.errors import PipelineError
    from instructretro.pretrain import check_global_batch, preset_training

    def params(**pretrain):
        base = yaml.safe_load((REPO / "params.yaml").read_text())
        base["pretrain"].update(pretrain)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(base))
        return P.load(tmp_path / "params.yaml")

    recipe = presets.training("843m")  # global batch 128, micro batch 1
    p = params(micro_batch=None, grad_accum=None)
    with pytest.raises(PipelineError, match=r"global batch 128 .* micro_batch 1 x 48 processes.*pretrain.grad_accum"):
        check_global_batch(p, "843m", recipe, 48)
    check_global_batch(p, "843m", recipe, 64)
    assert preset_training(recipe, 64)["grad_accum"] == 2 and preset_training(recipe, 48)["grad_accum"] is None
    assert preset_training(recipe, 8, micro_batch=4)["grad_accum"] == 4
    check_global_batch(params(grad_accum=3), "843m", recipe, 48)  # set explicitly: no preset split
    with pytest.raises(PipelineError, match="micro_batch 4 x 3"):
        check_global_batch(params(micro_batch=4, grad_accum=None), "843m", recipe, 3)


def test_make_gpu_targets_launch_each_stage_and_install_faiss_gpu():
    def dry(*args):
        return subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout

    plan = dry("pretrain", "GPUS=4", "HOSTFILE=hosts")
    launcher = "deepspeed --hostfile hosts --num_gpus 4"
    for stage in ("embed", "query-neighbors", "pretrain"):
        assert f"instructretro.launch '{stage}' '.venv/bin/{launcher}'" in plan, plan
    assert plan.index("'embed'") < plan.index("repro add-index") < plan.index("'query-neighbors'") < plan.index("'pretrain'")
    sft_plan = dry("sft", "GPUS=2")
    assert "make" in sft_plan and "instructretro.launch 'sft' '.venv/bin/deepspeed  --num_gpus 2'" in sft_plan
    assert "instructretro.launch 'generate@*'" in dry("generate", "GPUS=2")
    assert "repro --glob 'generate@*'" in dry("generate")
    stamp = "STAMP=/nonexistent/stamp"  # as on a fresh clone
    gpu, cpu = dry("install", "GPU=1", stamp), dry("install", "GPU=", stamp)
    assert "faiss-gpu" in gpu and "grep -v -E '^faiss-cpu' requirements.txt" in gpu
    assert "faiss-gpu" not in cpu and "-r requirements.txt" in cpu


def test_launch_plan_runs_each_stage_cmd_under_the_launcher_then_commits_it():
    from instructretro.launch import shell_lines, stage_commands

    stages = stage_commands("generate@*", str(REPO))
    assert stages and all(cmd.startswith("python stages/generate.py") for _, cmd in stages)
    [(name, cmd)] = stage_commands("embed", str(REPO))
    [line] = shell_lines([(name, cmd)], "deepspeed --num_gpus 8", "dvc")
    assert line.startswith("if dvc status embed | grep -q 'up to date'; then")
    assert f"else deepspeed --num_gpus 8 {cmd.removeprefix('python ')} && dvc commit -f embed; fi" in line


# ------------------------------------------------------------------------------ pretraining


@pytest.fixture(scope="module")
def pre(small_world, small_tokenizer, tmp_path_factory):
    """Pretraining inputs and params whose valid split gives the 2 ranks unequal batch counts."""
    root = tmp_path_factory.mktemp("multirank")
    tok = Tokenizer(small_tokenizer)
    write_store(small_world / "documents.jsonl", tok, root / "tokens" / "pretrain", 0.15)
    write_store(small_world / "reference.jsonl", tok, root / "tokens" / "db", 0.0)
    write_neighbor_inputs(root, root / "tokens" / "pretrain", root / "tokens" / "db")
    n_valid = len(SampleLayout(TokenStore(root / "tokens" / "pretrain", "valid"), CL, SEQ))
    micro = next(m for m in (2, 3, 4) if -(-n_valid // m) % 2 == 1)  # an odd number of eval batches
    eval_batches = -(-n_valid // (2 * micro))  # all of them
    counts = [len(eval_indices(n_valid, eval_batches, micro, 2, r)) for r in range(2)]
    assert counts[0] != counts[1], counts  # the case ZeRO-3 hung on

    def params(tag: str, **overrides) -> Path:
        kw = dict(steps=STEPS, micro_batch=micro, warmup=2, eval_interval=4, eval_batches=eval_batches,
                  save_interval=SAVE, zero_stage=0)
        kw.update(overrides)
        return set_model(write_params(root / f"params_{tag}.yaml", small_world, **kw), retro=True)

    return root, small_tokenizer, params, micro, counts


def pretrain(pre, tag: str, ranks: int = 2, work: str = "work", timeout: int = 300, **overrides):
    root, tok, params, _, _ = pre
    args = stage_args(root, root / tag, params(tag, **overrides), tag, tok)
    args[args.index("--work") + 1] = root / tag / work
    proc = launch("pretrain.py", *args, ranks=ranks, cwd=root, timeout=timeout)
    return proc, root / tag


@pytest.fixture(scope="module")
def zero0(pre):
    """The reference: 2 ranks, ZeRO 0."""
    proc, out = pretrain(pre, "zero0")
    ok(proc)
    return out


def _metrics(out: Path, tag: str) -> dict:
    return json.loads((out / f"metrics_{tag}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_pretrain_zero_stages_with_uneven_eval_batches_match_zero0(pre, zero0, stage):
    """ZeRO 2 and 3 on 2 ranks with 3 and 2 eval batches (ZeRO-3 gathers parameters in every
    forward: without padding it hangs); the ZeRO-3 export equals the ZeRO-0 export."""
    tag = f"zero{stage}"
    proc, out = pretrain(pre, tag, zero_stage=stage, timeout=240)
    ok(proc)
    ref, got = _metrics(zero0, "zero0"), _metrics(out, tag)
    assert got["steps"] == STEPS and got["valid_samples_evaluated"] == ref["valid_samples_evaluated"]
    for key in ("val_loss", "val_loss_shuffled", "val_loss_no_retrieval", "val_loss_facts", "train_loss"):
        assert got[key] == pytest.approx(ref[key], rel=1e-4), key
    # fp32 master weights; the gradient reductions differ in order (all-reduce vs reduce-scatter),
    # and Adam turns a last-bit difference of a near-zero gradient into up to ~1e-4 (one
    # embedding entry of 131k after 8 steps at ZeRO 2)
    a, b = read_weights(zero0 / "ckpt_zero0"), read_weights(out / f"ckpt_{tag}")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=2e-4, msg=name)


@pytest.mark.slow
def test_two_ranks_killed_after_a_checkpoint_resume_to_the_uninterrupted_weights(pre, zero0):
    """SIGKILL of the launcher and both ranks once a resume checkpoint exists; the rerun resumes
    there and ends on the same step with the same weights as the uninterrupted run."""
    root, tok, params, _, _ = pre
    out = root / "killed"
    args = stage_args(root, out, params("killed"), "killed", tok)
    work = out / "work"
    proc = subprocess.Popen(command("pretrain.py", *args), cwd=root, env=guarded_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(work.glob("*/latest")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = list(work.glob("*/latest"))
    assert latest, "no resume checkpoint before the kill"
    killed_at = int(latest[0].read_text().strip().removeprefix("step"))
    assert killed_at < STEPS and not (out / "ckpt_killed").exists()

    ok(launch("pretrain.py", *args, cwd=root))
    m = _metrics(out, "killed")
    assert m["steps"] == STEPS and killed_at <= m["resumed_at"] < STEPS
    a, b = read_weights(zero0 / "ckpt_zero0"), read_weights(out / "ckpt_killed")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert m["val_loss"] == pytest.approx(_metrics(zero0, "zero0")["val_loss"], abs=1e-6)


@pytest.mark.slow
def test_one_and_two_ranks_give_the_same_loss_curve_for_the_same_global_batch(pre, zero0, capsys):
    """1 process at micro batch 2m vs 2 ranks at m: the same samples per step, the same curve."""
    _, _, _, micro, _ = pre
    proc, out = pretrain(pre, "one", ranks=1, micro_batch=2 * micro)
    ok(proc, ranks=1)
    one, two = read_curve(out / "live_one", "train/loss"), read_curve(zero0 / "live_zero0", "train/loss")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    v1, v2 = read_curve(out / "live_one", "val/loss"), read_curve(zero0 / "live_zero0", "val/loss")
    assert sorted(v1) == sorted(v2) == [4, 8]
    with capsys.disabled():
        print("\nstep  train/loss 1 rank  2 ranks   diff")
        for s in sorted(one):
            print(f"{s:>4}  {one[s]:.6f}          {two[s]:.6f}  {two[s] - one[s]:+.1e}")
        for s in sorted(v1):
            print(f"val@{s}  {v1[s]:.6f}          {v2[s]:.6f}  {v2[s] - v1[s]:+.1e}")
    assert max(abs(one[s] - two[s]) for s in one) < 1e-4
    assert max(abs(v1[s] - v2[s]) for s in v1) < 1e-4
    assert one[STEPS] < one[1] - 0.1  # it trained


@pytest.mark.slow
def test_eval_only_on_two_ranks_gives_the_run_own_validation(pre, zero0):
    root, tok, params, _, _ = pre
    args = stage_args(root, root / "evalonly", params("evalonly"), "evalonly", tok)
    ok(launch("pretrain.py", *args, "--eval-only", zero0 / "ckpt_zero0", cwd=root))
    m, ref = _metrics(root / "evalonly", "evalonly"), _metrics(zero0, "zero0")
    assert m["steps"] == 0 and m["valid_samples_evaluated"] == ref["valid_samples_evaluated"]
    for key in ("val_loss", "val_loss_shuffled", "val_loss_no_retrieval", "val_loss_facts"):
        assert m[key] == pytest.approx(ref[key], abs=1e-5), key


# ------------------------------------------------------------------------------ SFT


def _sft_params(path: Path, world_dir: Path, ckpt: Path, **sft_overrides) -> Path:
    from instructretro import sft

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["sft"].update({k: None for k in sft.TRAIN_KEYS})
    # one dataset, one held-out sample: rank 1 has none and pads its validation
    params["sft"].update(init_from=str(ckpt), retrieval="none", valid_fraction=0.1,
                         valid_samples=1, eval_interval=2, save_interval=2, seed=5, seq_length=256, steps=4,
                         global_batch=4,
                         blend={"short_qa": {"path": str(world_dir / "sft" / "short_qa.jsonl"), "format": "conversation",
                                             "prob": 1}})
    params["sft"].update(sft_overrides)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.mark.slow
def test_sft_on_two_ranks_with_a_resume_matches_one_process(pre, zero0, small_world):
    """The same global batch on 1 process and on 2 ranks (the 2-rank run stopped after step 2
    with a resume checkpoint, then continued); one held-out sample, so rank 1 pads."""
    root, tok, _, _, _ = pre
    runs = {}
    for ranks, micro in ((1, 4), (2, 2)):
        out = root / f"sft{ranks}"
        params = _sft_params(root / f"sft{ranks}.yaml", small_world, zero0 / "ckpt_zero0", micro_batch=micro)
        args = ["--params", params, "--tokenizer", tok, "--out", out / "ckpt", "--metrics", out / "metrics.json",
                "--live", out / "live", "--work", out / "work"]
        if ranks == 2:
            ok(launch("sft.py", *args, "--stop-after", 2, ranks=ranks, cwd=root, timeout=240), ranks=ranks)
            assert not (out / "ckpt").exists()
        ok(launch("sft.py", *args, ranks=ranks, cwd=root, timeout=240), ranks=ranks)
        runs[ranks] = json.loads((out / "metrics.json").read_text())
    one, two = runs[1], runs[2]
    assert one["resumed_at"] == 0 and two["resumed_at"] == 2 and two["steps"] == 4
    assert np.isfinite(two["val_loss"]) and two["blend"] == one["blend"]
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
    a, b = read_weights(root / "sft1" / "ckpt"), read_weights(root / "sft2" / "ckpt")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_sft_retrieval_is_split_over_ranks_and_gathered(tmp_path):
    """Each rank searches one share of the queries; every rank gets the table one process gets."""
    script = tmp_path / "search.py"
    script.write_text("""
import json, sys, numpy as np
from instructretro import dist, sft
rank, world = dist.init_distributed()

class Retriever:
    def __init__(self):
        self.seen = []
    def search(self, texts, n):
        self.seen += texts
        return np.array([[sum(map(ord, t)) % 97 + j for j in range(n)] for t in texts])

texts = [f"question {i}" if i % 5 else "" for i in range(23)]
r = Retriever()
ids = sft.search_batched(r, texts, 3, batch=4, rank=rank, world_size=world)
json.dump({"ids": ids.tolist(), "seen": r.seen}, open(sys.argv[-1] + f".{rank}.{world}", "w"))
dist.barrier()
dist.end_ranks(world)  # both ranks leave the group before exit (gloo threads alive at exit can abort)
""")
    ok(launch(script, tmp_path / "out", ranks=1, cwd=tmp_path), ranks=1)
    ok(launch(script, tmp_path / "out", ranks=2, cwd=tmp_path))
    one = json.loads((tmp_path / "out.0.1").read_text())
    parts = [json.loads((tmp_path / f"out.{r}.2").read_text()) for r in range(2)]
    assert all(p["ids"] == one["ids"] for p in parts)
    assert parts[0]["seen"] and parts[1]["seen"]
    assert parts[0]["seen"] + parts[1]["seen"] == one["seen"]  # each query searched once, in order


# ------------------------------------------------------------------------------ generation


@pytest.mark.slow
def test_generate_sharded_over_two_ranks_writes_the_bytes_of_one_process(pre, zero0, small_world):
    root, tok, _, _, _ = pre
    params = {"retro": {"chunk_length": CL}, "sft": {"system": "Be short."},
              "generate": {"checkpoint": str(zero0 / "ckpt_zero0"),
                           "tasks": {"qa": {"path": str(small_world / "qa.jsonl"), "style": "short"}},
                           "retrieval": "none", "num_contexts": 0, "max_new_tokens": 12, "batch_size": 4,
                           "max_questions": 10, "system": None, "nprobe": 1, "efsearch": 1, "threads": 1}}
    (root / "gen.yaml").write_text(yaml.safe_dump(params))
    outs = {}
    for ranks in (1, 2):
        d = root / f"gen{ranks}"
        ok(launch("generate.py", "--params", root / "gen.yaml", "--tokenizer", tok, "--task", "qa",
                  "--out", d / "qa.jsonl", "--metrics", d / "qa.json", ranks=ranks, cwd=root), ranks=ranks)
        outs[ranks] = d
    assert (outs[1] / "qa.jsonl").read_bytes() == (outs[2] / "qa.jsonl").read_bytes()
    answers = read_jsonl(outs[2] / "qa.jsonl")
    assert len(answers) == 10 and sum(a["new_tokens"] for a in answers) > 0
    assert [a["question"] for a in answers] == [r["question"] for r in read_jsonl(small_world / "qa.jsonl")[:10]]
    m1, m2 = (json.loads((outs[r] / "qa.json").read_text()) for r in (1, 2))
    assert m1["decoded_by_rank"] == [10] and m2["decoded_by_rank"] == [6, 4]  # batches 4+2 and 4
