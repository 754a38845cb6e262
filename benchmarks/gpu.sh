#!/usr/bin/env bash
# The GPU path, measured: one table of images/s (thawlab vs a plain loop, with and without torch.compile),
# peak CUDA memory (frozen vs full), the feature cache and a JPEG data path. Under 8 minutes on one GPU.
#   benchmarks/gpu.sh                  # resnet50 and vit_base_patch16_224 at 224 px, bf16, channels_last
#   benchmarks/gpu.sh --device cpu     # tiny models, a few steps (the test suite runs this)
# PYTHON=... picks the interpreter (default: the checkout's .venv, else python3); see benchmarks/gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu.py "$@"
