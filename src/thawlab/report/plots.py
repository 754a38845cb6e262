"""Figures: ID vs OOD on logit axes, WiSE-FT curves, accuracy against corruption severity, drift per block
group."""
from __future__ import annotations

import math
import re
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from thawlab.report.runs import FORMATS, Run, Runs, selection_words
from thawlab.report.stats import ERFit, clip, effective_robustness, id_ood, logit, samples, sigmoid
from thawlab.report.zeroshot import is_zeroshot

@dataclass
class FigureSet:
    figures: dict = field(default_factory=dict)  # name -> matplotlib Figure
    paths: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _colors(labels: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}


def _wrap(s: str, width: int = 34) -> str:
    return "\n".join(textwrap.wrap(s, width, break_on_hyphens=False)) or s


def _n(done: int, expected: int) -> str:
    return f"n={done}" if done == expected else f"n={done} of {expected}"


def _pct(p: float) -> str:
    v = 100 * p
    text = f"{v:.2f}".rstrip("0").rstrip(".") if (v < 1 or v > 99) else f"{v:.1f}".rstrip("0").rstrip(".")
    return text + "%"


def _logit_ticks(lo: float, hi: float) -> list[float]:
    """Round percentages for a logit axis, the roundest first, none closer than a twelfth of the axis (labels
    in the compressed middle of a wide logit axis would overlap)."""
    priority = [0.5, 0.1, 0.9, 0.01, 0.99, 0.001, 0.999, 0.0001, 0.9999, 0.2, 0.8, 0.05, 0.95, 0.02, 0.98, 0.005,
                0.995, 0.002, 0.998, 0.0005, 0.9995, 0.0002, 0.9998, 0.3, 0.7, 0.4, 0.6]
    gap = (logit(hi) - logit(lo)) / 12
    ticks: list[float] = []
    for t in priority:
        if lo <= t <= hi and all(abs(logit(t) - logit(u)) >= gap for u in ticks):
            ticks.append(t)
    if len(ticks) >= 3:
        return sorted(ticks)
    out = []
    for i in range(5):  # a narrow range: five ticks evenly spaced in logit, rounded to two significant digits
        p = sigmoid(logit(lo) + (logit(hi) - logit(lo)) * (i + 0.5) / 5)
        q = min(p, 1 - p)
        digits = max(0, -math.floor(math.log10(q)) + 1)
        q = round(q, digits)
        out.append(q if p <= 0.5 else 1 - q)
    return sorted(set(t for t in out if lo <= t <= hi and 0 < t < 1))


def _logit_axis(ax, which: str, lo: float, hi: float) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("logit")
    (ax.set_xlim if which == "x" else ax.set_ylim)(lo, hi)
    axis.set_major_locator(FixedLocator(_logit_ticks(lo, hi)))
    axis.set_major_formatter(FuncFormatter(lambda p, _: _pct(p)))
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())


def _limits(values: list[float]) -> tuple[float, float]:
    lo, hi = logit(min(values)), logit(max(values))
    pad = max(0.25 * (hi - lo), 0.4)
    return sigmoid(lo - pad), sigmoid(hi + pad)


def _new_figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _sd(values: list[float], se: bool = False) -> float:
    """The spread drawn or printed: sample std (n−1), or the s.e. std/√n; 0 for a single value."""
    if len(values) < 2:
        return 0.0
    return statistics.stdev(values) / (math.sqrt(len(values)) if se else 1.0)


def _spread_name(se: bool) -> str:
    return "s.e." if se else "std"


