"""thawlab-report on a real smoke sweep (frozen and wise_ft, seeds 0-2, made with `thawlab-train -m`): the
table's rows, n and values against hand computations from the results.json files, failed and missing seeds as
gaps, effective robustness by hand, paired win counts, the LaTeX and CSV, the figures, and bad input."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import thawlab
from conftest import BASE, cli
from thawlab import report

SEEDS = (0, 1, 2)
SCHEDULES = ("frozen", "wise_ft")
ROWS = [f"schedule={s}" for s in SCHEDULES]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir) -> Path:
    """A real sweep, once for the module; the pretraining cache is the session's (THAWLAB_CACHE)."""
    out = tmp_path_factory.mktemp("report") / "sweep"
    p = cli("-m", *BASE, f"schedule={','.join(SCHEDULES)}", f"seed={','.join(map(str, SEEDS))}",
            f"hydra.sweep.dir={out}", cwd=out.parent, cache=cache_dir, timeout=300,
            env={"OMP_NUM_THREADS": "1"})  # on a shared 2-core machine, spinning OpenMP threads cost minutes
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(list(out.glob("*/results.json"))) == len(SEEDS) * len(SCHEDULES)
    return out


@pytest.fixture
def copy(sweep, tmp_path) -> Path:
    """The sweep's results (without checkpoints) in a directory this test may change."""
    dst = tmp_path / "sweep"
    shutil.copytree(sweep, dst, ignore=shutil.ignore_patterns("checkpoints"))
    return dst


def results(root: Path) -> dict[tuple[str, int], dict]:
    out = {}
    for f in root.glob("*/results.json"):
        r = json.loads(f.read_text())
        out[(r["config"]["schedule"]["name"], r["seed"])] = r | {"file": f}
    return out


def edit(root: Path, schedule: str, seed: int, **fields) -> Path:
    f = results(root)[(schedule, seed)]["file"]
    r = json.loads(f.read_text())
    r.update(fields)
    f.write_text(json.dumps(r))
    return f


def fail(root: Path, schedule: str, seed: int, error: str) -> Path:
    """What a failed run leaves: status failed, its error, no metrics, no `done`."""
    f = edit(root, schedule, seed, status="failed", error=error, metrics={}, counts={}, selection=None, wise=None)
    (f.parent / "done").unlink()
    return f


def cli_report(*args, cwd: Path, smoke: bool = True) -> subprocess.CompletedProcess:
    """`python -m thawlab.report` as a user runs it, on this checkout's code (on the smoke fixture: with
    --include-smoke unless smoke=False)."""
    env = {**os.environ, "PYTHONPATH": str(Path(thawlab.__file__).parents[1]), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "thawlab.report", *map(str, args),
                           *(["--include-smoke"] if smoke else [])], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=env)


def load(paths, **kw) -> report.Runs:
    """report.load on the smoke fixture: its runs are smoke runs, reported only when asked for."""
    return report.load(paths, **{"include_smoke": True, **kw})


def main(argv: list[str]) -> int:
    return report.main([*argv, "--include-smoke"])


