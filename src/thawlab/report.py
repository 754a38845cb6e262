"""`thawlab-report`: tables, figures and paired comparisons from the results.json files of runs and sweeps.

    thawlab-report PATH... [--out DIR] [--metric acc|nll|ece] [--se] [--group-by KEY...] [--rows LABEL...]
                   [--baselines LABEL... | --testbed FILE] [--er-fit mean|per-set] [--compare A B]...
                   [--label ROW=NAME]... [--labels FILE] [--include-smoke] [--tune KEY] [--no-figures]

Every results.json under the PATHs (searched recursively; a PATH may also be one results.json) is one run. Runs
are grouped into rows: one row per configuration, i.e. the run's command-line overrides (results.json
`overrides`) without the seed; a row is labelled by the overrides that vary across runs (those common to all
runs are left out of the labels and named in the caption). `--group-by schedule.name head._target_` forms rows
from resolved config values instead (label `schedule.name=full,...`). Wherever a row label is asked for, the
label itself or, when unambiguous, its values alone (`lp_ft` for `schedule=lp_ft`) is accepted.
Overrides that do not change the experiment (INERT_KEYS: ckpt_path, logger, hydra.*, progress bar, loader
workers, ...) are never row factors: a job resumed with `ckpt_path=last` is the same configuration and seed.
Under --group-by a row may merge configurations; a seed is a gap only when no run of the row has it.
`--label ROW=NAME` (repeatable) and `--labels FILE` (YAML or JSON, row -> name) give rows display names.

Smoke runs (results.json config.debug set, a `debug=` override, or trainer.limit_{train,val,test}_batches
other than the full float 1.0) measure a few batches and are not results: they are left out, with a warning
on stderr naming how many and where, unless --include-smoke (then the caption says so).

Outputs, next to the runs (the common parent of the PATHs, or the single PATH) or in --out:

- table.md, table.tex, table.csv: per row, ID, each OOD set and the OOD mean (test `--metric`, accuracy by
  default), ECE on the ID test set, the source task (forgetting; when the runs have it), effective robustness
  (per OOD set too with --er-fit per-set) and n. Per column the best mean (higher accuracy and effective
  robustness, lower NLL and ECE) and every mean within the best one's spread as shown (std, or s.e.) are bold
  (md, tex). table.tex is booktabs with the values aligned at ±, minus signs as \textminus, scaled to the
  line width only when wider (needs booktabs and graphicx). Cells are mean ± std (sample std, n−1) over
  seeds, or mean ± s.e. (std/√n) with --se (so are the paired files, the WiSE-FT tables and the figures' bars
  and bands). n counts the seeds that finished out of those expected: every seed seen anywhere in the
  reported runs is expected for every configuration. A failed run (status "failed"), a run directory without results.json (killed) and a
  seed that has no run at all lower n and are named, with their error, in the notes; nothing is averaged
  over silently.
- id_vs_ood, wise, severity (.png and .pdf): ID vs OOD-mean accuracy on logit axes with the baseline fit, the
  WiSE-FT curves, accuracy against corruption severity. A figure without data is skipped with a note.
- paired_<A>_vs_<B>.md for each `--compare A B`: per-seed differences A − B over the seeds both rows
  finished, mean ± std (s.e. with --se), a t-based 95% confidence interval of the mean difference, the
  two-sided paired t-test's p-value (scipy.stats.ttest_rel), and in how many seeds A is better.

Effective robustness (Taori et al., NeurIPS 2020; used by WiSE-FT, Wortsman et al., CVPR 2022). With
logit(p) = ln(p / (1 − p)) and σ its inverse, a line is fitted by ordinary least squares through the baseline
runs, one point per run (seed):

    logit(OOD mean acc) = a · logit(ID acc) + b

and every run's effective robustness is

    ER = OOD mean acc − σ(a · logit(ID acc) + b)

in accuracy units (the table shows percentage points), averaged per row like any other cell. Baseline rows
are `--baselines`, by default the rows whose runs all have schedule.name frozen or full. Before the logit an
accuracy p measured on n test samples is clipped to [0.5/n, 1 − 0.5/n] (half a sample from either end; n is
results.json `counts`: test/id for the ID accuracy, the OOD sets together for the OOD mean; 0.5/1000 when the
counts are missing). The fit needs at least two distinct ID accuracies among the baseline runs; otherwise
the column is a gap and the caption says why.

`--er-fit per-set` fits one line per OOD set s instead, as Taori et al. do per distribution shift:
logit(acc_s) = a_s · logit(ID acc) + b_s, ER_s = acc_s − σ(a_s · logit(ID acc) + b_s) (columns `ER s`), and
the `eff. robustness` column is a run's mean of ER_s over the sets. `--testbed FILE` fits the line(s) through
baseline models instead of rows, as the papers do (their testbed of models trained on the ID data): a CSV
with columns `model`, `id` and one per OOD set (accuracies in [0, 1]; see docs/testbed.example.csv and
Testbed); their OOD mean is the unweighted mean over the sets, and the clipping uses the runs' test counts.
The caption says which fit was used (testbed file or baseline rows; per set or the OOD mean).

Exit status: 0; 1 when a results.json was unreadable or not a thawlab results file, or runs were left out as
incompatible (different data: another data._target_ or other evaluation sets; the largest compatible group
is reported), always after writing what could be written; 2 for bad input (a PATH without results, an
unknown row label), one line on stderr and nothing written.

Python API (what the analysis notebook uses):

    runs = load(["multirun/strategies"])          # Runs: .runs, .skipped, .smoke, .labels(), .row(label)
    rename(runs, {"lp_ft": "LP-FT"})              # display names (tables, paired files, legends)
    table = summarize(runs, metric="acc", se=False, baselines=None, rows=None, er_fit="mean", testbed=None)
    table.rows[0].cells["OOD mean"].mean; table.best(); table.markdown(); table.latex(); table.csv()
    fit = effective_robustness(runs, mode="per-set")  # ERFit: .a, .b (mean), .lines (per set), .ok, .per_run
    pair = paired(runs, "lp_ft", "full", "test/ood/printed/acc")  # Pair: .diffs, .wins, .ci95, .p_value
    figs = figures(runs, out=None)                # FigureSet: .figures (matplotlib Figures), .paths, .notes
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import statistics
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from thawlab.errors import did_you_mean
from thawlab.results import RESULTS, read_results

PROG = "thawlab-report"
METRICS = ("acc", "nll", "ece")
BASELINE_SCHEDULES = ("frozen", "full")
DEFAULT_N = 1000  # test samples assumed for the clipping when results.json has no counts
FORMATS = ("png", "pdf")
ER_FITS = ("mean", "per-set")

# Overrides that change how a run is executed, resumed or logged, never what it computes. A job resumed with
# `ckpt_path=last`, relaunched with another logger, launcher or more loader workers is the same experiment and
# the same seed: these keys are never row factors, and two runs differing only in them are one configuration
# (a resumed seed replaces its killed run instead of opening a row of its own). A key covers its subkeys
# (`hydra` covers hydra.run.dir and hydra/launcher=...). Keys that do change results (seed, debug, trainer.limit_*,
# trainer.precision, trainer.deterministic, ...) are deliberately absent.
INERT_KEYS = ("ckpt_path", "logger", "hydra", "cache_dir", "export", "trainer.enable_progress_bar",
              "trainer.log_every_n_steps", "data.num_workers", "data.pin_memory", "data.persistent_workers",
              "data.source.num_workers", "ddp.timeout_s", "ddp.grace_s")
# Trainer limits under which a run trains or evaluates on a few batches (debug=smoke sets them): its metrics
# are not results. A limit is full when unset or the float 1.0 (an int 1 is one batch, as in Lightning).
SMOKE_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches")


_ABSENT = object()


class ReportError(Exception):
    """Bad input: printed as one line, exit status `code`, nothing written."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------------------- loading

