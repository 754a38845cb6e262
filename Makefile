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

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=12 $(PYTEST_ARGS)

clean:
	rm -rf outputs multirun .pytest_cache dist build
