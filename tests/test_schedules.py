"""Schedules are data: phases per strategy, the trainable set epoch by epoch, and the lr each group gets."""
from __future__ import annotations

import math

import lightning as L
import pytest
from omegaconf import OmegaConf

from conftest import add_callbacks

from thawlab.schedules import build_phases, lr_factor, phase_at

GROUPS = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


def sched(**kw):
    base = dict(name="full", probe_lr_mult=10.0, bn="train", lp_epochs=None, interval=1, factor=2.6)
    return OmegaConf.create({**base, **kw})


def test_gradual_unfreezes_one_group_from_the_top_with_discriminative_lr():
    phases = build_phases(sched(name="gradual", interval=2), GROUPS, 14)
    trainable = [phase_at(phases, e)[1].trainable for e in range(14)]
    assert trainable[0] == trainable[1] == ("head",)
    assert trainable[2] == ("layer4", "head")
    assert trainable[4] == ("layer3", "layer4", "head")
    assert trainable[10] == tuple(GROUPS) and trainable[13] == tuple(GROUPS)
    last = phases[-1]
    assert last.lr_mult["layer4"] == pytest.approx(1 / 2.6)
    assert last.lr_mult["stem"] == pytest.approx(2.6**-5)


def test_lp_ft_phases_and_default_split():
    lp, ft = build_phases(sched(name="lp_ft", bn="eval"), GROUPS, 10)
    assert (lp.epochs, lp.trainable, lp.lr_mult["head"]) == (5, ("head",), 10.0)
    assert (ft.epochs, ft.trainable, ft.bn) == (5, tuple(GROUPS), "eval")


def test_lr_factor_is_zero_for_frozen_groups_and_cosine_within_a_phase():
    phases = build_phases(sched(name="lp_ft"), GROUPS, 4)
    spe = 10
    assert lr_factor(phases, "stem", 0, spe) == 0.0
    assert lr_factor(phases, "head", 0, spe) == 10.0
    assert lr_factor(phases, "head", 10, spe) == pytest.approx(10 * 0.5 * (1 + math.cos(math.pi * 10 / 20)))
    assert lr_factor(phases, "stem", 20, spe) == 1.0  # phase 2 starts its own cosine at the full lr


# Per schedule, 4 epochs on test_resnet (groups stem, layer1.0 .. layer4.0, head): for each epoch, the lr
# multiplier of every trainable group; groups not listed are frozen. Written out by hand from the papers'
# recipes, not computed by thawlab's code.
D = 1 / 2.6
EXPECTED = {
    "frozen": [{"head": 10}] * 4,
    "full": [{g: 1 for g in GROUPS}] * 4,
    "lp_ft": [{"head": 10}] * 2 + [{g: 1 for g in GROUPS}] * 2,
    "gradual": [{"head": 10}, {"head": 1, "layer4": D}, {"head": 1, "layer4": D, "layer3": D**2},
                {"head": 1, "layer4": D, "layer3": D**2, "layer2": D**3}],
}
PHASE_EPOCHS = {"frozen": [4], "full": [4], "lp_ft": [2, 2], "gradual": [1, 1, 1, 1]}


class _LrProbe(L.Callback):
    def __init__(self):
        self.steps = []  # (epoch, {group: lr}, {group: requires_grad}) at every optimizer step

    def on_fit_start(self, trainer, module):
        self.steps = []  # only the last fit: the fine-tuning, not a pretraining before it

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        lrs = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
        grads = {g: all(p.requires_grad for p in ps) for g, ps in module.net.named_group_parameters().items()}
        self.steps.append((trainer.current_epoch, lrs, grads))


@pytest.mark.parametrize("schedule", list(EXPECTED))
def test_trainable_set_and_every_steps_lr_in_real_runs(run, monkeypatch, schedule):
    probe = _LrProbe()
    add_callbacks(monkeypatch, probe)
    r = run(f"schedule={schedule}", "schedule.interval=1", "schedule.bn=train", "trainer.max_epochs=4")
    names = list(r["trace"][0]["lr"])  # the real group names, in forward order
    short = dict(zip(names, GROUPS))  # layer1.0 -> layer1 ...
    want = [{g for g in names if short[g] in e} for e in EXPECTED[schedule]]
    assert [set(t["trainable_groups"]) for t in r["trace"]] == want
    counts = [t["trainable_params"] for t in r["trace"]]
    assert counts == [sum(n for g, n in zip(names, _params(r)) if g in w) for w in want]

    steps_per_epoch = 2  # debug=smoke
    starts = [sum(PHASE_EPOCHS[schedule][:i]) for i in range(len(PHASE_EPOCHS[schedule]))]
    assert len(probe.steps) == 4 * steps_per_epoch
    for step, (epoch, lrs, grads) in enumerate(probe.steps):
        phase = max(i for i, s in enumerate(starts) if s <= epoch)
        t = step - starts[phase] * steps_per_epoch
        total = PHASE_EPOCHS[schedule][phase] * steps_per_epoch
        shape = 0.5 * (1 + math.cos(math.pi * t / total))  # cosine, restarting in each phase
        for g in names:
            mult = EXPECTED[schedule][epoch].get(short[g], 0.0)
            assert lrs[g] == pytest.approx(1e-3 * mult * shape, rel=1e-6, abs=1e-12), (step, g)
            assert grads[g] == (mult > 0), (step, g)


def _params(r) -> list[int]:
    """Parameters per group (forward order) of the run's network, from the partition thawlab prints."""
    from thawlab.backbone import block_groups
    import timm

    backbone = timm.create_model(r["config"]["backbone"]["name"], num_classes=0)
    sizes = dict(backbone.named_parameters())
    per_group = [sum(sizes[n].numel() for n in ns) for ns in block_groups(backbone).values()]
    return per_group + [backbone.num_features * 10 + 10]  # the linear head