@dataclass(eq=False)
class Run:
    """One run: a results.json, or a slot with none (status "missing": killed, or never run)."""
    path: Path | None  # the results.json, the run directory of a killed run, None for a seed never run
    status: str  # "done", "failed" or "missing"
    seed: int | None
    overrides: tuple[str, ...]  # the command-line overrides without the seed, in their order
    config: dict
    metrics: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    selection: dict | None = None
    wise: list | None = None
    error: str | None = None
    finished: str = ""
    label: str = ""
    inert: tuple[str, ...] = ()  # overrides that do not change the experiment (INERT_KEYS): never in the key
    smoke: str | None = None  # why this is a smoke run (smoke_reason), None for a real one

    @property
    def done(self) -> bool:
        return self.status == "done"

    @property
    def key(self) -> tuple[str, ...]:
        """The configuration: overrides but the seed, order-free."""
        return tuple(sorted(self.overrides))

    def get(self, dotted: str, default=None):
        node = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def value(self, key: str) -> float | None:
        """A metric, None when absent or not finite."""
        v = self.metrics.get(key)
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    def where(self) -> str:
        return str(self.path) if self.path else "no run directory"


@dataclass
class Skipped:
    path: Path
    reason: str
    kind: str  # "corrupt", "incompatible" or "duplicate"


