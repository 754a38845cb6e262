"""Resuming and interrupting a run without losing a result.

- `thawlab-train --resume <run dir>`: the run's own composed overrides (`<run>/.hydra/overrides.yaml`), in
  that directory, from its `checkpoints/last.ckpt`. The path reaches Hydra through an environment variable
  (`hydra.run.dir=${oc.env:...}`), never through the override parser, so any character a sweep job's name
  holds (`=`, `,`, spaces, quotes) works. Hydra does not rewrite `<run>/.hydra` on a resume
  (hydra.output_subdir=null): it keeps describing the run as first launched.
- Every checkpoint carries a fingerprint of the experiment-defining config; a resume whose config differs is a
  one-line error naming the keys, before anything is written (a wrong config would otherwise load another
  schedule's checkpoint: an IndexError, or a finished-looking run with another seed's metrics).
- SIGINT and SIGTERM end a run as failed with a one-line reason (signal, last finished epoch, how to resume);
  the exit status is 128 + the signal number.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from thawlab.errors import ThawlabError

RESUME_ENV = "THAWLAB_RESUME"  # JSON: the run being resumed by --resume (dir, overrides, name, group)
DIR_ENV = "THAWLAB_RESUME_DIR"  # its directory, read by Hydra as hydra.run.dir

# keys that may differ between a run and its resume: where things are and how they are shown, not what is
# computed (a prefix ends with a dot)
FREE_KEYS = ("ckpt_path", "cache_dir", "export", "logger.", "trainer.enable_progress_bar",
             "trainer.log_every_n_steps", "ddp.timeout_s", "ddp.grace_s", "data.num_workers", "data.pin_memory",
             "data.persistent_workers", "data.source.num_workers", "data.root", "data.paths.", "data.download",
             # the caches of frozen parts change how (within float tolerance), not what; a bare bool or the block
             # (checkpoints from before the block carry `cache_features: true`)
             "cache_features", "cache_features.")


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fingerprint(config: dict) -> dict:
    """The experiment-defining part of a resolved config, flattened: what a checkpoint must be resumed with."""
    return {k: v for k, v in flat(config).items()
            if not any(k == f or (f.endswith(".") and k.startswith(f)) for f in FREE_KEYS)}


def identity(config: dict, job: dict) -> dict:
    """What every checkpoint of a run carries: its fingerprint, and its overrides, W&B name and group as first
    launched (what --resume composes again; a checkpoint cannot be overwritten by a mistaken command, while
    Hydra rewrites <run>/.hydra before thawlab sees the config)."""
    return {"fingerprint": fingerprint(config), **{k: job[k] for k in ("overrides", "name", "group")}}


def checkpoint_state(path: str | Path) -> dict:
    """The thawlab entries of a checkpoint (memory-mapped: the weights are not read)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {"epoch": state.get("epoch"), **(state.get("thawlab_identity") or {"fingerprint": None})}


