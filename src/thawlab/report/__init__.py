"""`thawlab-report`: tables, figures and paired comparisons from the results.json files of runs and sweeps.

    thawlab-report PATH... [--out DIR] [--metric acc|nll|ece] [--se] [--group-by KEY...] [--rows LABEL...]
                   [--baselines LABEL... | --testbed FILE] [--er-fit mean|per-set] [--compare A B]...
                   [--label ROW=NAME]... [--labels FILE] [--include-smoke] [--tune KEY] [--no-figures]
                   [--rule id_val|oracle|last]
                   [--wandb [--wandb-project NAME] [--wandb-entity NAME]]

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
- the zero-shot row (thawlab.report.zeroshot): runs with head=zeroshot evaluate the zero-shot model before
  training (results.json test/zeroshot/*); it is one row, `zero-shot`, first, per zero-shot model (several:
  `zero-shot[<keys that differ>]`), per seed the mean over that seed's runs, never a baseline of the fit, a star
  in id_vs_ood, usable in --rows, --label and --compare (`--compare schedule=wise_ft zero-shot`); the caption
  says whether its figures are identical across runs and seeds.
- with --rule NAME, the same in <out>/rule_NAME/ with every run at the checkpoint of that selection rule
  (results.json `selections`; thawlab.report.rules): id_val, oracle (OOD validation) or last.
- with --wandb, a W&B run of the report (job_type report, the sweep's group): the table, the paired
  comparisons and the figures (thawlab.report.wandb_run).

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
    runs = load(paths, zeroshot=False)            # without the zero-shot row
    rename(runs, {"lp_ft": "LP-FT"})              # display names (tables, paired files, legends)
    table = summarize(runs, metric="acc", se=False, baselines=None, rows=None, er_fit="mean", testbed=None)
    table.rows[0].cells["OOD mean"].mean; table.best(); table.markdown(); table.latex(); table.csv()
    fit = effective_robustness(runs, mode="per-set")  # ERFit: .a, .b (mean), .lines (per set), .ok, .per_run
    pair = paired(runs, "lp_ft", "full", "test/ood/printed/acc")  # Pair: .diffs, .wins, .ci95, .p_value
    figs = figures(runs, out=None)                # FigureSet: .figures (matplotlib Figures), .paths, .notes
"""
from __future__ import annotations

# The package: runs (loading, rows, gaps, smoke runs), stats (effective robustness), tables, compare (paired
# comparisons), plots (figures), cli; every public name stays importable as thawlab.report.<name>.

from thawlab.report.runs import (  # noqa: F401
    PROG, METRICS, BASELINE_SCHEDULES, DEFAULT_N, FORMATS, ER_FITS, INERT_KEYS, SMOKE_LIMITS, ReportError, Run,
    Skipped, Runs, inert, smoke_reason, tune, rename,
)
from thawlab.report.zeroshot import load  # noqa: F401 (runs.load and the zero-shot rows)
from thawlab.report.stats import (  # noqa: F401
    logit, sigmoid, clip, samples, id_ood, Testbed, read_testbed, ERFit, default_baselines, effective_robustness,
)
from thawlab.report.tables import (  # noqa: F401
    Column, Cell, Row, columns, column_values, Table, notes, summarize,
)
from thawlab.report.compare import (  # noqa: F401
    Pair, paired, paired_markdown,
)
from thawlab.report.plots import (  # noqa: F401
    FigureSet, wise_markdown, figures,
)
from thawlab.report.cli import (  # noqa: F401
    parser, main,
)
