"""The papers' qualitative findings, reproduced at mini scale on the embedded benchmark with the experiments/
mini configs (fixed hyperparameters, 10 paired seeds): win counts and mean differences, never tuned here.
experiments/wise_ft/results.md has the full tables made by thawlab-report from the same configs."""
from __future__ import annotations

import statistics

import pytest
from findings_common import SEEDS, _compare


@pytest.fixture(scope="module")
def wise(experiment):
    """Only what is asserted on is evaluated, the printed digits at alpha 0, 0.5 and 1: the same weights and the
    same values as the experiment's runs, which evaluate every set at 11 alphas (test_strategies.py checks that
    measuring less changes nothing)."""
    return [experiment("wise_ft", "experiment=wise_ft_mini", "schedule=wise_ft", "data.ood=[printed]",
                       "schedule.alphas=[0,0.5,1]", f"seed={s}") for s in SEEDS]


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
