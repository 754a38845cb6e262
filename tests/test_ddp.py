"""DDP on 2 CPU processes (gloo): sweeps that stay one sweep, a failed rank that ends its job and only its job,
ranks that stay identical through a freezing schedule, and metrics that count every sample once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import cli
from thawlab.ranks import rank_seed
from thawlab.results import read_results
from wandb_log import records

DDP = ["debug=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]


def _jobs(sweep: Path) -> dict[str, Path]:
    return {p.parent.parent.name: p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml")}


def _rank_processes_of(path: Path) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if "thawlab.ranks" in line and str(path) in line]


def _wandb_exit_code(job: Path) -> int:
    (run_file,) = job.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.time() + 60  # the W&B service writes behind finish(); wait for the exit record
    while time.time() < deadline:
        exits = [rec.exit for rec in records(run_file) if rec.WhichOneof("record_type") == "exit"]
        if exits:
            return exits[-1].exit_code
        time.sleep(0.5)
    raise AssertionError(f"{run_file}: no exit record")


def test_ddp_sweep_with_a_failing_rank(tmp_path, cache_dir):
    """-m over two DDP jobs, the first with a rank that raises: exactly one sweep directory, the failed job ends
    fast, is marked failed (results.json and W&B) and leaves no process behind; the next job runs and succeeds."""
    sweep = tmp_path / "sweep"
    start = time.monotonic()
    r = cli("-m", *DDP, "logger=wandb", "ddp.fail_rank=1,null", "seed=5", f"hydra.sweep.dir={sweep}",
            cwd=tmp_path, cache=cache_dir, env={"WANDB_MODE": "offline"}, timeout=400)
    elapsed = time.monotonic() - start
    assert r.returncode == 1, r.stderr[-3000:]
    assert elapsed < 180, elapsed  # bounded: gloo fails the peer at once; ddp.grace_s caps the rest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"], "a second sweep directory appeared"
    jobs = _jobs(sweep)
    assert len(jobs) == 2, list(jobs)
    failed = next(j for name, j in jobs.items() if "fail_rank=1" in name)
    ok = next(j for name, j in jobs.items() if "fail_rank=null" in name)

    res = read_results(failed)
    assert res["status"] == "failed" and not (failed / "done").exists()
    assert "rank 1 of 2 failed" in res["error"] and "injected failure" in res["error"], res["error"]
    assert "1 of 2 jobs done" in r.stderr and "rank 1 of 2 failed" in r.stderr
    assert _wandb_exit_code(failed) != 0, "the failed job's W&B run must not look finished"
    assert _rank_processes_of(sweep) == [], "orphaned rank processes"

    res = read_results(ok)
    assert res["status"] == "done" and (ok / "done").exists()
    d = res["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "gloo"
    assert [x["rank"] for x in d["ranks"]] == [0, 1] and [x["seed"] for x in d["ranks"]] == [5, rank_seed(5, 1)]
    assert len({x["pid"] for x in d["ranks"]}) == 2
    assert _wandb_exit_code(ok) == 0
    assert len(list(ok.glob("wandb/offline-run-*"))) == 1  # one W&B run per job: rank 0's


def test_ddp_gradual_keeps_ranks_identical_and_counts_every_sample_once(tmp_path, cache_dir):
    """Groups unfrozen after DDP wrapped the model are all-reduced too (Lightning #20340): after a gradual
    schedule both ranks hold the same weights, and exactly the scheduled groups moved. Every evaluation sample
    counts once, and the metrics equal those of the same checkpoint evaluated in one process."""
    run_dir = tmp_path / "run"
    r = cli(*DDP, "logger=none", "schedule=gradual", "trainer.max_epochs=3", "trainer.limit_val_batches=null",
            "trainer.limit_test_batches=null", f"hydra.run.dir={run_dir}", cwd=tmp_path, cache=cache_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    res = read_results(run_dir)
    ranks = res["distributed"]["ranks"]
    assert ranks[0]["weights"] == ranks[1]["weights"], "ranks diverged"
    # dropout and augmentation draw from each rank's own seed (the data order is the sampler's, from seed)
    assert [k["seed"] for k in ranks] == [rank_seed(res["seed"], k) for k in (0, 1)]
    assert ranks[0]["seed"] != ranks[1]["seed"]
    import torch  # a checkpoint carries each rank's random states, which a resume gives back to each rank

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    (rng0, host0), (rng1, host1) = ckpt["thawlab_rng_ranks"]
    assert not torch.equal(rng0, rng1) and host0["python"] != host1["python"]
    trained = {g for t in res["trace"] for g in t["trainable_groups"]}
    assert len(trained) >= 2 and set(ranks[0]["changed"]) == trained, (ranks[0]["changed"], trained)
    assert len(ranks[0]["weights"]) > len(trained)  # some groups stayed frozen, and did not move

    assert res["counts"]["test/id"] == 360 and res["counts"]["val/id"] == 180  # 36 and 18 per class
    assert res["counts"]["test/ood/printed"] == 360 and res["counts"]["test/ood/corrupt_s5"] == 360

    one, drift = _evaluate_in_one_process(OmegaConf.create(res["config"]), run_dir / res["selection"]["checkpoint"])
    for key, value in one.items():
        assert res["metrics"][key] == pytest.approx(value, abs=1e-6), key
    # the drift diagnostics gather both ranks' shares of the sample (here read off each rank's test pass):
    # those of one process on the whole sample, by a pass of the monitor's own
    assert res["diagnostics"]["final_features"] == "the test pass"
    final = res["diagnostics"]["final"]
    for kind in ("cka", "feature_change"):
        for name, per_group in drift[kind].items():
            assert final[kind][name] == pytest.approx(per_group, abs=1e-6), (kind, name)
    assert final["weight_change"] == pytest.approx(drift["weight_change"], abs=1e-9)


def _evaluate_in_one_process(cfg, checkpoint: Path) -> tuple[dict[str, float], dict]:
    """(test metrics, drift diagnostics) of a checkpoint in one process."""
    import lightning as L

    from thawlab.build import build_datamodule, build_module, build_monitor, build_net, build_trainer
    from thawlab.pretrain import source_weights

    L.seed_everything(cfg.seed, verbose=False)  # the run's initial head, theta_0's head
    dm = build_datamodule(cfg.data, None, shuffle_seed=cfg.seed)
    net, dm.preprocess = build_net(cfg, dm.num_classes, str(source_weights(cfg)))
    module = build_module(cfg, net, dm)
    monitor = build_monitor(cfg, net, dm)
    trainer = build_trainer(cfg.trainer, None, False, devices=1, num_nodes=1, strategy="auto",
                            enable_progress_bar=False)
    trainer.test(module, datamodule=dm, ckpt_path=str(checkpoint), verbose=False)
    return module.computed["test"], monitor.measure(module.net)


def test_submitit_local_runs_each_task_as_a_rank(tmp_path, cache_dir):
    """The cluster path: submitit starts one process per task (as SLURM does); each is a rank, none is started
    by thawlab or Lightning."""
    sweep = tmp_path / "sweep"
    r = cli("-m", *DDP, "logger=none", "hydra/launcher=submitit_local_ddp", f"hydra.sweep.dir={sweep}",
            cwd=tmp_path, cache=cache_dir, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    (job,) = _jobs(sweep).values()
    res = read_results(job)
    assert res["status"] == "done" and res["distributed"]["world_size"] == 2
    assert not (job / "ranks" / "spec.json").exists()  # ranks came from submitit's tasks, not thawlab.ranks
    ranks = res["distributed"]["ranks"]
    assert ranks[0]["weights"] == ranks[1]["weights"]


def test_submitit_local_prepares_the_data_once_per_job(tmp_path):
    """Under a cluster launcher each task is a rank: global rank 0 prepares the data (downloads), once, and the
    other rank sets up only after it finished; Lightning's fit and test do not prepare again."""
    sweep, log = tmp_path / "sweep", tmp_path / "prepare.log"
    tests = str(Path(__file__).parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    r = cli("-m", *DDP, "logger=none", "backbone.pretrained=false", "data._target_=counting_data.CountingDigits",
            "hydra/launcher=submitit_local_ddp", f"hydra.sweep.dir={sweep}", cwd=tmp_path, cache=str(tmp_path),
            env={"PYTHONPATH": path, "THAWLAB_TEST_PREPARE_LOG": str(log)}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (job,) = _jobs(sweep).values()
    assert read_results(job)["distributed"]["world_size"] == 2
    calls = [line.split() for line in log.read_text().splitlines()]
    prepared = [c for c in calls if c[0] == "prepare"]
    assert [c[1] for c in prepared] == ["0"], calls  # once, by rank 0
    setups = [c for c in calls if c[0] == "setup"]
    assert {c[1] for c in setups} == {"0", "1"}, calls
    assert all(float(c[2]) > float(prepared[0][2]) for c in setups), calls  # the others waited for it
    assert len(list((job / "ranks").glob("prepared-*.json"))) == 1


_RANK = """
import sys, time
from pathlib import Path
from omegaconf import OmegaConf
from thawlab.errors import ThawlabError
from thawlab.ranks import prepare_once
run_dir, fail = Path(sys.argv[1]), sys.argv[2] == "fail"
def prepare():
    time.sleep(1.0)
    if fail:
        raise ThawlabError("data.root=/nowhere: no such directory")
    (run_dir / "data").write_text("downloaded")
try:
    prepare_once(OmegaConf.create({"trainer": {"devices": 2, "accelerator": "cpu"}}), run_dir, prepare)
except ThawlabError as e:
    print(e); sys.exit(2)
print("saw", (run_dir / "data").read_text())
"""


@pytest.mark.parametrize("fail", [False, True])
def test_cluster_ranks_wait_for_rank_0_to_prepare(tmp_path, fail):
    """SLURM tasks: rank 1, started first, returns only once rank 0 has prepared, and fails with rank 0's error;
    a marker left by an earlier attempt of the job (a requeue: another restart count) is not taken for this one."""
    (tmp_path / "ranks").mkdir()
    (tmp_path / "ranks" / "prepared-slurm77.0.json").write_text('{"ok": true}')  # the earlier attempt's
    env = {**os.environ, "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1", "SLURM_NTASKS": "2"}
    env.pop("RANK", None)
    run = lambda k: subprocess.Popen([sys.executable, "-c", _RANK, str(tmp_path), "fail" if fail else "ok"],  # noqa
                                     env={**env, "SLURM_PROCID": str(k)}, stdout=subprocess.PIPE, text=True)
    waiting = run(1)
    time.sleep(1.0)
    assert waiting.poll() is None, "rank 1 did not wait"
    first = run(0)
    outs = [p.communicate(timeout=60)[0] for p in (first, waiting)]
    if fail:
        assert [first.returncode, waiting.returncode] == [2, 2], outs
        assert outs[1].strip() == "rank 0 could not prepare the data: data.root=/nowhere: no such directory"
    else:
        assert [first.returncode, waiting.returncode] == [0, 0] and outs == ["saw downloaded\n"] * 2, outs


@pytest.mark.parametrize("override, named", [
    ("trainer.devices=64", "trainer.devices=64"),
    ("trainer.strategy=fsdp", "trainer.strategy='fsdp'"),
    # torch's SyncBatchNorm refuses CPU tensors (torch 2.14): said before anything starts, not in a rank
    ("trainer.sync_batchnorm=true", "trainer.sync_batchnorm=true"),
])
def test_bad_ddp_input_is_one_line(tmp_path, cache_dir, override, named):
    r = cli(*DDP, "logger=none", override, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, cache=cache_dir)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.startswith("thawlab-train: error")]
    assert len(lines) == 1 and named in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"
    assert not os.path.exists(tmp_path / "run" / "ranks" / "spec.json")  # nothing started
