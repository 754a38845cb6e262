"""Logs for files: output that is not a terminal keeps full tables, the job's train.log holds the tables too,
each Lightning line appears once, and a sweep ends with the commands to run next."""
from __future__ import annotations

import os
import subprocess

from conftest import TRAIN

QUIET = ["debug=smoke", "trainer.enable_progress_bar=false", "backbone.pretrained=false"]


def _run(*args: str, cwd, cache) -> subprocess.CompletedProcess:
    """thawlab-train with its output through a pipe, as a SLURM job or `| tee` sees it: no terminal, no
    COLUMNS; no W&B credentials (offline runs)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "WANDB_MODE", "WANDB_API_KEY")}
    env.update(THAWLAB_CACHE=str(cache), WANDB_SILENT="true", HOME=str(cwd))  # HOME: no ~/.netrc credentials
    return subprocess.run([TRAIN, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_piped_output_and_train_log_hold_full_tables_and_each_line_once(tmp_path):
    run_dir = tmp_path / "run"
    r = _run(*QUIET, "logger=none", "schedule=gradual", "schedule.interval=1", "trainer.max_epochs=4",
             f"hydra.run.dir={run_dir}", cwd=tmp_path, cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    output = r.stdout + r.stderr
    # the partition table: 4 phases make it wider than 80 columns; nothing cut ("unfree…") or wrapped
    header = next(line for line in output.splitlines() if line.startswith("┃ group"))
    assert len(header) > 80 and "…" not in output, header
    assert all(f"{p} (1 ep)" in header for p in ("head", "unfreeze1", "unfreeze2", "unfreeze3")), header
    row = next(line for line in output.splitlines() if line.startswith("│ layer3.0"))
    assert row.count("│") == 8 and "x0.148" in row, row  # 7 columns, lr multipliers printed whole

    log = (run_dir / "train.log").read_text()
    assert header in log.splitlines() and row in log.splitlines(), "the partition table in train.log"
    assert "test metrics (checkpoint selected by max val/id/acc over head, unfreeze1, " in log
    assert "│ ood/mean " in log
    assert "trainable parameters in unfreeze3" in log and f"results: {run_dir / 'results.json'}" in log
    # Lightning's INFO lines: once on the terminal (not also through Lightning's own handler), once in the log
    for line in ("Seed set to 0", "GPU available: False", "`Trainer.fit` stopped: `max_epochs=4` reached."):
        assert output.count(line) == 1 and log.count(line) == 1, (line, output.count(line), log.count(line))


def test_a_sweep_ends_with_the_report_command_and_one_wandb_sync(tmp_path):
    sweep = tmp_path / "sweep"
    r = _run("-m", *QUIET, "logger=wandb", "trainer.max_epochs=1", "seed=0,1", f"hydra.sweep.dir={sweep}",
             cwd=tmp_path, cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stderr.rstrip().splitlines()
    assert lines[-3:] == [f"sweep {sweep}: 2 of 2 jobs done", f"report: thawlab-report {sweep}",
                          f"W&B: logged offline; upload every job of the sweep with "
                          f"`wandb sync {sweep}/*/wandb/offline-run-*`"], lines[-3:]
    assert len(list(sweep.glob("*/wandb/offline-run-*"))) == 2, "the one command covers both jobs' runs"
    assert "upload later" not in r.stderr, "no per-job sync hint inside a sweep"