@dataclass
class Runs:
    runs: list[Run]
    skipped: list[Skipped]
    root: Path
    group_by: tuple[str, ...] = ()
    common: tuple[str, ...] = ()  # overrides common to all runs (left out of the labels)
    tuned: dict = field(default_factory=dict)  # row -> (key, chosen value, {value: mean val score}), see tune()
    smoke: list = field(default_factory=list)  # smoke runs left out (load(include_smoke=False))
    smoke_included: list = field(default_factory=list)  # smoke runs reported (include_smoke=True)
    names: dict = field(default_factory=dict)  # row label -> display name (rename(), --label, --labels)

    def name(self, label: str) -> str:
        """The row's display name: the one given with rename()/--label, else its label."""
        return self.names.get(label, label)

    @property
    def inert(self) -> tuple[str, ...]:
        """The inert overrides seen in the runs (left out of the configurations; named in the caption)."""
        return tuple(dict.fromkeys(o for r in self.runs for o in r.inert))

    def labels(self) -> list[str]:
        out: list[str] = []
        for r in self.runs:
            if r.label not in out:
                out.append(r.label)
        return out

    def row(self, label: str) -> list[Run]:
        return [r for r in self.runs if r.label == label]

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.runs if r.seed is not None})

    @property
    def done(self) -> list[Run]:
        return [r for r in self.runs if r.done]

    @property
    def problems(self) -> list[Skipped]:
        """What makes the exit status 1: unreadable files and incompatible runs (duplicates are not)."""
        return [s for s in self.skipped if s.kind != "duplicate"]

    def ood_sets(self) -> list[str]:
        """OOD evaluation sets in the order the runs report them (the mean left out)."""
        out: list[str] = []
        for r in self.done:
            for k in r.metrics:
                parts = k.split("/")
                if len(parts) == 4 and parts[:2] == ["test", "ood"] and parts[2] != "mean" and parts[2] not in out:
                    out.append(parts[2])
        return out

    def resolve(self, label: str, option: str = "row") -> str:
        """A row label as typed: the label itself or, if unambiguous, its values alone (`lp_ft`)."""
        labels = self.labels()
        if label in labels:
            return label
        short = [lab for lab in labels if _values_only(lab) == label]
        if len(short) == 1:
            return short[0]
        raise ReportError(f"{option}: unknown row label {label!r} (available: {', '.join(labels)})"
                          f"{did_you_mean(label, labels + [_values_only(x) for x in labels])}")


def _values_only(label: str) -> str:
    return ",".join(p.split("=", 1)[-1] for p in _split_label(label))


