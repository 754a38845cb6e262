"""The zero-shot row: the model before any training, from the `test/zeroshot/*` figures that runs with
head=zeroshot write to results.json (thawlab.train.evaluate_zeroshot: ID and every OOD set, whole test sets).

Every such run evaluates the zero-shot model it starts from, so a sweep of several schedules over several seeds
holds many copies of one figure. They become one row per zero-shot model (`zero-shot`, or
`zero-shot[<the keys that tell the models apart>]` when the runs hold several), a row like any other: in the
table, the paired comparisons (`--compare schedule=full zero-shot`), the effective robustness (never a
baseline: the papers fit the line through models trained on the ID data) and the figures (a star in the ID vs
OOD figure). Per seed its value is the mean over the runs of that seed that evaluated the model; the row's ±
is over seeds, as for every row. The figures are identical across runs and seeds when the test sets are fixed
(data.split_seed is not the seed); `describe` checks this and says which it is.
"""
from __future__ import annotations

import hashlib
import json
import statistics

from thawlab.report import runs as _runs
from thawlab.report.runs import Run, Runs

PREFIX = "test/zeroshot/"
LABEL = "zero-shot"
# Config keys that do not change the zero-shot model or the test sets it is evaluated on: how batches are
# loaded, training-only data settings (augmentation, the training pool's size, the timm source pretraining a
# CLIP never uses), and backbone settings active only in training (drop path) or in how the schedules group
# blocks. Everything else under backbone, data and head.templates names the model: weights, class names,
# templates, the test sets and the CLIP source pretraining (data.clip_pretrain, data.source).
INERT = ("data.batch_size", "data.eval_batch_size", "data.num_workers", "data.pin_memory",
         "data.persistent_workers", "data.augment", "data.train_per_class", "data.pretrain",
         "data.source.batch_size", "data.source.eval_batch_size", "data.source.num_workers",
         "backbone.drop_path_rate", "backbone.coarse_groups")
# figures of one model at one seed that differ by more than this are named in a note (not one model, or
# nondeterministic evaluation); below it they are one figure evaluated twice
TOLERANCE = 1e-6


def _flat(node, prefix: str) -> dict:
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for k, v in node.items():
        out.update(_flat(v, f"{prefix}.{k}"))
    return out


def identity(run: Run) -> dict:
    """What defines the zero-shot model a run evaluated and its test sets, as flat dotted keys."""
    flat = {**_flat(run.config.get("backbone") or {}, "backbone"), **_flat(run.config.get("data") or {}, "data")}
    flat = {k: v for k, v in flat.items() if not any(k == i or k.startswith(i + ".") for i in INERT)}
    # head.templates=null means the data's templates (thawlab.build): the templates used are what counts
    flat["templates"] = run.get("head.templates") or run.get("data.templates")
    flat.pop("data.templates", None)
    return flat


def load(paths, group_by=None, include_smoke: bool = False, zeroshot: bool = True) -> Runs:
    """thawlab.report.runs.load, and the zero-shot rows (`add`) unless zeroshot=False: what the CLI, the notebook
    and thawlab.report.load use (thawlab-soup averages real runs only: it loads without them)."""
    runs = _runs.load(paths, group_by=group_by, include_smoke=include_smoke)
    return add(runs) if zeroshot else runs


def _text(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))
    return s if len(s) <= 40 else "#" + hashlib.sha1(s.encode()).hexdigest()[:8]  # class lists, paths: a digest


def is_zeroshot(run: Run) -> bool:
    """A row's run that is the zero-shot model (made here), not a training run."""
    return run.zeroshot_of is not None


def add(runs: Runs) -> Runs:
    """Put the zero-shot row(s) first in `runs` (in place; returned too). No run with test/zeroshot/*: nothing."""
    sources = [r for r in runs.runs if r.done and not is_zeroshot(r) and any(k.startswith(PREFIX) for k in r.metrics)]
    if not sources or any(is_zeroshot(r) for r in runs.runs):
        return runs
    groups: dict[str, list[Run]] = {}
    ids = {}
    for r in sources:
        ident = identity(r)
        key = json.dumps(ident, sort_keys=True, default=str)
        ids[key] = ident
        groups.setdefault(key, []).append(r)
    # a label names only the keys in which the models differ
    varying = sorted(k for k in set().union(*ids.values()) if len({json.dumps(i.get(k), default=str)
                                                                   for i in ids.values()}) > 1)
    made: list[Run] = []
    for key, members in groups.items():
        label = LABEL if len(groups) == 1 else (
            LABEL + "[" + ",".join(f"{k}={_text(ids[key].get(k))}" for k in varying) + "]")
        made += _row(runs, label, members)
    runs.runs[:0] = made
    return runs


