"""DomainBed's selection rules beside the primary one (selection.rules; thawlab/selection.py): on a real short
LP-FT run where the three rules pick three different fine-tuning epochs, each picks the epoch it should (first
maximum of val/id/acc, first maximum of the mean OOD validation accuracy, the last epoch; never the probe),
its checkpoint is tested on every set as test/<rule>/..., equal to a run whose primary rule it is, survives a
resume, and bad input is one line."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import Killed, KillAfter, add_callbacks, compose_cfg
from thawlab.build import check_config
from thawlab.errors import ThawlabError
from thawlab.selection import check_ood_validation

# deterministic: the probe (epochs 0-1) validates best on both ID and OOD; fine-tuning at lr 0.01 then gives
# ID validation ties (first maximum: epoch 2) and an OOD validation maximum at epoch 4, before the last epoch 5
LP_FT = ["schedule=lp_ft", "schedule.lp_epochs=2", "trainer.max_epochs=6", "trainer.limit_train_batches=null",
         "optimizer.lr=0.01"]
RULES = "selection.rules=[oracle,last,id_val]"


class _Val(L.Callback):
    """val/id/acc and val/ood/mean/acc of every epoch, as selection saw them."""

    def __init__(self):
        self.seen: dict[int, tuple[float, float]] = {}

    def on_validation_end(self, trainer, module):
        m = trainer.callback_metrics
        if not trainer.sanity_checking and "val/ood/mean/acc" in m:  # not the source pretraining's trainer
            self.seen[trainer.current_epoch] = (float(m["val/id/acc"]), float(m["val/ood/mean/acc"]))


def _first_max(values: dict[int, float], epochs: list[int]) -> int:
    return max(epochs, key=lambda e: (values[e], -e))  # ties: the earliest, as ModelCheckpoint keeps it


@pytest.fixture(scope="module")
def lp_ft(tmp_path_factory, cache_dir):
    """The rules' run, the epochs each rule should pick, and the same run with schedule.select=last."""
    from conftest import BASE
    from thawlab.results import read_results
    from thawlab.train import train

    root = tmp_path_factory.mktemp("rules")
    seen = _Val()
    mp = pytest.MonkeyPatch()
    add_callbacks(mp, seen)
    out = {}
    try:
        for name, extra in (("rules", [RULES]), ("last", ["schedule.select=last"])):
            train(compose_cfg([*BASE, f"cache_dir={cache_dir}", *LP_FT, *extra], root / name))
            out[name] = {**read_results(root / name), "run_dir": root / name}
            if name == "rules":
                out["seen"] = dict(seen.seen)
    finally:
        mp.undo()
    return out


def test_each_rule_picks_its_epoch_within_fine_tuning(lp_ft):
    r, seen = lp_ft["rules"], lp_ft["seen"]
    ft = [t["epoch"] for t in r["trace"] if t["phase"] == "ft"]
    assert ft == [2, 3, 4, 5]
    ids, oods = {e: v[0] for e, v in seen.items()}, {e: v[1] for e, v in seen.items()}
    want = {"id_val": _first_max(ids, ft), "oracle": _first_max(oods, ft), "last": ft[-1]}
    assert len(set(want.values())) == 3, f"the run must separate the rules: {seen}"
    assert _first_max(ids, list(seen)) < 2, "the probe validates best: the rules must stay within ft"
    sel = r["selections"]
    assert list(sel) == ["id_val", "oracle", "last"]  # the primary rule first, then selection.rules' order
    assert {k: (v["epoch"], v["phase"]) for k, v in sel.items()} == {k: (e, "ft") for k, e in want.items()}
    files = {"id_val": "best", "oracle": "oracle", "last": "final"}
    for name, e in want.items():
        s = sel[name]
        assert s["checkpoint"] == f"checkpoints/{files[name]}-epoch{e}.ckpt"
        assert torch.load(r["run_dir"] / s["checkpoint"], weights_only=True)["epoch"] == e
        assert s["val"] == {"val/id/acc": pytest.approx(ids[e]), "val/ood/mean/acc": pytest.approx(oods[e])}
        assert s["value"] == pytest.approx(oods[e] if name == "oracle" else ids[e])
        assert s["phases"] == ["ft"] and s["primary"] == (name == "id_val")
    assert [s["rule"] for s in sel.values()] == ["max val/id/acc", "max val/ood/mean/acc", "last epoch"]
    # the primary rule's contract is unchanged: selection without `val`, metrics under test/<set>/<metric>
    assert r["selection"] == {k: v for k, v in sel["id_val"].items() if k not in ("val", "primary", "metrics")}
    assert sorted(p.name for p in (r["run_dir"] / "checkpoints").iterdir()) == sorted(
        [f"best-epoch{want['id_val']}.ckpt", f"oracle-epoch{want['oracle']}.ckpt", "final-epoch5.ckpt", "last.ckpt"])


