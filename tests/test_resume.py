"""Kill a run in the middle of a schedule, rerun it with ckpt_path=last: the same weights, metrics and trace
as a run that was never interrupted (Lightning #21901: groups unfrozen before the checkpoint must train after
it; finetuning-scheduler #30: no duplicated parameter groups). And nothing a researcher does by mistake loses a
result: a resume with another config is refused before it writes, a finished run is never rewritten, SIGTERM
and SIGINT end a run saying where it stopped, `--resume <dir>` continues a run from its directory alone."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import BASE, TRAIN, Killed, KillAfter, add_callbacks, cli
from thawlab.errors import ThawlabError
from thawlab.results import RunRecord


CASES = {  # schedule overrides, the epoch after which the run dies, and what that epoch was
    "gradual": (["schedule=gradual", "schedule.interval=1", "trainer.max_epochs=4"], 1, "unfreeze1"),
    "lp_ft": (["schedule=lp_ft", "schedule.lp_epochs=2", "trainer.max_epochs=4"], 2, "ft"),
    "wise_ft": (["schedule=wise_ft", "schedule.lp_epochs=2", "trainer.max_epochs=4",
                 "schedule.alphas=[0.0,0.5,1.0]"], 2, "ft"),
    # random augmentation (torch and python's random: timm RandAugment) and Mixup/CutMix (numpy's random)
    "randaug_mixup": (["schedule=lp_ft", "schedule.lp_epochs=2", "trainer.max_epochs=4", "data.augment=randaug",
                       "regularization.mixup=0.8", "regularization.cutmix=1.0"], 2, "ft"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_mid_schedule_equals_an_uninterrupted_run(run, monkeypatch, case):
    overrides, kill_epoch, phase = CASES[case]
    whole = run(*overrides)

    with monkeypatch.context() as m:
        add_callbacks(m, KillAfter(kill_epoch))
        with pytest.raises(Killed):
            run(*overrides, name="resumed")
    state = torch.load(whole["run_dir"].parent / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch"] == kill_epoch and state["thawlab_trace"][-1]["phase"] == phase
    assert len(state["optimizer_states"][0]["param_groups"]) == len(whole["trace"][0]["lr"])

    resumed = run(*overrides, "ckpt_path=last", name="resumed")
    assert resumed["status"] == "done"
    # the resume is recorded beside the run's identity, not in it
    assert resumed["overrides"] == whole["overrides"]
    assert [e["from_epoch"] for e in resumed["resumed"]] == [kill_epoch + 1]
    a = torch.load(whole["run_dir"] / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed["run_dir"] / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), f"{k} differs after resuming"
    assert resumed["metrics"] == whole["metrics"]
    assert resumed["selection"] == whole["selection"]
    strip = lambda trace: [{k: v for k, v in t.items() if k != "lr"} for t in trace]  # noqa: E731
    assert strip(resumed["trace"]) == strip(whole["trace"])
    for t, u in zip(resumed["trace"], whole["trace"]):
        assert t["lr"] == pytest.approx(u["lr"], rel=1e-12), t["epoch"]
    if "wise" in whole:
        assert resumed["wise"] == whole["wise"]


# ---- resuming by directory, mistaken resumes, interruptions (real thawlab-train processes) -------------------
def _start(*args: str, cwd: Path, cache: str) -> subprocess.Popen:
    env = {**os.environ, "THAWLAB_CACHE": cache, "WANDB_SILENT": "true"}
    # SIGINT as a terminal gives it, also when the tests themselves run in a background job or under nohup
    # (which start every child with SIGINT ignored, and thawlab leaves an ignored or foreign handler alone)
    return subprocess.Popen([TRAIN, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _kill_after_first_epoch(proc: subprocess.Popen, run_dir_glob: str, cwd: Path, sig: int) -> tuple[str, Path]:
    """Send `sig` once the run has written its first checkpoint; its stderr and run directory."""
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        found = list(cwd.glob(run_dir_glob + "/checkpoints/last.ckpt"))
        if found:
            break
        time.sleep(0.05)
    assert proc.poll() is None and found, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return err, found[0].parent.parent


def test_a_mistaken_resume_changes_nothing_and_resume_by_directory_continues(tmp_path, cache_dir):
    """The user's report: a sweep job resumed by hand with `ckpt_path=last "hydra.run.dir='<job>'"` composed the
    default schedule, crashed loading the gradual checkpoint and rewrote results.json as failed; without seed=1
    it "finished" with seed 0 recorded. Now: a one-line error naming the differing keys, exit 2, nothing
    written. Also: SIGTERM ends the run as failed, naming the signal and the last finished epoch (exit 143),
    and `--resume <dir>` continues the job from its own config, whatever characters its path holds."""
    cwd = tmp_path / "it's a dir, with=signs"  # the job's absolute path: a quote, a space, `=` and `,`
    cwd.mkdir()
    proc = _start("-m", *BASE, "logger=csv", "schedule=gradual", "seed=1", "trainer.max_epochs=15",
                  "hydra.sweep.dir=sweep", cwd=cwd, cache=cache_dir)
    err, job = _kill_after_first_epoch(proc, "sweep/*", cwd, signal.SIGTERM)
    assert proc.returncode == 143, err[-2000:]
    line = err.strip().splitlines()[-1]
    epochs = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] + 1
    reason = (f"interrupted by SIGTERM after epoch {epochs} of 15 (checkpoints/last.ckpt); resume: "
              f"thawlab-train --resume {shlex.quote(str(job))}")
    assert line == f"thawlab-train: {reason}"
    first = json.loads((job / "results.json").read_text())
    assert first["status"] == "failed" and first["error"] == reason and not (job / "done").exists()
    assert first["debug"] == first["config"]["debug"] == "smoke"
    assert [t["epoch"] for t in first["trace"]][:epochs] == list(range(epochs))

    # the user's commands: the default schedule, or only seed=1 left out; quoted as Hydra wants it
    kept = {p: p.read_bytes() for p in [job / "results.json", *job.glob(".hydra/*"), *job.glob("checkpoints/*")]}
    where = f"hydra.run.dir='{job.relative_to(cwd)}'"  # as the user typed it: quoted, relative
    for args, keys in [(["logger=csv", where], ["schedule.name='full' (checkpoint: 'gradual')", "seed=0"]),
                       (["logger=csv", "schedule=gradual", where], ["seed=0 (checkpoint: 1)"])]:
        r = cli(*BASE, "ckpt_path=last", *args, cwd=cwd, cache=cache_dir)
        assert r.returncode == 2, r.stderr[-2000:]
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert "the config differs from the run's in" in r.stderr and all(k in r.stderr for k in keys), r.stderr
        if len(keys) == 1:
            assert "schedule.name" not in r.stderr
        assert {p: p.read_bytes() for p in kept} == kept, "a refused resume wrote into the run"

    r = cli("--resume", str(job), cwd=tmp_path, cache=cache_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    done = json.loads((job / "results.json").read_text())
    assert done["status"] == "done" and (job / "done").exists()
    assert done["seed"] == 1 and done["config"]["schedule"]["name"] == "gradual"
    assert done["overrides"] == first["overrides"] and not any("ckpt_path" in o for o in done["overrides"])
    assert [e["from_epoch"] for e in done["resumed"]] == [epochs]
    assert [t["epoch"] for t in done["trace"]] == list(range(15))
    assert done["debug"] == done["config"]["debug"] == "smoke"
    assert {p: p.read_bytes() for p in job.glob(".hydra/*")} == {p: kept[p] for p in job.glob(".hydra/*")}

    # a finished run is never touched: --resume says so (exit 0); a rerun in its directory: see below
    finished = (job / "results.json").read_bytes()
    again = cli("--resume", str(job), cwd=tmp_path, cache=cache_dir)
    assert again.returncode == 0 and "already finished" in again.stderr, again.stderr[-2000:]
    assert (job / "results.json").read_bytes() == finished and (job / "done").exists()


def test_a_finished_run_is_never_rewritten(run):
    """A rerun in a finished run's directory (with or without ckpt_path=last) is refused before it writes."""
    first = run("schedule=frozen", "trainer.max_epochs=1", name="job")
    kept = (first["run_dir"] / "results.json").read_bytes()
    for extra in ([], ["ckpt_path=last"]):
        with pytest.raises(ThawlabError, match="already finished"):
            run("schedule=full", "trainer.max_epochs=2", *extra, name="job")
        assert (first["run_dir"] / "results.json").read_bytes() == kept and (first["run_dir"] / "done").exists()
    with pytest.raises(ThawlabError, match="already finished"):  # the record itself refuses, whoever calls it
        RunRecord(first["run_dir"], {}, 0)