def md_rows(text: str, bold: bool = False) -> dict[str, list[str]]:
    """table.md's data rows: label -> cells (header and separator left out; bold marks removed unless bold)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    return {cells[0]: [c if bold else c.removeprefix("**").removesuffix("**") for c in cells[1:]]
            for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:])}


def hand_er(pts, runs_all, key_id="test/id/acc", key_ood="test/ood/mean/acc"):
    """Effective robustness by hand: OLS on logit axes through `pts`, then OOD − sigmoid(a logit(ID) + b)."""
    def clipped(r, key, n):
        e = 0.5 / n
        return min(max(r["metrics"][key], e), 1 - e)

    def n_ood(r):
        return sum(v for k, v in r["counts"].items() if k.startswith("test/ood/"))

    lg = lambda p: math.log(p / (1 - p))  # noqa: E731
    xs = [lg(clipped(r, key_id, r["counts"]["test/id"])) for r in pts]
    ys = [lg(clipped(r, key_ood, n_ood(r))) for r in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    b = my - a * mx
    er = [r["metrics"][key_ood] - 1 / (1 + math.exp(-(a * lg(clipped(r, key_id, r["counts"]["test/id"])) + b)))
          for r in runs_all]
    return a, b, er


def test_table_figures_and_paired_file_from_the_cli(sweep, copy, tmp_path):
    out = tmp_path / "report"
    p = cli_report(sweep, "--out", out, "--compare", "wise_ft", "schedule=frozen", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    res = results(sweep)
    text = (out / "table.md").read_text()
    rows = md_rows(text)
    assert list(rows) == ROWS  # the sweep's order; labelled by the only varying override
    head = [c.strip() for c in next(ln for ln in text.splitlines() if ln.startswith("| ")).strip("|").split("|")]
    assert head == ["row", "ID", "OOD printed", *[f"OOD corrupt_s{k}" for k in range(1, 6)], "OOD mean", "ECE ID",
                    "source task", "distortion OOD/ID", "eff. robustness", "n"]
    for s in SCHEDULES:
        cells = dict(zip(head[1:], rows[f"schedule={s}"]))
        assert cells["n"] == "3"
        for col, key in (("ID", "test/id/acc"), ("OOD printed", "test/ood/printed/acc"),
                         ("OOD mean", "test/ood/mean/acc"), ("ECE ID", "test/id/ece")):
            vals = [100 * res[(s, k)]["metrics"][key] for k in SEEDS]
            assert cells[col] == f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}", (s, col)
        # LP-FT's feature distortion of the selected checkpoint (results.json diagnostics), unmarked
        # (a linear probe's body does not move: no ratio)
        vals = [res[(s, k)]["diagnostics"]["final"]["distortion"]["ood/mean"] for k in SEEDS]
        assert cells["distortion OOD/ID"] == ("–" if s == "frozen" else
                                              f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"), s
    # the caption: spread, selection rule, ER formula and baselines, common overrides
    assert "mean ± std (sample std, n−1)" in text and "max val/id/acc" in text
    assert "σ(a · logit(ID acc) + b)" in text and "baseline rows schedule=frozen" in text
    assert "clipped to [0.5/n, 1 − 0.5/n]" in text and "debug=smoke" in text
    # LaTeX: a booktabs tabular with escaped underscores, one line per row, each value split at ±
    tex = (out / "table.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 1 and tex.count(r"\end{tabular}") == 1
    assert tex.index(r"\begin{tabular}") < tex.index(r"\end{tabular}")
    assert r"schedule=wise\_ft &" in tex and r"OOD corrupt\_s1" in tex and r"$\pm$" in tex
    assert re.search(r"(?<!\\)_", tex) is None and r"\caption{" in tex
    assert all(x in tex for x in (r"\toprule", r"\midrule", r"\bottomrule", r"\resizebox", r"\begin{table*}"))
    body = tex[tex.index(r"\begin{tabular}"):tex.index(r"\end{tabular}")]
    lines = [ln for ln in body.splitlines() if ln.endswith(r"\\")]
    assert lines[0].count("&") == len(head) - 1 and lines[0].count(r"\multicolumn{2}{c}") == len(head) - 2
    # (an empty cell, `--` across both halves: the linear probe's undefined distortion ratio)
    assert all(ln.count("&") + ln.count(r"\multicolumn{2}{c}{--}") == len(head) - 1 + len(head) - 2
               for ln in lines[1:])
    # CSV: unrounded means and stds
    with open(out / "table.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["row"] for r in table] == ROWS and [r["name"] for r in table] == ROWS
    for r, s in zip(table, SCHEDULES):
        vals = [100 * res[(s, k)]["metrics"]["test/ood/mean/acc"] for k in SEEDS]
        assert float(r["OOD mean (acc %) mean"]) == pytest.approx(statistics.mean(vals), abs=1e-9)
        assert float(r["OOD mean (acc %) std"]) == pytest.approx(statistics.stdev(vals), abs=1e-9)
        assert (r["n_finished"], r["n_expected"]) == ("3", "3")
    # figures: non-empty PNG and PDF each
    for name in ("id_vs_ood", "wise", "severity", "drift"):
        png, pdf = (out / f"{name}.png").read_bytes(), (out / f"{name}.pdf").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000, name
        assert pdf.startswith(b"%PDF") and len(pdf) > 5_000, name
    # the WiSE-FT curve as a table: per alpha, mean ± std over seeds and paired wins against alpha = 1
    wise = (out / "wise_schedule=wise_ft.md").read_text()
    line = next(ln for ln in wise.splitlines() if ln.startswith("| 0.5 |"))
    vals = [100 * next(p for p in res[("wise_ft", k)]["wise"] if p["alpha"] == 0.5)["metrics"]
            ["test/wise/0.5/ood/printed/acc"] for k in SEEDS]
    ends = [100 * next(p for p in res[("wise_ft", k)]["wise"] if p["alpha"] == 1.0)["metrics"]
            ["test/wise/1/ood/printed/acc"] for k in SEEDS]
    wins = sum(v > e for v, e in zip(vals, ends))
    assert f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f} ({wins}/3)" in line.split("|")[3]
    assert not (out / "wise_schedule=frozen.md").exists()
    # the paired file, named as typed, and the same on the terminal
    paired_md = (out / "paired_wise_ft_vs_schedule=frozen.md").read_text()
    assert "| OOD mean |" in paired_md and paired_md.splitlines()[0] in p.stdout
    # the default output directory: next to the runs
    p = cli_report(copy, "--no-figures", cwd=tmp_path)
    assert p.returncode == 0 and (copy / "table.md").read_text() == text


def test_failed_killed_and_absent_seeds_are_gaps_that_lower_n(copy):
    res = results(copy)
    fail(copy, "wise_ft", 1, "ThawlabError: schedule.lp_epochs=9 must leave both phases an epoch of the 3")
    killed = res[("frozen", 2)]["file"]
    killed.unlink()  # killed: its directory (.hydra) without results.json
    runs = load([copy])
    assert sorted((r.label, r.seed, r.status) for r in runs.runs if not r.done) == [
        ("schedule=frozen", 2, "missing"), ("schedule=wise_ft", 1, "failed")]
    table = report.summarize(runs)
    by = {r.label: r for r in table.rows}
    assert (by["schedule=wise_ft"].n, by["schedule=wise_ft"].expected, by["schedule=wise_ft"].n_text) == (2, 3, "2 of 3")
    assert by["schedule=frozen"].n_text == "2 of 3"
    # the mean is over the seeds that finished, never over a zero for the failed one
    vals = [100 * res[("wise_ft", k)]["metrics"]["test/id/acc"] for k in (0, 2)]
    assert by["schedule=wise_ft"].cells["ID"].values == pytest.approx(vals)
    assert by["schedule=wise_ft"].cells["ID"].mean == pytest.approx(statistics.mean(vals))
    md = table.markdown()
    assert md_rows(md)["schedule=wise_ft"][-1] == "2 of 3"
    assert "schedule=wise_ft, seed 1: failed: ThawlabError: schedule.lp_epochs=9" in md
    assert f"schedule=frozen, seed 2: missing: no results.json (killed, or still running) [{killed.parent}]" in md
    assert "schedule.lp\\_epochs=9" in table.latex()
    # a seed no configuration but one ran: expected of every configuration, a gap where it has no run
    extra = copy / "extra"
    shutil.copytree(res[("frozen", 0)]["file"].parent, extra)
    (extra / "results.json").write_text(json.dumps(json.loads((extra / "results.json").read_text()) | {"seed": 7}))
    table = report.summarize(load([copy]))
    by = {r.label: r for r in table.rows}
    assert by["schedule=wise_ft"].n_text == "2 of 4" and by["schedule=frozen"].n_text == "3 of 4"
    assert "schedule=wise_ft, seed 7: missing: no run of this seed" in table.markdown()


def test_effective_robustness_is_the_logit_fit_computed_by_hand(copy):
    res = results(copy)
    runs = load([copy])
    assert report.default_baselines(runs) == ["schedule=frozen"]
    everyone = [res[(s, k)] for s in SCHEDULES for k in SEEDS]
    a, b, er = hand_er(everyone, everyone)  # both rows as baselines: six points
    fit = report.effective_robustness(runs, baselines=["frozen", "wise_ft"])
    assert fit.ok and (fit.a, fit.b) == (pytest.approx(a, rel=1e-9), pytest.approx(b, rel=1e-9))
    table = report.summarize(runs, baselines=["frozen", "wise_ft"])
    for i, row in enumerate(table.rows):
        hand = [100 * e for e in er[3 * i:3 * i + 3]]
        assert row.cells["eff. robustness"].values == pytest.approx(hand, abs=1e-9)
        assert row.cells["eff. robustness"].mean == pytest.approx(statistics.mean(hand), abs=1e-9)
    assert f"a = {a:.3f}, b = {b:.3f}" in table.caption and "schedule=frozen, schedule=wise_ft" in table.caption
    # the fit is impossible with fewer than two distinct ID accuracies: a gap, and the caption says why
    for k in SEEDS:
        m = res[("frozen", k)]["metrics"] | {"test/id/acc": 0.5}
        edit(copy, "frozen", k, metrics=m)
    table = report.summarize(load([copy]))
    assert not table.fit.ok and all(r.cells["eff. robustness"].mean is None for r in table.rows)
    assert "fewer than two distinct ID accuracies" in table.caption
    assert [row[-2] for row in md_rows(table.markdown()).values()] == ["–", "–"]


def test_paired_differences_and_win_counts(copy, capsys):
    res = results(copy)
    fail(copy, "frozen", 2, "RuntimeError: boom")
    runs = load([copy])
    p = report.paired(runs, "wise_ft", "frozen", "test/ood/printed/acc")
    diffs = [100 * (res[("wise_ft", k)]["metrics"]["test/ood/printed/acc"]
                    - res[("frozen", k)]["metrics"]["test/ood/printed/acc"]) for k in (0, 1)]
    assert p.seeds == [0, 1] and p.diffs == pytest.approx(diffs) and p.n == 2
    assert p.wins == sum(d > 0 for d in diffs) and p.ties == sum(d == 0 for d in diffs)
    assert p.unpaired == ["seed 2 (schedule=frozen failed)"]
    ece = report.paired(runs, "wise_ft", "frozen", "test/id/ece")  # lower is better
    d = [res[("wise_ft", k)]["metrics"]["test/id/ece"] - res[("frozen", k)]["metrics"]["test/id/ece"] for k in (0, 1)]
    assert ece.wins == sum(x < 0 for x in d)
    # a diagnostic with no better direction (LP-FT's distortion ratio) counts the seeds in which A is lower and
    # says so: give the probe (whose body does not move: no ratio) ratios on both sides of WiSE-FT's
    for seed, shift in ((0, +0.1), (1, -0.1)):
        diag = res[("frozen", seed)]["diagnostics"]
        diag["final"]["distortion"]["ood/mean"] = res[("wise_ft", seed)]["diagnostics"]["final"]["distortion"][
            "ood/mean"] + shift
        edit(copy, "frozen", seed, diagnostics=diag)
    # the CLI writes and prints the same
    rc = main([str(copy), "--no-figures", "--compare", "schedule=wise_ft", "frozen"])
    assert rc == 0
    text = (copy / "paired_schedule=wise_ft_vs_frozen.md").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("| OOD printed |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    assert cells[1:3] == [f"{diffs[0]:+.1f}", f"{diffs[1]:+.1f}"] and cells[3] == f"{mean:+.1f} ± {sd:.1f}"
    assert cells[-1] == f"{p.wins} of 2" + (f" ({p.ties} tied)" if p.ties else "")
    line = next(ln for ln in text.splitlines() if ln.startswith("| distortion OOD/ID |"))
    assert line.strip("|").split("|")[-1].strip() == "lower in 1 of 2"
    assert "Not paired: seed 2 (schedule=frozen failed)." in text and text.splitlines()[0] in capsys.readouterr().out


def test_group_by_rows_metric_and_se(copy, capsys):
    res = results(copy)
    rc = main([str(copy), "--out", str(copy / "r"), "--group-by", "schedule.name", "--rows", "wise_ft",
                      "frozen", "--metric", "nll", "--se"])
    assert rc == 0
    out = capsys.readouterr().out
    text = (copy / "r" / "table.md").read_text()
    rows = md_rows(text)
    assert list(rows) == ["schedule.name=wise_ft", "schedule.name=frozen"]
    vals = [res[("frozen", k)]["metrics"]["test/ood/mean/nll"] for k in SEEDS]
    se = statistics.stdev(vals) / math.sqrt(3)
    assert rows["schedule.name=frozen"][7] == f"{statistics.mean(vals):.3f} ± {se:.3f}"
    assert "mean ± s.e." in text and "negative log-likelihood in nats" in text
    with open(copy / "r" / "table.csv") as f:
        assert "OOD mean (nll nats) se" in next(csv.reader(f))
    # one row shown: the figures without data for it are skipped with a note
    capsys.readouterr()
    assert main([str(copy), "--out", str(copy / "f"), "--rows", "frozen"]) == 0
    assert "note: wise figure skipped: no run has a WiSE-FT curve" in capsys.readouterr().out
    assert (copy / "f" / "id_vs_ood.png").stat().st_size > 0 and not (copy / "f" / "wise.png").exists()


def test_no_results_and_unknown_labels_are_one_line_exit_2(copy, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    p = cli_report(empty, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and str(empty) in p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    p = cli_report(copy, "--rows", "frozen", "gradual", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr
    assert "'gradual'" in p.stderr and "schedule=frozen, schedule=wise_ft" in p.stderr
    assert main([str(copy), "--compare", "wise_ft", "ful"]) == 2
    assert main([str(copy), "--baselines", "nope"]) == 2
    assert not (copy / "table.md").exists()  # nothing written


def test_corrupt_results_are_named_and_the_rest_reported_exit_1(copy, tmp_path):
    res = results(copy)
    bad_json = res[("wise_ft", 2)]["file"]
    bad_json.write_text('{"status": "done", "metrics": {')
    no_metrics = res[("frozen", 1)]["file"]
    r = json.loads(no_metrics.read_text())
    del r["metrics"]
    no_metrics.write_text(json.dumps(r))
    p = cli_report(copy, "--no-figures", cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"{bad_json}: not valid JSON" in p.stderr and f"{no_metrics}: not a thawlab results file (missing " \
                                                         f"metrics)" in p.stderr
    rows = md_rows((copy / "table.md").read_text())
    assert rows["schedule=wise_ft"][-1] == "2 of 3" and rows["schedule=frozen"][-1] == "2 of 3"
    assert f"left out {bad_json}: not valid JSON" in (copy / "table.md").read_text()


def test_incompatible_runs_leave_the_largest_group_exit_1(copy, capsys):
    res = results(copy)
    other_data = res[("frozen", 0)]["file"]
    r = json.loads(other_data.read_text())
    r["config"]["data"]["_target_"] = "mydata.Other"
    other_data.write_text(json.dumps(r))
    other_sets = edit(copy, "wise_ft", 1, metrics={k.replace("/printed/", "/handwritten/"): v
                                                   for k, v in res[("wise_ft", 1)]["metrics"].items()})
    assert main([str(copy), "--no-figures"]) == 1
    err = capsys.readouterr().err
    assert f"{other_data}: incompatible with the 4 reported runs: data._target_ mydata.Other" in err
    assert f"{other_sets}: incompatible with the 4 reported runs: other evaluation sets (has handwritten; " \
           f"lacks printed)" in err
    text = (copy / "table.md").read_text()
    assert [row[-1] for row in md_rows(text).values()] == ["2 of 3", "2 of 3"]
    assert f"left out {other_data}: incompatible" in text and "OOD handwritten" not in text


def test_tune_keeps_per_row_the_value_best_on_id_validation(copy):
    """--tune KEY: per row, the KEY value whose selected checkpoints score best on ID validation, mean over seeds."""
    # two lrs per schedule: seed 2 "ran" at lr 0.1, best on validation for frozen, worst for wise_ft
    for (s, seed), r in results(copy).items():
        if seed == 2:
            edit(copy, s, seed, config={**r["config"], "optimizer": {**r["config"]["optimizer"], "lr": 0.1}},
                 overrides=[*r["overrides"], "optimizer.lr=0.1"],
                 selection={**r["selection"], "value": 1.0 if s == "frozen" else 0.0})
    runs = report.tune(load([copy]), "optimizer.lr")
    assert sorted(runs.labels()) == ["schedule=frozen", "schedule=wise_ft"]
    assert runs.tuned["schedule=frozen"][1] == "0.1" and runs.tuned["schedule=wise_ft"][1] != "0.1"
    assert [r.seed for r in runs.row("schedule=frozen") if r.done] == [2]  # seeds 0, 1 of lr 0.1: gaps
    table = report.summarize(runs)
    assert "optimizer.lr chosen per row on ID validation" in table.caption and "schedule=frozen: 0.1" in table.caption
    with pytest.raises(report.ReportError, match="--tune nope.key: no run's config has this key"):
        report.tune(load([copy]), "nope.key")


# ------------------------------------------------------------------------------- inert overrides and --group-by

def test_a_resumed_run_is_the_same_configuration_and_seed(copy):
    """ckpt_path=last (and a logger or hydra override) added by a resume never makes a row of its own."""
    r = results(copy)[("frozen", 1)]
    edit(copy, "frozen", 1, overrides=[o for o in r["overrides"] if not o.startswith("logger=")]
         + ["ckpt_path=last", "hydra.run.dir=/somewhere", "hydra/launcher=basic"])
    for group_by in (None, ["schedule.name"]):
        runs = load([copy], group_by=group_by)
        table = report.summarize(runs)
        assert len(table.rows) == 2 and all(row.n_text == "3" for row in table.rows), group_by
        assert ": missing:" not in table.markdown()
    runs = load([copy])
    assert runs.labels() == ROWS
    assert {"ckpt_path=last", "hydra.run.dir=/somewhere"} <= set(runs.inert)
    assert "not row factors: " in report.summarize(runs).caption
    assert report.inert("~logger") and report.inert("data.num_workers=4") and not report.inert("data.shift=x")


def test_group_by_counts_runs_not_configurations(copy):
    """A row merging configurations (--group-by) lacks a seed only when none of them ran it: the 3-of-6 bug."""
    r = results(copy)[("frozen", 1)]
    edit(copy, "frozen", 1, overrides=[*r["overrides"], "trainer.deterministic=true"])  # a real factor
    by = {row.label: row for row in report.summarize(load([copy])).rows}
    assert by["schedule=frozen"].n_text == "2 of 3" and by["schedule=frozen,trainer.deterministic=true"].n_text \
        == "1 of 3"  # without --group-by: two configurations, each with its gaps
    table = report.summarize(load([copy], group_by=["schedule.name"]))
    by = {row.label: row for row in table.rows}
    assert by["schedule.name=frozen"].n_text == "3" and ": missing:" not in table.markdown()
    assert sorted(x.seed for x in by["schedule.name=frozen"].runs) == [0, 1, 2]
    # a seed that no run of the row has is still a gap
    shutil.rmtree(results(copy)[("frozen", 2)]["file"].parent)
    table = report.summarize(load([copy], group_by=["schedule.name"]))
    by = {row.label: row for row in table.rows}
    assert by["schedule.name=frozen"].n_text == "2 of 3"
    assert "schedule.name=frozen, seed 2: missing: no run of this seed" in table.markdown()


# ------------------------------------------------------------------------------------------------ smoke runs

def real(root: Path, schedule: str, seed: int) -> None:
    """Make a smoke run look like a real one: no debug override, no trainer limits."""
    r = results(root)[(schedule, seed)]
    trainer = {**r["config"]["trainer"], **{k: None for k in report.SMOKE_LIMITS}}
    edit(root, schedule, seed, config={**r["config"], "trainer": trainer, "debug": None}, debug=None,
         overrides=[o for o in r["overrides"] if o != "debug=smoke"])


def test_smoke_runs_are_left_out_unless_asked_for(copy, tmp_path):
    p = cli_report(copy, "--no-figures", cwd=tmp_path, smoke=False)  # every run a smoke run: nothing to report
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "all 6 runs are smoke runs" in p.stderr
    assert "--include-smoke" in p.stderr and not (copy / "table.md").exists()
    for k in SEEDS:
        real(copy, "frozen", k)
        r = results(copy)[("wise_ft", k)]  # still a smoke run by its trainer limits alone (as results.json
        # files written before thawlab marked smoke runs: debug null, no debug override)
        edit(copy, "wise_ft", k, config={**r["config"], "debug": None}, debug=None,
             overrides=[o for o in r["overrides"] if o != "debug=smoke"])
    p = cli_report(copy, "--no-figures", cwd=tmp_path, smoke=False)
    assert p.returncode == 0, p.stderr
    assert f"warning: left out 3 smoke run(s) under {copy.resolve()}" in p.stderr
    assert "trainer.limit_train_batches=2" in p.stderr  # the fallback: results.json has debug null
    text = (copy / "table.md").read_text()
    assert list(md_rows(text)) == ["all"] and md_rows(text)["all"][-1] == "3"
    assert "left out 3 smoke run(s)" in text
    # config.debug, as the training side records it, is enough on its own
    r = results(copy)[("frozen", 0)]
    edit(copy, "frozen", 0, config={**r["config"], "debug": "smoke"})
    runs = report.load([copy])
    assert len(runs.done) == 2 and sorted(x.smoke for x in runs.smoke)[0] == "debug=smoke"
    assert len(report.load([copy], include_smoke=True).done) == 6
    assert "Includes 4 smoke runs (not results)" in report.summarize(report.load([copy], include_smoke=True)).caption
    # a full limit (float 1.0) is not a smoke run; an int 1 is one batch
    assert report.smoke_reason({"trainer": {"limit_test_batches": 1.0}}) is None
    assert report.smoke_reason({"trainer": {"limit_test_batches": 1}}) == "trainer.limit_test_batches=1"


# ------------------------------------------------------------------------- effective robustness: per set, testbed

def _lg(p):
    return math.log(p / (1 - p))


def _clip(p, n):
    return min(max(p, 0.5 / n), 1 - 0.5 / n)


def test_per_set_effective_robustness_matches_scipy_linregress(copy):
    from scipy import stats

    res = results(copy)
    runs = load([copy])
    sets = runs.ood_sets()
    fit = report.effective_robustness(runs, baselines=["frozen", "wise_ft"], mode="per-set")
    assert fit.ok and list(fit.lines) == sets
    everyone = [res[(s, k)] for s in SCHEDULES for k in SEEDS]
    xs = [_lg(_clip(r["metrics"]["test/id/acc"], r["counts"]["test/id"])) for r in everyone]
    per_set = {}
    for s in sets:
        ys = [_lg(_clip(r["metrics"][f"test/ood/{s}/acc"], r["counts"][f"test/ood/{s}"])) for r in everyone]
        lr = stats.linregress(xs, ys)
        assert fit.lines[s] == (pytest.approx(lr.slope, rel=1e-9), pytest.approx(lr.intercept, rel=1e-9, abs=1e-12))
        per_set[s] = [r["metrics"][f"test/ood/{s}/acc"] - 1 / (1 + math.exp(-(lr.slope * x + lr.intercept)))
                      for r, x in zip(everyone, xs)]
    table = report.summarize(runs, baselines=["frozen", "wise_ft"], er_fit="per-set")
    assert [c.name for c in table.columns][-len(sets) - 1:] == [f"ER {s}" for s in sets] + ["eff. robustness"]
    for i, row in enumerate(table.rows):
        for s in sets:
            assert row.cells[f"ER {s}"].values == pytest.approx([100 * e for e in per_set[s][3 * i:3 * i + 3]])
        mean_er = [100 * statistics.fmean(per_set[s][j] for s in sets) for j in range(3 * i, 3 * i + 3)]
        assert row.cells["eff. robustness"].values == pytest.approx(mean_er)
    assert "fit: baseline rows, per OOD set" in table.caption and "a_s · logit(ID acc) + b_s" in table.caption
    pair = report.paired(runs, "wise_ft", "frozen", f"er/{sets[0]}", baselines=["frozen", "wise_ft"])
    assert pair.diffs == pytest.approx([100 * (per_set[sets[0]][3 + k] - per_set[sets[0]][k]) for k in SEEDS])
    assert "fit: baseline rows, OOD mean" in report.summarize(runs).caption


TESTBED = """# EXAMPLE: made-up accuracies, the format only
model,id,printed,corrupt_s1,corrupt_s2,corrupt_s3,corrupt_s4,corrupt_s5,extra
m1,0.50,0.40,0.45,0.42,0.38,0.33,0.30,9
m2,0.70,0.55,0.62,0.58,0.50,0.44,0.41,9
m3,0.85,0.71,0.80,0.74,0.66,0.57,0.52,9
m4,0.93,0.80,0.90,0.85,0.77,0.70,0.61,9
"""


def test_testbed_fit_matches_scipy_linregress(copy, tmp_path):
    from scipy import stats

    bed = tmp_path / "testbed.csv"
    bed.write_text(TESTBED)
    res = results(copy)
    runs = load([copy])
    sets = runs.ood_sets()
    rows = [dict(zip(TESTBED.splitlines()[1].split(","), ln.split(","))) for ln in TESTBED.splitlines()[2:]]
    r0 = res[("frozen", 0)]
    n_id, n_ood = r0["counts"]["test/id"], sum(v for k, v in r0["counts"].items() if k.startswith("test/ood/"))
    xs = [_lg(_clip(float(m["id"]), n_id)) for m in rows]
    ys = [_lg(_clip(statistics.fmean(float(m[s]) for s in sets), n_ood)) for m in rows]
    lr = stats.linregress(xs, ys)
    fit = report.effective_robustness(runs, testbed=bed)
    assert (fit.a, fit.b) == (pytest.approx(lr.slope, rel=1e-9), pytest.approx(lr.intercept, rel=1e-9))
    r = res[("wise_ft", 1)]
    run = next(x for x in runs.runs if x.seed == 1 and x.label == "schedule=wise_ft")
    hand = r["metrics"]["test/ood/mean/acc"] - 1 / (1 + math.exp(-(lr.slope * _lg(
        _clip(r["metrics"]["test/id/acc"], n_id)) + lr.intercept)))
    assert fit.per_run[run] == pytest.approx(hand, rel=1e-9)
    pfit = report.effective_robustness(runs, testbed=bed, mode="per-set")
    for s in sets:
        lr_s = stats.linregress(xs, [_lg(_clip(float(m[s]), r0["counts"][f"test/ood/{s}"])) for m in rows])
        assert pfit.lines[s] == (pytest.approx(lr_s.slope, rel=1e-9), pytest.approx(lr_s.intercept, rel=1e-9))
    # the CLI: the caption names the fit
    assert main([str(copy), "--no-figures", "--testbed", str(bed), "--er-fit", "per-set"]) == 0
    text = (copy / "table.md").read_text()
    assert "fit: testbed file, per OOD set" in text and "the 4 models of the testbed testbed.csv" in text
    assert main([str(copy), "--out", str(tmp_path / "fig"), "--testbed", str(bed)]) == 0
    assert (tmp_path / "fig" / "id_vs_ood.png").stat().st_size > 0


def test_bad_testbeds_are_one_line_exit_2(copy, tmp_path):
    bed = tmp_path / "bed.csv"
    for text, why in ((TESTBED.replace(",corrupt_s5,", ",other,"), "no column 'corrupt_s5'"),
                      (TESTBED.replace("0.85,", "85,", 1), "model 'm3': id='85' is not an accuracy in [0, 1]"),
                      ("model,id\n", "no rows")):
        bed.write_text(text)
        p = cli_report(copy, "--no-figures", "--testbed", bed, cwd=tmp_path)
        assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and why in p.stderr, p.stderr
        assert "Traceback" not in p.stderr and not (copy / "table.md").exists()
    bed.write_text(TESTBED)
    p = cli_report(copy, "--testbed", bed, "--baselines", "frozen", cwd=tmp_path)
    assert p.returncode == 2 and "give one" in p.stderr


# ---------------------------------------------------------------------------------------- paper-ready tables

def set_metrics(root: Path, values: dict) -> None:
    """Per (schedule, seed): ID acc, one accuracy for every OOD set (and their mean), ID ECE."""
    for (s, k), r in results(root).items():
        idacc, ood, ece = values[(s, k)]
        m = dict(r["metrics"])
        for key in m:
            if key.startswith("test/ood/") and key.endswith("/acc"):
                m[key] = ood
        m |= {"test/id/acc": idacc, "test/id/ece": ece}
        edit(root, s, k, metrics=m)


VALUES = {("frozen", 0): (0.50, 0.60, 0.10), ("frozen", 1): (0.52, 0.61, 0.10), ("frozen", 2): (0.54, 0.62, 0.10),
          ("wise_ft", 0): (0.485, 0.30, 0.05), ("wise_ft", 1): (0.505, 0.30, 0.05), ("wise_ft", 2): (0.525, 0.30, 0.05)}


def test_best_cells_bold_with_ties_names_and_minus_signs(copy, tmp_path):
    set_metrics(copy, VALUES)
    labels = tmp_path / "labels.yaml"
    labels.write_text("wise_ft: 'WiSE-FT (α = 0.5)'\n")
    out = tmp_path / "r"
    assert main([str(copy), "--out", str(out), "--no-figures", "--baselines", "frozen", "--labels", str(labels),
                 "--label", 'schedule=frozen="Linear probe"', "--compare", "wise_ft", "frozen"]) == 0
    text = (out / "table.md").read_text()
    rows = md_rows(text, bold=True)
    assert list(rows) == ["Linear probe", "WiSE-FT (α = 0.5)"]
    lp, wise = rows["Linear probe"], rows["WiSE-FT (α = 0.5)"]
    # ID: 52.0 ± 2.0 is best, 50.5 lies within its std: both bold (a tie)
    assert lp[0] == "**52.0 ± 2.0**" and wise[0] == "**50.5 ± 2.0**"
    # OOD: clearly better, alone in bold; ECE: lower is better
    assert lp[1] == "**61.0 ± 1.0**" and wise[1] == "30.0 ± 0.0"
    ece = [c.name for c in report.summarize(load([copy])).columns].index("ECE ID")
    assert wise[ece] == "**5.0 ± 0.0**" and lp[ece] == "10.0 ± 0.0"
    assert wise[-2].startswith("-") and not wise[-2].startswith("**")  # ER far below the line
    # with --se the tolerance is the s.e. (2/√3 = 1.15): 50.5 is no longer a tie
    assert main([str(copy), "--out", str(out), "--no-figures", "--baselines", "frozen", "--se"]) == 0
    rows = md_rows((out / "table.md").read_text(), bold=True)
    assert rows["schedule=frozen"][0].startswith("**52.0") and not rows["schedule=wise_ft"][0].startswith("**")
    # LaTeX: the names, bold cells, and typographic minus signs only
    assert main([str(copy), "--out", str(out), "--no-figures", "--baselines", "frozen", "--labels",
                 str(labels)]) == 0
    tex = (out / "table.tex").read_text()
    body = tex[tex.index(r"\begin{tabular}"):tex.index(r"\end{tabular}")]
    assert r"WiSE-FT ($\alpha$ = 0.5) &" in body and r"\textbf{52.0} & \textbf{2.0}" in body
    assert r"\textbf{50.5} & \textbf{2.0}" in body and r"\textminus{}" in body
    assert re.search(r"(?<![\w{])-\d", body) is None  # no hyphen as a minus sign
    # the paired file names the rows by their names
    paired_md = (tmp_path / "r" / "paired_wise_ft_vs_frozen.md").read_text()
    assert paired_md.startswith("# Paired comparison: WiSE-FT (α = 0.5) vs Linear probe")
    # an unknown row in --label is bad input
    assert main([str(copy), "--no-figures", "--label", "gradual=Gradual"]) == 2
    assert main([str(copy), "--no-figures", "--label", "no-equals-sign"]) == 2


def test_paired_confidence_interval_and_t_test_match_scipy(copy, capsys):
    from scipy import stats

    res = results(copy)
    runs = load([copy])
    p = report.paired(runs, "wise_ft", "frozen", "test/ood/printed/acc")
    a = [100 * res[("wise_ft", k)]["metrics"]["test/ood/printed/acc"] for k in SEEDS]
    b = [100 * res[("frozen", k)]["metrics"]["test/ood/printed/acc"] for k in SEEDS]
    if len({x - y for x, y in zip(a, b)}) == 1:  # identical differences: no t-test; make them differ
        set_metrics(copy, VALUES)
        res, runs = results(copy), load([copy])
        p = report.paired(runs, "wise_ft", "frozen", "test/ood/printed/acc")
        a = [100 * res[("wise_ft", k)]["metrics"]["test/ood/printed/acc"] for k in SEEDS]
        b = [100 * res[("frozen", k)]["metrics"]["test/ood/printed/acc"] for k in SEEDS]
    d = [x - y for x, y in zip(a, b)]
    assert p.p_value == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-9)
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=statistics.mean(d), scale=stats.sem(d))
    assert p.ci95 == (pytest.approx(lo, rel=1e-9), pytest.approx(hi, rel=1e-9))
    assert p.se == pytest.approx(stats.sem(d), rel=1e-9)
    # the file: mean ± s.e. with --se, the CI and the p-value, and the test named in the caption
    assert main([str(copy), "--no-figures", "--se", "--compare", "wise_ft", "frozen"]) == 0
    text = (copy / "paired_wise_ft_vs_frozen.md").read_text()
    assert "| mean ± s.e. | 95% CI | p (paired t) |" in text and "two-sided paired t-test" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| OOD printed |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    pv = stats.ttest_rel(a, b).pvalue
    assert cells[4:7] == [f"{statistics.mean(d):+.1f} ± {stats.sem(d):.1f}", f"[{lo:+.1f}, {hi:+.1f}]",
                          "< 0.001" if pv < 0.001 else f"{pv:.3f}"]


def test_se_is_honoured_in_the_wise_table_and_figures(copy):
    res = results(copy)
    assert main([str(copy), "--se", "--rows", "wise_ft", "--out", str(copy / "se")]) == 0
    wise = (copy / "se" / "wise_schedule=wise_ft.md").read_text()
    assert "mean ± s.e. over 3 seeds" in wise
    line = next(ln for ln in wise.splitlines() if ln.startswith("| 0.5 |"))
    vals = [100 * next(p for p in res[("wise_ft", k)]["wise"] if p["alpha"] == 0.5)["metrics"]
            ["test/wise/0.5/ood/printed/acc"] for k in SEEDS]
    assert line.split("|")[3].strip().startswith(f"{statistics.mean(vals):.1f} ± "
                                                 f"{statistics.stdev(vals) / math.sqrt(3):.1f}")
    figs = report.figures(load([copy]), se=True)
    assert "s.e." in figs.figures["id_vs_ood"].axes[0].get_title()


def test_severity_legend_shows_every_row_inside_the_figure(copy):
    """Many rows (here 14): the severity legend (one column was cut off at the figure's edge past about ten
    entries) has every row, drawn inside the figure."""
    frozen = [results(copy)[("frozen", k)]["file"].parent for k in SEEDS]
    for i in range(12):  # 12 more configurations, clones of the frozen runs under an extra override
        for src in frozen:
            dst = copy / f"{src.name},clone={i}"
            shutil.copytree(src, dst)
            r = json.loads((dst / "results.json").read_text())
            (dst / "results.json").write_text(json.dumps({**r, "overrides": [*r["overrides"],
                                                                               f"optimizer.lr=0.{i + 1}"]}))
    runs = load([copy])
    assert len(runs.labels()) == 14
    fig = report.figures(runs).figures["severity"]
    fig.canvas.draw()
    (legend,) = fig.legends
    assert len(legend.get_texts()) == 14
    box, page = legend.get_window_extent(), fig.bbox
    assert box.y0 >= page.y0 and box.y1 <= page.y1 and box.x1 <= page.x1, (box, page)
