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

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
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

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        self.count += target.numel()

    def compute(self):
        return self.count


def eval_metrics(num_classes: int, sync: bool = True) -> MetricCollection:
    """sync: under DDP, compute() gathers every rank's state (each rank evaluated its share of the set);
    False for an evaluation one process runs alone."""
    kw = {"sync_on_compute": sync}
    return MetricCollection(
        {"acc": MulticlassAccuracy(num_classes, average="micro", **kw),
         "nll": NLL(**kw),
         "ece": MulticlassCalibrationError(num_classes, n_bins=ECE_BINS, norm=ECE_NORM, **kw),
         "count": Count(**kw)},
        compute_groups=False,
    )


def restrict(logits: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
    """Logits of a set whose labels cover only some classes (ImageNet-R and -A: 200 of 1000), restricted to
    them as those sets' authors evaluate: every other class gets -inf, so its probability is 0."""
    if classes is None:
        return logits
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[classes.to(logits.device)] = True
    return logits.masked_fill(~keep, float("-inf"))


def ood_mean(values: dict[str, float], prefix: str, sets: list[str]) -> dict[str, float]:
    """`<prefix>/ood/mean/<metric>`: the unweighted mean over the OOD sets (each set counts once)."""
    ood = [s for s in sets if s.startswith("ood/")]
    if not ood:
        return {}
    return {f"{prefix}/ood/mean/{m}": sum(values[f"{prefix}/{s}/{m}"] for s in ood) / len(ood)
            for m in ("acc", "nll", "ece")}


@torch.no_grad()
def evaluate(net: torch.nn.Module, loaders: dict[str, "torch.utils.data.DataLoader"], num_classes: int,
             prefix: str, class_subsets: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """The network, in eval mode, on named sets outside a Trainer: `<prefix>/<set>/<metric>` and the OOD mean.
    For evaluations that must not touch the run's logged test metrics (WiSE-FT's alphas, forgetting).
    class_subsets: {set name: the classes its logits are restricted to} (see restrict)."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    values = {}
    for name, loader in loaders.items():
        collection = eval_metrics(num_classes, sync=False).to(device)
        for x, y, *_ in loader:
            logits = restrict(net(x.to(device)), (class_subsets or {}).get(name))
            collection.update(torch.softmax(logits.float(), dim=-1), y.to(device))
        values.update({f"{prefix}/{name}/{k}": float(v) for k, v in collection.compute().items() if k != "count"})
    values.update(ood_mean(values, prefix, list(loaders)))
    net.train(was_training)
    return values