def _scatter(runs: Runs, labels: list[str], fit: ERFit, colors: dict, se: bool = False):
    pts = {lab: [(r, *v) for r in runs.row(lab) if (v := id_ood(r)) is not None] for lab in labels}
    if not any(pts.values()):
        return None, "no finished run reports test/id/acc and test/ood/mean/acc"
    n_ood = len(runs.ood_sets())
    fig = _new_figure(9.5, 5.8)
    ax = fig.add_subplot()
    allx, ally = [], []
    for lab in labels:
        if not pts[lab]:
            continue
        xs = [clip(x, samples(r, "id")) for r, x, _ in pts[lab]]
        ys = [clip(y, samples(r, "ood")) for r, _, y in pts[lab]]
        allx += xs
        ally += ys
        c = colors[lab]
        ax.scatter(xs, ys, s=28, color=c, alpha=0.45, edgecolors="none", zorder=2)
        mx, my = statistics.fmean(x for _, x, _ in pts[lab]), statistics.fmean(y for _, _, y in pts[lab])
        sx = _sd([x for _, x, _ in pts[lab]], se)
        sy = _sd([y for _, _, y in pts[lab]], se)
        # keep the mean and its bars inside (0, 1), where a logit axis can draw them, as the clipped points are
        eps_x = min(min(xs), 1 - max(xs), 0.5)
        eps_y = min(min(ys), 1 - max(ys), 0.5)
        cx, cy = min(max(mx, eps_x), 1 - eps_x), min(max(my, eps_y), 1 - eps_y)
        xerr = [[cx - min(max(mx - sx, eps_x), cx)], [max(min(mx + sx, 1 - eps_x), cx) - cx]]
        yerr = [[cy - min(max(my - sy, eps_y), cy)], [max(min(my + sy, 1 - eps_y), cy) - cy]]
        # the zero-shot model (report/zeroshot.py): a star, as the papers draw it beside the fine-tuned models
        star = any(is_zeroshot(r) for r in runs.row(lab))
        ax.errorbar([cx], [cy], xerr=xerr, yerr=yerr, fmt="*" if star else "o", ms=16 if star else 9, color=c,
                    mec="black", mew=0.8, ecolor=c, elinewidth=1.4, capsize=3, zorder=3,
                    label=_wrap(f"{runs.name(lab)} ({_n(len(pts[lab]), len(runs.row(lab)))})"
                                + (" · baseline" if lab in fit.baselines else "")
                                + (" · the model before training" if star else "")))
    if fit.testbed is not None and fit.mode == "mean" and fit.points:
        tx, ty = [x for _, x, _ in fit.points], [y for _, _, y in fit.points]
        allx += tx
        ally += ty
        ax.scatter(tx, ty, s=30, marker="x", color="0.35", lw=1.1, zorder=2,
                   label=_wrap(f"testbed {fit.testbed.path.name} ({len(tx)} models)"))
    xlo, xhi = _limits(allx)
    ylo, yhi = _limits(ally)
    lo, hi = min(xlo, ylo), max(xhi, yhi)
    import numpy as np

    grid = [sigmoid(t) for t in np.linspace(logit(lo), logit(hi), 200)]
    ax.plot(grid, grid, ls=":", color="0.55", lw=1, label="y = x", zorder=1)
    if fit.ok and fit.mode == "per-set":
        ax.plot([], [], " ", label=_wrap("effective robustness fitted per OOD set (see the table): no single line "
                                         "for the mean"))
    elif fit.ok:
        who = f"testbed {fit.testbed.path.name}" if fit.testbed is not None else ", ".join(map(runs.name,
                                                                                                fit.baselines))
        ax.plot(grid, [sigmoid(fit.a * logit(x) + fit.b) for x in grid], ls="--", color="black", lw=1.3, zorder=1,
                label=_wrap(f"baseline fit ({who}): logit(OOD) = {fit.a:.2f}·logit(ID) "
                            f"{'+' if fit.b >= 0 else '−'} {abs(fit.b):.2f}"))
    else:
        ax.plot([], [], " ", label=_wrap(f"no baseline fit: {fit.reason}"))  # a legend line, never over data
    clipped = sum(x in (0.0, 1.0) or y in (0.0, 1.0) for lab in labels for _, x, y in pts[lab])
    if clipped:
        ax.text(0.99, 0.01, f"{clipped} run(s) at 0% or 100% drawn half a test sample inside (as in the fit)",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=8.5, color="0.3")
    _logit_axis(ax, "x", xlo, xhi)
    _logit_axis(ax, "y", ylo, yhi)
    ax.set_xlabel("ID test accuracy (%, logit scale)", fontsize=11)
    ax.set_ylabel(f"OOD test accuracy, mean of {n_ood} sets (%, logit scale)", fontsize=11)
    ax.set_title(f"ID vs OOD accuracy: small dots are seeds, large markers the row mean ± {_spread_name(se)}",
                 fontsize=12)
    ax.tick_params(labelsize=9.5)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9, frameon=False, borderaxespad=0)
    return fig, None


def _percent_limits(ax) -> None:
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(lo, 0.0), min(hi, 100.0))


def _wise_points(run: Run) -> list[tuple[float, float, float]]:
    """(alpha, ID acc, OOD mean acc) along a run's WiSE-FT curve."""
    out = []
    for p in run.wise or []:
        if not isinstance(p, dict) or not isinstance(p.get("metrics"), dict):
            continue
        m = p["metrics"]
        i = next((v for k, v in m.items() if k.endswith("/id/acc")), None)
        o = next((v for k, v in m.items() if k.endswith("/ood/mean/acc")), None)
        if isinstance(p.get("alpha"), (int, float)) and i is not None and o is not None:
            out.append((float(p["alpha"]), float(i), float(o)))
    return out


