"""W&B: a real offline run in the run directory whose logged test metrics equal results.json."""
from __future__ import annotations

import os
import time

import pytest

from wandb_log import records, summary_and_history


def test_offline_wandb_run_holds_the_results_metrics(run, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", os.devnull)
    r = run("logger=wandb", "schedule=lp_ft", "trainer.max_epochs=2")
    assert os.environ.get("WANDB_MODE") is None, "offline mode must not leak into later jobs"
    files = list((r["run_dir"] / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    # wandb's service writes the file behind wandb.finish(); `wandb sync` reads it after the job: wait for the
    # run's exit record as sync would
    deadline = time.time() + 60
    while "exit" not in {rec.WhichOneof("record_type") for rec in records(files[0])} and time.time() < deadline:
        time.sleep(0.5)
    summary, history, config, group = summary_and_history(files[0])
    for key in ("test/id/acc", "test/ood/printed/acc", "test/ood/corrupt_s5/acc", "test/ood/mean/acc"):
        assert summary[key] == pytest.approx(r["metrics"][key], abs=1e-6), key
    logged = {k for row in history for k in row}
    assert {"val/id/acc", "val/ood/printed/acc", "train/loss_step", "trace/trainable_params"} <= logged
    groups = r["trace"][0]["lr"]  # every named parameter group's lr, under its block group's name (no pg2)
    assert {f"lr/{g}" for g in groups} <= logged and not any(k.startswith("lr-") or "pg" in k for k in logged)
    assert summary["test/source/acc"] == pytest.approx(r["metrics"]["test/source/acc"], abs=1e-6)
    assert config["schedule"]["name"] == "lp_ft" and group == "single"


def test_resumed_run_continues_the_same_wandb_run(run, monkeypatch):
    """ckpt_path=last (e.g. a preempted SLURM job requeued): the W&B run id of the run directory is reused."""
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", os.devnull)
    first = run("logger=wandb", "schedule=frozen", "trainer.max_epochs=1", name="job")
    again = run("logger=wandb", "schedule=frozen", "trainer.max_epochs=2", "ckpt_path=last", name="job")
    assert again["status"] == "done" and again["trace"][-1]["epoch"] == 1
    ids = {f.stem for f in (first["run_dir"] / "wandb").glob("offline-run-*/run-*.wandb")}
    assert len(list((first["run_dir"] / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1, ids
