"""Effective robustness (Taori et al. 2020): logit-axis fits through baseline rows or a testbed, per OOD set
or for the OOD mean."""
from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from thawlab.report.runs import BASELINE_SCHEDULES, DEFAULT_N, ER_FITS, ReportError, Run, Runs

def logit(p: float) -> float:
    return math.log(p / (1 - p))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def clip(p: float, n: int | float | None) -> float:
    """p clipped to [0.5/n, 1 − 0.5/n]: half a sample from either end (n = test samples behind p)."""
    eps = 0.5 / (n or DEFAULT_N)
    return min(max(p, eps), 1 - eps)


def samples(run: Run, which: str) -> int | None:
    """Test samples behind a run's ID accuracy ("id"), OOD mean accuracy ("ood", all OOD sets together) or one
    OOD set's accuracy ("ood/<set>")."""
    if which == "id" or which.startswith("ood/"):
        n = run.counts.get(f"test/{which}")
        return n if isinstance(n, (int, float)) and n > 0 else None
    ns = [v for k, v in run.counts.items() if k.startswith("test/ood/") and isinstance(v, (int, float))]
    return sum(ns) if ns and sum(ns) > 0 else None


def id_ood(run: Run, ood: str = "mean") -> tuple[float, float] | None:
    """(ID acc, OOD acc) of a finished run, unclipped; `ood` is an OOD set or "mean"."""
    x, y = run.value("test/id/acc"), run.value(f"test/ood/{ood}/acc")
    return None if x is None or y is None or not run.done else (x, y)


