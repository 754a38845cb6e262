"""Early stopping per phase.

A multi-phase schedule is a plan (LP-FT: probe, then fine-tune). Lightning's EarlyStopping ends the whole run, so
a probe that plateaus would silently skip the fine-tuning. Here a plateau ends the *phase*: the phase is cut at
the current epoch, the next one starts at the next epoch with its planned length (its lr shape restarts as
usual), and the run ends early only when the last phase stops. Every phase gets its own patience: the count
restarts, and the best value is the phase's own (a fine-tuning phase starts from its probe's accuracy).

The cut is made in the module's phase list in place, so everything that reads the plan sees the same thing:
the lr lambdas, the phase of each epoch, WiSE-FT's theta_0 at the end of the first phase. Checkpoints carry
the cut plan (FineTuner.on_save_checkpoint), so a resumed run continues the shortened schedule.
"""
from __future__ import annotations

from dataclasses import replace

from lightning.pytorch.callbacks import Callback

from thawlab.errors import ThawlabError
from thawlab.schedules import phase_at

MONITORS = {"val/id/acc": "max", "val/id/nll": "min", "val/id/ece": "min"}


def check(cfg) -> None:
    if cfg is None or cfg.get("patience") is None:
        return
    if cfg.monitor not in MONITORS:
        raise ThawlabError(f"early_stopping.monitor={cfg.monitor!r} is not one of {', '.join(MONITORS)}")
    if not isinstance(cfg.patience, int) or cfg.patience < 1:
        raise ThawlabError(f"early_stopping.patience={cfg.patience!r} must be at least 1 epoch (null: off)")
    if cfg.min_delta < 0:
        raise ThawlabError(f"early_stopping.min_delta={cfg.min_delta} must be >= 0")


class PhaseEarlyStopping(Callback):
    def __init__(self, monitor: str = "val/id/acc", patience: int = 3, min_delta: float = 0.0):
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.sign = 1.0 if MONITORS[monitor] == "max" else -1.0
        self.phase: int | None = None  # the phase the counters below belong to
        self.best, self.best_epoch, self.wait = float("-inf"), -1, 0

    def on_validation_end(self, trainer, module) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        epoch, phases = trainer.current_epoch, module.phases
        index, phase, start = phase_at(phases, epoch)
        if index != self.phase:
            self.phase, self.best, self.best_epoch, self.wait = index, float("-inf"), -1, 0
        value = self.sign * float(trainer.callback_metrics[self.monitor])
        if value > self.best + self.min_delta:
            self.best, self.best_epoch, self.wait = value, epoch, 0
        else:
            self.wait += 1
        last_of_phase = epoch == start + phase.epochs - 1
        if self.wait >= self.patience and not last_of_phase:
            phases[index] = replace(phase, epochs=epoch - start + 1)  # in place: the lr lambdas hold this list
            module.stopped.append({"phase": phase.name, "planned_epochs": phase.epochs,
                                   "epochs": epoch - start + 1, "stopped_after_epoch": epoch,
                                   "best": self.sign * self.best, "best_epoch": self.best_epoch})
        if epoch + 1 >= sum(p.epochs for p in phases):  # the (possibly shortened) plan is done
            trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"phase": self.phase, "best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def load_state_dict(self, state: dict) -> None:
        self.phase, self.best, self.best_epoch, self.wait = (state["phase"], state["best"], state["best_epoch"],
                                                             state["wait"])
