"""Automatic layer choice from gradient statistics: Auto-RGN and Auto-SNR (Lee et al., "Surgical Fine-Tuning
Improves Adaptation to Distribution Shifts", ICLR 2023; their code: anniesch/surgical-finetuning, main.py).

At the start of every epoch of a phase with `auto` set (schedule=auto_rgn, auto_snr), for every trainable tensor
w, on `batches` training batches drawn afresh (the reference: the first 5 batches of a new pass over its shuffled
training loader), the gradient g of the plain cross-entropy of each batch gives a statistic, averaged over the
batches:

- RGN, relative gradient norm: ||g|| / ||w||. The tensor's lr multiplier is its RGN over the largest RGN of all
  trainable tensors, so the tensor with the largest relative gradient trains at the full lr.
- SNR, as the reference computes it (`eb-criterion`): the mean over the tensor's entries of
  g^2 / (Var(g along dim 0) + 1e-8), torch's unbiased variance. The multiplier is 1 where that is at least the
  threshold (0.95) and 0 below: the tensor trains or not this epoch.

A new head (thawlab replaces the source head; the paper keeps it, its tasks sharing the source's labels) trains at
the full lr throughout with schedule.train_head=true, the default, as in schedule=surgical: its statistics still
count in the RGN maximum, so the body's multipliers are the reference's.

The multipliers scale each tensor's lr on top of everything else (phase multiplier, lr shape, layer decay):
every tensor of an auto phase has an optimizer group of its own, named after its block group, and the one
per-step LambdaLR reads the current multiplier; no new optimizer loop. The reference builds a new Adam at every
epoch, so the optimizer state is cleared whenever the multipliers are recomputed.

Deviations, where the reference has no answer: a tensor whose weights are all zero (||w|| = 0) has no relative
gradient; it trains at the full lr and is left out of the maximum (the reference would divide by zero and set
every lr to NaN). Under DDP every rank draws the same batches and rank 0's multipliers are broadcast, so all
ranks scale alike.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

STATS = ("rgn", "snr")
SNR_EPS = 1e-8  # the reference's


def rgn(g: torch.Tensor, w: torch.Tensor) -> float:
    """||g|| / ||w|| (inf for an all-zero w)."""
    norm = float(w.detach().double().norm())
    return float(g.double().norm()) / norm if norm > 0 else math.inf


def snr(g: torch.Tensor) -> float:
    """mean(g^2 / (Var(g, dim 0, unbiased) + 1e-8)), the reference's `eb-criterion` (NaN for a tensor with one
    row, as there)."""
    g = g.double().reshape(1) if g.ndim == 0 else g.double()
    return float((g * g / (torch.var(g, dim=0, keepdim=True) + SNR_EPS)).mean())


def tensor_statistics(net, params: list[tuple[str, torch.nn.Parameter]], batches, stat: str) -> dict[str, float]:
    """Per tensor name, the statistic averaged over the batches ((x, y) pairs on the network's device)."""
    per: dict[str, list[float]] = {n: [] for n, _ in params}
    for x, y in batches:
        loss = F.cross_entropy(net(x), y)
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        for (n, p), g in zip(params, grads):
            g = torch.zeros_like(p) if g is None else g.detach()
            per[n].append(rgn(g, p) if stat == "rgn" else snr(g))
    return {n: sum(v) / len(v) for n, v in per.items()}


def multipliers(stats: dict[str, float], stat: str, threshold: float = 0.95) -> dict[str, float]:
    """RGN: each statistic over the largest finite one (an infinite one, ||w|| = 0: 1.0); SNR: 1.0 at or above
    the threshold, else 0.0 (NaN: 1.0, as the reference's `0.0 if v < threshold else 1.0`)."""
    if stat == "snr":
        return {n: 0.0 if v < threshold else 1.0 for n, v in stats.items()}
    top = max((v for v in stats.values() if math.isfinite(v)), default=0.0)
    return {n: 1.0 if not math.isfinite(v) else (v / top if top > 0 else 1.0) for n, v in stats.items()}


class AutoLR:
    """The per-tensor lr multipliers of the current epoch (1.0 outside auto phases), and their history per block
    group (the mean multiplier of the group's trainable tensors) for the trace."""

    def __init__(self):
        self.mult: dict[str, float] = {}

    def factor(self, name: str) -> float:
        """1.0 outside auto phases; in one, the tensor's multiplier, 0 for a tensor that does not train (BatchNorm
        weights under bn=frozen), so the group lrs shown are those of tensors that train."""
        return self.mult.get(name, 0.0) if self.mult else 1.0

    def wrap(self, base, name: str):
        """A group's lr lambda times its tensor's current multiplier. A function, not a callable object: the
        scheduler's state_dict keeps no reference to it (checkpoints hold plain containers)."""
        return lambda step: base(step) * self.factor(name)

    def update(self, module, phase, epoch: int) -> dict[str, float] | None:
        """Recompute the multipliers at the start of an epoch of `phase`; per group, their mean (None outside auto
        phases). Global random state untouched: the training stream does not depend on the statistics."""
        if not phase.auto:
            self.mult = {}
            return None
        net, trainer = module.net, module.trainer
        params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        with torch.random.fork_rng(devices=[module.device] if module.device.type == "cuda" else []):
            batches = _batches(module, phase.auto.get("batches", 5), module.trainer.datamodule.shuffle_seed, epoch)
            stats = tensor_statistics(net, params, batches, phase.auto["stat"])
        mult = multipliers(stats, phase.auto["stat"], phase.auto.get("threshold", 0.95))
        for n in mult:  # groups that always train at the full lr (a new head: schedule.train_head)
            if net._group_of[n] in phase.auto.get("always", ()):
                mult[n] = 1.0
        if trainer.world_size > 1:
            import torch.distributed as dist

            box = [mult]
            dist.broadcast_object_list(box, src=0)
            mult = box[0]
        self.mult = mult
        by_group: dict[str, list[float]] = {}
        for n, m in mult.items():
            by_group.setdefault(net._group_of[n], []).append(m)
        return {g: sum(v) / len(v) for g, v in by_group.items()}


def _batches(module, k: int, seed: int, epoch: int):
    """k training batches of data.batch_size, a fresh shuffle drawn from (seed, epoch) alone: the same on every
    rank and on a resumed run."""
    dm = module.trainer.datamodule
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * (epoch + 1))
    loader = torch.utils.data.DataLoader(dm.train_set, batch_size=dm.batch_size, shuffle=True, generator=g,
                                         num_workers=0)
    for i, (x, y, *_) in enumerate(loader):
        if i == k:
            return
        x = x.to(module.device)
        if module.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y.to(module.device)
