"""Projection toward theta_0 (regularization=ftp | spd | tpgm): the reference repositories' own update rules
reproduced step by step (tests/fixtures/capture_projection.py runs the authors' code verbatim), then real
thawlab runs that end where each method says they may."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import compose_cfg
from thawlab import projection
from thawlab.build import check_config
from thawlab.errors import ThawlabError
from thawlab.module import OPTIMIZERS
from thawlab.tpgm import TPGM

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = torch.load(FIXTURES / "projection_reference.pt", weights_only=True)
_spec = importlib.util.spec_from_file_location("capture_projection", FIXTURES / "capture_projection.py")
capture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(capture)


def thawlab_run(model_name: str, scenario: str) -> list[dict]:
    """The same loop as the capture's, with thawlab's optimizer (two named groups, body and head, as thawlab's
    block groups are) and thawlab's projection around its step."""
    h = capture.SCENARIOS[scenario]
    torch.set_num_threads(1)
    model, batches, val = capture.setup(model_name)
    model.train()
    named = dict(model.named_parameters())
    body = [n for n in named if n not in capture.HEAD]
    theta0 = {n: named[n].detach().clone() for n in body}
    anchors = projection.anchors_of(model, body, lambda n: theta0[n])
    spd = scenario == "spd"
    groups = [{"params": [named[n] for n in body], "name": "body", **({"weight_decay": 0.0} if spd else {})},
              {"params": [named[n] for n in capture.HEAD], "name": "head", **({"weight_decay": 0.0} if spd else {})}]
    if scenario in ("ftp_adamp", "spd"):
        opt = OPTIMIZERS["adamw"](groups, {"lr": h["lr"], "weight_decay": 0.0 if spd else h["weight_decay"]})
    else:
        opt = OPTIMIZERS["sgd"](groups, {"lr": h["lr"], "momentum": h["momentum"], "nesterov": h["nesterov"],
                                         "weight_decay": h["weight_decay"]})
    if scenario.startswith("tpgm"):
        reg = {"tpgm_norm": h["norm_mode"], "tpgm_every": h["proj_freq"], "tpgm_iters": h["max_iters"],
               "tpgm_lr": h["proj_lr"]}
        method = TPGM(model, body, reg, lambda k: val[k % len(val)]).projection(anchors)  # the list, cycled
    else:
        method = projection.make(scenario.split("_")[0], anchors, {"ftp_k": h.get("k"),
                                                                   "spd_weight_decay": h["weight_decay"]})
    projection.attach(opt, method)
    trajectory = []
    for x, y in batches:
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
        trajectory.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return trajectory


@pytest.mark.parametrize("model_name", list(capture.MODELS))
@pytest.mark.parametrize("scenario", list(capture.SCENARIOS))
def test_reproduces_the_reference_update_rule(model_name, scenario):
    reference = REFERENCE["runs"][f"{model_name}/{scenario}"]
    ours = thawlab_run(model_name, scenario)
    model, _, _ = capture.setup(model_name)
    theta0 = dict(model.named_parameters())
    moved = 0.0
    for step, (ref, got) in enumerate(zip(reference, ours)):
        for name in ref:
            assert torch.allclose(got[name], ref[name], rtol=0, atol=1e-6), \
                f"{scenario} step {step + 1} {name}: max diff {(got[name] - ref[name]).abs().max():.3g}"
            moved = max(moved, float((ref[name] - theta0[name].detach()).abs().max()))
    assert len(ours) == capture.STEPS and moved > 1e-3, "the trajectory must move for the comparison to mean much"


def test_projection_acts_in_the_reference_trajectories():
    """The captured runs are not plain AdamW / SGD: FTP and TPGM keep the body inside their radii, so the body
    ends nearer theta_0 than the unprojected optimizer takes it (and the comparison above tests the projection)."""
    for model_name in capture.MODELS:
        model, batches, _ = capture.setup(model_name)
        theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        plain = torch.optim.SGD(model.parameters(), lr=5e-2, momentum=0.9, weight_decay=5e-4)
        for x, y in batches:
            plain.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            plain.step()
        body = [n for n in theta0 if n not in capture.HEAD]
        dist = lambda w: sum(float((w[n] - theta0[n]).norm()) for n in body)  # noqa: E731
        plain_dist = dist(dict(model.named_parameters()))
        for scenario in ("tpgm_mars", "tpgm_l2"):
            assert dist(REFERENCE["runs"][f"{model_name}/{scenario}"][-1]) < plain_dist, (model_name, scenario)


