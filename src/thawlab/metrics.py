"""Evaluation metrics, one collection per split and evaluation set (never shared between sets: a shared
torchmetrics object mixes the sets' states). Every metric takes logits (or log-probabilities: log_softmax
leaves them as they are), never probabilities, so nothing has to guess which it was given.

acc: micro-averaged top-1 accuracy (correct / samples). nll: mean negative log-likelihood, -log_softmax(logits)
at the label: exact for confident mistakes too (a logit gap of 100 costs 100, not a clamped -log 1e-12 = 27.6).
ece: expected calibration error (Guo et al. 2017), L1, of the softmax confidence (the top probability) in 15
equal-width bins B_k = (k/15, (k+1)/15], B_0 = [0, 1/15]: ECE = sum_k |correct_k - confidence_k| / samples.
count: samples seen, which must equal the set's size.

torchmetrics' MulticlassCalibrationError is not used for ECE: its bins are [k/15, (k+1)/15) plus a 16th bin of
its own for confidence exactly 1.0, which a saturated softmax gives often (in float32, a top logit 17 above
the others); a bin holding only those samples raises ECE above Guo et al.'s value (0.2650 vs 0.2350 when half the
samples have confidence 1.0, half of them wrong, and half 0.97, all right).
"""
from __future__ import annotations

from itertools import islice

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

ECE_BINS = 15  # equal-width bins; the norm is L1 (|accuracy - confidence| weighted by the bin's share)


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    # float32 (bf16 and fp16 logits are upcast exactly); classes outside a set's subset are -inf (restrict) and
    # stay -inf, every other entry is finite
    return torch.log_softmax(logits.float(), dim=-1)


class NLL(Metric):
    """Mean negative log-likelihood of the labels, from logits (log_softmax: no clamping, no overflow)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        picked = _log_probs(logits).gather(1, target[:, None]).squeeze(1)
        self.total += -picked.double().sum()
        self.count += target.numel()

    def compute(self):
        return (self.total / self.count).float()


class ECE(Metric):
    """Expected calibration error, Guo et al. 2017: confidence = the top softmax probability, n_bins equal-width
    bins (k/n, (k+1)/n] (the first [0, 1/n]), ECE = sum over bins of |correct - summed confidence| / samples.
    The states are sums per bin (samples, confidences, correct predictions): under DDP they add up across ranks."""

    full_state_update = False

    def __init__(self, n_bins: int = ECE_BINS, **kwargs):
        super().__init__(**kwargs)
        self.n_bins = n_bins
        self.add_state("samples", torch.zeros(n_bins, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("confidence", torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("correct", torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        top, predicted = _log_probs(logits).max(dim=-1)
        confidence = top.exp().double().clamp(0.0, 1.0)
        inner = torch.arange(1, self.n_bins, dtype=torch.float64, device=confidence.device) / self.n_bins
        # right=False: edges[k-1] < c <= edges[k] -> bin k, so a bin holds its upper edge, 1.0 the last bin
        bins = torch.bucketize(confidence, inner, right=False)
        self.samples += torch.bincount(bins, minlength=self.n_bins)
        self.confidence.index_add_(0, bins, confidence)
        self.correct.index_add_(0, bins, (predicted == target).double())

    def compute(self):
        return ((self.correct - self.confidence).abs().sum() / self.samples.sum()).float()


class Count(Metric):
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.count += target.numel()

    def compute(self):
        return self.count


def eval_metrics(num_classes: int, sync: bool = True) -> MetricCollection:
    """Updated with (logits, labels). sync: under DDP, compute() gathers every rank's state (each rank evaluated
    its share of the set); False for an evaluation one process runs alone."""
    kw = {"sync_on_compute": sync}
    return MetricCollection(
        {"acc": MulticlassAccuracy(num_classes, average="micro", **kw),  # argmax of the logits
         "nll": NLL(**kw),
         "ece": ECE(ECE_BINS, **kw),
         "count": Count(**kw)},
        compute_groups=False,
    )


def restrict(logits: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
    """Logits of a set whose labels cover only some classes (ImageNet-R and -A: 200 of 1000), restricted to
    them as those sets' authors evaluate: every other class gets -inf, so its probability is 0 and the softmax,
    NLL and confidence are those of the subset's classes alone."""
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


def limited(batches: int, limit: int | float | None) -> int:
    """How many of a loader's batches an evaluation cut by `limit` reads, as Lightning reads trainer.limit_test_batches:
    an int is a number of batches, a float a fraction of them, null all."""
    if limit is None:
        return batches
    return min(batches, limit) if isinstance(limit, int) else int(batches * limit)


@torch.no_grad()
def evaluate(net: torch.nn.Module, loaders: dict[str, "torch.utils.data.DataLoader"], num_classes: int,
             prefix: str, class_subsets: dict[str, torch.Tensor] | None = None,
             limit: int | float | None = None) -> dict[str, float]:
    """The network, in eval mode, on named sets outside a Trainer: `<prefix>/<set>/<metric>` and the OOD mean.
    For evaluations that must not touch the run's logged test metrics (WiSE-FT's alphas, forgetting).
    class_subsets: {set name: the classes its logits are restricted to} (see restrict). limit: the run's
    trainer.limit_test_batches, which cuts these evaluations as it cuts the test pass (see limited)."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    values = {}
    for name, loader in loaders.items():
        collection = eval_metrics(num_classes, sync=False).to(device)
        for x, y, *_ in islice(loader, limited(len(loader), limit)):
            collection.update(restrict(net(x.to(device)), (class_subsets or {}).get(name)), y.to(device))
        values.update({f"{prefix}/{name}/{k}": float(v) for k, v in collection.compute().items() if k != "count"})
    values.update(ood_mean(values, prefix, list(loaders)))
    net.train(was_training)
    return values
