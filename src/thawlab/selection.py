"""Model selection: which checkpoints a run tests.

The primary rule, whose metrics are results.json `metrics` (`test/<set>/<metric>`) and `selection`, is said by two
settings of the schedule, so a strategy's paper recipe is data, not code that knows its name:
  schedule.select         best: the epoch with the highest ID validation accuracy (val/id/acc);
                          last: the last epoch
  schedule.select_phases  the phases whose epochs selection considers (null: every phase, the whole run)
Each phase carries the answer as `Phase.select` (schedules.build_phases). LP-FT (Kumar et al. 2022) early-stops
on ID validation during fine-tuning: best within `ft`, never the probe, which often validates best on a
shifted task. WiSE-FT (Wortsman et al. 2022) interpolates towards the model at the end of fine-tuning: last
within `ft`. `select_phases=null` with `select=best` is the whole-run rule.

More rules can be reported beside it (`selection.rules`), named as DomainBed names its selection methods
(Gulrajani and Lopez-Paz 2021, domainbed/model_selection.py), each over the same select_phases:
  id_val  max val/id/acc: the ID ("training-domain") validation set; schedule.select=best is this rule
  oracle  max val/ood/mean/acc: the unweighted mean accuracy of the OOD validation sets (the "test-domain
          validation set"), the OOD-validated early stopping LP-FT reports apart from its main numbers
  last    the last epoch; schedule.select=last is this rule
Each has a checkpoint callback of its own (`best-epoch<N>.ckpt`, `oracle-epoch<N>.ckpt`, `final-epoch<N>.ckpt`)
and is tested after fit; its metrics are `test/<rule>/<set>/<metric>` (results.json `metrics`, W&B) and
results.json `selections[<rule>]`. DomainBed's own oracle keeps the last checkpoint of each run and uses the
OOD validation accuracy only to rank hyperparameters across runs; thawlab's `oracle` also picks the epoch
(LP-FT's and WILDS' OOD-validation early stopping). Every rule's entry records both validation scores of its
epoch (`val`), so DomainBed's ranking (the `last` checkpoint's val/ood/mean/acc) can be made from results.json.

A checkpoint callback skips the epochs of phases selection does not consider, in every rank alike (the
decision depends only on the epoch and the plan), and carries what it selected in its state, so a resumed run
reports the same selection as an uninterrupted one.
"""
from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint

from thawlab.errors import ThawlabError, did_you_mean
from thawlab.schedules import phase_at

SELECT = ("val/id/acc", "max")  # the ID validation metric a `best` selection maximises
OOD_SELECT = ("val/ood/mean/acc", "max")  # what the oracle maximises: the mean over the OOD validation sets
RULES = {"best": f"{SELECT[1]} {SELECT[0]}", "last": "last epoch"}  # schedule.select -> results.json rule
# selection.rules: name -> (monitor and mode or None for the last epoch, checkpoint file name, results.json rule)
NAMED = {"id_val": (SELECT, "best-epoch{epoch}", RULES["best"]),
         "oracle": (OOD_SELECT, "oracle-epoch{epoch}", f"{OOD_SELECT[1]} {OOD_SELECT[0]}"),
         "last": (None, "final-epoch{epoch}", RULES["last"])}
OF_SELECT = {"best": "id_val", "last": "last"}  # schedule.select -> the rule's name
VALIDATION = (SELECT[0], OOD_SELECT[0])  # the scores each selection records of its epoch (`val`)


def check_rules(rules) -> list[str]:
    """selection.rules as a list of known, distinct names; a one-line ThawlabError otherwise."""
    if rules is None:
        return []
    if isinstance(rules, str):
        raise ThawlabError(f"selection.rules={rules!r} must be a list, e.g. selection.rules=[{rules}]")
    names = [str(r) for r in rules]
    for r in names:
        if r not in NAMED:
            raise ThawlabError(f"selection.rules: {r!r} is not one of {', '.join(NAMED)}{did_you_mean(r, NAMED)}")
    if len(set(names)) != len(names):
        raise ThawlabError(f"selection.rules={names} names a rule twice")
    return names


def extra_rules(rules, select: str) -> list[str]:
    """The rules tested besides the primary one (schedule.select), in the order given."""
    return [r for r in check_rules(rules) if r != OF_SELECT[select]]


def check_ood_validation(rules, val_sets: list[str], data_name: str) -> None:
    """The oracle needs OOD validation sets: a one-line error where the data have none."""
    if "oracle" in check_rules(rules) and not any(s.startswith("ood/") for s in val_sets):
        raise ThawlabError(f"selection.rules: oracle selects on OOD validation sets, and data={data_name} has none "
                           f"(its validation sets: {', '.join(val_sets)}); on-disk data hold part of each OOD "
                           f"set out for it with data.ood_val_fraction")


class SelectCheckpoint(ModelCheckpoint):
    """The checkpoint one rule selects (`best-epoch<N>.ckpt`, `oracle-epoch<N>.ckpt` or `final-epoch<N>.ckpt`),
    over the epochs of the phases marked `select`. rule: schedule.select's best|last or a selection.rules name.
    primary: the run's own rule (trainer.checkpoint_callback; its state key is the one it always had, so older
    checkpoints resume); the others' state keys carry their rule name.
    `selected`: {epoch, phase, value (the rule's score at that epoch), val (both validation scores)}."""

    def __init__(self, dirpath, rule: str = "best", primary: bool = True):
        self.name = OF_SELECT.get(rule, rule)
        monitor, filename, self.description = NAMED[self.name]
        if monitor is not None:
            super().__init__(dirpath=dirpath, filename=filename, auto_insert_metric_name=False,
                             monitor=monitor[0], mode=monitor[1], save_top_k=1)
        else:  # monitor None, top 1: every considered epoch replaces the one before
            super().__init__(dirpath=dirpath, filename=filename, auto_insert_metric_name=False,
                             monitor=None, save_top_k=1)
        self.rule, self.primary = rule, primary
        self.score_key = (monitor or SELECT)[0]  # `last` reports the last epoch's val/id/acc, as it always has
        self.selected: dict | None = None

    @property
    def state_key(self) -> str:
        if self.primary:
            return super().state_key
        return self._generate_state_key(rule=self.name, monitor=self.monitor, mode=self.mode)

    def _considers(self, trainer) -> bool:
        _, phase, _ = phase_at(trainer.lightning_module.phases, trainer.current_epoch)
        return phase.select

    def _note(self, trainer, before: str) -> None:
        if self.best_model_path != before:  # this epoch's checkpoint became the selected one
            metrics = trainer.callback_metrics
            value = metrics.get(self.score_key)
            _, phase, _ = phase_at(trainer.lightning_module.phases, trainer.current_epoch)
            self.selected = {"epoch": trainer.current_epoch, "phase": phase.name,
                             "value": None if value is None else float(value),
                             "val": {k: float(metrics[k]) for k in VALIDATION if k in metrics}}

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
