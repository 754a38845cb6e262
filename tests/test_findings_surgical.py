"""The papers' qualitative findings, reproduced at mini scale on the embedded benchmark with the experiments/
mini configs (fixed hyperparameters, 10 paired seeds): win counts and mean differences, never tuned here.
experiments/surgical/results.md has the full tables made by thawlab-report from the same configs."""
from __future__ import annotations

from findings_common import SEEDS, _compare


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
