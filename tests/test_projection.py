"""Projection toward theta_0 (regularization=ftp | spd | tpgm): the reference repositories' own update rules
reproduced step by step (tests/fixtures/capture_projection.py runs the authors' code verbatim), then real
thawlab runs that end where each method says they may."""
from __future__ import annotations

import importlib.util
import json
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
        opt = OPTIMIZERS["sgd"](groups, {"lr": h["lr"], "momentum": h["momentum"], "weight_decay": h["weight_decay"]})
    if scenario.startswith("tpgm"):
        reg = {"tpgm_norm": h["norm_mode"], "tpgm_every": h["proj_freq"], "tpgm_iters": h["max_iters"],
               "tpgm_lr": h["proj_lr"]}
        method = TPGM(model, body, reg, lambda: val).projection(anchors)
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