def _split_label(label: str) -> list[str]:
    # "a=1,b=[1,2]" -> ["a=1", "b=[1,2]"]: split on commas outside brackets
    parts, depth, cur = [], 0, ""
    for ch in label:
        depth += ch in "[{(" and 1 or 0
        depth -= ch in "]})" and 1 or 0
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _natural(path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _override_key(o: str) -> str:
    return o.split("=", 1)[0].lstrip("+~")


def inert(override: str) -> bool:
    """True for an override that does not change the experiment (INERT_KEYS, with their subkeys)."""
    key = _override_key(override).replace("/", ".")
    return any(key == k or key.startswith(k + ".") for k in INERT_KEYS)


def _factors(overrides) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the overrides that define the configuration, the inert ones), the seed in neither."""
    kept = [o for o in overrides if _override_key(o) != "seed"]
    return tuple(o for o in kept if not inert(o)), tuple(o for o in kept if inert(o))


def smoke_reason(config: dict, overrides=()) -> str | None:
    """Why a run is a smoke run (metrics on a few batches, not results), or None.

    results.json `config.debug` names the debug preset when the training side records it; older files have it
    null even for smoke runs, so the trainer limits the preset sets (and a `debug=` override) count too."""
    debug = config.get("debug") if isinstance(config, dict) else None
    if debug not in (None, False, "", "null", "none"):
        return f"debug={debug if isinstance(debug, str) else json.dumps(debug)}"
    for o in overrides:
        if _override_key(o) == "debug" and o.split("=", 1)[-1] not in ("null", "none", ""):
            return o
    trainer = config.get("trainer") if isinstance(config, dict) else None
    for k in SMOKE_LIMITS:
        v = trainer.get(k) if isinstance(trainer, dict) else None
        if v is not None and not (isinstance(v, float) and v == 1.0):
            return f"trainer.{k}={v}"
    return None


def _parse(path: Path) -> Run:
    """A results.json as a Run; ValueError (with the reason) when it is not a readable thawlab results file."""
    try:
        data = read_results(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    except ValueError as e:
        raise ValueError(str(e).removeprefix(f"{path}: ")) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    status = data.get("status")
    if status not in ("done", "failed"):
        raise ValueError(f"status {status!r} is neither 'done' nor 'failed'")
    if not isinstance(data["metrics"], dict) or not isinstance(data["config"], dict):
        raise ValueError("'metrics' and 'config' must be JSON objects")
    seed = data["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed {seed!r} is not an integer")
    overrides = data.get("overrides")
    if overrides is None:  # results written before the contract had `overrides`: Hydra's own record
        overrides = _hydra_overrides(path.parent)
        if overrides is None:
            raise ValueError("missing overrides (and no .hydra/overrides.yaml beside it)")
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ValueError("'overrides' must be a list of strings")
    if status == "done" and not isinstance(data["selection"], dict):
        raise ValueError("a finished run without its 'selection'")
    factors, inert_ = _factors(overrides)
    return Run(path=path, status=status, seed=seed, overrides=factors, inert=inert_, config=data["config"],
               metrics=data["metrics"], counts=data.get("counts") or {}, selection=data.get("selection"),
               wise=data.get("wise") or None, error=data.get("error") if status == "failed" else None,
               finished=str(data.get("finished") or ""), smoke=smoke_reason(data["config"], overrides))


def _hydra_overrides(run_dir: Path) -> list[str] | None:
    f = run_dir / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return None
    import yaml

    try:
        out = yaml.safe_load(f.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return [str(o) for o in out] if isinstance(out, list) else None


def _killed(run_dir: Path) -> Run | None:
    """A run directory Hydra made (.hydra/) whose run never wrote results.json: killed, or still running."""
    overrides = _hydra_overrides(run_dir)
    if overrides is None:
        return None
    import yaml

    try:
        config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    seed = next((o.split("=", 1)[1] for o in overrides if _override_key(o) == "seed"), config.get("seed", 0))
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        return None
    config = config if isinstance(config, dict) else {}
    factors, inert_ = _factors(overrides)
    return Run(path=run_dir, status="missing", seed=seed, overrides=factors, inert=inert_, config=config,
               error="no results.json (killed, or still running)", smoke=smoke_reason(config, overrides))


def _find(path: Path) -> tuple[list[Path], list[Path]]:
    """results.json files and killed run directories under a PATH."""
    if path.is_file():
        return [path], []
    files, killed = [], []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d not in ("wandb", "checkpoints", ".hydra", "csv"))
        if RESULTS in filenames:
            files.append(Path(dirpath) / RESULTS)
        elif (Path(dirpath) / ".hydra" / "overrides.yaml").is_file():
            killed.append(Path(dirpath))
    return sorted(files, key=_natural), sorted(killed, key=_natural)


def _sets(run: Run) -> tuple[str, ...] | None:
    """The evaluation sets a finished run reports (None for a run without metrics)."""
    if not run.done:
        return None
    sets = set()
    for k in run.metrics:
        parts = k.split("/")
        if len(parts) == 3 and parts[:2] == ["test", "id"]:
            sets.add("id")
        elif len(parts) == 4 and parts[:2] == ["test", "ood"] and parts[2] != "mean":
            sets.add(parts[2])
    return tuple(sorted(sets))


def _compatible(runs: list[Run]) -> tuple[list[Run], list[Skipped]]:
    """The largest group of runs on the same data (data._target_ and evaluation sets); the rest skipped."""
    target = {id(r): str(r.get("data._target_")) for r in runs}
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.done:
            groups.setdefault((target[id(r)], _sets(r)), []).append(r)
    if groups:
        best = max(groups, key=lambda g: (len(groups[g]), sum(target[id(r)] == g[0] for r in runs)))
    else:  # nothing finished: group by the data alone
        counts: dict[str, int] = {}
        for r in runs:
            counts[target[id(r)]] = counts.get(target[id(r)], 0) + 1
        best = (max(counts, key=counts.get), None)
    kept, skipped = [], []
    for r in runs:
        t, s = target[id(r)], _sets(r)
        if t == best[0] and (s is None or best[1] is None or s == best[1]):
            kept.append(r)
            continue
        if t != best[0]:
            why = f"data._target_ {t}, not {best[0]}"
        else:
            extra, lack = sorted(set(s) - set(best[1])), sorted(set(best[1]) - set(s))
            why = "other evaluation sets (" + "; ".join(
                x for x in (f"has {', '.join(extra)}" if extra else "", f"lacks {', '.join(lack)}" if lack else "")
                if x) + ")"
        n = len(groups.get(best, []))
        skipped.append(Skipped(r.path, f"incompatible with the {n} reported runs: {why}", "incompatible"))
    return kept, skipped


def _dedupe(runs: list[Run]) -> tuple[list[Run], list[Skipped]]:
    """One run per configuration and seed: a finished one before a failed or killed one, then the latest."""
    rank = {"done": 2, "failed": 1, "missing": 0}
    best: dict[tuple, Run] = {}
    for r in runs:
        k = (r.key, r.seed)
        if k not in best or (rank[r.status], r.finished) > (rank[best[k].status], best[k].finished):
            best[k] = r
    kept = [r for r in runs if best[(r.key, r.seed)] is r]
    skipped = [Skipped(r.path, f"a second run of the same configuration and seed {r.seed}; "
                               f"reported instead: {best[(r.key, r.seed)].where()}", "duplicate")
               for r in runs if best[(r.key, r.seed)] is not r]
    return kept, skipped


def _fmt_value(v) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return "null" if v is None else str(v)


def load(paths, group_by=None, include_smoke: bool = False) -> Runs:
    """The runs under `paths` (directories searched recursively, or results.json files), labelled by row.

    Unreadable files, runs on other data than the largest compatible group and second runs of the same
    configuration and seed are left out and listed in `.skipped` with the reason. Smoke runs (smoke_reason:
    debug=smoke, trainer limits) are left out and listed in `.smoke` unless include_smoke. Every seed seen in
    the runs is expected of every row: a row without it gets a "missing" run (a gap). Under group_by a row may
    hold several configurations; a seed is missing from it only when none of them has a run of that seed."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    group_by = tuple(group_by or ())
    runs: list[Run] = []
    skipped: list[Skipped] = []
    dirs = []
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"{p}: no such file or directory")
        files, killed = _find(p)
        if not files:
            raise ReportError(f"{p}: no results ({RESULTS}) under it")
        dirs.append(p if p.is_dir() else p.parent)
        for f in files:
            try:
                runs.append(_parse(f))
            except ValueError as e:
                skipped.append(Skipped(f, str(e), "corrupt"))
        runs += [k for k in map(_killed, killed) if k is not None]
    root = Path(os.path.commonpath([str(d.resolve()) for d in dirs]))
    seen: set = set()
    runs = [r for r in runs if not (r.path.resolve() in seen or seen.add(r.path.resolve()))]  # PATH in PATH
    runs.sort(key=lambda r: _natural(r.path))
    smoke = [r for r in runs if r.smoke]
    if not include_smoke:
        runs = [r for r in runs if not r.smoke]
        if smoke and not runs:
            raise ReportError(f"{', '.join(map(str, paths))}: all {len(smoke)} runs are smoke runs ({smoke[0].smoke}:"
                              f" metrics of a few batches, not results); --include-smoke reports them")
    if not runs:
        return Runs([], skipped, root, group_by)
    runs, incompatible = _compatible(runs)
    runs, duplicates = _dedupe(runs)
    skipped += incompatible + duplicates
    out = Runs(runs, skipped, root, group_by, smoke=[] if include_smoke else smoke,
               smoke_included=[r for r in runs if r.smoke] if include_smoke else [])
    _label(out)
    # every seed seen is expected of every row (without --group-by a row is one configuration)
    seeds = sorted({r.seed for r in runs})
    have = {(r.label, r.seed) for r in runs}
    for label in out.labels():
        like = next(r for r in runs if r.label == label)
        for s in seeds:
            if (label, s) not in have:
                runs.append(Run(path=None, status="missing", seed=s, overrides=like.overrides, config=like.config,
                                error="no run of this seed", label=label))
    return out


