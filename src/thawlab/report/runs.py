"""Loading runs: results.json files and killed run directories as Runs, rows, seeds and gaps, smoke runs,
inert overrides, --tune and display names."""
from __future__ import annotations

import json
import math
import os
import re
import statistics
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
# trainer.precision, trainer.deterministic, ...) are deliberately absent. `selection.rules` only adds checkpoints
# tested beside the run's own (thawlab-report --rule reports them): the training and its own results are the same.
INERT_KEYS = ("ckpt_path", "logger", "hydra", "cache_dir", "export", "trainer.enable_progress_bar",
              "trainer.log_every_n_steps", "data.num_workers", "data.pin_memory", "data.persistent_workers",
              "data.source.num_workers", "ddp.timeout_s", "ddp.grace_s", "selection.rules")
# Trainer limits under which a run trains or evaluates on a few batches (debug=smoke sets them): its metrics
# are not results. A limit is full when unset or the float 1.0 (an int 1 is one batch, as in Lightning).
SMOKE_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches")


_ABSENT = object()


class ReportError(Exception):
    """Bad input: printed as one line, exit status `code`, nothing written."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def selection_words(run: "Run") -> str:
    """How a run's tested checkpoint was chosen, in words, from results.json `selection` and the schedule's
    `select_phases`: 'max val/id/acc over the whole run', 'max val/id/acc within phase ft', 'last epoch of phase
    ft'. Runs written before selection named its phases read as the whole run."""
    sel = run.selection or {}
    rule = sel.get("rule") or "unknown rule"
    phases = sel.get("phases") if (run.config.get("schedule") or {}).get("select_phases") else None
    oracle = " (the oracle: selected on OOD validation data)" if "val/ood" in rule else ""
    if not phases:
        return f"{rule} over the whole run{oracle}"
    where = f"phase{'s' if len(phases) > 1 else ''} {', '.join(phases)}"
    return f"last epoch of {where}" if rule == "last epoch" else f"{rule} within {where}{oracle}"


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
    diagnostics: dict | None = None  # results.json `diagnostics` (drift from the pretrained network), if any
    zeroshot_of: list | None = None  # a zero-shot row's run (report/zeroshot.py): the runs whose figures it is
    selections: dict | None = None  # results.json `selections`: each selection rule's checkpoint (report/rules.py)

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
        v = self.drift(key) if key.startswith("diag/") else self.metrics.get(key)
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    def drift(self, key: str):
        """diag/<kind>/<set or group>[/<group>] of the selected checkpoint's drift (results.json
        diagnostics.final): diag/distortion/ood/mean, diag/cka/id/pooled, diag/weight_change/head."""
        node = (self.diagnostics or {}).get("final") or {}
        kind, _, rest = key.removeprefix("diag/").partition("/")
        node = node.get(kind) or {}
        if rest in node or kind in ("distortion", "weight_change"):
            return node.get(rest)
        name, _, group = rest.rpartition("/")
        return (node.get(name) or {}).get(group)

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
    rule: str | None = None  # --rule: the selection rule every run is reported at (None: each run's own)

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
               finished=str(data.get("finished") or ""), smoke=smoke_reason(data["config"], overrides),
               diagnostics=data.get("diagnostics") if isinstance(data.get("diagnostics"), dict) else None,
               selections=data.get("selections") if isinstance(data.get("selections"), dict) else None)


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
    hold several configurations; a seed is missing from it only when none of them has a run of that seed.
    thawlab.report.load (report/zeroshot.py) adds the zero-shot rows to this."""
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
        if like.get("soup") and like.get("seed") is None:  # a soup over seeds (thawlab-soup) is one run, no seed's
            continue
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
    keep = [r for r in runs.runs if r.zeroshot_of is not None]  # the zero-shot model has no hyperparameter
    trained = [r for r in runs.runs if r.zeroshot_of is None]
    base = {id(r): ",".join(o for o in parts(r) if not o.startswith(prefix)) or "all" for r in trained}
    tuned = {}
    for row in dict.fromkeys(base.values()):
        members = [r for r in trained if base[id(r)] == row]
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
                runs.names, runs.rule)


def rename(runs: Runs, names: dict) -> Runs:
    """Display names for rows (tables, paired files, figure legends): {row label or its values: name}. An
    unknown row is a ReportError naming it."""
    for label, name in names.items():
        if not isinstance(label, str) or not isinstance(name, str) or not name.strip():
            raise ReportError(f"--label {label!r}: a row label and a non-empty name are both needed")
        runs.names[runs.resolve(label, "--label")] = name
    return runs
