#!/usr/bin/env bash
# The GPU bundle's entry script (gpu-bundle/run.sh, written by `make gpu-bundle`). On a node with
# no package index, with the `python3` that has a CUDA torch (>= 2.9; e.g. a site PyTorch 2.11):
#
#   bash gpu-bundle/run.sh [--out DIR] [--budget-s N] [--work DIR] [--cpu --tiny]
#
# installs the bundle's wheels offline into a temporary folder (pip --no-index --target; the
# site packages are never touched; only what the node lacks or has older than the bundle's pin),
# puts it on PYTHONPATH, and runs bench/gpu_suite.py node: the gpu tests, the 843m step
# benchmark, the step benchmark that sizes the fidelity runs, then GPT, Retro and a retrofit of
# that GPT through pretrain, SFT, generate and score (two seeds when the budget allows). Writes
# DIR/results.json and DIR/results.md (default DIR: gpu-results), also when --budget-s (default
# 480: the whole run, the install included) stops it. PYTHON=... picks another interpreter.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
OUT="gpu-results"
BUDGET=480
PASS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --budget-s) BUDGET="$2"; shift 2 ;;
        --work) PASS+=(--work "$2"); shift 2 ;;
        --cpu|--tiny) PASS+=("$1"); shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
START=$(date +%s)
say() { echo "[run.sh $(date +%H:%M:%S)] $*" >&2; }

say "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
"$PY" -c 'import torch' 2>/dev/null || { echo "run.sh: $PY has no torch; set PYTHON= to the interpreter with a CUDA torch" >&2; exit 1; }
say "torch: $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda, "GPUs", torch.cuda.device_count())')"

SITE="$(mktemp -d "${TMPDIR:-/tmp}/gpu-bundle-site.XXXXXX")"
# The pinned wheels this interpreter lacks (or has at an older version); the rest is the node's.
mapfile -t NEED < <("$PY" - "$HERE/wheels/requirements.txt" <<'PYEOF'
import sys
from importlib import metadata

def older(have, want):
    try:
        from packaging.version import Version
        return Version(have) < Version(want)
    except Exception:
        return have != want

for line in open(sys.argv[1]).read().split():
    name, _, want = line.partition("==")
    if name in ("exceptiongroup", "tomli") and sys.version_info >= (3, 11):
        continue
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        print(line)
        continue
    if want and older(have, want):
        print(line)
PYEOF
)
if [ ${#NEED[@]} -gt 0 ]; then
    say "installing ${#NEED[@]} wheels offline into $SITE: ${NEED[*]}"
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
            --find-links "$HERE/wheels" --target "$SITE" "${NEED[@]}"
    else  # no pip on the node: a wheel is a zip of the files to import; pick this Python's tags
        "$PY" - "$HERE/wheels" "$SITE" "${NEED[@]}" <<'PYEOF'
import sys, zipfile
from pathlib import Path
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
wheels, site, need = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
tags = list(sys_tags())
for line in need:
    name, _, version = line.partition("==")
    cands = [w for w in wheels.glob("*.whl") if canonicalize_name(parse_wheel_filename(w.name)[0]) == canonicalize_name(name)
             and (not version or str(parse_wheel_filename(w.name)[1]) == version)]
    best = min((tags.index(t), w) for w in cands for t in parse_wheel_filename(w.name)[3] if t in tags)[1]
    zipfile.ZipFile(best).extractall(site)
PYEOF
    fi
else
    say "the node has every package the runs need"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import deepspeed, pydantic, pytest; print("deepspeed", deepspeed.__version__, "pydantic", pydantic.VERSION, "pytest", pytest.__version__)' \
    | while read -r line; do say "$line"; done
LEFT=$((BUDGET - ($(date +%s) - START)))
say "running the checks and the fidelity runs ($LEFT s left of --budget-s $BUDGET)"
set +e
"$PY" "$HERE/repo/bench/gpu_suite.py" node --repo "$HERE/repo" --out "$OUT" --budget-s "$LEFT" ${PASS[@]+"${PASS[@]}"}
RC=$?
rm -rf "$SITE"
exit $RC
