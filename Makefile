# Two commands do everything: `make repro` runs the default pipeline, `make test` runs the tests.
# Both create .venv on first use: torch first (pinned), then requirements.txt, then this package.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODEL  ?=
GPUS   ?=
DVC    := $(BIN)/dvc
# Every target that runs stages runs them under `python -m instructretro.workspace`: it refuses to
# start, in one line, while another run holds this workspace (another make target, or a dvc
# command started by hand), and holds it until done. Side-by-side experiments: dvc exp run --queue.
WORKSPACE := $(BIN)/python -m instructretro.workspace --
DVC_RUN   := $(WORKSPACE) $(DVC)
# Stage commands in dvc.yaml call `python`, `deepspeed`: every target runs them from .venv.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro test test-fast bench clean-venv browser vega plots results overlap gpu-bundle

install: $(STAMP)

# Faiss: requirements.txt lists faiss-cpu; on a machine with an NVIDIA GPU (`nvidia-smi -L`
# succeeds) or with GPU=1, the PyPI wheel faiss-gpu is installed instead (both provide the module
# `faiss`, so only one of them; faiss-gpu also runs CPU indexes where no GPU is visible).
GPU       ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
FAISS_GPU ?= faiss-gpu==1.15.1
PIP       := $(BIN)/pip install -q --disable-pip-version-check

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) "$$(grep -E '^torch==' requirements.txt)"
ifeq ($(GPU),1)
	grep -v -E '^faiss-cpu' requirements.txt > $(VENV)/requirements-gpu.txt
	echo '$(FAISS_GPU)' >> $(VENV)/requirements-gpu.txt
	$(BIN)/pip uninstall -q -y faiss-cpu 2>/dev/null || true
	$(PIP) -r $(VENV)/requirements-gpu.txt
else
	$(PIP) -r requirements.txt
endif
	$(PIP) --no-deps --no-build-isolation -e .
	touch $(STAMP)

# DVC reads params.yaml before any stage runs (a task name with a dot is then "Parameters ...
# are missing"): the targets that start DVC check the file as the stages do, first.
PARAMS_CHECK := $(BIN)/python -m instructretro.params params.yaml

repro: install
	$(PARAMS_CHECK)
	$(DVC_RUN) repro

test: install browser vega
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

# The plots page (`dvc plots show`) drawn offline: `make vega` keeps the Vega scripts in
# .venv/vega (fetched once with npm, the versions dvc-render's page names), `make browser`
# installs Debian's Chromium when none is on PATH (apt-get, as root). `make plots` writes
# plots/index.html and the screenshot docs/plots.png; `make results` rewrites README.md's table
# of headline numbers from metrics/ (python -m instructretro.report).
VEGA_DIR  := $(VENV)/vega
VEGA_PKGS := vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2
BROWSER   := $(firstword $(shell command -v chromium chromium-browser google-chrome 2>/dev/null))

browser:
ifeq ($(BROWSER),)
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	  || echo "make browser: apt-get could not install chromium (the plots test will skip)"; \
	else echo "make browser: no Chromium on PATH; install Debian's chromium package (the plots test skips without it)"; fi
endif

vega: $(VEGA_DIR)/vega-embed.min.js

