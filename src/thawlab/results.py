"""The results contract: one results.json per run, written atomically, and a `done` marker written last.

A run that fails writes results.json with "status": "failed" and its error, and no `done` marker, so a
failed or interrupted run never looks finished. A finished run is never written again: a record refuses to
start in a directory with a `done` marker, and a run that finished keeps its results even if an error or a
signal reaches it afterwards. `read_results` is what reports use.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

from thawlab.errors import ThawlabError

RESULTS, DONE = "results.json", "done"
PACKAGES = ("thawlab", "torch", "torchvision", "lightning", "timm", "torchmetrics", "hydra-core", "omegaconf",
            "wandb")
REQUIRED = ("status", "metrics", "selection", "config", "versions", "seed", "git", "trace")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_state() -> dict:
    """Commit of the thawlab checkout that ran (None outside a git checkout, e.g. from a wheel)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--verify", "-q", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        commit = head.stdout.strip() if head.returncode == 0 else None
        dirty = bool(subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty}


def atomic_write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)


class RunRecord:
    """Collects what a run produces and writes it once, at the end, success or failure."""

    def __init__(self, run_dir: Path, config: dict, seed: int, overrides: list[str] | None = None,
                 write: bool = True):
        """write=False: keep the record in memory only (DDP ranks other than 0)."""
        self.run_dir, self.write = Path(run_dir), write
        if write:
            if (self.run_dir / DONE).exists():
                raise ThawlabError(f"{self.run_dir} already finished ({DONE} marker): its results are kept")
            self.run_dir.mkdir(parents=True, exist_ok=True)
        # debug: the debug preset (smoke) or null; reports leave smoke runs out
        self.payload = {"status": "running", "debug": config.get("debug"), "metrics": {}, "counts": {},
                        "selection": None, "config": config,
                        "overrides": list(overrides or []), "versions": versions(), "seed": seed,
                        "git": git_state(), "trace": [], "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def finish(self, **fields) -> None:
        self.payload.update(fields, status="done", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        if not self.write:
            return
        atomic_write_json(self.run_dir / RESULTS, self.payload)
        (self.run_dir / DONE).write_text(self.payload["finished"] + "\n")

    def fail(self, message: str, **fields) -> None:
        """message: the error as results.json states it (train.error_line)."""
        if self.payload["status"] == "done":  # finished before the error (or signal) came: keep the result
            return
        self.payload.update(fields, status="failed", error=message,
                            finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        if self.write:
            atomic_write_json(self.run_dir / RESULTS, self.payload)


def read_results(path) -> dict:
    """results.json of a run directory (or the file itself), checked against the contract."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS
    data = json.loads(path.read_text())
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ValueError(f"{path}: not a thawlab results file (missing {', '.join(missing)})")
    return data
