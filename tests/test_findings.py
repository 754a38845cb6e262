"""The papers' qualitative findings, reproduced at mini scale on the embedded benchmark with the experiments/
mini configs (fixed hyperparameters, 10 paired seeds): win counts and mean differences, never tuned here.
experiments/<paper>/results.md has the full tables made by thawlab-report from the same configs."""
from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from conftest import compose_cfg
from thawlab.results import read_results
from thawlab.train import train

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SEEDS = range(10)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, cache_dir):
    """experiment(paper, *overrides) -> results.json of a real run with experiments/<paper>'s configs."""
    root = tmp_path_factory.mktemp("findings")
    counter = iter(range(10_000))

    def _run(paper: str, *overrides: str) -> dict:
        run_dir = root / f"{paper}-{next(counter)}"
        cfg = compose_cfg([f"hydra.searchpath=[file://{EXPERIMENTS / paper}]", "logger=none",
                           "trainer.enable_progress_bar=false", f"cache_dir={cache_dir}", *overrides], run_dir)
        train(cfg)
        r = read_results(run_dir)
        assert r["status"] == "done", r.get("error")
        return {**r, "run_dir": run_dir}

    return _run


def _compare(a: list[float], b: list[float]) -> tuple[float, int, str]:
    """Mean paired difference a - b in points, wins of a, and the per-seed line for messages."""
    diffs = [100 * (x - y) for x, y in zip(a, b)]
    return statistics.mean(diffs), sum(d > 0 for d in diffs), " ".join(f"{d:+.1f}" for d in diffs)


@pytest.fixture(scope="module")
def lp_ft_and_full(experiment):
    """LP-FT runs (the checkpoint: the best fine-tuning epoch on ID validation, the paper's early stopping) and FT
    runs. WiSE-FT's runs train the same weights but test the end of fine-tuning, so they are not LP-FT's rows."""
    lp_ft = [experiment("lp_ft", "experiment=lp_ft_mini", "schedule=lp_ft", f"seed={s}") for s in SEEDS]
    full = [experiment("lp_ft", "experiment=lp_ft_mini", "schedule=full", f"seed={s}") for s in SEEDS]
    return lp_ft, full


@pytest.fixture(scope="module")
def wise(experiment):
    return [experiment("wise_ft", "experiment=wise_ft_mini", "schedule=wise_ft", f"seed={s}") for s in SEEDS]


def test_lp_ft_beats_fine_tuning_on_the_style_shift(lp_ft_and_full):
    """Kumar et al., ICLR 2022: with good pretrained features and a large shift, LP-FT > FT out of distribution."""
    lp_ft, ft = lp_ft_and_full
    key = "test/ood/printed/acc"
    mean, wins, line = _compare([r["metrics"][key] for r in lp_ft], [r["metrics"][key] for r in ft])
    assert wins >= 7 and mean >= 3.0, f"LP-FT - FT on printed digits: {mean:+.1f} points, {wins}/10 ({line})"


def test_wise_ft_at_one_half_beats_the_fine_tuned_endpoint_out_of_distribution(wise):
    """Wortsman et al., CVPR 2022: theta(0.5) beats theta_ft (the end of fine-tuning) OOD, with ID no worse than
    the weaker endpoint."""
    assert all(r["selection"]["phase"] == "ft" for r in wise)
    m = [r["metrics"] for r in wise]
    mean, wins, line = _compare([x["test/wise/0.5/ood/printed/acc"] for x in m], [x["test/wise/1/ood/printed/acc"]
                                                                                  for x in m])
    assert wins >= 7 and mean > 0, f"WiSE(0.5) - FT on printed digits: {mean:+.1f} points, {wins}/10 ({line})"
    id_ok = [x["test/wise/0.5/id/acc"] >= min(x["test/wise/0/id/acc"], x["test/wise/1/id/acc"]) for x in m]
    assert sum(id_ok) >= 9, f"ID at alpha 0.5 below the weaker endpoint in {10 - sum(id_ok)} seeds"
    assert statistics.mean(x["test/wise/0.5/id/acc"] for x in m) >= statistics.mean(
        min(x["test/wise/0/id/acc"], x["test/wise/1/id/acc"]) for x in m)


def test_surgical_crossover_input_shift_wants_an_early_block_label_shift_the_head(experiment):
    """Lee et al., ICLR 2023: for an input-level shift the first block beats the last layer; for a label-level
    shift the last layer beats the first block."""
    source = experiment("surgical", "experiment=surgical_source")
    stage2 = ["experiment=surgical_mini", f"backbone.pretrained={source['run_dir'] / 'model.safetensors'}"]
    early = ["schedule=surgical", "schedule.groups=[0]", "schedule.train_head=false"]
    acc = {}
    for shift in ("invert", "flip_labels"):
        for arm, overrides in (("early", early), ("head", ["schedule=frozen"])):
            acc[shift, arm] = [experiment("surgical", *stage2, *overrides, f"data.shift={shift}", f"seed={s}")
                               ["metrics"]["test/id/acc"] for s in SEEDS]
    mean, wins, line = _compare(acc["invert", "early"], acc["invert", "head"])
    assert wins >= 7 and mean >= 3.0, f"inverted inputs, first block - head: {mean:+.1f}, {wins}/10 ({line})"
    mean, wins, line = _compare(acc["flip_labels", "head"], acc["flip_labels", "early"])
    assert wins >= 9 and mean >= 10.0, f"flipped labels, head - first block: {mean:+.1f}, {wins}/10 ({line})"