def _label(runs: Runs) -> None:
    if runs.group_by:
        known = [k for k in runs.group_by if any(r.get(k, _ABSENT) is not _ABSENT for r in runs.runs)]
        unknown = [k for k in runs.group_by if k not in known]
        if unknown:
            raise ReportError(f"--group-by {unknown[0]}: no run's config has this key")
        for r in runs.runs:
            r.label = ",".join(f"{k}={_fmt_value(r.get(k))}" for k in runs.group_by)
        return
    common = set(runs.runs[0].overrides)
    for r in runs.runs[1:]:
        common &= set(r.overrides)
    runs.common = tuple(o for o in runs.runs[0].overrides if o in common)
    for r in runs.runs:
        r.label = ",".join(o for o in r.overrides if o not in common) or "all"
    # the same configuration written in another order gets the label of its first appearance
    first: dict[tuple, str] = {}
    for r in runs.runs:
        r.label = first.setdefault(r.key, r.label)


def tune(runs: Runs, key: str) -> Runs:
    """Per row, keep the runs of the `key` value (e.g. optimizer.lr) with the best mean ID validation score of
    their selected checkpoints (results.json selection.value) over seeds: hyperparameters chosen on ID
    validation, as the method's own model selection, never on test or OOD data. Rows are relabelled without
    the key; the choice and every candidate's score go into the table's caption."""
    if not any(r.get(key, _ABSENT) is not _ABSENT for r in runs.runs):
        raise ReportError(f"--tune {key}: no run's config has this key")
    prefix = f"{key}="
    parts = (lambda r: r.label.split(",")) if runs.group_by else (
        lambda r: [o for o in r.overrides if o not in runs.common])
    base = {id(r): ",".join(o for o in parts(r) if not o.startswith(prefix)) or "all" for r in runs.runs}
    keep, tuned = [], {}
    for row in dict.fromkeys(base.values()):
        members = [r for r in runs.runs if base[id(r)] == row]
        scores: dict[str, list[float]] = {}
        for r in members:
            value = (r.selection or {}).get("value")
            if r.done and isinstance(value, (int, float)):
                scores.setdefault(_fmt_value(r.get(key)), []).append(float(value))
        if not scores:
            raise ReportError(f"--tune {key}: row {row} has no finished run with a validation score")
        means = {v: statistics.fmean(xs) for v, xs in scores.items()}
        best = max(means, key=means.get)
        tuned[row] = (key, best, means)
        for r in members:
            if _fmt_value(r.get(key)) == best:
                r.label = row
                keep.append(r)
    return Runs(keep, runs.skipped, runs.root, runs.group_by, runs.common, tuned, runs.smoke, runs.smoke_included,
                runs.names)