def check_matches(config: dict, ckpt_path: str | Path) -> dict:
    """Raise a one-line ThawlabError if the config disagrees with the checkpoint's; return its state."""
    state = checkpoint_state(ckpt_path)
    saved = state["fingerprint"]
    if saved is None:  # a checkpoint from before fingerprints: nothing to compare with
        return state
    now = fingerprint(config)
    keys = sorted(k for k in saved.keys() | now.keys() if saved.get(k, "<unset>") != now.get(k, "<unset>"))
    if keys:
        shown = ", ".join(f"{k}={now.get(k, '<unset>')!r} (checkpoint: {saved.get(k, '<unset>')!r})"
                          for k in keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
        run_dir = Path(ckpt_path).resolve().parent.parent
        raise ThawlabError(f"cannot resume {ckpt_path}: the config differs from the run's in {shown}; resume "
                           f"with the run's own config: thawlab-train --resume {shlex.quote(str(run_dir))}")
    return state


# ---- --resume ---------------------------------------------------------------------------------------------
def resume_argv(arg: str, extra: list[str]) -> list[str] | None:
    """Hydra's argv for `--resume <dir> [overrides]`; sets the environment the job reads. None: nothing to
    do (the run is finished: a line on stderr says so)."""
    import yaml

    from thawlab.results import DONE

    run_dir = Path(arg).expanduser().resolve()
    overrides_file, last = run_dir / ".hydra" / "overrides.yaml", run_dir / "checkpoints" / "last.ckpt"
    if not overrides_file.is_file() and not last.is_file():
        raise ThawlabError(f"--resume {arg!r}: not a run directory (neither {overrides_file} nor {last})")
    if (run_dir / DONE).exists():
        print(f"thawlab-train: {run_dir} already finished ({DONE} marker); its results are kept. To run the "
              f"experiment again, start a new run (another hydra.run.dir)", file=sys.stderr)
        return None
    has_ckpt = last.is_file()
    job = checkpoint_state(last) if has_ckpt else {}
    if "overrides" not in job:  # no checkpoint yet (or one from before identities): the run's .hydra/
        overrides = [o for o in yaml.safe_load(overrides_file.read_text()) or [] if not is_resume_key(o)]
        hydra_file = run_dir / ".hydra" / "hydra.yaml"
        hc = (yaml.safe_load(hydra_file.read_text()) or {}).get("hydra", {}) if hydra_file.is_file() else {}
        multirun = hc.get("mode") == "MULTIRUN"
        job = {"overrides": overrides, "name": ",".join(sorted(overrides)) or hc.get("job", {}).get("name", "train"),
               "group": Path(str(hc.get("sweep", {}).get("dir", ""))).name if multirun else "single"}
    os.environ[DIR_ENV] = str(run_dir)
    os.environ[RESUME_ENV] = json.dumps({"dir": str(run_dir), **{k: job[k] for k in ("overrides", "name", "group")}})
    overrides = job["overrides"]
    if not has_ckpt:
        print(f"thawlab-train: {run_dir} has no checkpoint yet (no epoch finished): starting it again from "
              f"the beginning, with its own config", file=sys.stderr)
    return [*overrides, *extra, *(["ckpt_path=last"] if has_ckpt else []),
            f"hydra.run.dir=${{oc.env:{DIR_ENV}}}", "hydra.output_subdir=null"]


def is_resume_key(override: str) -> bool:
    """ckpt_path=... (any prefix: ckpt_path, +ckpt_path, ~ckpt_path) is how a run resumes, not what it is."""
    return override.lstrip("+~").split("=", 1)[0] == "ckpt_path"


def resumed_job(run_dir: str) -> dict | None:
    """The identity (overrides, name, group) of the run --resume continues in run_dir, if it is that run."""
    spec = os.environ.get(RESUME_ENV)
    if not spec:
        return None
    job = json.loads(spec)
    return job if Path(job["dir"]) == Path(run_dir).resolve() else None


def resume_event(run_dir: Path, epoch: int | None) -> list[dict]:
    """results.json `resumed`: the earlier resumes of this run (its last results.json) and this one."""
    try:
        earlier = json.loads((run_dir / "results.json").read_text()).get("resumed") or []
    except (OSError, ValueError):
        earlier = []
    return [*earlier, {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "from_epoch": None if epoch is None else epoch + 1}]


# ---- signals ----------------------------------------------------------------------------------------------
class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the run. A BaseException: a sweep stops here rather than going on to its next
    job (Hydra's launchers only catch Exception)."""

    def __init__(self, signum: int):
        self.signum = signum
        self.reason = f"interrupted by {signal.Signals(signum).name}"
        super().__init__(self.reason)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def describe(self, run_dir: Path, max_epochs: int | None) -> None:
        """The one line that results.json and stderr carry: the last finished epoch and how to go on."""
        last = run_dir / "checkpoints" / "last.ckpt"
        try:
            epochs = checkpoint_state(last)["epoch"] + 1 if last.is_file() else 0
        except Exception:  # noqa: BLE001  (an unreadable checkpoint: say so below rather than fail here)
            epochs = None
        of = f" of {max_epochs}" if max_epochs else ""
        where = ("before its first epoch ended" if epochs == 0 else "(last.ckpt unreadable)" if epochs is None
                 else f"after epoch {epochs}{of} (checkpoints/last.ckpt)")
        self.reason = (f"interrupted by {signal.Signals(self.signum).name} {where}; resume: "
                       f"thawlab-train --resume {shlex.quote(str(run_dir))}")
        self.args = (self.reason,)

    def __str__(self) -> str:
        return self.reason


_deferring: list[int] | None = None  # inside signals_deferred: the signals that arrived meanwhile


def _raise_interrupted(signum, frame):
    if _deferring is not None:
        _deferring.append(signum)
        return
    raise Interrupted(signum)


def signals_deferred(fn):
    """fn, with SIGINT and SIGTERM held back until it returns. For writing checkpoints: Lightning writes to a
    temporary file and moves it into place, but across file systems (the temporary file is in /tmp) the move
    is a copy that a signal could cut short, leaving half a last.ckpt."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _deferring
        if _deferring is not None:  # nested: the outer call raises
            return fn(*args, **kwargs)
        _deferring = []
        try:
            return fn(*args, **kwargs)
        finally:
            pending, _deferring = _deferring, None
            if pending:
                raise Interrupted(pending[0])
    return wrapper


@contextlib.contextmanager
def interruptible():
    """SIGINT and SIGTERM raise Interrupted inside the block. A signal someone else already handles stays
    theirs: submitit's SLURM jobs bypass SIGTERM and requeue on their own signal, and that must keep working.
    (Lightning composes its own SIGTERM handler with ours when fit starts.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    mine = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    previous = {s: signal.getsignal(s) for s in mine}
    taken = [s for s, default in mine.items() if previous[s] is default]
    for s in taken:
        signal.signal(s, _raise_interrupted)
    try:
        yield
    finally:
        for s in taken:
            signal.signal(s, previous[s])
