"""`thawlab-report --wandb`: the report as a W&B run of its own, beside the training runs it reads.

One run per report: job_type `report`, in the group the training runs of the sweep have (the sweep
directory's name; `single` for runs outside a sweep; the groups joined by `+` when the report reads several),
its config the report's arguments. It holds:

- `table`: the table as a wandb.Table, the columns and rows of table.csv (numbers as numbers, gaps as null);
- `paired/<A>_vs_<B>`: per --compare, a wandb.Table with a row per column of the table: the per-seed
  differences A − B, mean, std, s.e., 95% CI, p (paired t) and A's wins, as in paired_<A>_vs_<B>.md;
- `figures/<name>`: each figure as a wandb.Image (its png).

Offline-first like training runs (thawlab.loggers.wandb_mode): without credentials it logs into <out>/wandb and
prints the `wandb sync` command.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import yaml

from thawlab.report.compare import paired
from thawlab.report.runs import Runs
from thawlab.report.stats import ERFit
from thawlab.report.tables import Table, columns


def group_of(runs: Runs) -> str:
    """The W&B group the runs' training runs are in (train.job_of_hydra): the sweep directory's name for a
    sweep job, `single` otherwise; several joined by `+`."""
    groups = set()
    for r in runs.runs:
        if r.path is None:  # a seed never run
            continue
        run_dir = r.path.parent if r.path.name == "results.json" else r.path
        groups.add(_group_of_dir(run_dir))
    return "+".join(sorted(groups)) or "single"


def _group_of_dir(run_dir: Path) -> str:
    if (run_dir.parent / "multirun.yaml").is_file():  # Hydra's sweep directory (kept by --resume too)
        return run_dir.parent.name
    try:
        hc = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
        if hc.get("mode") == "MULTIRUN":
            return Path(hc["sweep"]["dir"]).name
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        pass
    return "single"


def _value(cell: str):
    """A table.csv cell as W&B stores it: a number when it is one, null for a gap, else the text."""
    if cell == "":
        return None
    for kind in (int, float):
        try:
            return kind(cell)
        except ValueError:
            pass
    return cell


def csv_table(text: str):
    """table.csv's text as a wandb.Table."""
    import wandb

    head, *rows = list(csv.reader(io.StringIO(text)))
    return wandb.Table(columns=head, data=[[_value(c) for c in row] for row in rows])


def paired_table(runs: Runs, a: str, b: str, metric: str, fit: ERFit):
    """The paired comparison A − B as a wandb.Table, a row per column of the table."""
    import wandb

    cols = columns(runs, metric, list(fit.lines) if fit.mode == "per-set" else ())
    pairs = [(c, paired(runs, a, b, c.key, fit=fit)) for c in cols]
    seeds = sorted({s for _, p in pairs for s in p.seeds})
    head = ["column", "key", *[f"seed {s}" for s in seeds], "mean", "std", "se", "ci95 low", "ci95 high",
            "p (paired t)", "wins", "ties", "n"]
    data = []
    for c, p in pairs:
        d = dict(zip(p.seeds, p.diffs))
        ci = p.ci95 or (None, None)
        data.append([c.name, c.key, *[d.get(s) for s in seeds], p.mean, p.std, p.se, *ci, p.p_value,
                     p.wins, p.ties, p.n])
    return wandb.Table(columns=head, data=data)


def publish(out: Path, runs: Runs, table: Table, compare: list[tuple[str, str, str]], figure_paths: list[Path],
            fit: ERFit, config: dict, project: str = "thawlab", entity: str | None = None) -> str:
    """Log the report as one W&B run into out/wandb; compare: (A, B, key suffix). Returns the run's id."""
    import wandb

    from thawlab.loggers import wandb_mode

    mode = wandb_mode(str(out))
    data = {"table": csv_table(table.csv())}
    for a, b, name in compare:
        data[f"paired/{name}"] = paired_table(runs, a, b, table.metric, fit)
    for path in figure_paths:
        if path.suffix == ".png":
            data[f"figures/{path.stem}"] = wandb.Image(str(path))
    with wandb.init(project=project, entity=entity, dir=str(out), job_type="report", group=group_of(runs),
                    name=f"report {out.name}", config=config, **({"mode": mode} if mode else {})) as run:
        run.log(data)
        return run.id