def _ols(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Ordinary least squares y = a x + b."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return a, my - a * mx


@dataclass
class Testbed:
    """Baseline models for the effective-robustness fit (--testbed FILE): accuracies of models trained on the
    ID data, evaluated on the same test sets. CSV columns: `model`, `id`, one per OOD set (named as in
    results.json: test/ood/<set>/acc), accuracies as fractions in [0, 1]; other columns are ignored."""
    path: Path
    models: list[str]
    acc: dict[str, list[float]]  # "id" or an OOD set -> per model

    def ood_mean(self, sets: list[str]) -> list[float]:
        """Per model, the unweighted mean over `sets` (as test/ood/mean/acc is over a run's sets)."""
        return [statistics.fmean(self.acc[s][i] for s in sets) for i in range(len(self.models))]


def read_testbed(path, sets: list[str]) -> Testbed:
    """A testbed CSV (see Testbed) with a column for each of `sets`; a ReportError names what is wrong."""
    path = Path(path)
    try:
        with open(path, newline="") as f:  # lines starting with # are comments
            rows = list(csv.DictReader(line for line in f if not line.lstrip().startswith("#")))
            head = [h.strip() for h in (rows and rows[0].keys() or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ReportError(f"--testbed {path}: cannot be read ({e})") from None
    if not rows:
        raise ReportError(f"--testbed {path}: no rows (a header `model,id,<OOD set>...` and one line per model)")
    need = ["model", "id", *sets]
    lack = [c for c in need if c not in head]
    if lack:
        raise ReportError(f"--testbed {path}: no column {lack[0]!r} (has {', '.join(head)}; needs {', '.join(need)})")
    acc: dict[str, list[float]] = {c: [] for c in need[1:]}
    for row in rows:
        row = {k.strip(): v for k, v in row.items() if k is not None}
        for c in need[1:]:
            text = (row.get(c) or "").strip()
            try:
                v = float(text)
            except ValueError:
                v = float("nan")
            if not 0 <= v <= 1:
                raise ReportError(f"--testbed {path}: model {(row.get('model') or '').strip()!r}: {c}={text!r} is "
                                  f"not an accuracy in [0, 1]")
            acc[c].append(v)
    return Testbed(path, [str(r.get("model") or "").strip() for r in rows], acc)


@dataclass
class ERFit:
    """Effective robustness (Taori et al. 2020): OOD accuracy above a line fitted on logit axes through baseline
    points, the baseline rows' runs or a testbed's models. mode "mean": one line for the OOD mean,
    logit(OOD mean acc) = a · logit(ID acc) + b; mode "per-set": one line per OOD set s, logit(acc_s) =
    a_s · logit(ID acc) + b_s, and a run's effective robustness is its mean over the sets of acc_s minus the
    set's line. `per_run`: Run -> ER (accuracy units); `per_set`: set -> {Run: ER on that set}."""
    baselines: list[str]
    points: list[tuple]  # (Run or testbed model name, clipped ID acc, clipped OOD mean acc): the mean fit's points
    a: float | None = None
    b: float | None = None
    reason: str | None = None  # why there is no fit
    per_run: dict = field(default_factory=dict)  # Run -> ER (accuracy units)
    mode: str = "mean"
    testbed: Testbed | None = None
    lines: dict = field(default_factory=dict)  # per-set mode: OOD set -> (a, b)
    set_points: dict = field(default_factory=dict)  # per-set mode: OOD set -> [(who, clipped ID, clipped acc)]
    per_set: dict = field(default_factory=dict)  # per-set mode: OOD set -> {Run: ER}

    @property
    def ok(self) -> bool:
        return self.a is not None if self.mode == "mean" else bool(self.lines) and self.reason is None

    def predict(self, id_acc: float, n: int | None = None, ood: str = "mean") -> float:
        """The OOD accuracy (the mean, or one set's in per-set mode) the line expects at this ID accuracy."""
        a, b = (self.a, self.b) if ood == "mean" else self.lines[ood]
        return sigmoid(a * logit(clip(id_acc, n)) + b)

    def source(self) -> str:
        """Which points the fit went through, in words."""
        if self.testbed is not None:
            return f"the {len(self.testbed.models)} models of the testbed {self.testbed.path.name}"
        n = len(self.points) if self.mode == "mean" else len(next(iter(self.set_points.values()), []))
        return f"the {n} runs (one point per seed) of the baseline rows {', '.join(self.baselines) or 'none'}"

    def describe(self) -> str:
        if not self.ok:
            return f"no fit: {self.reason}"
        if self.mode == "mean":
            return (f"logit(OOD mean) = {self.a:.3f} · logit(ID) {'+' if self.b >= 0 else '−'} {abs(self.b):.3f}, "
                    f"least squares through {self.source()}")
        lines = "; ".join(f"{s}: a = {a:.3f}, b = {b:.3f}" for s, (a, b) in self.lines.items())
        return (f"one line per OOD set s, logit(acc_s) = a_s · logit(ID) + b_s, least squares through "
                f"{self.source()} ({lines}); a run's ER is the mean over the sets of acc_s − σ(a_s · logit(ID) + b_s)")


def default_baselines(runs: Runs) -> list[str]:
    """Rows whose runs all have schedule.name frozen or full (a soup of such runs is no baseline: thawlab-soup)."""
    return [lab for lab in runs.labels()
            if all(r.get("schedule.name") in BASELINE_SCHEDULES and not r.get("soup") for r in runs.row(lab))]


def _testbed_counts(runs: Runs) -> dict[str, int | None]:
    """Test samples behind each accuracy, from the runs (a testbed is evaluated on the same test sets)."""
    done = runs.done
    out = {"id": next((n for r in done if (n := samples(r, "id"))), None),
           "ood": next((n for r in done if (n := samples(r, "ood"))), None)}
    for s in runs.ood_sets():
        out[f"ood/{s}"] = next((n for r in done if (n := samples(r, f"ood/{s}"))), None)
    return out


def effective_robustness(runs: Runs, baselines=None, mode: str = "mean", testbed=None) -> ERFit:
    """Fit the baseline line(s) on logit axes and each finished run's effective robustness (see ERFit and the
    module docstring). `testbed`: a Testbed or a CSV path; its models are then the baseline points (and
    `baselines` must be None). `mode`: "mean" (one line for the OOD mean) or "per-set" (one line per set)."""
    if mode not in ER_FITS:
        raise ReportError(f"--er-fit {mode!r}: choose from {', '.join(ER_FITS)}")
    sets = runs.ood_sets()
    if testbed is not None and baselines:
        raise ReportError("--baselines and --testbed both name the baseline points: give one")
    if testbed is not None and not isinstance(testbed, Testbed):
        testbed = read_testbed(testbed, sets)
    if testbed is None:
        baselines = [runs.resolve(b, "--baselines") for b in baselines] if baselines else default_baselines(runs)
    else:
        baselines = []
    fit = ERFit(baselines=baselines, points=[], mode=mode, testbed=testbed)
    targets = ["mean"] if mode == "mean" else sets
    pts: dict[str, list[tuple]] = {}
    if testbed is not None:
        n = _testbed_counts(runs)
        for t in targets:
            ys = testbed.ood_mean(sets) if t == "mean" else testbed.acc[t]
            pts[t] = [(m, clip(x, n["id"]), clip(y, n["ood" if t == "mean" else f"ood/{t}"]))
                      for m, x, y in zip(testbed.models, testbed.acc["id"], ys)]
    else:
        for t in targets:
            pts[t] = [(r, clip(v[0], samples(r, "id")), clip(v[1], samples(r, "ood" if t == "mean" else f"ood/{t}")))
                      for lab in baselines for r in runs.row(lab) if (v := id_ood(r, t)) is not None]
    first = pts[targets[0]] if targets else []
    where = f"the testbed {testbed.path}" if testbed is not None else f"the baseline rows {', '.join(baselines)}"
    if testbed is None and not baselines:
        fit.reason = (f"no baseline rows (none has schedule.name {' or '.join(BASELINE_SCHEDULES)}; "
                      f"name them with --baselines, or give --testbed)")
    elif not targets:
        fit.reason = "no OOD set to fit a line per set for"
    elif not first:
        fit.reason = (f"no finished run of {where} reports both test/id/acc and "
                      f"test/ood/{targets[0]}/acc")
    elif len({x for _, x, _ in first}) < 2:
        fit.reason = f"fewer than two distinct ID accuracies among the {len(first)} points of {where}"
    if mode == "mean":
        fit.points = first
    else:
        fit.set_points = pts
    if fit.reason:
        return fit
    for t in targets:
        a, b = _ols([logit(x) for _, x, _ in pts[t]], [logit(y) for _, _, y in pts[t]])
        if mode == "mean":
            fit.a, fit.b = a, b
        else:
            fit.lines[t] = (a, b)
    for r in runs.runs:
        if mode == "mean":
            if (v := id_ood(r)) is not None:
                fit.per_run[r] = v[1] - fit.predict(v[0], samples(r, "id"))
            continue
        ers = {}
        for t in targets:
            if (v := id_ood(r, t)) is not None:
                ers[t] = v[1] - fit.predict(v[0], samples(r, "id"), t)
                fit.per_set.setdefault(t, {})[r] = ers[t]
        if len(ers) == len(targets):
            fit.per_run[r] = statistics.fmean(ers.values())
    return fit
