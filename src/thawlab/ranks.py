"""The processes of a DDP job: who starts them, and how a job with a failed rank ends.

Lightning's own DDP launcher re-executes `sys.argv` for ranks 1..N-1. Under `thawlab-train -m` that child runs
the whole sweep again (a second sweep directory, ranks that outlive their job, a hang when a rank fails). So
thawlab never lets Lightning start processes:

- Started here (single runs, and sweeps on the basic or joblib launcher): the job's own process becomes a
  supervisor. It checks the config and fills the pretraining cache once, then starts one process per rank
  (`python -m thawlab.ranks <spec>`: that job's resolved config and the entry point it was given to run, by
  dotted name, e.g. `thawlab.train:run`; nothing re-parsed from the command line) with
  the torch.distributed environment in the children's environment only, and watches them. The supervisor
  never joins a process group, so nothing (environment variables, process groups, W&B runs) outlives the job.
- Started by a cluster (SLURM, or submitit's local twin, with one task per device): each task is a rank; the
  job runs in place and Lightning reads SLURM's variables (for submitit_local thawlab exports
  MASTER_ADDR/RANK/... from submitit's job environment). Global rank 0 prepares the data while the others
  wait for its marker in the job directory (prepare_once).

A rank that fails writes its error to `ranks/rank<k>.error` and exits non-zero. Its peers fail on their next
collective (gloo: at once, "connection closed by peer"; NCCL: at the process-group timeout, `ddp.timeout_s`);
the supervisor gives them `ddp.grace_s` to record the failure (rank 0 marks the W&B run failed), then
terminates and kills what is left, process group by process group, so no rank or data-loader worker is orphaned.
The job's results.json names the rank that failed first and its error.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from thawlab.errors import ThawlabError

SPEC = "ranks/spec.json"
POLL_S = 0.2
TERM_GRACE_S = 5.0  # after SIGTERM, before SIGKILL


class RankFailed(ThawlabError):
    """A rank of a DDP job failed: the job is marked failed; exit status 1 (not a config error)."""

    exit_code = 1


def world_size(cfg: DictConfig) -> int:
    """Processes a job trains with: trainer.devices x trainer.num_nodes (1 unless devices > 1)."""
    devices = cfg.trainer.devices
    if isinstance(devices, str) and devices.lstrip("-").isdigit():
        devices = int(devices)
    if devices in ("auto", -1):
        devices = _available(cfg.trainer.accelerator)
    if not isinstance(devices, int) or devices < 1:
        raise ThawlabError(f"trainer.devices={devices!r}: give a number of devices (processes on a CPU)")
    return devices * int(cfg.trainer.get("num_nodes", 1))


def check(cfg: DictConfig) -> None:
    """trainer.devices against what the machine has; strategies other than DDP."""
    n, accel = world_size(cfg), _accelerator(cfg.trainer.accelerator)
    have = _available(accel)
    per_node = n // int(cfg.trainer.get("num_nodes", 1))
    if per_node > have:
        what = "GPUs" if accel == "gpu" else "CPU cores"
        raise ThawlabError(f"trainer.devices={per_node}: more than the {have} {what} available here")
    strategy = cfg.trainer.get("strategy", "auto")
    if n > 1 and strategy not in ("auto", "ddp"):
        raise ThawlabError(f"trainer.strategy={strategy!r}: thawlab runs multi-device jobs with ddp (its own "
                           f"launcher); use trainer=ddp")
    if n > 1 and accel == "cpu" and cfg.trainer.get("sync_batchnorm"):
        # torch's SyncBatchNorm raises in the first training step on CPU tensors (torch 2.14: "expected input
        # tensor to be on GPU"); said here, before anything runs. One process has nothing to synchronise.
        raise ThawlabError("trainer.sync_batchnorm=true: torch's SyncBatchNorm runs on GPUs only, not on "
                           "trainer.accelerator=cpu with several processes (use GPUs, or sync_batchnorm=false)")


def _accelerator(name: str) -> str:
    import torch

    if name == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if name in ("gpu", "cuda") else name


def _available(accelerator: str) -> int:
    import torch

    if _accelerator(accelerator) == "gpu":
        return torch.cuda.device_count()
    return os.cpu_count() or 1


def global_rank() -> int:
    """This process's rank, from the environment (0 outside DDP), readable before any Trainer exists."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit() and (var == "RANK" or int(os.environ.get("SLURM_NTASKS", 1)) > 1):
            return int(os.environ[var])
    return 0


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank` for what should differ between ranks: dropout, drop-path, augmentation, Mixup
    (one seed on every rank draws the same masks and crops for different samples). Rank 0 keeps the run's
    seed; the data order is the sampler's, from the run's seed, whatever this is."""
    if rank == 0:
        return seed
    return int(hashlib.sha256(f"thawlab-rank:{seed}:{rank}".encode()).hexdigest()[:8], 16)


def started_by_cluster() -> bool:
    """True when a cluster launcher already started one process per rank (SLURM tasks, submitit, torchrun)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return True
    if int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1:
        _export_submitit_local()
        return True
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _export_submitit_local() -> None:
    """submitit's local executor numbers its tasks but sets no torch.distributed variables: set them from it.
    This process is the task's own (submitit starts one per task), so nothing leaks into another job."""
    env = os.environ
    if "MASTER_PORT" in env:
        return
    job_id = env["SUBMITIT_LOCAL_JOB_ID"]
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(20000 + int(job_id) % 40000),
               WORLD_SIZE=env["SUBMITIT_LOCAL_NTASKS"], RANK=env["SUBMITIT_LOCAL_GLOBALID"],
               LOCAL_RANK=env["SUBMITIT_LOCAL_LOCALID"], NODE_RANK=env.get("SUBMITIT_LOCAL_NODEID", "0"))


def prepare_once(cfg: DictConfig, run_dir: Path, prepare: Callable[[], None]) -> None:
    """Run prepare() (data download and checks, the pretraining cache) once per job, before any rank trains.

    Single processes and ranks thawlab started: rank 0 (the supervisor has prepared before starting them).
    Ranks a cluster started (SLURM tasks, submitit): global rank 0 prepares and leaves a marker in the job's
    directory, which SLURM's tasks share; the other ranks wait for it, on every node (a cluster's data root is
    a shared file system: one download serves every node). Waiting has no time limit, as Lightning's own
    prepare_data barrier: a download takes what it takes. If rank 0 fails, the marker says why and every rank
    fails with that line. The marker is named after the job's attempt (SLURM job id and restart count), so a
    requeued job never reads the marker of its earlier attempt."""
    # started_by_cluster first: it sets RANK under submitit's local twin. Ranks thawlab started (THAWLAB_RANK_OF)
    # look cluster-started too (LOCAL_RANK, WORLD_SIZE), but their supervisor has prepared already
    by_cluster = world_size(cfg) > 1 and started_by_cluster() and not os.environ.get("THAWLAB_RANK_OF")
    rank = global_rank()
    if not by_cluster:
        if rank == 0:
            prepare()
        return
    marker = run_dir / "ranks" / f"prepared-{_attempt()}.json"
    if rank == 0:
        marker.parent.mkdir(parents=True, exist_ok=True)
        state: dict = {"ok": False, "error": "rank 0 stopped while preparing"}
        try:
            prepare()
            state = {"ok": True}
        except BaseException as e:
            state["error"] = f"{e}".splitlines()[0] if isinstance(e, ThawlabError) else f"{type(e).__name__}: {e}"
            raise
        finally:  # atomically: a waiting rank never reads half a file
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(marker)
        return
    while not marker.exists():
        time.sleep(POLL_S)
    state = json.loads(marker.read_text())
    if not state["ok"]:
        raise ThawlabError(f"rank 0 could not prepare the data: {state['error']}")


def _attempt() -> str:
    """What names one attempt of a job alike on all its tasks (and differently on a requeue). Exact under
    SLURM and submitit; under torchrun, only as unique as its run id (--rdzv-id) or the main port."""
    env = os.environ
    if "SLURM_JOB_ID" in env:
        return f"slurm{env['SLURM_JOB_ID']}.{env.get('SLURM_RESTART_COUNT', '0')}"
    if "SUBMITIT_LOCAL_JOB_ID" in env:
        return f"local{env['SUBMITIT_LOCAL_JOB_ID']}"
    return env.get("TORCHELASTIC_RUN_ID") or f"{env.get('MASTER_ADDR', '')}.{env.get('MASTER_PORT', '')}"


def must_start_ranks(cfg: DictConfig) -> int:
    """The number of rank processes this job has to start itself (0: it runs in place)."""
    if os.environ.get("THAWLAB_RANK_OF"):  # this is one of those ranks
        return 0
    n = world_size(cfg)
    if n == 1 or started_by_cluster():
        return 0
    return n


# ---- the supervisor ------------------------------------------------------------------------------------
def launch(cfg: DictConfig, job: dict, n: int, entry: Callable[[DictConfig, dict], object],
           timeout_s: float | None = None) -> None:
    """Start n rank processes that each call entry(cfg, job), wait for them; raise RankFailed if any failed.
    The entry point is given, not imported here: this module sits below the training code that calls it."""
    run_dir = Path(job["run_dir"])
    rank_dir = run_dir / "ranks"
    rank_dir.mkdir(parents=True, exist_ok=True)
    for old in rank_dir.glob("rank*.error"):
        old.unlink()
    spec = run_dir / SPEC
    spec.write_text(json.dumps({"entry": entry_name(entry), "config": OmegaConf.to_container(cfg, resolve=True),
                                "job": job}, indent=1))
    port = _free_port()
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(n):
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(n),
                   "RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0", "THAWLAB_RANK_OF": str(run_dir)}
            if _accelerator(cfg.trainer.accelerator) == "cpu" and "OMP_NUM_THREADS" not in os.environ:
                # n processes each using every core slow each other down several-fold
                env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
            out = None if rank == 0 else open(rank_dir / f"rank{rank}.log", "w")  # rank 0 talks to the user
            procs.append(subprocess.Popen([sys.executable, "-m", "thawlab.ranks", str(spec)], env=env,
                                          stdout=out, stderr=subprocess.STDOUT if out else None,
                                          start_new_session=True, preexec_fn=_die_with_parent))
        _watch(procs, float(cfg.ddp.grace_s), timeout_s)
    finally:
        _stop(procs)
    codes = [p.returncode for p in procs]
    if any(codes):
        rank, error = _first_failure(rank_dir, codes)
        raise RankFailed(f"rank {rank} of {n} failed: {error}")


def entry_name(fn: Callable) -> str:
    """'module:function', what a rank process imports and calls: a module-level function, so it can."""
    name = f"{fn.__module__}:{fn.__qualname__}"
    if "<" in fn.__qualname__ or "." in fn.__qualname__ or resolve(name) is not fn:
        raise TypeError(f"{name}: a rank's entry point must be a module-level function")
    return name


def resolve(name: str) -> Callable:
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def _watch(procs: list[subprocess.Popen], grace_s: float, timeout_s: float | None) -> None:
    """Until every rank has exited; once one has failed, the others get grace_s to follow on their own."""
    start, failed_at = time.monotonic(), None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.returncode for p in procs):
            failed_at = now
        if failed_at is not None and now - failed_at > grace_s:
            return
        if timeout_s is not None and now - start > timeout_s:
            return
        time.sleep(POLL_S)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM, then SIGKILL, to each rank's whole process group (its data-loader workers too)."""
    alive = [p for p in procs if p.poll() is None]
    for sig, wait in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, TERM_GRACE_S)):
        for p in alive:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(p.poll() is None for p in alive):
            time.sleep(POLL_S)
        alive = [p for p in alive if p.poll() is None]
    for p in procs:  # reap, and collect process groups whose leader exited first (workers)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if p.stdout:
            p.stdout.close()


def _first_failure(rank_dir: Path, codes: list[int]) -> tuple[int, str]:
    """The rank that failed first (the earliest error file; its peers fail after it) and its error."""
    errors = sorted(rank_dir.glob("rank*.error"), key=lambda f: f.stat().st_mtime_ns)
    if errors:
        return int(errors[0].stem[4:]), errors[0].read_text().splitlines()[0]
    rank = next(i for i, c in enumerate(codes) if c)
    why = f"killed by signal {-codes[rank]}" if codes[rank] < 0 else f"exit status {codes[rank]}"
    return rank, f"{why} (log: {rank_dir / f'rank{rank}.log'})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the supervisor dies, however it dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# ---- a rank ---------------------------------------------------------------------------------------------
def rank_main(spec_path: str) -> None:
    """`python -m thawlab.ranks <spec>`: run the job of the spec as rank $RANK."""
    rank = global_rank()
    spec = json.loads(Path(spec_path).read_text())
    run_dir = Path(spec["job"]["run_dir"])
    try:
        from thawlab.resume import interruptible

        entry = resolve(spec["entry"])
        cfg = OmegaConf.create(spec["config"])
        OmegaConf.set_struct(cfg, True)
        with interruptible():  # the supervisor's SIGTERM: rank 0 records the interruption like a single run
            entry(cfg, spec["job"])
    except BaseException as e:  # noqa: BLE001
        message = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
        (run_dir / "ranks" / f"rank{rank}.error").write_text(message + "\n\n" + traceback.format_exc())
        print(f"thawlab-train: rank {rank}: {message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    rank_main(sys.argv[1])
