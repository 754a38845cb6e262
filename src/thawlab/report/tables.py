"""The table: columns, cells (mean ± std or s.e.), best-cell marking, markdown, booktabs LaTeX and CSV."""
from __future__ import annotations

import csv
import io
import math
import os
import re
import statistics
from dataclasses import dataclass, field

from thawlab.results import RESULTS
from thawlab.report.runs import METRICS, ReportError, Run, Runs, selection_words
from thawlab.report.stats import ERFit, effective_robustness
from thawlab.report import zeroshot as zs

@dataclass
class Column:
    name: str
    key: str  # a metric key, or "er"
    scale: float  # shown value = scale · stored value
    decimals: int
    higher_is_better: bool
    signed: bool = False
    marked: bool = True  # best cells marked (not for a diagnostic with no better direction)


@dataclass
class Cell:
    values: list[float]  # per finished run, in the column's units
    mean: float | None
    spread: float | None  # std (n−1) or s.e.; None for fewer than two values

    @property
    def n(self) -> int:
        return len(self.values)


@dataclass
class Row:
    label: str
    runs: list[Run]
    cells: dict[str, Cell]

    @property
    def n(self) -> int:
        return sum(r.done for r in self.runs)

    @property
    def expected(self) -> int:
        return len(self.runs)

    @property
    def n_text(self) -> str:
        return str(self.n) if self.n == self.expected else f"{self.n} of {self.expected}"


def columns(runs: Runs, metric: str = "acc", er_sets=()) -> list[Column]:
    """The table's columns; `er_sets`: OOD sets with a per-set effective-robustness column (per-set fit)."""
    if metric not in METRICS:
        raise ReportError(f"--metric {metric!r}: choose from {', '.join(METRICS)}")
    pct = metric in ("acc", "ece")
    kw = dict(scale=100.0 if pct else 1.0, decimals=1 if pct else 3, higher_is_better=metric == "acc")
    cols = [Column("ID", f"test/id/{metric}", **kw)]
    cols += [Column(f"OOD {s}", f"test/ood/{s}/{metric}", **kw) for s in runs.ood_sets()]
    if any(f"test/ood/mean/{metric}" in r.metrics for r in runs.done):
        cols.append(Column("OOD mean", f"test/ood/mean/{metric}", **kw))
    if metric != "ece":
        cols.append(Column("ECE ID", "test/id/ece", 100.0, 1, False))
    if any(f"test/source/{metric}" in r.metrics for r in runs.done):
        cols.append(Column("source task", f"test/source/{metric}", **kw))
    if any(r.value(DISTORTION) is not None for r in runs.done):
        # LP-FT's feature distortion of the selected checkpoint: OOD / ID relative feature change at the pooled
        # output (thawlab/diagnostics.py); a diagnostic, so no cell is marked best
        cols.append(Column("distortion OOD/ID", DISTORTION, 1.0, 2, False, marked=False))
    cols += [Column(f"ER {s}", f"er/{s}", 100.0, 1, True, signed=True) for s in er_sets]
    cols.append(Column("eff. robustness", "er", 100.0, 1, True, signed=True))
    return cols


DISTORTION = "diag/distortion/ood/mean"


def _stats(values: list[float], se: bool) -> Cell:
    if not values:
        return Cell([], None, None)
    spread = statistics.stdev(values) if len(values) > 1 else None
    if spread is not None and se:
        spread /= math.sqrt(len(values))
    return Cell(values, statistics.fmean(values), spread)


def column_values(runs: list[Run], col: Column, fit: ERFit | None) -> list[tuple[Run, float]]:
    """(run, value in the column's units) for the finished runs that have it."""
    out = []
    for r in runs:
        if not r.done:
            continue
        if col.key == "er":
            v = fit.per_run.get(r) if fit is not None else None
        elif col.key.startswith("er/"):
            v = fit.per_set.get(col.key[3:], {}).get(r) if fit is not None else None
        else:
            v = r.value(col.key)
        if v is not None:
            out.append((r, col.scale * v))
    return out


def _num(x: float, decimals: int, signed: bool = False) -> str:
    if round(x, decimals) == 0:
        x = 0.0  # no "-0.0"
    return f"{{:{'+' if signed else ''}.{decimals}f}}".format(x)


