"""Evaluation metrics, one collection per split and evaluation set (never shared between sets: a shared
torchmetrics object mixes the sets' states).

acc: micro-averaged top-1 accuracy (correct / samples). nll: mean negative log-likelihood. ece: expected
calibration error, 15 equal-width bins, L1 norm, on softmax probabilities (never logits). count: samples seen,
which must equal the set's size.
"""
from __future__ import annotations

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

ECE_BINS, ECE_NORM = 15, "l1"


class NLL(Metric):
    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        p = probs.gather(1, target[:, None]).squeeze(1).clamp_min(1e-12)
        self.total += -torch.log(p.double()).sum()
        self.count += target.numel()

    def compute(self):
        return (self.total / self.count).float()


class Count(Metric):
    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        self.count += target.numel()

    def compute(self):
        return self.count


def eval_metrics(num_classes: int) -> MetricCollection:
    return MetricCollection(
        {"acc": MulticlassAccuracy(num_classes, average="micro"),
         "nll": NLL(),
         "ece": MulticlassCalibrationError(num_classes, n_bins=ECE_BINS, norm=ECE_NORM),
         "count": Count()},
        compute_groups=False,
    )
