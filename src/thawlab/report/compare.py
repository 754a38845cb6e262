"""Paired comparisons of two rows over shared seeds: differences, t-based 95% CI, paired t-test, wins."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from thawlab.report.runs import METRICS, Runs
from thawlab.report.stats import ERFit, effective_robustness
from thawlab.report.tables import Column, _rules, column_values, columns

@dataclass
class Pair:
    a: str
    b: str
    column: str  # the metric key, or "er"
    seeds: list[int]  # seeds both rows finished
    diffs: list[float]  # A − B per seed, in the column's units
    higher_is_better: bool
    unpaired: list[str]  # seeds left out, and why

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.diffs) if self.diffs else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.diffs) if len(self.diffs) > 1 else None

    @property
    def se(self) -> float | None:
        return self.std / math.sqrt(self.n) if self.std is not None else None

    @property
    def ci95(self) -> tuple[float, float] | None:
        """95% confidence interval of the mean difference, t-based: mean ± t(0.975, n−1) · s.e."""
        if self.se is None:
            return None
        from scipy import stats

        h = stats.t.ppf(0.975, self.n - 1) * self.se
        return self.mean - h, self.mean + h

    @property
    def p_value(self) -> float | None:
        """Two-sided paired t-test of mean difference 0 (scipy.stats.ttest_rel on the paired values, i.e. a
        one-sample t-test of the differences); None for fewer than two pairs or differences all equal."""
        if self.std is None or self.std == 0:
            return None
        from scipy import stats

        return float(stats.ttest_1samp(self.diffs, 0.0).pvalue)

    @property
    def wins(self) -> int:
        """Seeds in which A is better than B (higher acc and ER, lower NLL and ECE)."""
        return sum((d > 0) if self.higher_is_better else (d < 0) for d in self.diffs)

    @property
    def ties(self) -> int:
        return sum(d == 0 for d in self.diffs)


def _column_for(runs: Runs, key: str) -> Column:
    if key == "er" or key.startswith("er/"):
        return Column("eff. robustness" if key == "er" else f"ER {key[3:]}", key, 100.0, 1, True, signed=True)
    metric = key.rsplit("/", 1)[-1]
    for c in columns(runs, metric if metric in METRICS else "acc"):
        if c.key == key:
            return c
    if metric in METRICS:
        pct = metric in ("acc", "ece")
        return Column(key, key, 100.0 if pct else 1.0, 1 if pct else 3, metric == "acc")
    return Column(key, key, 1.0, 3, True)


def paired(runs: Runs, a: str, b: str, metric: str = "test/ood/mean/acc", baselines=None,
           fit: ERFit | None = None) -> Pair:
    """Per-seed differences A − B of one metric key (or "er") over the seeds both rows finished.

    Seeds pair runs: the same seed means the same head initialisation and batch order. A row with several
    runs at one seed (--group-by merging configurations) contributes their mean at that seed."""
    a, b = runs.resolve(a, "--compare"), runs.resolve(b, "--compare")
    col = _column_for(runs, metric)
    if (col.key == "er" or col.key.startswith("er/")) and fit is None:  # a set's ER needs the per-set fit
        fit = effective_robustness(runs, baselines, "per-set" if col.key.startswith("er/") else "mean")
    per: list[dict[int, float]] = []
    for lab in (a, b):
        vals: dict[int, list[float]] = {}
        for r, v in column_values(runs.row(lab), col, fit):
            vals.setdefault(r.seed, []).append(v)
        per.append({s: statistics.fmean(v) for s, v in vals.items()})
    seeds = sorted(set(per[0]) & set(per[1]))
    unpaired = []
    for s in runs.seeds:
        if s not in seeds:
            why = [f"{lab} {_seed_status(runs, lab, s) or 'has no ' + (col.name if col.key != 'er' else 'fit')}"
                   for i, lab in enumerate((a, b)) if s not in per[i]]
            unpaired.append(f"seed {s} ({'; '.join(why)})")
    return Pair(a, b, col.key, seeds, [per[0][s] - per[1][s] for s in seeds], col.higher_is_better, unpaired)


def _seed_status(runs: Runs, label: str, seed: int) -> str | None:
    """None when the row finished a run of this seed, else what happened to it."""
    at = [r for r in runs.row(label) if r.seed == seed]
    if any(r.done for r in at):
        return None
    return "failed" if any(r.status == "failed" for r in at) else "missing"


def _p(p: float | None) -> str:
    if p is None:
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def paired_markdown(runs: Runs, a: str, b: str, metric: str = "acc", baselines=None, se: bool = False,
                    fit: ERFit | None = None) -> str:
    """Per column: the per-seed differences A − B, their mean ± std (s.e. with se), a t-based 95% confidence
    interval of the mean difference, the two-sided paired t-test's p-value, and the seeds A wins."""
    a, b = runs.resolve(a, "--compare"), runs.resolve(b, "--compare")
    fit = fit or effective_robustness(runs, baselines)
    cols = columns(runs, metric, list(fit.lines) if fit.mode == "per-set" else ())
    pairs = [(c, paired(runs, a, b, c.key, fit=fit)) for c in cols]
    seeds = sorted({s for _, p in pairs for s in p.seeds})
    na, nb = runs.name(a), runs.name(b)
    spread = "s.e." if se else "std"
    head = ["column"] + [f"seed {s}" for s in seeds] + [f"mean ± {spread}", "95% CI", "p (paired t)", f"{na} better"]
    lines = [f"# Paired comparison: {na} vs {nb}", "",
             f"Per-seed differences {na} − {nb} over the seeds both finished (a seed fixes the head initialisation "
             f"and the batch order, so runs of one seed are paired). Accuracy, ECE and effective robustness in "
             f"percentage points, NLL in nats. Mean ± {'s.e. (std/√n)' if se else 'std (n−1)'} of the "
             f"differences; 95% CI: mean ± t(0.975, n−1) · std/√n; p: two-sided paired t-test of a zero mean "
             f"difference (scipy.stats.ttest_rel). `{na} better`: seeds in which {na} has the higher accuracy or "
             f"effective robustness, or the lower NLL or ECE, out of the paired n (ties named; the distortion ratio, "
             f"a diagnostic with no better direction: the seeds in which it is lower). Effective "
             f"robustness: {fit.describe()}. Checkpoints: {_rules(runs.row(a) + runs.row(b))}.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for c, p in pairs:
        d = dict(zip(p.seeds, p.diffs))
        k = c.decimals
        cells = [f"{d[s]:+.{k}f}" if s in d else "–" for s in seeds]
        sp = p.se if se else p.std
        ms = "–" if p.mean is None else f"{p.mean:+.{k}f} ± " + (f"{sp:.{k}f}" if sp is not None else "–")
        ci = "–" if p.ci95 is None else f"[{p.ci95[0]:+.{k}f}, {p.ci95[1]:+.{k}f}]"
        win = f"{p.wins} of {p.n}" + (f" ({p.ties} tied)" if p.ties else "") if p.n else "–"
        if p.n and not c.marked:  # a diagnostic (distortion) has no better direction: say which way it counted
            win = f"lower in {win}"
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in [c.name] + cells + [ms, ci, _p(p.p_value), win])
                     + " |")
    unpaired = []  # seeds a row did not finish (a column without a value shows "–" and is explained above)
    for s in runs.seeds:
        why = [f"{runs.name(lab)} {st}" for lab in (a, b) if (st := _seed_status(runs, lab, s))]
        if why:
            unpaired.append(f"seed {s} ({'; '.join(why)})")
    if unpaired:
        lines += ["", "Not paired: " + ", ".join(unpaired) + "."]
    return "\n".join(lines) + "\n"