def rename(runs: Runs, names: dict) -> Runs:
    """Display names for rows (tables, paired files, figure legends): {row label or its values: name}. An
    unknown row is a ReportError naming it."""
    for label, name in names.items():
        if not isinstance(label, str) or not isinstance(name, str) or not name.strip():
            raise ReportError(f"--label {label!r}: a row label and a non-empty name are both needed")
        runs.names[runs.resolve(label, "--label")] = name
    return runs


# ------------------------------------------------------------------------------------------ effective robustness

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
    """Rows whose runs all have schedule.name frozen or full."""
    return [lab for lab in runs.labels()
            if all(r.get("schedule.name") in BASELINE_SCHEDULES for r in runs.row(lab))]


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


# ------------------------------------------------------------------------------------------------------- tables

@dataclass
class Column:
    name: str
    key: str  # a metric key, or "er"
    scale: float  # shown value = scale · stored value
    decimals: int
    higher_is_better: bool
    signed: bool = False


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
    cols += [Column(f"ER {s}", f"er/{s}", 100.0, 1, True, signed=True) for s in er_sets]
    cols.append(Column("eff. robustness", "er", 100.0, 1, True, signed=True))
    return cols


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
            if len(cells) < 2:
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
    rules: dict[str, int] = {}
    for r in runs:
        if r.done:
            rule = (r.selection or {}).get("rule") or "unknown"
            rules[rule] = rules.get(rule, 0) + 1
    if len(rules) == 1:
        return f"the checkpoint selected by {next(iter(rules))}"
    return "checkpoints selected by " + "; ".join(f"{k} ({v} runs)" for k, v in rules.items())


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
               f"{_rules(runs.runs)} on ID validation, mean ± {spread} over seeds. "
               f"{n_text}; a failed or missing run is a gap, never averaged away. Bold: per column the best mean "
               f"(lower NLL and ECE, higher accuracy and eff. robustness) and every mean within the best one's "
               f"{'s.e.' if se else 'std'} of it. {rows_text} {_er_caption(fit)}")
    if runs.tuned:
        key = next(iter(runs.tuned.values()))[0]
        choices = "; ".join(f"{row}: {best} (" + ", ".join(f"{v}: {100 * m:.1f}" for v, m in means.items()) + ")"
                            for row, (_, best, means) in runs.tuned.items() if row in labels)
        caption += (f" {key} chosen per row on ID validation (mean val/id/acc of the selected checkpoints over "
                    f"seeds, in %): {choices}.")
    if any(c.key.startswith("test/source/") for c in cols):
        caption += (" Source task: the fine-tuned backbone with the original source head on the source test set "
                    "(forgetting).")
    if runs.smoke_included:
        caption += f" Includes {len(runs.smoke_included)} smoke runs (not results)."
    return Table(cols, table_rows, metric, se, fit, caption, notes(runs, labels), dict(runs.names))


