"""The papers' qualitative findings, reproduced at mini scale on the embedded benchmark with the experiments/
mini configs (fixed hyperparameters, 10 paired seeds): win counts and mean differences, never tuned here.
experiments/lp_ft/results.md has the full tables made by thawlab-report from the same configs."""
from __future__ import annotations

import pytest
from findings_common import SEEDS, _compare


LP_FT_MINI = ["experiment=lp_ft_mini", "data.ood=[printed]"]


@pytest.fixture(scope="module")
def lp_ft_and_full(experiment):
    """LP-FT runs (the checkpoint: the best fine-tuning epoch on ID validation, the paper's early stopping) and FT
    runs. WiSE-FT's runs train the same weights but test the end of fine-tuning, so they are not LP-FT's rows.
    Only the OOD set asserted on is evaluated (data.ood=[printed]): the same weights and the same values as the
    experiment's runs, which evaluate every set (test_strategies.py checks that measuring less changes nothing)."""
    lp_ft = [experiment("lp_ft", *LP_FT_MINI, "schedule=lp_ft", f"seed={s}") for s in SEEDS]
    full = [experiment("lp_ft", *LP_FT_MINI, "schedule=full", f"seed={s}") for s in SEEDS]
    return lp_ft, full


def test_lp_ft_beats_fine_tuning_on_the_style_shift(lp_ft_and_full):
    """Kumar et al., ICLR 2022: with good pretrained features and a large shift, LP-FT > FT out of distribution."""
    lp_ft, ft = lp_ft_and_full
    key = "test/ood/printed/acc"
    mean, wins, line = _compare([r["metrics"][key] for r in lp_ft], [r["metrics"][key] for r in ft])
    assert wins >= 7 and mean >= 3.0, f"LP-FT - FT on printed digits: {mean:+.1f} points, {wins}/10 ({line})"