@dataclass
class Table:
    columns: list[Column]
    rows: list[Row]
    metric: str
    se: bool
    fit: ERFit
    caption: str
    notes: list[str]
    names: dict = field(default_factory=dict)  # row label -> display name

    def name(self, row: Row) -> str:
        return self.names.get(row.label, row.label)

    def best(self) -> set[tuple[str, str]]:
        """(row label, column name) of the cells marked best: per column, the best mean (the highest for
        accuracy and effective robustness, the lowest for NLL and ECE) and every mean within the best cell's
        spread as shown (std, or s.e. with --se) of it, or equal to it as printed. Columns with fewer than two
        rows with a value are not marked."""
        out = set()
        for c in self.columns:
            cells = [(r.label, r.cells[c.name]) for r in self.rows if r.cells[c.name].mean is not None]
            if len(cells) < 2 or not c.marked:
                continue
            sign = 1 if c.higher_is_better else -1
            top = max((cell for _, cell in cells), key=lambda cell: sign * cell.mean)
            tol = top.spread or 0.0
            shown = _num(top.mean, c.decimals)
            for label, cell in cells:
                if sign * cell.mean >= sign * top.mean - tol or _num(cell.mean, c.decimals) == shown:
                    out.add((label, c.name))
        return out

    def _parts(self, col: Column, cell: Cell, row: Row) -> tuple[str, str] | None:
        """(mean, spread and n note) as printed, None for a gap."""
        if cell.mean is None:
            return None
        spread = f"{cell.spread:.{col.decimals}f}" if cell.spread is not None else "–"
        return _num(cell.mean, col.decimals, col.signed), spread + (f" (n={cell.n})" if cell.n != row.n else "")

    def _cell(self, col: Column, cell: Cell, row: Row) -> str:
        parts = self._parts(col, cell, row)
        return "–" if parts is None else f"{parts[0]} ± {parts[1]}"

    def grid(self) -> list[list[str]]:
        head = ["row"] + [c.name for c in self.columns] + ["n"]
        return [head] + [[self.name(r)] + [self._cell(c, r.cells[c.name], r) for c in self.columns] + [r.n_text]
                         for r in self.rows]

    def markdown(self) -> str:
        best = self.best()
        head = ["row"] + [c.name for c in self.columns] + ["n"]
        body = []
        for r in self.rows:
            cells = []
            for c in self.columns:
                text = self._cell(c, r.cells[c.name], r)
                cells.append(f"**{text}**" if (r.label, c.name) in best else text)
            body.append([self.name(r), *cells, r.n_text])
        esc = [[c.replace("|", "\\|") for c in line] for line in [head, *body]]
        lines = [f"**Table.** {self.caption}", "",
                 "| " + " | ".join(esc[0]) + " |", "|" + "|".join(["---"] + ["---:"] * (len(esc[0]) - 1)) + "|"]
        lines += ["| " + " | ".join(line) + " |" for line in esc[1:]]
        if self.notes:
            lines += ["", "Notes:", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def latex(self) -> str:
        """booktabs, each value column split at ± into right- and left-aligned halves (the ± signs line up),
        minus signs as \textminus, best cells bold; scaled down to the line width only when wider (a wide
        table is a table*)."""
        best = self.best()
        spec = "l" + r"r@{\,$\pm$\,}l" * len(self.columns) + "r"
        head = ["row"] + [rf"\multicolumn{{2}}{{c}}{{{_tex(c.name)}}}" for c in self.columns] + ["n"]
        body = []
        for r in self.rows:
            cells = [_tex(self.name(r))]
            for c in self.columns:
                parts = self._parts(c, r.cells[c.name], r)
                if parts is None:
                    cells.append(r"\multicolumn{2}{c}{--}")
                    continue
                m, sp = (_tex_num(x) for x in parts)
                if (r.label, c.name) in best:
                    m, sp = rf"\textbf{{{m}}}", rf"\textbf{{{sp}}}"
                cells += [m, sp]
            body.append(" & ".join(cells + [_tex(r.n_text)]) + r" \\")
        env = "table*" if len(self.columns) > 6 else "table"
        lines = [r"% thawlab-report table: needs \usepackage{booktabs,graphicx} (\textminus: LaTeX 2020 or later)",
                 rf"\begin{{{env}}}[t]", r"\centering", r"\small", rf"\caption{{{_tex_num(self.caption)}}}",
                 r"\label{tab:thawlab-report}",
                 r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
                 rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(head) + r" \\", r"\midrule", *body,
                 r"\bottomrule", r"\end{tabular}}"]
        if self.notes:
            lines += [r"\par\smallskip", r"\begin{minipage}{\linewidth}\raggedright\scriptsize"]
            lines += [_tex_num(n) + r"\\" for n in self.notes]
            lines.append(r"\end{minipage}")
        lines.append(rf"\end{{{env}}}")
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        spread = "se" if self.se else "std"
        head = ["row", "name", "n_finished", "n_expected"]
        for c in self.columns:
            unit = _unit(c, self.metric)
            head += [f"{c.name} {unit} mean", f"{c.name} {unit} {spread}", f"{c.name} n"]
        w.writerow(head)
        for r in self.rows:
            line = [r.label, self.name(r), r.n, r.expected]
            for c in self.columns:
                cell = r.cells[c.name]
                line += ["" if cell.mean is None else repr(cell.mean),
                         "" if cell.spread is None else repr(cell.spread), cell.n]
            w.writerow(line)
        return buf.getvalue()


def _unit(col: Column, metric: str) -> str:
    if col.key == "er" or col.key.startswith("er/"):
        return "(pp)"
    if col.key == "test/id/ece":
        return "(ece %)"
    return {"acc": "(acc %)", "ece": "(ece %)", "nll": "(nll nats)"}[metric]


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "−": r"\textminus{}",
        "·": r"$\cdot$", "σ": r"$\sigma$", "√": r"$\surd$", "≥": r"$\geq$", "α": r"$\alpha$", "θ": r"$\theta$",
        "–": "--", "₀": r"$_0$", "×": r"$\times$", "≤": r"$\leq$", "→": r"$\rightarrow$"}


