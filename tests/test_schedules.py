"""Schedules are data: phases per strategy, the trainable set epoch by epoch, and the lr each group gets at
every step, checked against the papers' formulas written out here by hand."""
from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest

from conftest import add_callbacks, compose_cfg
from thawlab.errors import ThawlabError
from thawlab.schedules import build_phases, lr_factor, momentum_at, phase_at, shape_at

GROUPS = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


def sched(name: str, *overrides: str):
    """The schedule config exactly as `schedule=<name> schedule.<key>=<value>...` composes it."""
    return compose_cfg([f"schedule={name}", *[f"schedule.{o}" for o in overrides]]).schedule


def test_gradual_unfreezes_one_group_from_the_top_with_discriminative_lr():
    phases = build_phases(sched("gradual", "interval=2"), GROUPS, 14)
    trainable = [phase_at(phases, e)[1].trainable for e in range(14)]
    assert trainable[0] == trainable[1] == ("head",)
    assert trainable[2] == ("layer4", "head")
    assert trainable[4] == ("layer3", "layer4", "head")
    assert trainable[10] == tuple(GROUPS) and trainable[13] == tuple(GROUPS)
    last = phases[-1]
    assert last.lr_mult["layer4"] == pytest.approx(1 / 2.6)
    assert last.lr_mult["stem"] == pytest.approx(2.6**-5)


def test_lp_ft_phases_and_default_split():
    lp, ft = build_phases(sched("lp_ft"), GROUPS, 10)
    assert (lp.epochs, lp.trainable, lp.lr_mult["head"]) == (5, ("head",), 10.0)
    assert (ft.epochs, ft.trainable, ft.bn) == (5, tuple(GROUPS), "eval")


def test_surgical_and_partial_pick_groups_by_index():
    (p,) = build_phases(sched("surgical", "groups=[1]"), GROUPS, 3)
    assert p.trainable == ("layer1", "head") and p.bn == "eval"
    (p,) = build_phases(sched("surgical", "groups=[0,-1]"), GROUPS, 3)
    assert p.trainable == ("stem", "layer4", "head")
    (p,) = build_phases(sched("partial", "freeze_first=2"), GROUPS, 3)
    assert p.trainable == ("layer2", "layer3", "layer4", "head")
    for bad, needle in ((sched("surgical", "groups=[5]"), "index 5 is out of range"),
                        (sched("surgical", "groups=[-6]"), "-5..4"),
                        (sched("partial", "freeze_first=6"), "freeze_first=6")):
        with pytest.raises(ThawlabError, match=needle):
            build_phases(bad, GROUPS, 3)


def test_bitfit_and_lora_train_a_subset_of_every_group():
    (b,) = build_phases(sched("bitfit"), GROUPS, 2)
    (lo,) = build_phases(sched("lora"), GROUPS, 2)
    assert b.trainable == lo.trainable == tuple(GROUPS)
    import re

    assert re.search(b.params, "layer1.0.bn1.bias") and not re.search(b.params, "layer1.0.conv1.weight")
    assert re.search(lo.params, "layer1.0.conv1.lora_A.default.weight")


def test_bn_policy_per_phase_and_bad_policy():
    lp, ft = build_phases(sched("lp_ft", "bn={lp:eval,ft:train}"), GROUPS, 4)
    assert (lp.bn, ft.bn) == ("eval", "train")
    with pytest.raises(ThawlabError, match="schedule.bn names phase 'warmup'"):
        build_phases(sched("lp_ft", "bn={warmup:eval}"), GROUPS, 4)
    with pytest.raises(ThawlabError, match="sometimes"):
        build_phases(sched("full", "bn=sometimes"), GROUPS, 4)


def test_layer_decay_is_checked_but_not_folded_into_the_block_groups():
    (p,) = build_phases(sched("full"), GROUPS, 2, layer_decay=0.5)  # per parameter, in the optimizer (below)
    assert [p.lr_mult[g] for g in GROUPS] == [1.0] * 6
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ThawlabError, match=f"optimizer.layer_decay={bad} must be in"):
            build_phases(sched("full"), GROUPS, 2, layer_decay=bad)


def test_wise_alpha_grid_must_lie_in_the_unit_interval():
    assert list(sched("wise_ft").alphas) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    with pytest.raises(ThawlabError, match=r"schedule.alphas: 1.5 is outside \[0, 1\]"):
        build_phases(sched("wise_ft", "alphas=[0.5,1.5]"), GROUPS, 4)


