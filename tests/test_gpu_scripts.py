"""bench/gpu_check.sh and bench/gpu_fidelity.sh: their CPU dry runs print the table (GPU rows
skipped), and every params key the fidelity runs set exists in params.yaml; the GPU bundle's
sizing of the fidelity runs, its decision rule and its torch check (bench/gpu_suite.py)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
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
                              preset="100m", eval_batches=16, tiny=False)
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


def test_contexts_params_exist():
    """The params ``gpu_suite.contexts`` points the runs at (prepared QA and SFT files) exist."""
    from e2e import set_param

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    keys = ["generate.tasks"] + [f"sft.blend.{name}.path" for name in params["sft"]["blend"]]
    assert [k for k in keys if not set_param(params, k, None)] == []


def test_size_runs_fills_the_time_left_and_drops_to_one_seed():
    import gpu_suite

    kw = dict(sft_steps=200, eval_tokens=16 * 8192, qa_tokens=200 * 512)
    fast = gpu_suite.size_runs(400, 150_000, 8, 8192, **kw)
    assert fast.seeds == 2 and fast.steps >= 200 and fast.retrofit_steps == fast.steps // 2
    # the plan's own time estimate fits the time left: 3 variants x (4 starts, SFT, eval, QA) + 2.5 runs of steps
    per_variant = 4 * 8 + (200 * 8192 + 16 * 8192 + 200 * 512 / 3) / 150_000
    assert fast.seeds * (3 * per_variant + 2.5 * fast.steps * 8192 / 150_000) <= 400
    more = gpu_suite.size_runs(800, 150_000, 8, 8192, **kw)
    assert more.steps > 2 * fast.steps  # the fixed costs do not grow with the time
    slow = gpu_suite.size_runs(400, 20_000, 8, 8192, **kw)
    assert slow.seeds == 1 and 0 < slow.steps < 200
    assert gpu_suite.size_runs(400, 150_000, 8, 8192, max_steps=50, **kw).steps == 50


def _rows(values: dict):
    import gpu_suite

    rows = []
    for (variant, seed), v in values.items():
        rows.append(gpu_suite.Row(f"{variant} seed {seed}", "pass", values=v))
    return rows


def test_verdict_applies_the_decision_rule(tmp_path):
    import gpu_suite

    def run(val, shuffled=None, no_retr=None, em=0.1):
        return dict(val_loss=val, shuffled=shuffled, no_retr=no_retr, facts=val + 1, qa_em=em)

    wins = _rows({("GPT", 1): run(2.00), ("Retro", 1): run(1.80, 1.95, 1.97, 0.3),
                  ("GPT", 2): run(2.02), ("Retro", 2): run(1.82, 1.96, 1.98, 0.35)})
    v = gpu_suite.verdict(wins)
    assert v["decided"] and v["result"] == "Retro beats GPT by retrieval"
    assert v["retro_lead"] == pytest.approx(0.2) and v["seed_spread"] == pytest.approx(0.02)
    assert v["qa_em_lead"] == pytest.approx(0.225)
    decoder = _rows({("GPT", 1): run(2.00), ("Retro", 1): run(1.80, 1.805, 1.81),
                     ("GPT", 2): run(2.02), ("Retro", 2): run(1.82, 1.825, 1.83)})
    assert gpu_suite.verdict(decoder)["result"] == "Retro ahead, but not by retrieval"
    tie = _rows({("GPT", 1): run(2.00), ("Retro", 1): run(1.99, 2.1, 2.1),
                 ("GPT", 2): run(2.05), ("Retro", 2): run(2.04, 2.1, 2.1)})
    assert gpu_suite.verdict(tie)["result"] == "no Retro advantage at this budget"
    one = _rows({("GPT", 1): run(2.00), ("Retro", 1): run(1.80, 1.95, 1.97)})
    assert not gpu_suite.verdict(one)["decided"]
    gpu_suite.write_results(tmp_path, {"environment": "test"}, [gpu_suite.Row("environment", "ok")], wins)
    saved = __import__("json").loads((tmp_path / "results.json").read_text())
    assert saved["verdict"]["result"] == "Retro beats GPT by retrieval" and len(saved["fidelity"]) == 4
    assert "| Retro seed 2 | pass |" in (tmp_path / "results.md").read_text()


def test_torch_check_names_what_is_missing(monkeypatch):
    import gpu_suite

    assert gpu_suite.missing_torch_apis() == []  # the pinned torch has everything
    monkeypatch.setattr(gpu_suite, "TORCH_APIS", gpu_suite.TORCH_APIS + (("torch.backends.cuda.not_there", "9.9"),
                                                                          ("torch.no_such_module.f", "9.9")))
    assert gpu_suite.missing_torch_apis() == ["torch.backends.cuda.not_there (torch >= 9.9)",
                                              "torch.no_such_module.f (torch >= 9.9)"]
