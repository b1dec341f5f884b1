"""bench/gpu_check.sh and bench/gpu_fidelity.sh: their CPU dry runs print the table (GPU rows
skipped), and every params key the fidelity runs set exists in params.yaml."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def dry_run(script: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(Path.home())}
    return subprocess.run(["bash", str(REPO / "bench" / script), "--dry-run"], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=120)


def test_gpu_check_dry_run_prints_the_table_with_gpu_rows_skipped():
    r = dry_run("gpu_check.sh")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {line.split("  ")[0].strip(): line for line in r.stdout.splitlines() if "  " in line}
    assert rows["environment"].split()[1] == "ok"
    for name in ("tests marked gpu", "843m step benchmark (1 GPU)", "2-GPU pretrain, export, generate"):
        assert name in rows and " skipped " in rows[name] and "dry run" in rows[name], r.stdout


def test_gpu_fidelity_dry_run_prints_the_plan_and_the_skeleton():
    r = dry_run("gpu_fidelity.sh")
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "preset 100m" in out and "decoder frozen" in out
    header = next(line for line in out.splitlines() if line.startswith("check"))
    assert header.split()[3:] == ["val_loss", "shuffled", "no_retr", "facts", "qa_em"]
    runs = [line for line in out.splitlines() if " seed " in line]
    assert [line.split(" seed ")[0] for line in runs] == ["GPT", "Retro", "Retro retrofit"] * 2
    assert all(" skipped " in line for line in runs)


def test_fidelity_runs_set_only_existing_params_and_the_100m_preset():
    import gpu_suite
    from e2e import set_param

    from instructretro import presets

    args = argparse.Namespace(entities=6000, seq_length=512, steps=600, micro_batch=16, lr=1e-3, sft_steps=200,
                              preset="100m")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    plan = gpu_suite.fidelity_plan(args)
    keys = [k for section in plan.values() for k in section]
    keys += ["model.retro", "pretrain.seed", "sft.seed", "pretrain.init_from", "pretrain.freeze_decoder",
             "sft.init_from", "generate.checkpoint"]
    assert [k for k in keys if not set_param(params, k, None)] == []
    assert "100m" in presets.NAMES


def test_step_benchmark_fits_the_gpu_it_runs_on():
    import gpu_suite

    big = gpu_suite.step_benchmark_args(80)
    small = gpu_suite.step_benchmark_args(16)
    assert int(big[1]) >= int(small[1]) and big[1] in ("1", "2", "4")
    assert "--checkpointing" in small