def _tex(s: str) -> str:
    # a hyphen before another would typeset "--" as an en dash (--include-smoke): keep them apart
    return "".join("-{}" if ch == "-" and s[i + 1:i + 2] == "-" else _TEX.get(ch, ch) for i, ch in enumerate(s))


def _tex_num(s: str) -> str:
    """A printed number for LaTeX: a typographic minus (a hyphen before a digit is one)."""
    return _tex(re.sub(r"(?<![\w.])-(?=\d)", "−", s))


def _rules(runs: list[Run]) -> str:
    rules: dict[str, list] = {}
    for r in runs:
        if r.done:
            rule = selection_words(r)
            rules.setdefault(rule, []).append(r)
    if len(rules) == 1:
        return f"the checkpoint selected by {next(iter(rules))}"
    return "checkpoints selected by " + "; ".join(f"{k} ({len(v)} runs)" for k, v in rules.items())


def notes(runs: Runs, labels: list[str]) -> list[str]:
    """Each run that did not finish, with its error, each file left out, with why, and the smoke runs."""
    out = []
    for lab in labels:
        for r in sorted(runs.row(lab), key=lambda r: r.seed):
            if not r.done:
                what = "failed" if r.status == "failed" else "missing"
                where = f" [{r.path}]" if r.path else ""
                out.append(f"{runs.name(lab)}, seed {r.seed}: {what}: {r.error or 'no error recorded'}{where} (a "
                           f"gap: not in the mean, n lowered)")
    for s in runs.skipped:
        out.append(f"left out {s.path}: {s.reason}")
    if runs.smoke:
        out.append(f"left out {len(runs.smoke)} smoke run(s) ({runs.smoke[0].smoke}; metrics of a few batches "
                   f"are not results) under {_where(runs.smoke)}")
    if runs.smoke_included:
        out.append(f"{len(runs.smoke_included)} of the reported runs are smoke runs "
                   f"({runs.smoke_included[0].smoke}, --include-smoke): their metrics are not results")
    return out


def _where(rs: list[Run]) -> str:
    """The directory holding these runs (their common parent), for a message."""
    dirs = [str((r.path.parent if r.path.name == RESULTS else r.path).resolve()) for r in rs if r.path]
    return os.path.commonpath(dirs) if dirs else "no run directory"


def _er_caption(fit: ERFit) -> str:
    clip_text = ("before the logit each accuracy is clipped to [0.5/n, 1 − 0.5/n], n = its test samples "
                 "(the OOD sets together for the OOD mean)")
    src = ("testbed file" if fit.testbed is not None else "baseline rows") + (", per OOD set" if fit.mode == "per-set"
                                                                                 else ", OOD mean")
    if not fit.ok:
        return (f"Eff. robustness (OOD acc − σ(a · logit(ID acc) + b), Taori et al. 2020; fit: {src}): a gap, "
                f"{fit.reason}.")
    if fit.mode == "mean":
        return (f"Eff. robustness (Taori et al. 2020; fit: {src}), in percentage points: OOD mean acc − "
                f"σ(a · logit(ID acc) + b), averaged per row, with a = {fit.a:.3f}, b = {fit.b:.3f} fitted by "
                f"least squares on logit axes through {fit.source()}; {clip_text}.")
    lines = "; ".join(f"{s}: a = {a:.3f}, b = {b:.3f}" for s, (a, b) in fit.lines.items())
    return (f"Eff. robustness (Taori et al. 2020; fit: {src}), in percentage points: per OOD set s, acc_s − "
            f"σ(a_s · logit(ID acc) + b_s) (columns ER s), with one line per set fitted by least squares on logit "
            f"axes through {fit.source()} ({lines}); eff. robustness: a run's mean over the {len(fit.lines)} sets, "
            f"averaged per row; {clip_text}.")


