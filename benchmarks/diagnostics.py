"""What the drift diagnostics cost (a benchmark, run by hand; not a test).

The default run of the embedded benchmark (data=digits schedule=full, 20 epochs, test_resnet pretrained on the
source task), end to end through thawlab's `train` (fit, test, results.json) with the default diagnostics
(diagnostics=drift: CKA, feature and weight change of the selected checkpoint on 512 images of each of the 7
test sets, i.e. all 360 of each) and with diagnostics=none, alternating, median of the repeats. Also the time
spent inside the measurements themselves. Goal: at most 10% on top of the run.

    .venv/bin/python benchmarks/diagnostics.py                 # 3 repeats each
    .venv/bin/python benchmarks/diagnostics.py --every 5       # also measured every 5 epochs during fit
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from thawlab import config
from thawlab import diagnostics as dg
from thawlab.train import conf_dir, train

SPENT = []  # seconds inside DriftMonitor.measure, per run


def timed_measure(real):
    def measure(self, *a, **kw):
        start = time.perf_counter()
        try:
            return real(self, *a, **kw)
        finally:
            SPENT[-1] += time.perf_counter() - start

    return measure


def one_run(overrides: list[str], root: Path, k: int) -> float:
    """Seconds of one whole run (thawlab.train.train, as thawlab-train calls it), in a fresh directory."""
    config.register()
    run_dir = root / f"run{k}"
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):  # what Hydra's run_job fills in before calling the task function
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.override_dirname = ",".join(overrides)
        cfg.hydra.overrides.task = list(overrides)
        cfg.hydra.job.name = "bench"
        cfg.hydra.mode = "RUN"
    HydraConfig.instance().set_config(cfg)
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    SPENT.append(0.0)
    start = time.perf_counter()
    train(task)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--every", type=int, default=None, help="also measure every k epochs during fit")
    a = ap.parse_args()
    dg.DriftMonitor.measure = timed_measure(dg.DriftMonitor.measure)
    base = ["logger=none", "trainer.enable_progress_bar=false"]
    on = base + ([f"diagnostics.every={a.every}"] if a.every else [])
    off = base + ["diagnostics=none"]
    times: dict[str, list[float]] = {"on": [], "off": []}
    spent: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        one_run(off, Path(tmp), -1)  # warm-up: the source pretraining (cached), imports, first-touch costs
        for k in range(a.repeats):
            for name, overrides in (("off", off), ("on", on)) if k % 2 == 0 else (("on", on), ("off", off)):
                times[name].append(one_run(overrides, Path(tmp), 2 * k + (name == "on")))
                if name == "on":
                    spent.append(SPENT[-1])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nrepeats {a.repeats}, every={a.every}")
    print(f"diagnostics=none : median {med['off']:.1f} s  ({', '.join(f'{t:.1f}' for t in times['off'])})")
    print(f"diagnostics on   : median {med['on']:.1f} s  ({', '.join(f'{t:.1f}' for t in times['on'])})")
    print(f"inside the measurements: median {statistics.median(spent):.2f} s "
          f"({100 * statistics.median(spent) / med['off']:.1f}% of the run)")
    print(f"ratio on/off: {med['on'] / med['off']:.3f}")


if __name__ == "__main__":
    main()