# ---------------------------------------------------------------------------------------------- paired compare

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
    if (col.key == "er" or col.key.startswith("er/")) and fit is None:
        fit = effective_robustness(runs, baselines)
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
             f"effective robustness, or the lower NLL or ECE, out of the paired n (ties named). Effective "
             f"robustness: {fit.describe()}.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for c, p in pairs:
        d = dict(zip(p.seeds, p.diffs))
        k = c.decimals
        cells = [f"{d[s]:+.{k}f}" if s in d else "–" for s in seeds]
        sp = p.se if se else p.std
        ms = "–" if p.mean is None else f"{p.mean:+.{k}f} ± " + (f"{sp:.{k}f}" if sp is not None else "–")
        ci = "–" if p.ci95 is None else f"[{p.ci95[0]:+.{k}f}, {p.ci95[1]:+.{k}f}]"
        win = f"{p.wins} of {p.n}" + (f" ({p.ties} tied)" if p.ties else "") if p.n else "–"
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


# ------------------------------------------------------------------------------------------------------ figures

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
        ax.errorbar([cx], [cy], xerr=xerr, yerr=yerr, fmt="o", ms=9, color=c, mec="black", mew=0.8,
                    ecolor=c, elinewidth=1.4, capsize=3, zorder=3,
                    label=_wrap(f"{runs.name(lab)} ({_n(len(pts[lab]), len(runs.row(lab)))})"
                                + (" · baseline" if lab in fit.baselines else "")))
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
    lines = [f"**WiSE-FT curve of {runs.name(label)}.** Test {metric} (%), mean ± {_spread_name(se)} over "
             f"{len(done)} seeds, of "
             f"(1 − α) θ₀ + α θ_ft (θ₀: pretrained body + linear-probe head; θ_ft: the fine-tuned checkpoint "
             f"selected on ID validation). In brackets: seeds in which α beats α = 1, paired by seed.", "",
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
    fig.suptitle("WiSE-FT: interpolating from θ₀ (pretrained body + linear-probe head) to the fine-tuned "
                 "weights", fontsize=12)
    return fig, None


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
    fig.legend(handles, names, loc="outside right upper", fontsize=9, frameon=False,
               title=f"mean ± {_spread_name(se)} over seeds", title_fontsize=9)
    fig.suptitle("Accuracy against corruption severity", fontsize=12)
    return fig, None


def figures(runs: Runs, out=None, baselines=None, rows=None, fit: ERFit | None = None,
            formats=FORMATS, se: bool = False) -> FigureSet:
    """The three figures (matplotlib Figures, drawn with Agg; pyplot's state is not touched); saved to
    out/<name>.png and .pdf when `out` is given. A figure without data is skipped with a note."""
    labels = [runs.resolve(x, "--rows") for x in rows] if rows else runs.labels()
    fit = fit or effective_robustness(runs, baselines)
    colors = _colors(runs.labels())
    result = FigureSet()
    for name, make in (("id_vs_ood", lambda: _scatter(runs, labels, fit, colors, se)),
                       ("wise", lambda: _wise(runs, labels, colors, se)),
                       ("severity", lambda: _severity(runs, labels, colors, se=se))):
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


# ---------------------------------------------------------------------------------------------------------- CLI

def _safe(s: str) -> str:
    return re.sub(r"[^\w.=,+-]", "_", s)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tables (md, tex, csv), figures (png, pdf) and paired comparisons from thawlab results.json "
                    "files.",
        epilog="effective robustness = OOD mean acc - sigmoid(a * logit(ID acc) + b), the line fitted by least "
               "squares\non logit axes through the baseline rows' runs; accuracies clipped to [0.5/n, 1 - 0.5/n] "
               "(n: test samples).\nexit status: 0; 1 if files were left out (unreadable, incompatible), after "
               "writing the rest;\n2 for bad input (no results, unknown label), nothing written.\nmore: "
               "python -c 'import thawlab.report; help(thawlab.report)'")
    ap.add_argument("paths", nargs="+", metavar="PATH", help="sweep or run directories (searched recursively), "
                                                              "or results.json files")
    ap.add_argument("--out", type=Path, metavar="DIR",
                    help="output directory (default: the common parent of the PATHs)")
    ap.add_argument("--metric", choices=METRICS, default="acc", help="metric of the ID, OOD and OOD mean columns")
    ap.add_argument("--se", action="store_true", help="mean ± standard error instead of ± std")
    ap.add_argument("--group-by", nargs="+", metavar="KEY", help="dotted config keys forming the rows "
                                                                 "(e.g. schedule.name), instead of the overrides")
    ap.add_argument("--rows", nargs="+", metavar="LABEL", help="the rows to show, in this order")
    ap.add_argument("--baselines", nargs="+", metavar="LABEL",
                    help="rows fitting the effective-robustness line (default: schedule.name frozen or full)")
    ap.add_argument("--testbed", type=Path, metavar="FILE",
                    help="CSV of baseline models trained on the ID data (columns model, id, one per OOD set; "
                         "accuracies in [0, 1]): the effective-robustness fit goes through them instead of rows")
    ap.add_argument("--er-fit", choices=ER_FITS, default="mean",
                    help="one line for the OOD mean (default) or one per OOD set (Taori et al.), with a column per set")
    ap.add_argument("--include-smoke", action="store_true",
                    help="report smoke runs too (debug=smoke or trainer.limit_*_batches: not results)")
    ap.add_argument("--label", action="append", default=[], metavar="ROW=NAME",
                    help='display name of a row, e.g. --label schedule=lp_ft="LP-FT" (repeatable)')
    ap.add_argument("--labels", type=Path, metavar="FILE", help="YAML or JSON mapping row label -> display name")
    ap.add_argument("--compare", nargs=2, action="append", metavar=("A", "B"), default=[],
                    help="paired comparison A − B over shared seeds (repeatable)")
    ap.add_argument("--tune", metavar="KEY", help="per row, keep the value of KEY (e.g. optimizer.lr) with the best "
                                                  "mean ID validation score; the caption says which")
    ap.add_argument("--no-figures", action="store_true", help="tables (and paired files) only")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return _report(args)
    except ReportError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.code