# Fetched into a scratch folder and moved into place only when all three are there.
$(VEGA_DIR)/vega-embed.min.js:
	@command -v npm >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm; } || true
	@rm -rf $(VEGA_DIR).tmp && mkdir -p $(VEGA_DIR).tmp && cd $(VEGA_DIR).tmp && \
	if npm pack --silent $(VEGA_PKGS) >/dev/null; then \
	  for pkg in $(VEGA_PKGS); do name=$${pkg%@*}; tar xzf $$name-$${pkg#*@}.tgz -O package/build/$$name.min.js > $$name.min.js; done && \
	  mkdir -p $(abspath $(VEGA_DIR)) && mv vega.min.js vega-lite.min.js $(abspath $(VEGA_DIR))/ && mv vega-embed.min.js $(abspath $(VEGA_DIR))/ && echo "make vega: Vega scripts in $(VEGA_DIR)"; \
	else echo "make vega: npm could not fetch $(VEGA_PKGS) (the plots test will skip)"; fi; \
	rm -rf $(abspath $(VEGA_DIR)).tmp

plots: install browser vega
	$(BIN)/python -m instructretro.plots --out plots --png docs/plots.png

results: install
	$(BIN)/python -m instructretro.report --write README.md --contracts docs/CONTRACTS.md

# How much of the pretraining text the neighbors could give (experiments/neighbor_overlap.py on
# the valid split), before any training: the first check when Retro ignores its neighbors.
overlap: install
	$(DVC_RUN) repro query-neighbors
	$(BIN)/python experiments/neighbor_overlap.py

# Instruction tuning. `make sft` runs the sft stage (and whatever it depends on) for the default
# preset (params.yaml model.name); `make sft MODEL=843m` runs it as a DVC experiment for that
# preset (dvc exp run -S model.name=843m sft), printing first what the SFT run will cost;
# `make sft MODEL=843m SMOKE=1` runs one step of the real 843m graph on a 2-chunk sequence
# (fresh weights, output in a scratch folder) to prove the plumbing on any machine.
SMOKE  ?=
SFT_ENV := PATH=$(abspath $(BIN)):$$PATH
.PHONY: sft generate
sft: install
	$(PARAMS_CHECK)
ifneq ($(GPUS),)
	$(if $(MODEL),$(error with GPUS=, set model.name in params.yaml instead of MODEL=))
	$(MAKE) pretrain GPUS=$(GPUS) HOSTFILE=$(HOSTFILE)
	$(call launch_stages,sft)
else ifeq ($(SMOKE),1)
	$(SFT_ENV) $(DVC_RUN) repro tokenizer
	$(SFT_ENV) python stages/sft.py --smoke $(if $(MODEL),--model $(MODEL))
else ifneq ($(MODEL),)
	$(SFT_ENV) $(DVC_RUN) repro tokenizer
	$(SFT_ENV) python stages/sft.py --estimate --model $(MODEL)
	$(SFT_ENV) $(DVC_RUN) exp run -S model.name=$(MODEL) sft
else
	$(SFT_ENV) $(DVC_RUN) repro sft
endif

# Pretraining (stage pretrain, DeepSpeed). `make pretrain` runs `dvc repro pretrain`: one process
# on CPU, or one GPU. `make pretrain GPUS=8` runs the stage scripts of embed, query-neighbors and
# pretrain under the `deepspeed` launcher on 8 local GPUs (add HOSTFILE=path for several nodes:
# `deepspeed --hostfile`), the other stages with DVC, and records each launched stage's outputs
# in dvc.lock with `dvc commit -f`; a stage DVC reports up to date is skipped. The commands are
# the stages' own cmd lines from dvc.yaml (python -m instructretro.launch). `make sft GPUS=8` and
# `make generate GPUS=8` do the same for their stage after the stages before it. The preset
# is params.yaml `model.name`; `make pretrain MODEL=843m` runs it as a DVC experiment on one process.
# `make eval-ppl CKPT=folder` is the reference's --skip-train: validation loss/perplexity of an
# exported checkpoint on the pipeline's valid split, into metrics/eval_ppl.json (GPUS= works too);
# MAX_OVERLAP=0.5 adds val_loss_filtered, the same loss with the leakage filter (docs/pretrain.md).
HOSTFILE ?=
MAX_OVERLAP ?=
CKPT     ?= data/checkpoints/pretrain
PRETRAIN_ARGS := --out data/checkpoints/pretrain --work data/work/pretrain --live dvclive/pretrain --metrics metrics/pretrain.json
LAUNCH = $(if $(GPUS),$(BIN)/deepspeed $(if $(HOSTFILE),--hostfile $(HOSTFILE)) --num_gpus $(GPUS),$(BIN)/python)
# $(call launch_stages,GLOB): the dvc.yaml stages matching GLOB under $(LAUNCH), each then committed.
launch_stages = plan="$$($(BIN)/python -m instructretro.launch '$(1)' '$(LAUNCH)' '$(DVC)')" && echo "$$plan" && $(WORKSPACE) bash -c "$$plan"
.PHONY: pretrain eval-ppl
pretrain: install
	$(PARAMS_CHECK)
ifneq ($(GPUS),)
	$(if $(MODEL),$(error with GPUS=, set model.name in params.yaml instead of MODEL=))
	$(SFT_ENV) $(DVC_RUN) repro tokenize@db tokenize@pretrain
	$(call launch_stages,embed)
	$(SFT_ENV) $(DVC_RUN) repro add-index
	$(call launch_stages,query-neighbors)
	$(call launch_stages,pretrain)
else ifneq ($(MODEL),)
	$(SFT_ENV) $(DVC_RUN) exp run -S model.name=$(MODEL) pretrain
else
	$(SFT_ENV) $(DVC_RUN) repro pretrain
endif

eval-ppl: install
	$(SFT_ENV) $(WORKSPACE) $(LAUNCH) stages/pretrain.py --eval-only $(CKPT) --metrics metrics/eval_ppl.json $(if $(MAX_OVERLAP),--max-overlap $(MAX_OVERLAP))

# Memory plan before a run: `make estimate MODEL=43b GPUS=8 GPU_MEM=80` prints per-GPU GiB of
# parameters, gradients, optimizer state and activations for the preset's GPU recipe, whether it
# fits, and the settings that do (ZeRO stage, checkpointing, micro batch, CPU offload).
# MODEL may list several presets (MODEL=843m,2b,4b,43b); SEQ= overrides the sequence length.
# HF=<folder> sizes an imported Hugging Face decoder (its config.json) with MODEL's Retro additions.
GPU_MEM ?= 80
SEQ     ?=
.PHONY: estimate
estimate: install
	$(BIN)/python -m instructretro.estimate --model $(or $(MODEL),$(if $(HF),843m,43b)) --gpus $(or $(GPUS),8) --gpu-mem $(GPU_MEM) $(if $(SEQ),--seq-length $(SEQ)) $(if $(HF),--hf $(HF))

# Zero-shot QA (stages generate@<task>). `make generate` runs `dvc repro` of every generate stage;
# `make generate GPUS=8 [HOSTFILE=...]` brings sft up to date the same way (`make sft GPUS=8`),
# then runs each task's generate script under the launcher (each rank decodes a share of the
# questions on its GPU; rank 0 writes the answers in question order) and commits it.
generate: install
	$(PARAMS_CHECK)
ifneq ($(GPUS),)
	$(MAKE) sft GPUS=$(GPUS) HOSTFILE=$(HOSTFILE)
	$(call launch_stages,generate@*)
else
	$(SFT_ENV) $(DVC_RUN) repro --glob 'generate@*'
endif

# Ask the instruction-tuned model (docs/qa.md "Ask your model"; needs `make generate`'s inputs:
# generate.checkpoint, the database and its index). `make ask Q="..."` answers one question the
# way the generate stage does and prints the chunks it was given (ASK_ARGS=--json: one JSON
# object). `make serve [PORT=8000] [HOST=127.0.0.1]` serves it over HTTP: the OpenAI-compatible
# /v1/completions and /v1/chat/completions, /v1/retrieve, /v1/documents (add documents while
# serving) and a page at /. Neither is a DVC stage; documents added are kept in data/serve/.
Q        ?=
ASK_ARGS ?=
PORT     ?= 8000
HOST     ?= 127.0.0.1
export Q
.PHONY: ask serve
ask: install
	@test -n "$$Q" || { echo 'make ask: give the question as Q="..."'; exit 2; }
	$(BIN)/python -m instructretro.ask "$$Q" $(ASK_ARGS)

serve: install
	$(BIN)/python -m instructretro.serve --host $(HOST) --port $(PORT)

# Hugging Face decoders (docs/model.md): `make hf-check HF=<folder>` builds our model from an HF
# folder and compares it with transformers' own (largest logit difference, greedy 32-token
# decode; one line ending ok or MISMATCH, exit 1 on a mismatch). `make export-hf CKPT=<our
# checkpoint> OUT=<folder> [TOKENIZER=<spm.model or HF folder>]` writes the decoder as an HF folder.
HF        ?=
TOKENIZER ?= data/tokenizer/spm.model
OUT       ?=
.PHONY: hf-check export-hf
hf-check: install
	$(BIN)/python -m instructretro.hf check HF=$(HF)

export-hf: install
	$(BIN)/python -m instructretro.hf export CKPT=$(CKPT) OUT=$(OUT) TOKENIZER=$(TOKENIZER)

# The GPU check for a compute node without a package index: `make gpu-bundle` (here, with the
# index) writes gpu-bundle/ (git-ignored, under 60 MiB): the wheels the node lacks (DeepSpeed
# and pytest with their dependencies, CPython 3.10-3.12), the code, the fidelity runs' inputs
# built on this machine (world, tokenizer, token stores, database chunk table, neighbors, QA and
# SFT passages) and run.sh. On the node: `bash gpu-bundle/run.sh --out results` (8 minutes on
# one H100). TINY=1 builds the small world of the CPU check (`run.sh --cpu --tiny`).
TINY ?=
gpu-bundle: install
	$(BIN)/python bench/gpu_bundle.py $(if $(TINY),--tiny --work data/work/gpu-bundle-tiny)
