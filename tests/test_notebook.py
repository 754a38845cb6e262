"""notebooks/analysis.ipynb runs from top to bottom against a small real sweep and shows what it promises."""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from conftest import cli

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analysis.ipynb"


def test_analysis_notebook_executes_on_a_sweep(tmp_path, cache_dir, monkeypatch):
    sweep = tmp_path / "sweep"
    r = cli("-m", "debug=smoke", "logger=none", "trainer.enable_progress_bar=false", "schedule=frozen,full,lp_ft",
            "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path, cache=cache_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    monkeypatch.setenv("THAWLAB_SWEEP", str(sweep))
    monkeypatch.setenv("THAWLAB_INCLUDE_SMOKE", "1")  # a smoke sweep: left out unless asked for
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") or o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "6 finished runs" in text and "schedule=lp_ft" in text
    assert "| schedule=full |" in text or "schedule=full" in text
    assert "Paired comparison: schedule=lp_ft vs schedule=full" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the ID-vs-OOD scatter and the severity plot
