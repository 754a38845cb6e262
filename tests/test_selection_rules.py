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


# ---- thawlab-report --rule: a table per rule, the rule in every caption -------------------------------------

def _report_dir(lp_ft, tmp_path):
    """The two runs' results.json (the rules run and the schedule.select=last run) in a directory of their own."""
    import shutil

    for name in ("rules", "last"):
        shutil.copytree(lp_ft[name]["run_dir"], tmp_path / name, ignore=shutil.ignore_patterns("checkpoints"))
    return tmp_path


def test_report_makes_a_table_per_rule(lp_ft, tmp_path):
    from thawlab import report
    from thawlab.report.rules import with_rule

    root = _report_dir(lp_ft, tmp_path)
    sel = lp_ft["rules"]["selections"]
    # selection.rules changes no training (an inert override, never a row factor): the rules run's row is "all"
    last_row, rules_row = "schedule.select=last", "all"

    def table(rule):
        runs = with_rule(report.load([root], include_smoke=True), rule)
        t = report.summarize(runs)
        return t, {r.label: r for r in t.rows}

    t, rows = table("oracle")  # the rules run at its oracle checkpoint; the other run has none: a gap
    assert set(rows) == {last_row, rules_row}
    assert rows[rules_row].cells["ID"].values == [pytest.approx(100 * sel["oracle"]["metrics"]["test/id/acc"])]
    assert rows[rules_row].cells["OOD mean"].values == [
        pytest.approx(100 * sel["oracle"]["metrics"]["test/ood/mean/acc"])]
    assert rows[last_row].n_text == "0 of 1"
    assert "max val/ood/mean/acc within phase ft (the oracle: selected on OOD validation data)" in t.caption
    assert "Selection rule: oracle (--rule)" in t.caption
    assert any("no 'oracle' checkpoint (run it with selection.rules=[oracle])" in n for n in t.notes)
    assert not any(c.key.startswith("test/source/") for c in t.columns), "the source task is the primary's"

    t, rows = table("last")  # both runs at their last epoch: the same checkpoint, the same numbers
    assert rows[rules_row].cells["ID"].values == pytest.approx(rows[last_row].cells["ID"].values, abs=1e-4)
    assert "last epoch of phase ft" in t.caption and "max val/id/acc" not in t.caption

    t, rows = table(None)  # each run's own rule, as before
    assert rows[rules_row].cells["ID"].values == [pytest.approx(100 * lp_ft["rules"]["metrics"]["test/id/acc"])]
    assert "max val/id/acc within phase ft (1 runs)" in t.caption and "last epoch of phase ft (1 runs)" in t.caption
    assert "Selection rule" not in t.caption


def test_report_rule_from_the_cli(lp_ft, tmp_path):
    from conftest import BASE  # noqa: F401  (the runs are smoke runs: --include-smoke)
    from thawlab.report.cli import main

    root = _report_dir(lp_ft, tmp_path)
    assert main([str(root), "--include-smoke", "--no-figures", "--rule", "oracle"]) == 0
    text = (root / "rule_oracle" / "table.md").read_text()
    assert "Selection rule: oracle" in text and "(the oracle: selected on OOD validation data)" in text
    assert not (root / "table.md").exists()  # a rule's table never replaces the default report's
    (root / "rules" / "results.json").unlink()  # left: the run without selections
    assert main([str(root), "--include-smoke", "--no-figures", "--rule", "oracle"]) == 2


# ---- OOD validation on on-disk data: data.ood_val_fraction ----------------------------------------------------

def test_ood_hold_out_is_stratified_disjoint_and_seeded():
    import numpy as np

    from thawlab.data.ood_val import split

    labels = np.repeat([0, 1, 2], [10, 4, 1])
    test, val = split(labels, 0.3, seed=5)
    assert sorted([*test, *val]) == list(range(15)) and not set(test) & set(val)
    assert [int((labels[val] == c).sum()) for c in range(3)] == [3, 1, 0]  # round(0.3 n), one test image kept
    assert [int((labels[test] == c).sum()) for c in range(3)] == [7, 3, 1]
    again, other = split(labels, 0.3, seed=5), split(labels, 0.3, seed=6)
    assert np.array_equal(again[1], val) and not np.array_equal(other[1], val)


def _folders(root):
    from test_datasets import FOLDER_CLASSES, write_images

    write_images(root / "train", FOLDER_CLASSES, 4)
    write_images(root / "test", FOLDER_CLASSES, 2, key=20)
    write_images(root / "ood_sketch", FOLDER_CLASSES, 4, key=30)
    return root


def test_imagefolder_ood_validation_for_the_oracle(run, tmp_path):
    from test_datasets import FAST

    from thawlab.data.folders import ImageFolders
    from thawlab.data.preprocess import Preprocess

    root = _folders(tmp_path / "data")
    dm = ImageFolders(root=str(root), ood={"sketch": "ood_sketch"}, ood_val_fraction=0.5, val_fraction=0.25)
    dm.preprocess = Preprocess(img_size=32)
    dm.setup("fit")
    val, test = dm.sets["val"]["ood/sketch"], dm.sets["test"]["ood/sketch"]
    files = lambda s: {s.dataset.files[i] for i in s.indices}  # noqa: E731
    assert len(files(val)) == len(files(test)) == 6 and not files(val) & files(test)
    assert sorted(dm.sets["val"]) == ["id", "ood/sketch"]

    data = ["data=imagefolder", f"data.root={root}", "data.ood={sketch:ood_sketch}", *FAST, "trainer.max_epochs=2"]
    with pytest.raises(ThawlabError, match="data=imagefolder has none .* data.ood_val_fraction"):
        run(*data, "selection.rules=[oracle]", smoke=False)
    r = run(*data, "data.ood_val_fraction=0.5", "selection.rules=[oracle]", smoke=False)
    assert r["counts"]["val/ood/sketch"] == 6 and r["counts"]["test/ood/sketch"] == 6
    assert r["selections"]["oracle"]["value"] == pytest.approx(r["selections"]["oracle"]["val"]["val/ood/mean/acc"])
    with pytest.raises(ThawlabError, match=r"data.ood_val_fraction=0.1 holds out no image of ood/sketch"):
        run(*data, "data.ood_val_fraction=0.1", "selection.rules=[oracle]", smoke=False)


def test_ddp_oracle_without_ood_validation_is_one_line_before_any_rank(tmp_path, cache_dir):
    from conftest import cli

    r = cli("debug=smoke", "trainer=ddp", "trainer.accelerator=cpu", "logger=none", "data.ood=[]",
            "selection.rules=[oracle]", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, cache=cache_dir)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "rank" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "thawlab-train: error: selection.rules: oracle selects on OOD validation sets, and data=digits has none "
        "(its validation sets: id); on-disk data hold part of each OOD set out for it with data.ood_val_fraction")
    assert not (tmp_path / "run" / "ranks").exists()