# ---- real thawlab runs ------------------------------------------------------------------------------------
class Probe:
    """A Lightning callback that records, around every optimizer step, each projected tensor's distance to w0
    (and SPD's condition), and at the end of fit the weights, w0, the optimizer state and TPGM's radii."""

    def __init__(self):
        import lightning as L

        self.callback = type("ProbeCallback", (L.Callback,), {
            "on_before_optimizer_step": lambda _, trainer, module, opt: self.before(module),
            "on_train_batch_end": lambda _, trainer, module, *a: self.after(module),
            "on_train_end": lambda _, trainer, module: self.end(module, trainer)})()
        self.steps: list[dict] = []

    def projected(self, module):
        if getattr(module, "projection", None) is None:  # (the source pretraining a first run may start)
            return {}
        params = dict(module.net.backbone.named_parameters())
        return {n: (params[n], getattr(module.w0, str(i))) for n, i in module._w0_index.items()}

    def before(self, module):
        self._before = {n: (float(torch.norm(p - w0)), float(-torch.sum(p.grad * (p - w0))))
                        for n, (p, w0) in self.projected(module).items() if p.grad is not None}

    def after(self, module):
        self.steps.append({n: (*self._before[n], float(torch.norm(p.detach() - w0)))
                           for n, (p, w0) in self.projected(module).items() if n in self._before})

    def end(self, module, trainer):
        if getattr(module, "projection", None) is None:
            return
        self.weights = {n: (p.detach().clone(), w0.clone()) for n, (p, w0) in self.projected(module).items()}
        opt = trainer.optimizers[0]
        params = dict(module.net.named_parameters())
        self.state = {n: dict(opt.state.get(p, {})) for n, p in params.items()}
        self.radii = {n: float(module.tpgm.radii[f"backbone.{n}"]) for n in self.weights} if module.tpgm else None
        self.started = module.tpgm.radii.started.clone() if module.tpgm else None


def probed_run(run, monkeypatch, *overrides):
    from conftest import add_callbacks

    probe = Probe()
    add_callbacks(monkeypatch, probe.callback)
    return run(*overrides), probe


def test_ftp_run_keeps_each_row_within_its_learned_radius(run, monkeypatch, capsys):
    results, probe = probed_run(run, monkeypatch, "regularization=ftp")
    assert "projection ftp:" in capsys.readouterr().err
    assert results["config"]["regularization"]["projection"] == "ftp"
    for name, (w, w0) in probe.weights.items():
        state = probe.state[f"backbone.{name}"]
        assert state["ftp_t"] == 6  # 3 epochs x 2 batches, every tensor trained in every step
        rows = projection.mars_norm(w - w0)
        assert float(rows.max()) <= float(state["ftp_gamma"]) * (1 + 1e-5) + 1e-7, name  # FTP's radius bounds it
    assert not any("ftp_gamma" in probe.state[n] for n in ("head.fc.weight", "head.fc.bias")), "head not projected"
    assert any(float((w - w0).abs().max()) > 0 for w, w0 in probe.weights.values())


def test_spd_run_never_moves_a_selected_tensor_away_from_w0(run, monkeypatch):
    """With lambda = 1 SPD is a projection: a tensor whose gradient points away from w0 (-<g, w - w0> < 0) ends
    the step no farther from w0 than it began it; the others move freely."""
    _, probe = probed_run(run, monkeypatch, "regularization=spd")
    selected = freely = 0
    for step in probe.steps:
        for name, (before, condition, after) in step.items():
            if condition < 0:
                selected += 1
                assert after <= before * (1 + 1e-5) + 1e-7, (name, before, after)
            elif after > before:
                freely += 1
    assert selected and freely, (selected, freely)


