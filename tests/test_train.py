"""End to end: a smoke run per schedule and head, the results contract, evaluation counts, the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import cli, compose_cfg
from thawlab import pretrain
from thawlab.results import read_results


@pytest.mark.parametrize("schedule", ["frozen", "gradual", "full", "lp_ft"])
def test_smoke_run_per_schedule_writes_the_results_contract(run, schedule):
    r = run(f"schedule={schedule}")
    assert r["status"] == "done" and (r["run_dir"] / "done").exists()
    assert (r["run_dir"] / "checkpoints" / "last.ckpt").exists()
    assert (r["run_dir"] / r["selection"]["checkpoint"]).exists()
    assert r["selection"]["rule"] == "max val/id/acc"
    m = r["metrics"]
    for key in ("test/id/acc", "test/id/nll", "test/id/ece", "test/ood/printed/acc", "test/ood/corrupt_s5/acc",
                "test/ood/mean/acc"):
        assert isinstance(m[key], float), key
    assert all(0.0 <= v <= 1.0 for k, v in m.items() if k.endswith(("/acc", "/ece")))
    assert len(r["trace"]) == 3 and {"epoch", "phase", "trainable_groups", "trainable_params", "lr"} <= set(r["trace"][0])
    assert r["versions"]["timm"] and r["seed"] == 0 and "commit" in r["git"]
    assert r["config"]["schedule"]["name"] == schedule


@pytest.mark.parametrize("head", ["mlp", "cosine"])
def test_other_heads_train(run, head):
    r = run(f"head={head}", "schedule=lp_ft", "trainer.max_epochs=2")
    assert r["status"] == "done" and r["config"]["head"]["_target_"].lower().endswith(f"{head}head")


def test_each_evaluation_sample_counted_exactly_once(run):
    r = run("schedule=frozen", "trainer.max_epochs=1", "trainer.limit_val_batches=null",
            "trainer.limit_test_batches=null", "data.eval_batch_size=100")
    c = r["counts"]
    assert c["test/id"] == 360 and c["val/id"] == 180  # 36 and 18 per class, 10 classes
    assert c["test/ood/printed"] == 360 and c["test/ood/corrupt_s3"] == 360


def test_cli_run_and_failure_marks_failed(tmp_path, cache_dir):
    ok = cli("debug=smoke", "logger=csv", "schedule=lp_ft", f"hydra.run.dir={tmp_path}/ok", cwd=tmp_path,
             cache=cache_dir)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "ood/printed" in ok.stdout and "test metrics" in ok.stdout
    r = read_results(tmp_path / "ok")
    assert r["status"] == "done" and (tmp_path / "ok" / "done").exists()
    assert (tmp_path / "ok" / "csv" / "metrics.csv").exists()

    bad = cli("debug=smoke", "logger=none", "schedule=lp_ft", "schedule.lp_epochs=7",
              f"hydra.run.dir={tmp_path}/bad", cwd=tmp_path, cache=cache_dir)
    assert bad.returncode == 2 and "lp_epochs" in bad.stderr
    assert json.loads((tmp_path / "bad" / "results.json").read_text())["status"] == "failed"
    assert not (tmp_path / "bad" / "done").exists()


def test_experiment_pretrain_source_reruns_the_cached_pretraining(tmp_path):
    # a cache of its own: rewriting the session's shared one would pull the weights from under other tests
    # (pytest-xdist workers) that read them outside the lock
    cache = str(tmp_path / "cache")
    cfg = compose_cfg(["debug=smoke", f"cache_dir={cache}"])
    pretrain.source_weights(cfg)  # the smoke pretraining, cached
    meta = pretrain.cache_dir(cfg) / "meta.json"
    assert meta.exists(), meta
    before = meta.stat().st_mtime_ns
    r = cli("experiment=pretrain_source", "debug=smoke", f"hydra.run.dir={tmp_path}/pre", cwd=tmp_path,
            cache=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pretraining done" in r.stderr and meta.stat().st_mtime_ns > before
    assert (meta.parent / "done").exists() and (meta.parent / "weights.safetensors").exists()