def test_sigint_marks_the_run_interrupted_and_exits_130(tmp_path, cache_dir):
    proc = _start(*BASE, "logger=none", "schedule=lp_ft", "trainer.max_epochs=15", "hydra.run.dir=run",
                  cwd=tmp_path, cache=cache_dir)
    err, run_dir = _kill_after_first_epoch(proc, "run", tmp_path, signal.SIGINT)
    assert proc.returncode == 130, err[-2000:]
    result = json.loads((run_dir / "results.json").read_text())
    assert result["status"] == "failed" and result["error"].startswith("interrupted by SIGINT after epoch ")
    assert err.strip().splitlines()[-1] == f"thawlab-train: {result['error']}"
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)  # a whole checkpoint
    assert f"after epoch {state['epoch'] + 1} of 15" in result["error"]
    assert state["thawlab_identity"]["overrides"] == result["overrides"]


def test_a_signal_never_cuts_a_checkpoint_write_short(tmp_path):
    """SIGTERM in the middle of writing a checkpoint: the write completes, then the run is interrupted."""
    from thawlab.resume import Interrupted, interruptible, signals_deferred

    def save(path):
        path.write_text("first half ")
        os.kill(os.getpid(), signal.SIGTERM)  # delivered at once: the handler runs before the next line
        path.write_text("first half and second half")

    with interruptible(), pytest.raises(Interrupted, match="SIGTERM"):
        signals_deferred(save)(tmp_path / "last.ckpt")
    assert (tmp_path / "last.ckpt").read_text() == "first half and second half"
    with interruptible(), pytest.raises(Interrupted, match="SIGTERM"):  # outside a write: at once
        save(tmp_path / "other.ckpt")
    assert (tmp_path / "other.ckpt").read_text() == "first half "


