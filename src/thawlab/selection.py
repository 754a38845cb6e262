"""Model selection: which checkpoint a run tests.

Two settings of the schedule say it, so a strategy's paper recipe is data, not code that knows its name:
  schedule.select         best: the epoch with the highest ID validation accuracy (val/id/acc);
                          last: the last epoch
  schedule.select_phases  the phases whose epochs selection considers (null: every phase, the whole run)
Each phase carries the answer as `Phase.select` (schedules.build_phases). LP-FT (Kumar et al. 2022) early-stops
on ID validation during fine-tuning: best within `ft`, never the probe, which often validates best on a
shifted task. WiSE-FT (Wortsman et al. 2022) interpolates towards the model at the end of fine-tuning: last
within `ft`. `select_phases=null` with `select=best` is the whole-run rule.

The checkpoint callback skips the epochs of phases selection does not consider, in every rank alike (the
decision depends only on the epoch and the plan), and carries what it selected in its state, so a resumed run
reports the same selection as an uninterrupted one.
"""
from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint

from thawlab.schedules import phase_at

SELECT = ("val/id/acc", "max")  # the ID validation metric a `best` selection maximises
RULES = {"best": f"{SELECT[1]} {SELECT[0]}", "last": "last epoch"}  # schedule.select -> results.json rule


class SelectCheckpoint(ModelCheckpoint):
    """The selected checkpoint (`best-epoch<N>.ckpt` or `final-epoch<N>.ckpt`), over the epochs of the phases
    marked `select`. `selected`: {epoch, phase, value (val/id/acc at that epoch)} of the checkpoint it holds."""

    def __init__(self, dirpath, rule: str = "best"):
        if rule == "best":
            super().__init__(dirpath=dirpath, filename="best-epoch{epoch}", auto_insert_metric_name=False,
                             monitor=SELECT[0], mode=SELECT[1], save_top_k=1)
        else:  # monitor None, top 1: every considered epoch replaces the one before
            super().__init__(dirpath=dirpath, filename="final-epoch{epoch}", auto_insert_metric_name=False,
                             monitor=None, save_top_k=1)
        self.rule = rule
        self.selected: dict | None = None

    def _considers(self, trainer) -> bool:
        _, phase, _ = phase_at(trainer.lightning_module.phases, trainer.current_epoch)
        return phase.select

    def _note(self, trainer, before: str) -> None:
        if self.best_model_path != before:  # this epoch's checkpoint became the selected one
            value = trainer.callback_metrics.get(SELECT[0])
            _, phase, _ = phase_at(trainer.lightning_module.phases, trainer.current_epoch)
            self.selected = {"epoch": trainer.current_epoch, "phase": phase.name,
                             "value": None if value is None else float(value)}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._considers(trainer):
            before = self.best_model_path
            super().on_train_epoch_end(trainer, pl_module)
            self._note(trainer, before)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._considers(trainer):
            before = self.best_model_path
            super().on_validation_end(trainer, pl_module)
            self._note(trainer, before)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "selected": self.selected}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.selected = state_dict.get("selected")