def _row(runs: Runs, label: str, members: list[Run]) -> list[Run]:
    """One Run per seed: the mean of its runs' test/zeroshot figures as test/* metrics; a gap per seed none has."""
    like = members[0]
    config = {**like.config, "schedule": {"name": "zero-shot"}}  # never a baseline row (BASELINE_SCHEDULES)
    config.pop("soup", None)
    out = []
    for seed in runs.seeds:
        at = [r for r in members if r.seed == seed]
        if not at:
            out.append(Run(path=None, status="missing", seed=seed, overrides=(), config=config, label=label,
                           error="no finished run of this seed evaluated the zero-shot model", zeroshot_of=[]))
            continue
        keys = dict.fromkeys(k for r in at for k in r.metrics if k.startswith(PREFIX))
        metrics = {}
        for k in keys:
            vals = [r.metrics[k] for r in at if isinstance(r.metrics.get(k), (int, float))]
            if vals:
                metrics["test/" + k.removeprefix(PREFIX)] = statistics.fmean(vals)
        # the test sets are whole in both (evaluate_zeroshot), so the runs' test counts are the zero-shot's
        counts = {k: v for k, v in at[0].counts.items() if k.startswith("test/")}
        out.append(Run(path=None, status="done", seed=seed, overrides=(), config=config, metrics=metrics,
                       counts=counts, selection={"rule": "none: the zero-shot model, before training"},
                       label=label, smoke=at[0].smoke, zeroshot_of=at))
    return out


def spreads(row: list[Run]) -> tuple[float, float, str | None]:
    """(max |difference| between runs of one seed, max |difference| across seeds, the metric of the latter)
    over every test/zeroshot figure of a zero-shot row."""
    within, across, where = 0.0, 0.0, None
    per_key: dict[str, list[float]] = {}
    for r in row:
        if not r.done:
            continue
        for k in r.metrics:
            vals = [float(s.metrics[PREFIX + k.removeprefix("test/")]) for s in r.zeroshot_of
                    if isinstance(s.metrics.get(PREFIX + k.removeprefix("test/")), (int, float))]
            if vals:
                within = max(within, max(vals) - min(vals))
            per_key.setdefault(k, []).append(r.metrics[k])
    for k, vals in per_key.items():
        if max(vals) - min(vals) > across:
            across, where = max(vals) - min(vals), k
    return within, across, where


def describe(runs: Runs, labels: list[str]) -> tuple[str, list[str]]:
    """(the caption's sentence on the zero-shot rows among `labels`, notes), or ("", []) when there are none."""
    zs = [lab for lab in labels if any(is_zeroshot(r) for r in runs.row(lab))]
    if not zs:
        return "", []
    notes, how = [], []
    for lab in zs:
        row = runs.row(lab)
        n = sum(len(r.zeroshot_of) for r in row)
        within, across, where = spreads(row)
        if within > TOLERANCE:
            notes.append(f"{runs.name(lab)}: runs of one seed report different test/zeroshot figures (up to "
                         f"{within:.2g}): not one model, or a nondeterministic evaluation; their mean is shown")
        if across > TOLERANCE:
            how.append(f"{runs.name(lab)}: from {n} runs; its figures differ across seeds (up to {across:.3g} "
                       f"in {where}: the test sets or the model change with the seed), so its ± is over seeds")
        else:
            how.append(f"{runs.name(lab)}: from {n} runs, every figure identical across runs and seeds (one model, "
                       f"fixed test sets), so its ± is 0")
    sentence = ("Zero-shot: the model before any training (the test/zeroshot figures of the head=zeroshot runs, on "
                "the whole test sets), one row per zero-shot model (backbone, weights, data, class names, "
                "templates), per seed the mean over the runs of that seed; never a baseline of the fit ("
                + "; ".join(how) + ").")
    return sentence, notes
