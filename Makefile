# Quickstart: `make demo` and `make test`. Both create .venv if missing and install thawlab into it.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# torch and torchvision pinned for this install only (they lie on this machine's disk; see README);
# pyproject keeps ranges so GPU users keep their own CUDA build.
TORCH   ?= torch==2.14.1 torchvision==0.29.1
STAMP   := $(VENV)/.installed

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded benchmark: pretrains the backbone once (cached), fine-tunes, prints ID/OOD metrics.
demo: $(STAMP)
	WANDB_SILENT=true $(BIN)/thawlab-train

# TEST_WORKERS pytest-xdist processes (TEST_WORKERS=0: one process), each with its share of the cores
# (tests/conftest.py). --dist loadfile keeps a file's tests in one worker, so a module's shared fixtures
# (the findings' 10-seed runs, the report's sweep) are computed once; --no-loadscope-reorder keeps
# tests/conftest.py's order (the slowest files first) instead of xdist's by test count.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=12 $(PYTEST_ARGS)

clean:
	rm -rf outputs multirun .pytest_cache dist build