def _names(args) -> dict:
    """--labels FILE and --label ROW=NAME (these win) as {row: name}."""
    names = {}
    if args.labels:
        import yaml

        try:
            data = yaml.safe_load(args.labels.read_text())  # JSON is YAML
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ReportError(f"--labels {args.labels}: cannot be read ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ReportError(f"--labels {args.labels}: not a mapping of row label -> name")
        names.update({str(k): v for k, v in data.items()})
    for item in args.label:
        row, sep, name = item.rpartition("=")
        if not sep or not row or not name.strip():
            raise ReportError(f"--label {item!r}: expected ROW=NAME, e.g. schedule=lp_ft=LP-FT")
        names[row] = name.strip().strip('"')
    return names


def _report(args) -> int:
    runs = load(args.paths, group_by=args.group_by, include_smoke=args.include_smoke)
    if args.tune:
        runs = tune(runs, args.tune)
    for s in runs.skipped:
        print(f"{PROG}: {'warning' if s.kind == 'duplicate' else 'error'}: {s.path}: {s.reason}", file=sys.stderr)
    if runs.smoke:
        print(f"{PROG}: warning: left out {len(runs.smoke)} smoke run(s) under {_where(runs.smoke)} "
              f"({runs.smoke[0].smoke}: metrics of a few batches, not results); --include-smoke reports them",
              file=sys.stderr)
    if not runs.runs:
        print(f"{PROG}: error: no readable results under {', '.join(map(str, args.paths))}; nothing written",
              file=sys.stderr)
        return 1
    # every label and input file is checked before anything is written
    rows = [runs.resolve(x, "--rows") for x in args.rows] if args.rows else None
    baselines = [runs.resolve(x, "--baselines") for x in args.baselines] if args.baselines else None
    compare = [(runs.resolve(a, "--compare"), runs.resolve(b, "--compare")) for a, b in args.compare]
    rename(runs, _names(args))
    fit = effective_robustness(runs, baselines, args.er_fit, args.testbed)
    out = args.out or runs.root
    out.mkdir(parents=True, exist_ok=True)
    table = summarize(runs, metric=args.metric, se=args.se, rows=rows, fit=fit)
    written = []
    for name, text in (("table.md", table.markdown()), ("table.tex", table.latex()), ("table.csv", table.csv())):
        (out / name).write_text(text)
        written.append(out / name)
    print(table.markdown())
    if not args.no_figures:
        figs = figures(runs, out, rows=rows, fit=table.fit, se=args.se)
        written += figs.paths
        for n in figs.notes:
            print(f"note: {n}")
    for label in rows or runs.labels():
        text = wise_markdown(runs, label, args.metric, args.se)
        if text:
            path = out / (f"wise_{_safe(label)}.md" if len(runs.labels()) > 1 else "wise.md")
            path.write_text(text)
            written.append(path)
            print(text)
    for (a, b), typed in zip(compare, args.compare):
        text = paired_markdown(runs, a, b, args.metric, se=args.se, fit=fit)
        path = out / f"paired_{_safe(typed[0])}_vs_{_safe(typed[1])}.md"
        path.write_text(text)
        written.append(path)
        print(text)
    print("wrote " + ", ".join(str(p) for p in written))
    if runs.problems:
        print(f"{PROG}: {len(runs.problems)} file(s) left out (named above); the report covers the rest",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