def _theta0(runs: list[Run]) -> str:
    """What θ₀ is in these runs: with head=zeroshot the zero-shot model (the paper's recipe), else the pretrained
    body with the linear probe's head."""
    kinds = {"the zero-shot model" if str(r.get("head._target_", "")).endswith("ZeroShotHead")
             else "pretrained body + linear-probe head" for r in runs}
    return " or ".join(sorted(kinds)) or "pretrained body + linear-probe head"


def wise_markdown(runs: Runs, label: str, metric: str = "acc", se: bool = False) -> str | None:
    """The WiSE-FT curve of one row as a table: per alpha, mean ± std (s.e. with se) over seeds of ID, each OOD
    set and the
    OOD mean, and per column the seeds in which alpha beats alpha = 1 (the fine-tuned endpoint), paired by
    seed. None when the row's runs have no curve."""
    done = [r for r in runs.row(label) if r.done and r.wise]
    if not done:
        return None
    sets = ["id", *[f"ood/{s}" for s in runs.ood_sets()], "ood/mean"]
    per_alpha: dict[float, dict[int, dict]] = {}
    for r in done:
        for p in r.wise:
            per_alpha.setdefault(float(p["alpha"]), {})[r.seed] = p["metrics"]
    alphas = sorted(per_alpha)
    end = per_alpha.get(1.0, {})
    better = (lambda d: d > 0) if metric == "acc" else (lambda d: d < 0)
    head = ["alpha", *[("ID" if s == "id" else "OOD " + s.removeprefix("ood/")) for s in sets]]
    # θ_ft is the run's selected checkpoint: say how it was selected (wise_ft: the end of fine-tuning)
    rules = sorted({selection_words(r) for r in done})
    lines = [f"**WiSE-FT curve of {runs.name(label)}.** Test {metric} (%), mean ± {_spread_name(se)} over "
             f"{len(done)} seeds, of "
             f"(1 − α) θ₀ + α θ_ft (θ₀: {_theta0(done)}; θ_ft: the fine-tuned checkpoint, "
             f"{'; '.join(rules)}). In brackets: seeds in which α beats α = 1, paired by seed.", "",
             "| " + " | ".join(head) + " |", "|---" + "|---:" * len(sets) + "|"]
    scale = 100 if metric in ("acc", "ece") else 1
    for a in alphas:
        cells = []
        for s in sets:
            key = f"test/wise/{a:g}/{s}/{metric}"
            vals = {seed: m[key] for seed, m in per_alpha[a].items() if key in m}
            if not vals:
                cells.append("–")
                continue
            xs = [scale * v for v in vals.values()]
            sd = _sd(xs, se) if len(xs) > 1 else float("nan")
            cell = f"{statistics.fmean(xs):.1f} ± {sd:.1f}"
            end_key = f"test/wise/1/{s}/{metric}"
            paired = [(v, end[seed][end_key]) for seed, v in vals.items() if seed in end and end_key in end[seed]]
            if a != 1.0 and paired:
                cell += f" ({sum(better(v - e) for v, e in paired)}/{len(paired)})"
            cells.append(cell)
        lines.append(f"| {a:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _band(ax, xs, per_x: list[list[float]], color, label, se: bool = False):
    means = [100 * statistics.fmean(v) for v in per_x]
    sds = [100 * _sd(v, se) for v in per_x]
    ax.plot(xs, means, "-o", color=color, ms=4, lw=1.8, label=label)
    ax.fill_between(xs, [m - s for m, s in zip(means, sds)], [m + s for m, s in zip(means, sds)], color=color,
                    alpha=0.18, lw=0)


def _wise(runs: Runs, labels: list[str], colors: dict, se: bool = False):
    curves = {}
    for lab in labels:
        per_alpha: dict[float, list[tuple[float, float]]] = {}
        n = 0
        for r in runs.row(lab):
            if r.done and (pts := _wise_points(r)):
                n += 1
                for a, i, o in pts:
                    per_alpha.setdefault(a, []).append((i, o))
        if per_alpha:
            curves[lab] = (sorted(per_alpha), per_alpha, n)
    if not curves:
        return None, "no run has a WiSE-FT curve (results.json `wise`; schedule=wise_ft)"
    fig = _new_figure(11.5, 4.8)
    axes = fig.subplots(1, 2, sharex=True)
    for lab, (alphas, per_alpha, n) in curves.items():
        for ax, j in zip(axes, (0, 1)):
            _band(ax, alphas, [[p[j] for p in per_alpha[a]] for a in alphas], colors[lab],
                  _wrap(f"{runs.name(lab)} ({_n(n, len(runs.row(lab)))})"), se)
    for ax, what in zip(axes, ("ID test accuracy", f"OOD test accuracy, mean of {len(runs.ood_sets())} sets")):
        ax.set_title(what, fontsize=11.5)
        ax.set_ylabel("accuracy (%)", fontsize=10.5)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0], ["0\nθ₀", "0.25", "0.5", "0.75", "1\nfine-tuned"], fontsize=9.5)
        ax.set_xlabel("α, weights (1 − α)·θ₀ + α·θ_ft", fontsize=10.5)
        ax.set_xlim(-0.03, 1.03)
        _percent_limits(ax)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=9.5)
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.03, 1.0), fontsize=9, frameon=False, borderaxespad=0,
                   title=f"mean ± {_spread_name(se)} over seeds", title_fontsize=9)
    with_curve = [r for lab in curves for r in runs.row(lab) if r.done and r.wise]
    fig.suptitle(f"WiSE-FT: interpolating from θ₀ ({_theta0(with_curve)}) to the fine-tuned weights", fontsize=12)
    return fig, None


