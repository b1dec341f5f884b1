"""dvc.yaml keeps dependencies narrow: each stage lists exactly the src modules its script
imports (transitively) and only param keys that exist, so a change reruns exactly the stages
that depend on it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "src" / "instructretro"


def transitive_modules(script: Path) -> set[str]:
    """instructretro modules ``script`` imports, transitively (the scan the resume keys use)."""
    from instructretro.workdir import code_files

    return {p.stem for p in code_files(script) if p.parent == PKG}


def _stages():
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        return [(s.addressing, s.cmd, [str(Path(d.def_path)) for d in s.deps], s) for s in repo.index.stages]


def _flat_keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.add(key)
        if isinstance(v, dict):
            out |= _flat_keys(v, key + ".")
    return out


STAGES = _stages()


@pytest.mark.parametrize("name, cmd, deps, stage", STAGES, ids=[s[0] for s in STAGES])
def test_stage_lists_exactly_the_modules_it_imports(name, cmd, deps, stage):
    m = re.search(r"python\S* (stages/\S+\.py)", cmd)
    assert m, f"{name}: command does not run a stages/ script: {cmd}"
    script = m.group(1)
    assert script in deps, f"{name}: its own script {script} is not a dependency"
    listed = {Path(d).stem for d in deps if d.startswith("src/instructretro/")}
    wanted = transitive_modules(REPO / script)
    assert listed == wanted, f"{name}: missing {sorted(wanted - listed)}, extra {sorted(listed - wanted)}"


@pytest.mark.parametrize("name, cmd, deps, stage", STAGES, ids=[s[0] for s in STAGES])
def test_stage_params_exist_and_literal_reads_are_listed(name, cmd, deps, stage):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    keys = _flat_keys(params)
    listed = set()
    for p in stage.params:
        listed |= set(p.params)
    for k in listed:
        assert k in keys, f"{name}: param {k} is listed in dvc.yaml but not in params.yaml"
    script = re.search(r"(stages/\S+\.py)", cmd).group(1)
    read = set(re.findall(r"""\.get\(\s*["']([a-z_]+\.[a-z_.]+)["']""", (REPO / script).read_text()))
    missing = {k for k in read if k not in listed and not any(k.startswith(l + ".") for l in listed)}
    assert not missing, f"{name}: reads params {sorted(missing)} that dvc.yaml does not list"
