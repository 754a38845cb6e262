"""Model selection follows each paper: LP-FT early-stops on ID validation within fine-tuning (never the probe),
WiSE-FT interpolates towards the end of fine-tuning; schedule.select / select_phases keep the whole-run rule
for those who want it. In real (short) runs where the probe validates best, with early stopping, under DDP."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import add_callbacks, cli, compose_cfg
from thawlab.build import check_config
from thawlab.errors import ThawlabError
from thawlab.schedules import build_phases
from thawlab.results import read_results

# deterministic: the probe (head lr 0.03) reaches 0.19 ID validation accuracy at epoch 1; fine-tuning at lr 1.0
# wrecks the network (0.10 at epochs 2 and 3), so the probe validates best; on the whole ID validation set (one
# batch of 256), not the smoke run's 32 images of two classes
PROBE_BEST = ["schedule.lp_epochs=2", "trainer.max_epochs=4", "trainer.limit_train_batches=null", "optimizer.lr=1.0",
              "schedule.probe_lr_mult=0.03", "data.eval_batch_size=256"]
FULL_TEST = "trainer.limit_test_batches=null"


class _ValAcc(L.Callback):
    """val/id/acc of every epoch, as the selection saw it."""

    def __init__(self):
        self.acc: dict[int, float] = {}

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self.acc[trainer.current_epoch] = float(trainer.callback_metrics["val/id/acc"])


def _epochs(r, phase: str) -> list[int]:
    return [t["epoch"] for t in r["trace"] if t["phase"] == phase]


def _first_best(acc: dict[int, float], epochs: list[int]) -> int:
    return max(epochs, key=lambda e: (acc[e], -e))  # ties: the earliest, as ModelCheckpoint keeps it


def _state(r, name: str) -> dict:
    return torch.load(r["run_dir"] / "checkpoints" / name, map_location="cpu", weights_only=True)["state_dict"]


def test_lp_ft_selects_within_fine_tuning_when_the_probe_validates_best(run, monkeypatch):
    seen = _ValAcc()
    add_callbacks(monkeypatch, seen)
    r = run("schedule=lp_ft", *PROBE_BEST)
    lp, ft = _epochs(r, "lp"), _epochs(r, "ft")
    assert (lp, ft) == ([0, 1], [2, 3])
    assert max(seen.acc[e] for e in lp) > max(seen.acc[e] for e in ft), f"the probe must validate best: {seen.acc}"
    best = _first_best(seen.acc, ft)
    assert r["selection"] == {"rule": "max val/id/acc", "phases": ["ft"], "phase": "ft", "epoch": best,
                              "checkpoint": f"checkpoints/best-epoch{best}.ckpt",
                              "value": pytest.approx(seen.acc[best])}

    # schedule.select_phases=null: the whole-run rule, which picks the probe here
    seen.acc.clear()
    whole = run("schedule=lp_ft", *PROBE_BEST, "schedule.select_phases=null")
    best = _first_best(seen.acc, lp + ft)
    assert best in lp
    assert whole["selection"] == {"rule": "max val/id/acc", "phases": ["lp", "ft"], "phase": "lp", "epoch": best,
                                  "checkpoint": f"checkpoints/best-epoch{best}.ckpt",
                                  "value": pytest.approx(seen.acc[best])}
    assert whole["metrics"]["test/id/acc"] != r["metrics"]["test/id/acc"]


def test_lp_ft_selection_with_early_stopping_stays_in_fine_tuning(run, monkeypatch):
    """ft planned for 3 epochs, cut after 2 without improvement: the selected epoch is the best ft epoch run."""
    seen = _ValAcc()
    add_callbacks(monkeypatch, seen)
    r = run("schedule=lp_ft", *PROBE_BEST, "trainer.max_epochs=5", "early_stopping.patience=1")
    ft = _epochs(r, "ft")
    assert r["early_stopping"]["stopped"][-1]["phase"] == "ft" and len(ft) == 2
    assert r["selection"]["phase"] == "ft" and r["selection"]["epoch"] == _first_best(seen.acc, ft)


def test_wise_ft_interpolates_towards_the_end_of_fine_tuning(run, capsys, monkeypatch):
    seen = _ValAcc()
    add_callbacks(monkeypatch, seen)
    r = run("schedule=wise_ft", *PROBE_BEST, "schedule.alphas=[0.0,1.0]", FULL_TEST)
    assert r["selection"]["rule"] == "last epoch" and r["selection"]["phases"] == ["ft"]
    assert (r["selection"]["epoch"], r["selection"]["phase"]) == (3, "ft")
    assert r["selection"]["value"] == pytest.approx(seen.acc[3])  # its own val/id/acc, not the file's stale one
    # theta_ft: the weights at the end of fine-tuning (last.ckpt is the end of the run, the end of ft)
    selected, last = _state(r, "final-epoch3.ckpt"), _state(r, "last.ckpt")
    assert r["selection"]["checkpoint"] == "checkpoints/final-epoch3.ckpt"
    assert all(torch.equal(v, last[k]) for k, v in selected.items())
    end = r["wise"][-1]["metrics"]
    assert end["test/wise/1/id/acc"] == pytest.approx(r["metrics"]["test/id/acc"], abs=1e-9)
    assert "interpolates between two linear probes" not in capsys.readouterr().err

    # the whole-run rule is still there, with a warning when it makes theta_ft a probe
    whole = run("schedule=wise_ft", *PROBE_BEST, "schedule.alphas=[0.0,1.0]", "schedule.select=best",
                "schedule.select_phases=null")
    assert whole["selection"]["phase"] == "lp" and whole["selection"]["rule"] == "max val/id/acc"
    assert "interpolates between two linear probes" in capsys.readouterr().err


@pytest.mark.parametrize("overrides,needle", [
    (["schedule=lp_ft", "schedule.select=worst"], "schedule.select='worst' is not one of best, last"),
    (["schedule=lp_ft", "schedule.select_phases=[]"], "schedule.select_phases=[] must be a non-empty list"),
])
def test_bad_selection_settings_name_the_value(overrides, needle):
    with pytest.raises(ThawlabError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        check_config(compose_cfg(["logger=none", *overrides]))


def test_select_phases_must_name_phases_of_the_schedule():
    cfg = compose_cfg(["logger=none", "schedule=lp_ft", "schedule.select_phases=[probe]"])
    with pytest.raises(ThawlabError, match="schedule.select_phases names phase 'probe'; the phases of lp_ft are lp, ft"):
        build_phases(cfg.schedule, ["stem", "head"], 4)
    phases = build_phases(compose_cfg(["logger=none", "schedule=lp_ft"]).schedule, ["stem", "head"], 4)
    assert [(p.name, p.select) for p in phases] == [("lp", False), ("ft", True)]
    phases = build_phases(compose_cfg(["logger=none", "schedule=gradual"]).schedule, ["stem", "head"], 4)
    assert all(p.select for p in phases), "schedules without a paper rule select over the whole run"


def test_ddp_lp_ft_selects_within_fine_tuning(tmp_path, cache_dir):
    """Both ranks make the same decision each epoch (it depends on the plan alone): one selected checkpoint per
    rule (selection.rules adds DomainBed's oracle and the last epoch), in ft, each tested on every set."""
    run_dir = tmp_path / "run"
    r = cli("debug=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
            "logger=none", "schedule=lp_ft", *PROBE_BEST, "selection.rules=[oracle,last]", f"hydra.run.dir={run_dir}",
            cwd=tmp_path, cache=cache_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    res = read_results(run_dir)
    assert res["distributed"]["world_size"] == 2
    assert res["selection"]["phase"] == "ft" and res["selection"]["epoch"] in (2, 3)
    sel = res["selections"]
    assert [(k, v["phase"]) for k, v in sel.items()] == [("id_val", "ft"), ("oracle", "ft"), ("last", "ft")]
    assert sel["last"]["epoch"] == 3 and sel["oracle"]["epoch"] in (2, 3)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == sorted([
        f"best-epoch{res['selection']['epoch']}.ckpt", f"oracle-epoch{sel['oracle']['epoch']}.ckpt",
        "final-epoch3.ckpt", "last.ckpt"])
    for name in ("oracle", "last"):  # every sample of every set counted once across the ranks
        assert set(sel[name]["metrics"]) == set(sel["id_val"]["metrics"])
        assert res["metrics"][f"test/{name}/id/acc"] == sel[name]["metrics"]["test/id/acc"]