def test_a_resume_may_change_how_a_run_is_shown_never_what_it_computes(run, monkeypatch):
    overrides = ["schedule=lp_ft", "schedule.lp_epochs=1", "trainer.max_epochs=3"]
    with monkeypatch.context() as m:
        add_callbacks(m, KillAfter(0))
        with pytest.raises(Killed):
            run(*overrides, name="job")
    with pytest.raises(ThawlabError, match=r"differs from the run's in optimizer\.lr=0\.01 \(checkpoint: 0\.001\), "
                                           r"trainer\.max_epochs=4 \(checkpoint: 3\);"):
        run(*overrides, "trainer.max_epochs=4", "optimizer.lr=0.01", "ckpt_path=last", name="job")
    r = run(*overrides, "logger=csv", "data.num_workers=1", "ckpt_path=last", name="job")  # shown, not computed
    assert r["status"] == "done" and r["overrides"][-5:] == overrides + ["logger=csv", "data.num_workers=1"]
    assert r["metrics"]["test/id/acc"] >= 0 and [e["from_epoch"] for e in r["resumed"]] == [1]


def test_a_signal_handled_by_someone_else_stays_theirs():
    """submitit's SLURM jobs bypass SIGTERM and requeue on their own signal: thawlab must not take it over."""
    from thawlab.resume import interruptible

    def bypass(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, bypass)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python starts in a terminal
    try:
        with interruptible():
            assert signal.getsignal(signal.SIGTERM) is bypass
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler  # Ctrl-C: thawlab's
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