def summarize(runs: Runs, metric: str = "acc", se: bool = False, baselines=None, rows=None, fit: ERFit | None = None,
              er_fit: str = "mean", testbed=None) -> Table:
    """One row per configuration (or group), mean ± std (or s.e.) over seeds; see the module docstring.
    The effective-robustness fit is `fit`, or effective_robustness(runs, baselines, er_fit, testbed)."""
    labels = [runs.resolve(x, "--rows") for x in rows] if rows else runs.labels()
    fit = fit or effective_robustness(runs, baselines, er_fit, testbed)
    cols = columns(runs, metric, list(fit.lines) if fit.mode == "per-set" else ())
    table_rows = []
    for lab in labels:
        members = sorted(runs.row(lab), key=lambda r: r.seed)
        table_rows.append(Row(lab, members, {c.name: _stats([v for _, v in column_values(members, c, fit)], se)
                                             for c in cols}))
    spread = "s.e. (std/√n, std with n−1)" if se else "std (sample std, n−1)"
    what = {"acc": "accuracy in %", "nll": "negative log-likelihood in nats", "ece": "expected calibration "
            "error in % (15 bins)"}[metric]
    if runs.group_by:
        rows_text = f"Rows: runs grouped by {', '.join(runs.group_by)}."
    else:
        rows_text = ("Rows: the overrides that vary across runs (seed and "
                     + (f"the overrides common to all runs, {', '.join(runs.common)}, left out)." if runs.common
                        else "no override common to all runs)."))
    if runs.inert:
        rows_text += (f" Overrides that do not change the experiment are not row factors: "
                      f"{', '.join(runs.inert)}.")
    seeds = runs.seeds
    n_text = (f"n: runs that finished, of the row's runs plus one per seed it has no run of (seeds "
              f"{', '.join(map(str, seeds))}: every seed seen in these runs)" if runs.group_by else
              f"n: runs that finished, of the {len(seeds)} seeds expected per configuration "
              f"({', '.join(map(str, seeds))}: every seed seen in these runs)")
    caption = (f"Test {what} (ID, each OOD set and their mean; ECE on the ID test set in %) of "
               f"{_rules([r for r in runs.runs if not zs.is_zeroshot(r)])}, mean ± {spread} over seeds. "
               f"{n_text}; a failed or missing run is a gap, never averaged away. Bold: per column the best mean "
               f"(lower NLL and ECE, higher accuracy and eff. robustness) and every mean within the best one's "
               f"{'s.e.' if se else 'std'} of it. {rows_text} {_er_caption(fit)}")
    zs_caption, zs_notes = zs.describe(runs, labels)
    if zs_caption:
        caption += " " + zs_caption
    if runs.tuned:
        key = next(iter(runs.tuned.values()))[0]
        choices = "; ".join(f"{row}: {best} (" + ", ".join(f"{v}: {100 * m:.1f}" for v, m in means.items()) + ")"
                            for row, (_, best, means) in runs.tuned.items() if row in labels)
        on = ("OOD validation (the oracle: mean val/ood/mean/acc" if runs.rule == "oracle"
              else "ID validation (mean val/id/acc")
        caption += f" {key} chosen per row on {on} of the selected checkpoints over seeds, in %): {choices}."
    if runs.rule:
        caption += (f" Selection rule: {runs.rule} (--rule), every run at the checkpoint this rule chose; what only "
                    f"the run's own checkpoint measures (source task, drift, WiSE-FT) is left out.")
    if any(c.key.startswith("test/source/") for c in cols):
        caption += (" Source task: the fine-tuned backbone with the original source head on the source test set "
                    "(forgetting).")
    if runs.smoke_included:
        caption += f" Includes {len(runs.smoke_included)} smoke runs (not results)."
    return Table(cols, table_rows, metric, se, fit, caption, notes(runs, labels) + zs_notes, dict(runs.names))
