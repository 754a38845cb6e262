"""Loggers, built by Hydra from conf/logger/*.yaml. Each factory takes the same run-time arguments.

W&B: one run per job, group and name from the sweep and the overrides, the resolved config as a plain dict.
Without credentials it logs offline into the run directory and says how to upload (`wandb sync`; in a sweep,
once for all its jobs, at the end: thawlab.sweep). The mode
goes to this run's wandb.init only: Lightning's `offline=True` would set WANDB_MODE for the whole process.

A resumed run continues the same W&B run id, and its history continues too: thawlab gives every log call an
explicit W&B step, and `<run>/wandb/next-step` remembers the next one (written before each log call: a killed
run leaves at worst a gap, never two rows with one step). W&B cannot resume an offline run in its directory
(wandb 0.31 writes a new `offline-run-*` directory per process), so an offline run resumed k times has k + 1
segments with the same id and disjoint, increasing steps; `wandb sync` uploads them in order of start time.
"""
from __future__ import annotations

import netrc
import os
import sys
from pathlib import Path


def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(save_dir: str, say: bool = True) -> str | None:
    """The mode for this W&B run only: WANDB_MODE when set, else offline without credentials (say: print
    where it logs and the sync command), else None (online)."""
    mode = os.environ.get("WANDB_MODE")
    if mode is None and not _wandb_credentials():
        mode = "offline"
        if say:
            print(f"W&B: no credentials found, logging offline under {save_dir}/wandb; upload later with "
                  f"`wandb sync {save_dir}/wandb/offline-run-*`", file=sys.stderr)
    return mode


NEXT_STEP = "next-step"  # in <save_dir>/wandb: the W&B step a resumed run logs next


def next_wandb_step(save_dir: str) -> int:
    try:
        return int(Path(save_dir, "wandb", NEXT_STEP).read_text())
    except (OSError, ValueError):
        return 0


def previous_wandb_id(save_dir: str) -> str | None:
    """The id of the latest W&B run in a run directory (online or offline), for a resumed run to continue."""
    runs = sorted(Path(save_dir, "wandb").glob("*run-*/run-*.wandb"), key=lambda f: f.stat().st_mtime)
    return runs[-1].stem[len("run-"):] if runs else None


def wandb_logger(save_dir: str, name: str, group: str, run_config: dict, project: str = "thawlab",
                 job_type: str = "train", entity: str | None = None, resume: bool = False):
    """resume=True (a run resumed with ckpt_path): continue the W&B run the directory already has, same id."""
    from lightning.pytorch.loggers import WandbLogger

    # a sweep says it once, at its end
    mode = wandb_mode(save_dir, say=os.environ.get("RANK", "0") == "0" and group == "single")
    kwargs = {"mode": mode} if mode else {}
    run_id = previous_wandb_id(save_dir) if resume else None
    first_step = 0
    if run_id:
        first_step = next_wandb_step(save_dir)
        kwargs.update(id=run_id, resume="allow")
        print(f"W&B: resuming run {run_id} at step {first_step}", file=sys.stderr)

    class StepsContinued(WandbLogger):
        """Lightning's WandbLogger, every log call at an explicit W&B step that continues across resumes."""

        def __init__(self, **kw):
            super().__init__(**kw)
            self.next_step, self.started = first_step, False

        def log_metrics(self, metrics, step=None):
            from lightning.fabric.utilities.logger import _add_prefix
            from lightning.pytorch.utilities.rank_zero import rank_zero_only

            if rank_zero_only.rank != 0:
                return
            metrics = _add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR)
            if step is not None:
                metrics = {**metrics, "trainer/global_step": step}
            if not self.started:  # online, a resumed run's step comes from the server: never log below it
                self.next_step, self.started = max(self.next_step, self.experiment.step), True
            wandb_step = self.next_step
            self.next_step = wandb_step + 1
            record = Path(self.save_dir, "wandb", NEXT_STEP)
            record.parent.mkdir(parents=True, exist_ok=True)
            tmp = record.with_name(f".{NEXT_STEP}.tmp")
            tmp.write_text(f"{self.next_step}\n")
            os.replace(tmp, record)
            self.experiment.log(metrics, step=wandb_step)

    return StepsContinued(project=project, entity=entity, save_dir=save_dir, name=name, group=group,
                          job_type=job_type, config=run_config, **kwargs)


def log_final_metrics(logger, metrics: dict) -> None:
    """The run's final metrics (results.json's) in its W&B summary, and its test metrics per evaluation set as a
    table `test/sets` (a row per set, a column per metric). Lightning's test logging leaves in the summary
    only what was last logged under each key; these are the metrics of the selected checkpoint as reported.
    Rank 0 only (the caller's); nothing without a W&B logger."""
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return
    import wandb

    per_set: dict[str, dict] = {}
    for key, value in metrics.items():
        if key.startswith("test/"):
            name, _, metric = key[len("test/"):].rpartition("/")
            per_set.setdefault(name, {})[metric] = value
    names = sorted({m for row in per_set.values() for m in row})
    table = wandb.Table(columns=["set", *names], data=[[s, *(row.get(m) for m in names)]
                                                        for s, row in per_set.items()])
    logger.experiment.summary.update(metrics)
    logger.log_metrics({"test/sets": table})  # at the next step of the run's history (resumes continue it)


def csv_logger(save_dir: str, name: str, group: str, run_config: dict, project: str = "thawlab",
               resume: bool = False):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(save_dir=save_dir, name="csv", version="")
    logger.log_hyperparams(run_config)
    return logger


def no_logger(save_dir: str, name: str, group: str, run_config: dict, project: str = "thawlab",
              resume: bool = False):
    return False


def finish_wandb(failed: bool) -> None:
    """End the job's W&B run (exit code 1 if it failed) so the next job in a sweep gets a run of its own."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)
