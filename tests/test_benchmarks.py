"""benchmarks/gpu.sh cannot rot unseen: its CPU variant (the same rows on a tiny model, a few steps) runs here
and prints every row of the table, none of them an error."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu  # noqa: E402  (benchmarks/gpu.py: its rows, to check the table against)


def test_gpu_benchmark_cpu_variant_prints_every_row():
    r = subprocess.run([str(ROOT / "benchmarks" / "gpu.sh"), "--device", "cpu"], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHON": sys.executable, "WANDB_SILENT": "true"})
    assert r.returncode == 0, r.stderr[-3000:]
    table = {line.split("|")[1].strip(): line for line in r.stdout.splitlines() if line.startswith("| ")}
    expected = [row["id"] for row in gpu.rows(gpu.PRESETS["cpu"])]
    assert len(expected) == 9 and set(expected) <= set(table), (expected, r.stdout[-3000:])
    errors = [table[e] for e in expected if "| error |" in table[e]]
    assert not errors, errors
    for e in expected:
        assert float(table[e].split("|")[2]) > 0, table[e]
    assert "x test_resnet plain |" in table["test_resnet thawlab"]  # ratios against the reference rows
    assert "x test_resnet feature cache off |" in table["test_resnet feature cache on"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the CUDA table would run")
def test_gpu_benchmark_without_a_gpu_says_so():
    r = subprocess.run([str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 2 and "no CUDA device" in r.stderr and "--device cpu" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
