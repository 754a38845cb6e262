"""W&B: a real offline run in the run directory whose logged test metrics equal results.json."""
from __future__ import annotations

import os
import time

import pytest

from conftest import Killed, KillAfter, add_callbacks
from wandb_log import media, records, summary_and_history, table


def test_offline_wandb_run_holds_the_results_metrics(run, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", os.devnull)
    r = run("logger=wandb", "schedule=lp_ft", "trainer.max_epochs=2")
    assert os.environ.get("WANDB_MODE") is None, "offline mode must not leak into later jobs"
    files = list((r["run_dir"] / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    summary, history, config, group = _finished_records(files[0])
    for key in ("test/id/acc", "test/ood/printed/acc", "test/ood/corrupt_s5/acc", "test/ood/mean/acc"):
        assert summary[key] == pytest.approx(r["metrics"][key], abs=1e-6), key
    logged = {k for row in history for k in row}
    assert {"val/id/acc", "val/ood/printed/acc", "train/loss_step", "trace/trainable_params"} <= logged
    groups = r["trace"][0]["lr"]  # every named parameter group's lr, under its block group's name (no pg2)
    assert {f"lr/{g}" for g in groups} <= logged and not any(k.startswith("lr-") or "pg" in k for k in logged)
    assert summary["test/source/acc"] == pytest.approx(r["metrics"]["test/source/acc"], abs=1e-6)
    assert config["schedule"]["name"] == "lp_ft" and group == "single"
    # the final metrics as reported (results.json) in the summary, and per evaluation set as a table
    assert all(summary[k] == pytest.approx(v, abs=1e-9) for k, v in r["metrics"].items())
    logged = [row for row in history if "test/sets/_type" in row]
    assert len(logged) == 1
    sets = table(files[0], logged[0], "test/sets")
    assert sets["columns"][0] == "set" and {"acc", "nll", "ece"} <= set(sets["columns"])
    by_set = {row[0]: dict(zip(sets["columns"][1:], row[1:])) for row in sets["data"]}
    assert {"id", "ood/printed", "ood/corrupt_s5", "ood/mean", "source"} <= by_set.keys()
    for key, value in r["metrics"].items():
        if key.startswith("test/"):
            name, _, metric = key[5:].rpartition("/")
            assert by_set[name][metric] == pytest.approx(value, abs=1e-9), key


def _finished_records(path):
    """wandb's service writes the file behind wandb.finish(): wait for the run's exit record, as sync would."""
    deadline = time.time() + 60
    while "exit" not in {rec.WhichOneof("record_type") for rec in records(path)} and time.time() < deadline:
        time.sleep(0.5)
    return summary_and_history(path)


def test_resumed_run_continues_the_same_wandb_run_and_its_steps(run, monkeypatch):
    """A run killed after its second epoch, resumed with ckpt_path=last (e.g. a preempted SLURM job requeued):
    one W&B run id across both processes, and the history continues. wandb 0.31 cannot resume an offline run
    in its own directory, so the resume writes a second offline-run-* directory; the user's report: its
    `_step` restarted at 0 (first segment 0-17, resumed 0-9), so syncing one replaced the other. Now the
    resumed segment's steps follow the first segment's last one."""
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", os.devnull)
    overrides = ("logger=wandb", "schedule=gradual", "schedule.interval=1", "trainer.max_epochs=4")
    with monkeypatch.context() as m:
        add_callbacks(m, KillAfter(1))
        with pytest.raises(Killed):
            run(*overrides, name="job")
    resumed = run(*overrides, "ckpt_path=last", name="job")
    assert resumed["status"] == "done" and resumed["resumed"][0]["from_epoch"] == 2
    segments = sorted((resumed["run_dir"] / "wandb").glob("offline-run-*/run-*.wandb"))  # by start time
    assert len(segments) == 2 and len({f.stem for f in segments}) == 1, segments
    (_, first, _, _), (summary, second, _, _) = (_finished_records(f) for f in segments)
    steps = [row["_step"] for row in first + second]
    assert steps == list(range(len(steps))), steps  # one history: every step once, in order
    assert len(first) > 0 and len(second) > 0
    # Lightning's own step rides along: the resumed segment starts at the checkpoint's global step, 2 epochs
    # of 2 training batches (debug=smoke)
    assert min(r["trainer/global_step"] for r in second if "trainer/global_step" in r) == 2 * 2
    assert summary["test/id/acc"] == pytest.approx(resumed["metrics"]["test/id/acc"], abs=1e-6)


def test_report_run_holds_the_table_comparisons_and_figures_in_the_sweeps_group(tmp_path, cache_dir):
    """A real sweep logged to W&B (offline), then `thawlab-report --wandb` on it: one report run, job_type
    report, in the sweep's group (the group of its training runs), its table equal to table.csv, the paired
    comparison and the figures logged; each training run's summary holds results.json's test metrics."""
    import csv
    import json
    import subprocess
    import sys
    from pathlib import Path

    import thawlab
    from conftest import BASE, TRAIN

    env = {"NETRC": os.devnull, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": str(Path(thawlab.__file__).parents[1])}
    env = {**{k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}, **env}
    sweep = tmp_path / "sweep"
    base = [o for o in BASE if not o.startswith("logger=")]
    p = subprocess.run([TRAIN, "-m", *base, "logger=wandb", "schedule=frozen,full", "seed=0",
                        f"hydra.sweep.dir={sweep}", f"cache_dir={cache_dir}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = sorted(f.parent for f in sweep.glob("*/results.json"))
    assert len(jobs) == 2
    train_groups = set()
    for job in jobs:
        (run_file,) = job.glob("wandb/offline-run-*/run-*.wandb")
        summary, _, _, group = _finished_records(run_file)
        train_groups.add(group)
        metrics = json.loads((job / "results.json").read_text())["metrics"]
        assert summary["test/id/acc"] == pytest.approx(metrics["test/id/acc"], abs=1e-9)
    assert train_groups == {"sweep"}

    out = tmp_path / "report"
    p = subprocess.run([sys.executable, "-m", "thawlab.report", str(sweep), "--out", str(out), "--include-smoke",
                        "--compare", "frozen", "full", "--wandb"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"wandb sync {out}/wandb/offline-run-*" in p.stderr  # offline-first, with the upload command
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    summary, history, config, group = _finished_records(run_file)
    job_types = {rec.run.job_type for rec in records(run_file) if rec.WhichOneof("record_type") == "run"}
    assert job_types == {"report"} and group == "sweep" and config["compare"] == [["frozen", "full"]]
    assert len(history) == 1
    (row,) = history
    logged = table(run_file, row, "table")
    head, *rows = list(csv.reader((out / "table.csv").open()))
    assert logged["columns"] == head and len(logged["data"]) == len(rows) == 2
    for got, want in zip(logged["data"], rows):
        for g, w in zip(got, want):
            assert (g is None) if w == "" else (g == pytest.approx(float(w), rel=1e-12) if isinstance(g, float)
                                                 else str(g) == w), (got, want)
    pair = table(run_file, row, "paired/frozen_vs_full")
    assert pair["columns"][:3] == ["column", "key", "seed 0"] and pair["data"][0][:2] == ["ID", "test/id/acc"]
    res = {j.name: json.loads((j / "results.json").read_text()) for j in jobs}
    frozen, full = (next(r for r in res.values() if r["config"]["schedule"]["name"] == s) for s in ("frozen", "full"))
    want = 100 * (frozen["metrics"]["test/id/acc"] - full["metrics"]["test/id/acc"])
    assert pair["data"][0][2] == pytest.approx(want, abs=1e-9)  # the per-seed difference, in pp
    figures = {k.split("/")[1] for k in row if k.startswith("figures/") and k.endswith("/_type")}
    assert figures == {p.stem for p in out.glob("*.png")} and figures
    assert all(media(row, f"figures/{f}")["_type"] == "image-file" for f in figures)
