#!/usr/bin/env bash
# The papers' comparison at a GPU budget, on one GPU in about 10 minutes:
#
#   bench/gpu_fidelity.sh             # make install, then the runs below; one table at the end
#   bench/gpu_fidelity.sh --dry-run   # no GPU needed: the plan and the table skeleton
#   bench/gpu_fidelity.sh --seeds 1 --steps 400 --entities 4000   # a smaller budget
#
# In a throwaway copy of the repo, DVC builds a generated world of --entities entities (3
# documents each; with the defaults the pretraining run stays under a few epochs), its
# tokenizer, retrieval database, index and neighbors. Then, per seed, through the stage
# scripts with one params file per run (runs/*.yaml in the copy): the 100m preset as GPT and
# as Retro pretrained from scratch, and a Retro retrofitted from that GPT (pretrain.init_from
# the GPT, pretrain.freeze_decoder: true: only encoder and CCA train, RETRO section 4.4); each
# then instruction-tuned (stage sft) and asked the world's 200 QA questions with retrieved
# contexts in the prompt (stages generate and score). The table gives val_loss, the shuffled-
# neighbors and no-retrieval controls, the fact-token loss and QA EM of every run. A second
# seed starts only while the time budget (--budget-s) allows.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " != *" --dry-run "* ]]; then
    make install >&2
fi
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" bench/gpu_suite.py fidelity "$@"
