#!/usr/bin/env bash
# GPU acceptance check: one command on a machine with 1-8 NVIDIA GPUs, on a fresh clone with no
# edits, in under 10 minutes (each step has its own time limit: 3 + 2.5 + 6.5 min at most).
#
#   bench/gpu_check.sh            # make install, then the checks below; one table at the end
#   bench/gpu_check.sh --dry-run  # no GPU needed: the same table, GPU rows skipped
#
# Rows: the environment (GPUs, torch/CUDA, faiss GPUs, deepspeed); the tests marked `gpu`
# (bf16 forward/backward on the flash kernel, no host sync, fused AdamW + TF32, generation with
# model and cache on the GPU, faiss index training on GPU); the 843m Retro step benchmark
# (bench/gpu_step.py: tokens/s, MFU, peak memory); with 2+ GPUs, a throwaway copy of the repo
# where DVC builds the inputs, `deepspeed --num_gpus 2 stages/pretrain.py` trains 20 steps
# with validation and exports, and stages/generate.py answers from the export.
# Exit status 0 when every row that ran passed. Logs: --work DIR (default: a temp folder).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " != *" --dry-run "* ]]; then
    make install >&2
fi
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" bench/gpu_suite.py check "$@"
