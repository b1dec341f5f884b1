# Two commands do everything: `make repro` runs the default pipeline, `make test` runs the tests.
# Both create .venv on first use: torch first (pinned), then requirements.txt, then this package.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODEL  ?=
GPUS   ?=
DVC    := $(BIN)/dvc

.PHONY: install repro test test-fast bench clean-venv

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$$(grep -E '^torch==' requirements.txt)"
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

repro: install
	$(DVC) repro

test: install
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests
