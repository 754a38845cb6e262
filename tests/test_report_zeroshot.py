"""thawlab-report's zero-shot row (thawlab/report/zeroshot.py) on a real sweep of a tiny CLIP with head=zeroshot
(frozen and wise_ft, seeds 0-1, made with `thawlab-train -m`): one row per zero-shot model, its cells the
runs' test/zeroshot figures by hand, paired comparisons against it, its star in the ID vs OOD figure, and what
the caption says when the figures vary across seeds or runs, or the runs hold two zero-shot models."""
from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest

from clip_fixtures import PROMPTS, tiny_clip  # noqa: F401 (a fixture)
from conftest import BASE, cli
from test_report import cli_report, md_rows
from thawlab import clip, report
from thawlab.report import zeroshot as zs

SEEDS = (0, 1)
SCHEDULES = ("frozen", "wise_ft")
SETS = ("id", "ood/printed", "ood/corrupt_s1", "ood/corrupt_s5", "ood/mean")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir, tiny_clip) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("report_zeroshot") / "sweep"
    name = "thawlab-test-vit"
    # one test batch a set, of 256 images (8 of the 10 classes), not smoke's 32 (2 classes: a zero-shot accuracy
    # of 0, which the ID vs OOD figure's logit axes clip)
    p = cli("-m", *BASE, "data.eval_batch_size=256", f"backbone.name=open_clip:{name}",
            f"backbone.pretrained={tiny_clip[name]}", *PROMPTS, "head=zeroshot", f"schedule={','.join(SCHEDULES)}",
            f"seed={','.join(map(str, SEEDS))}", f"hydra.sweep.dir={out}", cwd=out.parent, cache=cache_dir, timeout=300,
            env={"OMP_NUM_THREADS": "1", clip.CONFIGS_ENV: str(Path(tiny_clip[name]).parent)})
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(list(out.glob("*/results.json"))) == len(SEEDS) * len(SCHEDULES)
    return out


@pytest.fixture
def copy(sweep, tmp_path) -> Path:
    dst = tmp_path / "sweep"
    shutil.copytree(sweep, dst, ignore=shutil.ignore_patterns("checkpoints"))
    return dst


def files(root: Path) -> dict[tuple[str, int], Path]:
    return {(r["config"]["schedule"]["name"], r["seed"]): f
            for f in root.glob("*/results.json") for r in [json.loads(f.read_text())]}


def results(root: Path) -> dict[tuple[str, int], dict]:
    return {k: json.loads(f.read_text()) for k, f in files(root).items()}


def change(root: Path, schedule: str, seed: int, fn) -> None:
    f = files(root)[(schedule, seed)]
    r = json.loads(f.read_text())
    fn(r)
    f.write_text(json.dumps(r))


def shift(delta: float):
    """An edit adding delta to every test/zeroshot accuracy of a run."""
    def fn(r):
        for k in r["metrics"]:
            if k.startswith(zs.PREFIX) and k.endswith("/acc"):
                r["metrics"][k] += delta
    return fn


def cell(mean: float, sd: float, decimals: int = 1) -> str:
    return f"{mean:.{decimals}f} ± {sd:.{decimals}f}"


def test_one_zero_shot_row_with_the_runs_figures_and_a_star(sweep, tmp_path):
    res = results(sweep)
    runs = report.load([sweep], include_smoke=True)
    labels = runs.labels()  # the zero-shot row first, once for the 4 runs (the others in the directories' order)
    assert labels[0] == "zero-shot" and sorted(labels[1:]) == ["schedule=frozen", "schedule=wise_ft"]
    row = runs.row("zero-shot")
    assert [r.seed for r in row] == list(SEEDS) and all(len(r.zeroshot_of) == 2 for r in row)
    # the trained rows are what they were without the zero-shot row
    plain = report.load([sweep], include_smoke=True, zeroshot=False)
    assert plain.labels() == labels[1:]
    assert [(r.label, r.seed, r.metrics) for r in plain.runs] == [(r.label, r.seed, r.metrics) for r in runs.runs
                                                                  if not zs.is_zeroshot(r)]
    for metric, scale, decimals in (("acc", 100, 1), ("nll", 1, 3)):
        table = report.summarize(runs, metric=metric)
        rows = md_rows(table.markdown())
        head = ["ID", "OOD printed", "OOD corrupt_s1", "OOD corrupt_s5", "OOD mean"]
        cols = [c.name for c in table.columns]
        for name, s in zip(head, SETS):
            # per seed the mean of its runs (here equal), then mean ± std over seeds, from results.json by hand
            per_seed = [statistics.fmean(res[(sch, k)]["metrics"][f"test/zeroshot/{s}/{metric}"] for sch in SCHEDULES)
                        for k in SEEDS]
            for k in SEEDS:
                assert {res[(sch, k)]["metrics"][f"test/zeroshot/{s}/{metric}"] for sch in SCHEDULES} == \
                       {per_seed[k]}, "the same zero-shot model gave two figures"
            vals = [scale * v for v in per_seed]
            assert rows["zero-shot"][cols.index(name)] == cell(statistics.mean(vals), statistics.stdev(vals),
                                                               decimals), (metric, name)
        assert rows["zero-shot"][-1] == "2"
    # never a baseline of the effective-robustness fit; the caption says the figures are one model's
    assert table.fit.baselines == ["schedule=frozen"]
    assert "Zero-shot: the model before any training" in table.caption
    assert "zero-shot: from 4 runs, every figure identical across runs and seeds" in table.caption
    # the selection rules: of the trained runs only
    assert "whole run (2 runs)" in table.caption and "last epoch of phase ft (2 runs)" in table.caption
    # the zero-shot point is where the WiSE-FT curve starts (alpha = 0: theta_0 is the zero-shot model)
    for k in SEEDS:
        zero = next(p for p in res[("wise_ft", k)]["wise"] if p["alpha"] == 0)["metrics"]
        assert zero["test/wise/0/id/acc"] == pytest.approx(row[k].metrics["test/id/acc"], abs=1e-6)
    assert "θ₀: the zero-shot model" in report.wise_markdown(runs, "schedule=wise_ft")
    # the ID vs OOD figure: the zero-shot row is a star at its mean
    figs = report.figures(runs, rows=None)
    ax = figs.figures["id_vs_ood"].axes[0]
    stars = [ln for ln in ax.get_lines() if ln.get_marker() == "*"]
    assert len(stars) == 1
    x, y = stars[0].get_xdata()[0], stars[0].get_ydata()[0]
    assert x == pytest.approx(statistics.fmean(r.metrics["test/id/acc"] for r in row))
    assert y == pytest.approx(statistics.fmean(r.metrics["test/ood/mean/acc"] for r in row))
    assert any("zero-shot (n=2) · the model before" in t.get_text() for t in ax.get_legend().get_texts())


def test_paired_comparison_against_the_zero_shot_model_from_the_cli(copy, tmp_path):
    res = results(copy)
    for k in SEEDS:  # figures that differ by seed (a split that changes with it): the pairing must follow seeds
        for sch in SCHEDULES:
            change(copy, sch, k, shift(0.01 * k))
    res = results(copy)
    out = tmp_path / "report"
    p = cli_report(copy, "--out", out, "--compare", "schedule=wise_ft", "zero-shot", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    text = (out / "paired_schedule=wise_ft_vs_zero-shot.md").read_text()
    for name, key in (("ID", "id/acc"), ("OOD printed", "ood/printed/acc"), ("OOD mean", "ood/mean/acc")):
        diffs = [100 * (res[("wise_ft", k)]["metrics"][f"test/{key}"] - res[("wise_ft", k)]["metrics"]
                        [f"test/zeroshot/{key}"]) for k in SEEDS]
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:3] == [f"{d:+.1f}" for d in diffs], name
        assert cells[3] == f"{statistics.mean(diffs):+.1f} ± {statistics.stdev(diffs):.1f}"
        wins, ties = sum(d > 0 for d in diffs), sum(d == 0 for d in diffs)
        assert cells[-1] == f"{wins} of 2" + (f" ({ties} tied)" if ties else "")
    table = (out / "table.md").read_text()
    assert "zero-shot: from 4 runs; its figures differ across seeds (up to 0.01 in test/" in table
    assert md_rows(table)["zero-shot"][0] == cell(*(lambda v: (statistics.mean(v), statistics.stdev(v)))(
        [100 * res[("frozen", k)]["metrics"]["test/zeroshot/id/acc"] for k in SEEDS]))
    # the row can be chosen, renamed and ordered like any other
    p = cli_report(copy, "--out", out, "--no-figures", "--rows", "wise_ft", "zero-shot", "--label",
                   "zero-shot=CLIP zero-shot", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert list(md_rows((out / "table.md").read_text())) == ["schedule=wise_ft", "CLIP zero-shot"]


def test_runs_of_one_seed_that_disagree_are_named(copy):
    change(copy, "frozen", 0, shift(0.02))
    res = results(copy)
    runs = report.load([copy], include_smoke=True)
    seed0 = runs.row("zero-shot")[0]
    assert seed0.metrics["test/id/acc"] == pytest.approx(statistics.fmean(
        res[(s, 0)]["metrics"]["test/zeroshot/id/acc"] for s in SCHEDULES))
    table = report.summarize(runs)
    assert any("zero-shot: runs of one seed report different test/zeroshot figures (up to 0.02)" in n
               for n in table.notes)


def test_two_zero_shot_models_are_two_rows_named_by_what_differs(copy, tmp_path):
    def other_weights(r):
        r["config"]["backbone"]["pretrained"] = "laion"
        shift(0.05)(r)
    for k in SEEDS:
        change(copy, "frozen", k, other_weights)
        # settings that do not change the zero-shot model or its test sets do not split it
        change(copy, "wise_ft", k, lambda r: r["config"]["data"].update(batch_size=7, augment="crop_flip"))
    res = results(copy)
    runs = report.load([copy], include_smoke=True)
    weights = res[("wise_ft", 0)]["config"]["backbone"]["pretrained"]
    assert len(weights) > 40  # a long value is shown as a digest
    labels = runs.labels()
    assert sorted(labels[:2]) == sorted([f"zero-shot[backbone.pretrained={zs._text(weights)}]",
                                         "zero-shot[backbone.pretrained=laion]"])
    assert zs._text(weights).startswith("#") and len(runs.row("zero-shot[backbone.pretrained=laion]")) == 2
    laion = runs.row("zero-shot[backbone.pretrained=laion]")
    assert [r.metrics["test/id/acc"] for r in laion] == [res[("frozen", k)]["metrics"]["test/zeroshot/id/acc"]
                                                         for k in SEEDS]
    assert all(r.zeroshot_of[0].get("schedule.name") == "frozen" for r in laion)
    # --tune keeps the zero-shot rows as they are (the zero-shot model has no hyperparameter)
    tuned = report.tune(runs, "optimizer.lr")
    assert tuned.labels()[:2] == labels[:2] and len(tuned.row(labels[1])) == len(SEEDS)
    assert sorted(r.label for r in tuned.runs if not zs.is_zeroshot(r)) == sorted(
        r.label for r in runs.runs if not zs.is_zeroshot(r))


def test_failed_seed_is_a_gap_and_no_zero_shot_figures_no_row(copy):
    for sch in SCHEDULES:  # a failed run has no metrics: at seed 1 no run evaluated the zero-shot model
        change(copy, sch, 1, lambda r: r.update(status="failed", error="RuntimeError: boom", metrics={}, counts={},
                                               selection=None, wise=None))
    runs = report.load([copy], include_smoke=True)
    row = runs.row("zero-shot")
    assert [(r.seed, r.status) for r in row] == [(0, "done"), (1, "missing")]
    table = report.summarize(runs)
    assert next(r for r in table.rows if r.label == "zero-shot").n_text == "1 of 2"
    assert any(n.startswith("zero-shot, seed 1: missing: no finished run of this seed evaluated") for n in table.notes)
    for sch in SCHEDULES:
        change(copy, sch, 0, lambda r: r.update(metrics={k: v for k, v in r["metrics"].items()
                                                         if not k.startswith(zs.PREFIX)}))
    assert "zero-shot" not in report.load([copy], include_smoke=True).labels()