def test_fine_tune_spreads_half_the_lr_and_resets_the_optimizer():
    frozen, unfrozen = build_phases(sched("fine_tune", "freeze_epochs=1", "lr_mult=100"), GROUPS, 5)
    assert (frozen.epochs, frozen.trainable, frozen.lr_mult) == (1, ("head",), {"head": 1.0})
    assert unfrozen.epochs == 4 and unfrozen.reset_optimizer and not frozen.reset_optimizer
    # fastai's default: slice(base_lr / 2 / 100, base_lr / 2) over its 2 groups of a timm model (body, head)
    assert [unfrozen.lr_mult[g] for g in GROUPS] == pytest.approx([0.5 / 100] * 5 + [0.5])
    # spread=blocks: the slice over 6 groups, even_mults: x10^(2/5) per group
    _, blocks = build_phases(sched("fine_tune", "spread=blocks"), GROUPS, 5)
    assert [blocks.lr_mult[g] for g in GROUPS] == pytest.approx([0.5 / 100 * 100 ** (i / 5) for i in range(6)])
    assert frozen.shape == {"name": "one_cycle", "pct_start": 0.99, "div": 25.0}
    with pytest.raises(ThawlabError, match="schedule.spread='layers' is not one of fastai, blocks"):
        build_phases(sched("fine_tune", "spread=layers"), GROUPS, 5)


def test_lr_factor_is_zero_for_frozen_groups_and_cosine_within_a_phase():
    phases = build_phases(sched("lp_ft"), GROUPS, 4)
    spe, cos = 10, {"name": "cosine"}
    assert lr_factor(phases, "stem", 0, spe, cos) == 0.0
    assert lr_factor(phases, "head", 0, spe, cos) == 10.0
    assert lr_factor(phases, "head", 10, spe, cos) == pytest.approx(10 * 0.5 * (1 + math.cos(math.pi * 10 / 20)))
    assert lr_factor(phases, "stem", 20, spe, cos) == 1.0  # phase 2 starts its own cosine at the full lr


def test_slanted_triangular_and_one_cycle_shapes():
    T = 200  # ULMFiT, Howard and Ruder 2018, eq. 3, with cut_frac 0.1 and ratio 32
    stlr = {"name": "stlr", "cut_frac": 0.1, "ratio": 32}
    cut = 20
    for t in (0, 10, 19, 20, 21, 100, 199):
        p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / 0.1 - 1))
        assert shape_at(t, T, stlr, 10) == pytest.approx((1 + p * 31) / 32)
    assert shape_at(cut, T, stlr, 10) == 1.0 and shape_at(0, T, stlr, 10) == pytest.approx(1 / 32)
    one = {"name": "one_cycle", "pct_start": 0.25, "div": 25.0, "div_final": 1e5}
    assert shape_at(0, 100, one, 10) == pytest.approx(1 / 25)
    assert shape_at(25, 100, one, 10) == pytest.approx(1.0)
    assert shape_at(100, 100, one, 10) == pytest.approx(1e-5)
    # fastai's SchedCos halfway up: start + (1 + cos(pi * 0.5)) * (end - start) / 2
    assert shape_at(12, 100, one, 10) == pytest.approx(1 / 25 + (1 + math.cos(math.pi * (1 - 0.48))) * (1 - 1 / 25) / 2)