def _legend_that_fits(fig, handles, names, **kw):
    """A legend right of the axes, in as many columns as it takes to fit the figure's height, the figure
    widened by the added columns. One column is cut off at the figure's bottom edge past about ten rows."""
    legend = fig.legend(handles, names, loc="outside right upper", **kw)
    fig.canvas.draw()  # the legend's size as rendered (wrapped labels are several lines)
    box = legend.get_window_extent()
    room = 0.9 * fig.get_figheight() * fig.dpi  # what constrained layout leaves of the height, and a margin
    if box.height <= room:
        return legend
    ncols = math.ceil(box.height / room)
    legend.remove()
    fig.set_figwidth(fig.get_figwidth() + (ncols - 1) * box.width / fig.dpi)
    return fig.legend(handles, names, loc="outside right upper", ncols=ncols, **kw)


def _severity(runs: Runs, labels: list[str], colors: dict, metric: str = "acc", se: bool = False):
    families: dict[str, list[int]] = {}
    for s in runs.ood_sets():
        if m := re.fullmatch(r"(.+)_s(\d+)", s):
            families.setdefault(m.group(1), []).append(int(m.group(2)))
    if not families:
        return None, "no OOD set is named <name>_s<severity>"
    ncols = min(len(families), 3)
    nrows = math.ceil(len(families) / ncols)
    fig = _new_figure(5.2 * ncols + 2.6, 4.4 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, sev) in zip(axes, families.items()):
        sev = sorted(sev)
        xs = [0] + sev
        keys = ["test/id/acc"] + [f"test/ood/{name}_s{k}/acc" for k in sev]
        shown = [lab for lab in labels if any(r.done for r in runs.row(lab))]
        width = min(0.3, 0.08 * len(shown))  # rows side by side at each severity, so error bars do not hide
        for j, lab in enumerate(shown):
            done = [r for r in runs.row(lab) if r.done]
            vals = [[r.value(k) for r in done if r.value(k) is not None] for k in keys]
            if not done or not all(vals):
                continue
            means = [100 * statistics.fmean(v) for v in vals]
            sds = [100 * _sd(v, se) for v in vals]
            dodge = (j - (len(shown) - 1) / 2) * width / max(len(shown) - 1, 1)
            ax.errorbar([x + dodge for x in xs], means, yerr=sds, fmt="-o", ms=4.5, lw=1.8, capsize=3,
                        color=colors[lab],
                        label=_wrap(f"{runs.name(lab)} ({_n(len(done), len(runs.row(lab)))})"))
        ax.set_xticks(xs, ["0\n(ID)"] + [str(k) for k in sev], fontsize=9.5)
        ax.set_xlabel("corruption severity (0: the clean ID test set)", fontsize=10.5)
        ax.set_ylabel("test accuracy (%)", fontsize=10.5)
        ax.set_title(f"OOD sets {name}_s{min(sev)}..s{max(sev)}", fontsize=11.5)
        _percent_limits(ax)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=9.5)
    for ax in axes[len(families):]:
        ax.set_visible(False)
    handles, names = axes[0].get_legend_handles_labels()
    if not handles:
        return None, "no finished run reports every severity"
    _legend_that_fits(fig, handles, names, fontsize=9, frameon=False,
                      title=f"mean ± {_spread_name(se)} over seeds", title_fontsize=9)
    fig.suptitle("Accuracy against corruption severity", fontsize=12)
    return fig, None


