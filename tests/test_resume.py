"""Kill a run in the middle of a schedule, rerun it with ckpt_path=last: the same weights, metrics and trace
as a run that was never interrupted (Lightning #21901: groups unfrozen before the checkpoint must train after
it; finetuning-scheduler #30: no duplicated parameter groups)."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import add_callbacks


class Killed(RuntimeError):
    pass


class _KillAfter(L.Callback):
    """Ends the run after epoch `epoch`, once its checkpoint is on disk (Lightning writes checkpoints after
    every other callback's epoch end), as a kill would."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.epoch + 1:
            raise Killed(f"killed after epoch {self.epoch}")


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
        add_callbacks(m, _KillAfter(kill_epoch))
        with pytest.raises(Killed):
            run(*overrides, name="resumed")
    state = torch.load(whole["run_dir"].parent / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch"] == kill_epoch and state["thawlab_trace"][-1]["phase"] == phase
    assert len(state["optimizer_states"][0]["param_groups"]) == len(whole["trace"][0]["lr"])

    resumed = run(*overrides, "ckpt_path=last", name="resumed")
    assert resumed["status"] == "done"
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