# Per case, 4 epochs on test_resnet (groups stem, layer1.0 .. layer4.0, head): the phases' lengths, then for
# each epoch the lr multiplier of every trainable group (groups not listed are frozen), and the lr shape.
# Written out by hand from the papers' recipes, not computed by thawlab's code.
D = 1 / 2.6
ALL = {g: 1 for g in GROUPS}
COS = {"name": "cosine"}
CASES = {
    "frozen": ([], [4], [{"head": 10}] * 4, COS),
    "full": ([], [4], [ALL] * 4, COS),
    "lp_ft": ([], [2, 2], [{"head": 10}] * 2 + [ALL] * 2, COS),
    "gradual": (["schedule.interval=1"], [1, 1, 1, 1],
                [{"head": 10}, {"head": 1, "layer4": D}, {"head": 1, "layer4": D, "layer3": D**2},
                 {"head": 1, "layer4": D, "layer3": D**2, "layer2": D**3}], COS),
    "gradual-stlr": (["schedule=gradual", "schedule.interval=2", "optimizer.schedule=stlr",
                      "optimizer.cut_frac=0.25", "optimizer.ratio=8"], [2, 2],
                     [{"head": 10}] * 2 + [{"head": 1, "layer4": D}] * 2,
                     {"name": "stlr", "cut_frac": 0.25, "ratio": 8}),
    "surgical": (["schedule.groups=[-1]"], [4], [{"layer4": 1, "head": 1}] * 4, COS),
    "partial": (["schedule.freeze_first=3"], [4], [{"layer3": 1, "layer4": 1, "head": 1}] * 4, COS),
    # test_resnet has one block per stage: timm's fine layer ids are thawlab's groups, the head at the top
    "full-layer_decay": (["schedule=full", "optimizer.layer_decay=0.5"], [4],
                         [{"head": 1, "layer4": .5, "layer3": .25, "layer2": .125, "layer1": .0625,
                           "stem": .03125}] * 4, COS),
    # fastai fine_tune: head at base_lr, then half of it spread by even_mults from /100 (stem) to x1 (head)
    "fine_tune": (["schedule.freeze_epochs=1", "optimizer.lr=1e-3"], [1, 3],
                  [{"head": 1}] + [{**{g: 0.5 / 100 for g in GROUPS}, "head": 0.5}] * 3,
                  [{"name": "one_cycle", "pct_start": 0.99, "div": 25.0, "div_final": 1e5},
                   {"name": "one_cycle", "pct_start": 0.3, "div": 5.0, "div_final": 1e5}]),
}


class _LrProbe(L.Callback):
    def __init__(self):
        self.steps = []  # (epoch, {group: lr}, {group: any parameter requires grad}) at every optimizer step

    def on_fit_start(self, trainer, module):
        self.steps = []  # only the last fit: the fine-tuning, not a pretraining before it

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        lrs = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
        grads = {g: any(p.requires_grad for p in ps) for g, ps in module.net.named_group_parameters().items()}
        self.steps.append((trainer.current_epoch, lrs, grads))


@pytest.mark.parametrize("case", list(CASES))
def test_trainable_set_and_every_steps_lr_in_real_runs(run, monkeypatch, case):
    overrides, lengths, mults, shape = CASES[case]
    if not any(o.startswith("schedule=") for o in overrides):
        overrides = [f"schedule={case}", *overrides]
    probe = _LrProbe()
    add_callbacks(monkeypatch, probe)
    r = run(*overrides, "schedule.bn=train", "trainer.max_epochs=4")
    names = list(r["trace"][0]["lr"])  # the real group names, in forward order
    short = dict(zip(names, GROUPS))  # layer1.0 -> layer1 ...
    want = [{g for g in names if short[g] in e} for e in mults]
    assert [set(t["trainable_groups"]) for t in r["trace"]] == want
    sizes = dict(zip(names, _params(r)))
    assert [t["trainable_params"] for t in r["trace"]] == [sum(sizes[g] for g in w) for w in want]

    steps_per_epoch = 2  # debug=smoke
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    assert len(probe.steps) == 4 * steps_per_epoch
    for step, (epoch, lrs, grads) in enumerate(probe.steps):
        phase = max(i for i, s in enumerate(starts) if s <= epoch)
        t, total = step - starts[phase] * steps_per_epoch, lengths[phase] * steps_per_epoch
        sh = shape[phase] if isinstance(shape, list) else shape
        if sh["name"] == "cosine":  # restarting in each phase
            factor = 0.5 * (1 + math.cos(math.pi * t / total))
        elif sh["name"] == "stlr":  # ULMFiT eq. 3
            cut = math.floor(total * sh["cut_frac"])
            p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / sh["cut_frac"] - 1))
            factor = (1 + p * (sh["ratio"] - 1)) / sh["ratio"]
        else:  # fastai's combined_cos(pct, 1/div, 1, 1/div_final) of SchedCos(a, b)
            pos, pct = t / total, sh["pct_start"]
            if pos < pct:
                a, b, x = 1 / sh["div"], 1, pos / pct
            else:
                a, b, x = 1, 1 / sh["div_final"], (pos - pct) / (1 - pct)
            factor = a + (1 + math.cos(math.pi * (1 - x))) * (b - a) / 2
        for g in names:
            mult = mults[epoch].get(short[g], 0.0)
            assert lrs[g] == pytest.approx(1e-3 * mult * factor, rel=1e-6, abs=1e-12), (step, g)
            assert grads[g] == (mult > 0), (step, g)


def _params(r) -> list[int]:
    """Parameters per group (forward order) of the run's network."""
    import timm

    from thawlab.backbone import block_groups

    backbone = timm.create_model(r["config"]["backbone"]["name"], num_classes=0)
    sizes = dict(backbone.named_parameters())
    per_group = [sum(sizes[n].numel() for n in ns) for ns in block_groups(backbone).values()]
    return per_group + [backbone.num_features * 10 + 10]  # the linear head


