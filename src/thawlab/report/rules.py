"""`thawlab-report --rule NAME`: report every run at the checkpoint one selection rule chose (results.json
`selections`, written by runs with `selection.rules`; thawlab/selection.py), so that a paper table can be made
per rule: id_val (max ID validation accuracy), oracle (max mean OOD validation accuracy), last (last epoch).

A run's own rule (schedule.select) is what the report shows without --rule. Under --rule, each run's test metrics
and `selection` become that rule's; what was measured on the primary checkpoint only (forgetting on the source
task, drift, the WiSE-FT curve) is left out rather than shown beside another checkpoint's numbers, and the
zero-shot metrics (before training) stay. A finished run without that rule is a gap, named below the table
with how to get it; a run whose own rule is the one asked for (id_val for schedule.select=best, last for
select=last) counts as it is, also when written before `selections` existed.
"""
from __future__ import annotations

from dataclasses import replace

from thawlab.report.runs import ReportError, Run, Runs

RULES = ("id_val", "oracle", "last")
OWN = {"max val/id/acc": "id_val", "last epoch": "last"}  # results.json selection.rule -> the rule's name
WORDS = {"id_val": "ID validation", "oracle": "OOD validation (oracle)", "last": "the last epoch"}


def own_rule(run: Run) -> str | None:
    """The name of the rule that chose a run's own checkpoint (its results.json `selection`)."""
    for name, s in (run.selections or {}).items():
        if s.get("primary"):
            return name
    return OWN.get((run.selection or {}).get("rule"))


def under_rule(run: Run, rule: str) -> Run:
    """The run as the `rule` checkpoint reports it (a new Run; a "missing" one when it has no such checkpoint)."""
    if not run.done or own_rule(run) == rule:
        return run
    entry = (run.selections or {}).get(rule)
    if not isinstance(entry, dict) or not isinstance(entry.get("metrics"), dict):
        return replace(run, status="missing", metrics={}, wise=None, diagnostics=None,
                       error=f"no '{rule}' checkpoint (run it with selection.rules=[{rule}])")
    # kept: what does not depend on the checkpoint (the zero-shot model, the source pretraining's score)
    kept = {k: v for k, v in run.metrics.items() if not k.startswith("test/") or k.startswith("test/zeroshot/")}
    selection = {k: v for k, v in entry.items() if k not in ("metrics", "primary", "val")}
    return replace(run, metrics={**kept, **entry["metrics"]}, selection=selection, wise=None, diagnostics=None)


def with_rule(runs: Runs, rule: str | None) -> Runs:
    """runs reported at `rule`'s checkpoints (None: each run's own). A ReportError when no finished run has it."""
    if rule is None:
        return runs
    if rule not in RULES:
        raise ReportError(f"--rule {rule!r} is not one of {', '.join(RULES)}")
    moved = [under_rule(r, rule) for r in runs.runs]
    if runs.done and not any(r.done for r in moved):
        raise ReportError(f"--rule {rule}: no finished run has a '{rule}' checkpoint; train with "
                          f"selection.rules=[{rule}] (results.json `selections`)")
    return replace(runs, runs=moved, rule=rule)