@pytest.mark.parametrize("schedule", ["full", "lp_ft"])
def test_tpgm_run_ends_within_the_learned_radii(run, monkeypatch, schedule):
    """lp_ft: the probe's steps train no tensor of the body, so the radii wait for fine-tuning."""
    _, probe = probed_run(run, monkeypatch, "regularization=tpgm", f"schedule={schedule}")
    assert bool(probe.started.all()), "every tensor of the body was projected"
    for name, (w, w0) in probe.weights.items():
        rows = projection.mars_norm(w - w0)
        assert float(rows.max()) <= probe.radii[name] * (1 + 1e-5) + 1e-7, (name, float(rows.max()), probe.radii[name])


def test_projection_leaves_frozen_groups_as_pretrained(run, monkeypatch):
    """schedule=gradual unfreezes one group per epoch: each tensor's FTP radius starts when the tensor first
    trains; the groups never unfrozen stay bitwise at w0."""
    _, probe = probed_run(run, monkeypatch, "regularization=ftp", "schedule=gradual")
    frozen = [n for n, (w, w0) in probe.weights.items() if torch.equal(w, w0)]
    moved = [n for n in probe.weights if n not in frozen]
    assert frozen and moved
    assert all("ftp_t" not in probe.state[f"backbone.{n}"] for n in frozen)
    assert {probe.state[f"backbone.{n}"]["ftp_t"] for n in moved} <= {2, 4}  # unfrozen after 1 or 2 epochs


@pytest.mark.parametrize("overrides, message", [
    (["regularization=ftp", "backbone.pretrained=false"],
     "regularization.projection=ftp projects toward the pretrained weights theta_0: backbone.pretrained=false"),
    (["regularization.projection=fpt"], "regularization.projection='fpt' is not one of ftp, spd, tpgm"),
    (["regularization=spd", "optimizer.name=sgd"], "regularization.projection=spd with optimizer.name=sgd"),
    (["regularization=tpgm", "schedule=lora"], "regularization.projection=tpgm with schedule.adapter=lora"),
    (["regularization=tpgm", "regularization.tpgm_norm=l1"], "regularization.tpgm_norm='l1' is not one of mars, l2"),
    (["regularization=ftp", "regularization.ftp_k=2"], "regularization.ftp_k=2"),
    (["regularization=ftp", "optimizer.name=sgd", "optimizer.nesterov=true", "optimizer.momentum=0"],
     "optimizer.nesterov=true with optimizer.momentum=0"),
])
def test_bad_projection_input_is_one_line(overrides, message):
    with pytest.raises(ThawlabError, match=message.replace("(", r"\(").replace("[", r"\[")) as e:
        check_config(compose_cfg(["logger=none", *overrides]))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["ftp", "tpgm"])
def test_a_resumed_projection_run_equals_an_uninterrupted_one(run, monkeypatch, method):
    """FTP's radii and moments (optimizer state) and TPGM's radii, their Adam and its validation draws
    (checkpoint `thawlab_tpgm`) come back with the checkpoint: killed after epoch 0 and resumed, the run ends
    bitwise where the uninterrupted one does."""
    from conftest import Killed, KillAfter, add_callbacks

    overrides = (f"regularization={method}", "diagnostics=none")
    whole = run(*overrides)
    with monkeypatch.context() as m:
        add_callbacks(m, KillAfter(0))
        with pytest.raises(Killed):
            run(*overrides, name="resumed")
    resumed = run(*overrides, "ckpt_path=last", name="resumed")
    a = torch.load(whole["run_dir"] / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed["run_dir"] / "checkpoints" / "last.ckpt", weights_only=True)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), f"{k} differs after resuming"
    if method == "tpgm":
        assert a["thawlab_tpgm"]["drawn"] == b["thawlab_tpgm"]["drawn"] == 6
        for k, v in a["thawlab_tpgm"]["radii"].items():
            assert torch.equal(v, b["thawlab_tpgm"]["radii"][k]), k
    else:
        assert any("ftp_gamma" in s for s in a["optimizer_states"][0]["state"].values())
    assert resumed["metrics"] == whole["metrics"]