@pytest.mark.parametrize("cut_frac, ratio", [(0.1, 32), (0.25, 8), (1 / 3, 2), (0.05, 100), (0.5, 1.5), (0.29, 32)])
def test_slanted_triangular_lr_stays_in_range_for_every_phase_length(cut_frac, ratio):
    """ULMFiT eq. 3 divides the falling side by cut (1/cut_frac - 1), T - cut only when T cut_frac is whole:
    at T = 36 (cut 3) it went negative. thawlab divides by T - cut: 1/ratio at t = 0 and at t = T."""
    stlr = {"name": "stlr", "cut_frac": cut_frac, "ratio": ratio}
    for T in range(1, 201):
        lr = [shape_at(t, T, stlr, 1) for t in range(T)]
        assert all(1 / ratio - 1e-12 <= v <= 1 + 1e-12 for v in lr), (T, min(lr), max(lr))
        cut = max(1, math.floor(T * cut_frac + 1e-9))
        assert lr[0] == pytest.approx(1 / ratio)
        if T > 1:
            assert max(range(T), key=lr.__getitem__) == cut and lr[cut] == pytest.approx(1.0), T
            assert shape_at(T, T, stlr, 1) == pytest.approx(1 / ratio), T  # the floor: the step after the last
            assert all(a > b for a, b in zip(lr[cut:], lr[cut + 1:])) and all(a < b for a, b in zip(lr, lr[1:cut]))
        if abs(T * cut_frac - round(T * cut_frac)) < 1e-9 and round(T * cut_frac) >= 1:  # the paper's own formula
            for t in range(T + 1):
                p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / cut_frac - 1))
                assert shape_at(t, T, stlr, 1) == pytest.approx((1 + p * (ratio - 1)) / ratio, abs=1e-12), (T, t)
    assert shape_at(35, 36, {"name": "stlr", "cut_frac": 0.1, "ratio": 32}, 1) > 1 / 32  # was negative


FASTAI = json.loads((Path(__file__).parent / "fixtures" / "fastai_fine_tune.json").read_text())


@pytest.mark.parametrize("fa", FASTAI["runs"], ids=lambda r: f"{r['epochs']}ep-freeze{r['freeze_epochs']}")
def test_fine_tune_defaults_are_fastais_per_step_lrs_and_adam_hypers(fa):
    """schedule=fine_tune's defaults against fastai 2.8.12's own fine_tune (tests/fixtures/fastai_fine_tune.py):
    every step's lr of the body and the head, Adam's beta1 (cycled), beta2, eps and weight decay."""
    cfg = compose_cfg(["schedule=fine_tune", f"schedule.freeze_epochs={fa['freeze_epochs']}"])
    o, spe = cfg.optimizer, fa["steps_per_epoch"]
    epochs = fa["freeze_epochs"] + fa["epochs"]
    phases = build_phases(cfg.schedule, GROUPS, epochs)
    shape = {"name": o.schedule, "div_final": o.div_final, "moms": list(o.moms)}
    assert fa["n_groups"] == 2 and len(fa["steps"]) == epochs * spe
    for step, rec in enumerate(fa["steps"]):
        assert (o.betas[1], o.eps, o.weight_decay) == (rec["sqr_mom"][0], rec["eps"][0], rec["wd"][0])
        assert momentum_at(phases, step, spe, shape, o.betas[0]) == pytest.approx(rec["mom"][0], rel=1e-6)
        head = o.lr * lr_factor(phases, "head", step, spe, shape)
        assert head == pytest.approx(rec["lr"][1], rel=1e-6), step  # fastai: positions in float32 (combined_sched)
        for g in GROUPS[:-1]:
            body = o.lr * lr_factor(phases, g, step, spe, shape)
            if rec["stage"] == 1:
                assert body == pytest.approx(rec["lr"][0], rel=1e-6), (step, g)
            else:  # frozen: fastai's train_bn trains the body's norm layers at lr/10 (README: differences)
                assert body == 0.0 and rec["trainable_tensors"][0] < rec["tensors"][0]


class _HyperProbe(L.Callback):
    def __init__(self):
        self.steps = []  # per optimizer step: {group name: (lr, beta1, beta2, eps, weight decay)}

    def on_fit_start(self, trainer, module):
        self.steps = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.steps.append({g["name"]: (g["lr"], *g["betas"], g["eps"], g["weight_decay"])
                           for g in trainer.optimizers[0].param_groups if g["weight_decay"]})


