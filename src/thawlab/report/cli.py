"""The thawlab-report command line."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from thawlab.report.runs import ER_FITS, METRICS, PROG, ReportError, rename, tune
from thawlab.report.zeroshot import load
from thawlab.report.stats import effective_robustness
from thawlab.report.tables import _where, summarize
from thawlab.report.compare import paired_markdown
from thawlab.report.plots import figures, wise_markdown
from thawlab.report.rules import RULES, with_rule

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
    ap.add_argument("--rule", choices=RULES, metavar="NAME",
                    help="report every run at the checkpoint of this selection rule: id_val, oracle (OOD "
                         "validation) or last (results.json selections; train with selection.rules=[...]); "
                         "default: each run's own (schedule.select). Output goes to <out>/rule_<NAME>/ unless --out")
    ap.add_argument("--tune", metavar="KEY", help="per row, keep the value of KEY (e.g. optimizer.lr) with the best "
                                                  "mean ID validation score; the caption says which")
    ap.add_argument("--no-figures", action="store_true", help="tables (and paired files) only")
    ap.add_argument("--wandb", action="store_true",
                    help="also log the report as a W&B run (job_type=report, in the sweep's group): the table, "
                         "the paired comparisons and the figures; offline into <out>/wandb without credentials")
    ap.add_argument("--wandb-project", default="thawlab", metavar="NAME",
                    help="W&B project of the report run (default: thawlab, as logger=wandb)")
    ap.add_argument("--wandb-entity", metavar="NAME", help="W&B entity of the report run")
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
    runs = with_rule(load(args.paths, group_by=args.group_by, include_smoke=args.include_smoke), args.rule)
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
    out = args.out or (runs.root / f"rule_{args.rule}" if args.rule else runs.root)
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
    if args.wandb:
        from thawlab.report.wandb_run import group_of, publish

        config = json.loads(json.dumps(vars(args), default=str))  # the arguments, paths as text
        run_id = publish(out, runs, table, [(a, b, f"{_safe(x)}_vs_{_safe(y)}") for (a, b), (x, y)
                                            in zip(compare, args.compare)],
                         [p for p in written if p.suffix == ".png"], fit=fit, config=config,
                         project=args.wandb_project, entity=args.wandb_entity)
        print(f"W&B: report run {run_id} (job_type=report, group {group_of(runs)})")
    if runs.problems:
        print(f"{PROG}: {len(runs.problems)} file(s) left out (named above); the report covers the rest",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