def test_each_rule_is_tested_on_every_set(lp_ft):
    r, last = lp_ft["rules"], lp_ft["last"]
    sets = ["id", "ood/printed", *(f"ood/corrupt_s{s}" for s in range(1, 6)), "ood/mean"]
    plain = {f"test/{s}/{m}" for s in sets for m in ("acc", "nll", "ece")}
    sel = r["selections"]
    for name in ("id_val", "oracle", "last"):
        assert set(sel[name]["metrics"]) == plain
    assert sel["id_val"]["metrics"] == {k: r["metrics"][k] for k in plain}  # the primary: today's keys
    for name in ("oracle", "last"):  # the others: test/<rule>/<set>/<metric> in metrics (and W&B)
        assert {k.replace("test/", f"test/{name}/", 1): v for k, v in sel[name]["metrics"].items()} == {
            k: v for k, v in r["metrics"].items() if k.startswith(f"test/{name}/")}
    # different checkpoints, different test numbers
    assert sel["oracle"]["metrics"]["test/ood/mean/nll"] != sel["id_val"]["metrics"]["test/ood/mean/nll"]
    # the `last` rule beside best is the run whose primary rule is last: same checkpoint, same test metrics
    assert last["selection"]["epoch"] == sel["last"]["epoch"]
    assert last["selection"]["rule"] == "last epoch"
    for k in plain:
        assert sel["last"]["metrics"][k] == pytest.approx(last["metrics"][k], abs=1e-6), k
    # the primary rule's extras (forgetting on the source task) stay the primary checkpoint's alone
    assert "test/source/acc" in r["metrics"] and not any(k.startswith("test/oracle/source") for k in r["metrics"])


def test_rules_survive_a_resume(run, monkeypatch, lp_ft):
    """Killed after epoch 4 (the oracle's pick, after id_val's): the resumed run reports what the whole run did."""
    with monkeypatch.context() as m:
        add_callbacks(m, KillAfter(4))
        with pytest.raises(Killed):
            run(*LP_FT, RULES, name="resumed")
    resumed = run(*LP_FT, RULES, "ckpt_path=last", name="resumed")
    whole = lp_ft["rules"]
    assert [e["from_epoch"] for e in resumed["resumed"]] == [5]
    assert resumed["selections"] == whole["selections"]
    assert resumed["metrics"] == whole["metrics"]


@pytest.mark.parametrize("rules,needle", [
    ("[oracel]", "selection.rules: 'oracel' is not one of id_val, oracle, last; did you mean oracle?"),
    ("[last,last]", "selection.rules=['last', 'last'] names a rule twice"),
])
def test_bad_rules_name_the_value(rules, needle):
    with pytest.raises(ThawlabError, match=needle.replace("[", r"\[").replace("]", r"\]").replace("?", r"\?")):
        check_config(compose_cfg(["logger=none", f"selection.rules={rules}"]))


def test_the_oracle_needs_ood_validation_sets(run):
    with pytest.raises(ThawlabError, match="oracle selects on OOD validation sets, and data=digits has none "
                                           r"\(its validation sets: id\)"):
        run("data.ood=[]", "selection.rules=[oracle]")
    check_ood_validation(["last", "id_val"], ["id"], "cifar10")  # the other rules need none
    with pytest.raises(ThawlabError, match="data=cifar10 has none"):
        check_ood_validation(["oracle"], ["id"], "cifar10")