@pytest.mark.parametrize("fa", FASTAI["runs"], ids=lambda r: f"{r['epochs']}ep-freeze{r['freeze_epochs']}")
def test_fine_tune_real_run_applies_fastais_lrs_and_betas_at_every_step(run, monkeypatch, fa):
    """The optimizer thawlab builds, read at every step of a real run with fastai's step count per epoch."""
    spe = fa["steps_per_epoch"]
    probe = _HyperProbe()
    add_callbacks(monkeypatch, probe)
    r = run("schedule=fine_tune", f"schedule.freeze_epochs={fa['freeze_epochs']}",
            f"trainer.max_epochs={fa['freeze_epochs'] + fa['epochs']}", f"trainer.limit_train_batches={spe}",
            f"data.batch_size={100 // spe}", "schedule.bn=train")
    assert r["status"] == "done" and len(probe.steps) == len(fa["steps"])
    for got, rec in zip(probe.steps, fa["steps"]):
        for g, (lr, beta1, beta2, eps, wd) in got.items():
            want = rec["lr"][1] if g == "head" else (rec["lr"][0] if rec["stage"] == 1 else 0.0)
            assert lr == pytest.approx(want, rel=1e-6, abs=1e-15), g
            assert (beta1, beta2, eps, wd) == (pytest.approx(rec["mom"][0], rel=1e-6), rec["sqr_mom"][0],
                                               rec["eps"][0], rec["wd"][0])


# family -> (timm model, kwargs): small test_* or shrunk models, random init
DECAY_FAMILIES = {
    "resnet": ("resnet18", {}),  # 2 blocks per stage: coarse groups hold several timm layers
    "convnext": ("test_convnext", {}),  # head.norm: timm's top layer, with the classifier
    "vit": ("test_vit", {"img_size": 32, "patch_size": 4}),
    "efficientnet": ("test_efficientnet", {}),
    "regnet": ("regnetx_002", {"depth": 6, "w0": 16, "wa": 16.0, "wm": 1.5}),
}


class _ParamLrProbe(L.Callback):
    def __init__(self):
        self.lr = {}  # parameter name -> (lr, weight decay) the optimizer applies at the first step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0 and not self.lr:
            names = {id(p): n for n, p in module.net.named_parameters()}
            self.lr = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in trainer.optimizers[0].param_groups
                       for p in g["params"]}


@pytest.mark.parametrize("coarse", [True, False], ids=["coarse", "fine"])
@pytest.mark.parametrize("family", list(DECAY_FAMILIES))
def test_layer_decay_is_timms_for_every_parameter(run, monkeypatch, family, coarse):
    """optimizer.layer_decay: each parameter's lr, read from the optimizer after the scheduler's first step of a
    real run, equals base lr x timm.optim.param_groups_layer_decay's lr_scale on the same timm model with its
    classifier (thawlab's head at the classifier's scale), coarse or fine block groups alike."""
    import timm
    from timm.optim import param_groups_layer_decay

    from test_groups import _kwargs_overrides

    name, kwargs = DECAY_FAMILIES[family]
    probe = _ParamLrProbe()
    add_callbacks(monkeypatch, probe)
    r = run("schedule=full", f"backbone.name={name}", "backbone.pretrained=false", f"backbone.coarse_groups={coarse}",
            "optimizer.layer_decay=0.7", "optimizer.schedule=constant", "optimizer.weight_decay=0.05",
            "trainer.max_epochs=1", "data.eval_batch_size=16", *_kwargs_overrides(kwargs))
    assert r["status"] == "done", r.get("error")
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    names = {id(p): n for n, p in model.named_parameters()}
    want = {names[id(p)]: (1e-3 * g["lr_scale"], g["weight_decay"])
            for g in param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.7,
                                              no_weight_decay_list=getattr(model, "no_weight_decay", set)())
            for p in g["params"]}
    classifier = model.pretrained_cfg["classifier"]
    for n, (lr, wd) in probe.lr.items():
        timm_name = n.removeprefix("backbone.") if n.startswith("backbone.") else f"{classifier}.{n.split('.')[-1]}"
        ref = want[timm_name]
        assert (lr, wd) == (pytest.approx(ref[0], rel=1e-12), ref[1]), n
    assert len(probe.lr) == len(want)
    scales = {round(v[0] / 1e-3, 9) for v in want.values()}
    assert len(scales) > 3 and max(scales) == 1.0  # the decay did something