def _drift_values(run: Run, kind: str, where: str, groups: list[str]) -> list[float | None]:
    """Per group, the selected checkpoint's CKA or feature change on the ID set (where="id") or averaged over
    the OOD sets (where="ood")."""
    final = ((run.diagnostics or {}).get("final") or {}).get(kind) or {}
    names = ["id"] if where == "id" else [s for s in final if s.startswith("ood/")]
    out = []
    for g in groups:
        vals = [final[n].get(g) for n in names if n in final]
        out.append(statistics.fmean(vals) if vals and None not in vals else None)
    return out


def _drift(runs: Runs, labels: list[str], colors: dict, se: bool = False):
    """Drift from the pretrained network per block group (thawlab/diagnostics.py): linear CKA (top) and relative
    feature change (bottom), ID (left) and OOD mean (right), one line per row, mean ± spread over seeds."""
    with_drift = [r for lab in labels for r in runs.row(lab) if r.done and (r.diagnostics or {}).get("final")]
    if not with_drift:
        return None, "no run has drift diagnostics (results.json `diagnostics`; diagnostics=none turns them off)"
    groups = list(with_drift[0].diagnostics.get("groups") or [])
    fig = _new_figure(11.5, 7.6)
    axes = fig.subplots(2, 2, sharex=True)
    kinds = (("cka", "linear CKA with θ₀"), ("feature_change", "‖f − f₀‖ / ‖f₀‖"))
    xs = list(range(len(groups)))
    for lab in labels:
        done = [r for r in runs.row(lab) if r.done and (r.diagnostics or {}).get("groups") == groups]
        if not done:
            continue
        for i, (kind, _) in enumerate(kinds):
            for j, where in enumerate(("id", "ood")):
                per_run = [_drift_values(r, kind, where, groups) for r in done]
                per_x = [[v[k] for v in per_run if v[k] is not None] for k in xs]
                if not all(per_x):
                    continue
                means = [statistics.fmean(v) for v in per_x]
                sds = [_sd(v, se) for v in per_x]
                ax = axes[i][j]
                ax.plot(xs, means, "-o", color=colors[lab], ms=4, lw=1.8,
                        label=_wrap(f"{runs.name(lab)} ({_n(len(done), len(runs.row(lab)))})"))
                ax.fill_between(xs, [m - d for m, d in zip(means, sds)], [m + d for m, d in zip(means, sds)],
                                color=colors[lab], alpha=0.18, lw=0)
    for i, (kind, what) in enumerate(kinds):
        for j, where in enumerate(("ID test set", f"OOD test sets (mean of {len(runs.ood_sets())})")):
            ax = axes[i][j]
            ax.set_title(f"{what}: {where}", fontsize=11)
            ax.set_xticks(xs, groups, rotation=30, ha="right", fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.tick_params(labelsize=9.5)
        axes[i][0].set_ylabel(what, fontsize=10.5)
    for ax in axes[1]:
        ax.set_xlabel("block group output (pooled: the head's input)", fontsize=10.5)
    handles, names = axes[0][0].get_legend_handles_labels()
    if not handles:
        return None, "no row has drift diagnostics for every group"
    _legend_that_fits(fig, handles, names, fontsize=9, frameon=False,
                      title=f"mean ± {_spread_name(se)} over seeds", title_fontsize=9)
    fig.suptitle("Drift from the pretrained network per block group (the selected checkpoint)", fontsize=12)
    return fig, None


def figures(runs: Runs, out=None, baselines=None, rows=None, fit: ERFit | None = None,
            formats=FORMATS, se: bool = False) -> FigureSet:
    """The figures (matplotlib Figures, drawn with Agg; pyplot's state is not touched); saved to
    out/<name>.png and .pdf when `out` is given. A figure without data is skipped with a note."""
    labels = [runs.resolve(x, "--rows") for x in rows] if rows else runs.labels()
    fit = fit or effective_robustness(runs, baselines)
    colors = _colors(runs.labels())
    result = FigureSet()
    for name, make in (("id_vs_ood", lambda: _scatter(runs, labels, fit, colors, se)),
                       ("wise", lambda: _wise(runs, labels, colors, se)),
                       ("severity", lambda: _severity(runs, labels, colors, se=se)),
                       ("drift", lambda: _drift(runs, labels, colors, se))):
        fig, why = make()
        if fig is None:
            result.notes.append(f"{name} figure skipped: {why}")
            continue
        result.figures[name] = fig
        if out is not None:
            Path(out).mkdir(parents=True, exist_ok=True)
            for ext in formats:
                path = Path(out) / f"{name}.{ext}"
                fig.savefig(path, dpi=150, metadata={"CreationDate": None} if ext == "pdf" else None)
                result.paths.append(path)
    return result
