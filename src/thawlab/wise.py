"""WiSE-FT (Wortsman et al., CVPR 2022): the weight-space ensemble of the zero-shot and the fine-tuned model.

theta(alpha) = (1 - alpha) * theta_0 + alpha * theta_ft over every floating-point state-dict entry (BatchNorm
statistics included; integer counters come from theta_ft). A timm backbone has no zero-shot head, so theta_0 is
the pretrained body with the linear-probe head (the first phase of schedule=wise_ft, as the paper's recipe for
models without one), and theta_ft the model at the end of fine-tuning, as the paper (the checkpoint schedule=wise_ft
selects: `select: last` over its `ft` phase, thawlab/selection.py). The plain formula, not lerp: alpha = 0 and 1
give the endpoints exactly. Evaluated from logits (thawlab.metrics).
"""
from __future__ import annotations

import torch
from torch import nn

from thawlab.metrics import evaluate


def interpolate(theta0: dict[str, torch.Tensor], theta1: dict[str, torch.Tensor], alpha: float) -> dict:
    return {k: (1 - alpha) * theta0[k] + alpha * v if v.is_floating_point() else v for k, v in theta1.items()}


def wise_curve(net: nn.Module, theta0: dict[str, torch.Tensor], loaders: dict, num_classes: int,
               alphas: list[float], class_subsets: dict | None = None, limit: int | float | None = None) -> list[dict]:
    """[{"alpha": a, "metrics": {"test/wise/<a>/id/acc": ..., ...}}, ...]; net keeps its own weights after.
    limit: trainer.limit_test_batches (thawlab.metrics.limited)."""
    theta_ft = {k: v.detach().clone() for k, v in net.state_dict().items()}
    curve = []
    try:
        for alpha in alphas:
            net.load_state_dict(interpolate(theta0, theta_ft, alpha))
            curve.append({"alpha": alpha, "metrics": evaluate(net, loaders, num_classes, f"test/wise/{alpha:g}",
                                                                   class_subsets, limit)})
    finally:
        net.load_state_dict(theta_ft)
    return curve
