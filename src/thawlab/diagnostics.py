"""Drift diagnostics: how far fine-tuning moved the network from the pretrained one, block group by block group.

For a fixed sample of the ID test set and of each OOD test set (`diagnostics.samples` per set, drawn from the
run's seed alone, so every schedule of a seed sees the same images), at the output of every block group and at
the backbone's pooled output (`pooled`, what the head sees: the penultimate layer):

- linear CKA (Kornblith et al., ICML 2019) between the pretrained and the current network's features,
  ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F), X_c and Y_c the column-centred (samples x features)
  matrices; 1 = the same representation up to a rotation and a scale;
- the relative feature change, the mean over samples of ||f(x) - f_0(x)|| / ||f_0(x)||;

and, per block group, the relative weight change ||theta - theta_0|| / ||theta_0||. LP-FT's feature distortion
(Kumar et al., ICLR 2022) is the ratio of the OOD to the ID feature change at the pooled output, per OOD set and
for the OOD mean.

The pretrained network theta_0 is a frozen copy of the network taken before training starts (the body as loaded
and the new head as initialised), never trained and never saved in checkpoints. A group's output is that of the
last module of the group (thawlab.model.ThawNet's module partition): the outermost module whose parameters are
the group's alone, the last in forward order, leaving out what follows the backbone's last parameter (global
pooling, an identity classifier), which is the pooled output's business.

Under DDP each rank runs its share of the sample and the features are gathered, so every rank computes the
statistics on the whole sample, as one process would.
"""
from __future__ import annotations

import copy
import math
import zlib
from collections import OrderedDict

import lightning as L
import torch
from torch import nn

from thawlab.errors import ThawlabError, did_you_mean

REFERENCE_CACHE_BYTES = 256 * 2**20  # theta_0's features kept between measurements up to this size
POOLED = "pooled"  # the backbone's pooled output (the head's input), measured beside the block groups


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same n samples (n x p and n x q): ||Y_c^T X_c||_F^2 /
    (||X_c^T X_c||_F ||Y_c^T Y_c||_F), computed through whichever is smaller, the n x n Gram matrices
    (<K, L>_F / (||K||_F ||L||_F), K = X_c X_c^T: conv maps, features outnumbering samples) or the feature-space
    cross-covariances. The products run in the features' precision (float32 from a network: a diagnostic, and
    the measurement's main cost after the forward passes), the sums in float64."""
    x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
    if x.dtype != y.dtype:
        x, y = x.double(), y.double()
    x, y = x - x.mean(0, keepdim=True), y - y.mean(0, keepdim=True)
    if len(x) <= max(x.shape[1], y.shape[1]):
        k, l_ = x @ x.T, y @ y.T
        num = (k.double() * l_.double()).sum()
        denom = torch.linalg.matrix_norm(k.double()) * torch.linalg.matrix_norm(l_.double())
    else:
        num = (y.T @ x).double().pow(2).sum()
        denom = torch.linalg.matrix_norm((x.T @ x).double()) * torch.linalg.matrix_norm((y.T @ y).double())
    return float(num / denom) if denom > 0 else math.nan


def relative_change(f: torch.Tensor, f0: torch.Tensor) -> float:
    """Mean over samples of ||f(x) - f_0(x)|| / ||f_0(x)|| (samples whose f_0 is 0 left out). The norms in the
    features' precision (float32 from a network: a diagnostic, as linear_cka's products), the ratios
    and their mean in float64."""
    f, f0 = f.reshape(len(f), -1), f0.reshape(len(f0), -1)
    if f.dtype != f0.dtype:
        f, f0 = f.double(), f0.double()
    base = f0.norm(dim=1).double()
    keep = base > 0
    if not keep.any():
        return math.nan
    return float(((f - f0).norm(dim=1).double()[keep] / base[keep]).mean())


def weight_change(net: nn.Module, reference: nn.Module, groups: dict[str, list[str]]) -> dict[str, float]:
    """||theta_g - theta_0,g|| / ||theta_0,g|| over each group's parameters (None where theta_0,g is 0)."""
    now, before = dict(net.named_parameters()), dict(reference.named_parameters())
    out = {}
    for g, names in groups.items():
        diff = sum(float((now[n].detach().double() - before[n].detach().double().to(now[n].device)).pow(2).sum())
                   for n in names)
        base = sum(float(before[n].detach().double().pow(2).sum()) for n in names)
        out[g] = math.sqrt(diff / base) if base > 0 else None
    return out


def output_modules(net, x: torch.Tensor | None = None) -> "OrderedDict[str, str]":
    """Block group -> the name of the module whose output is the group's output (see the module docstring).
    With an input batch x, a module that the backbone's forward never calls (PoolFormer's `head`, whose
    children timm calls one by one) gives way to the last-called module of the group inside it."""
    out = _outermost(net)
    if x is None:
        return out
    groups_of = {name: set(groups) for name, _, groups in net._module_groups if name.startswith("backbone.")}
    entries = list(groups_of)
    named = dict(net.named_modules())
    calls: list[str] = []
    handles = [named[n].register_forward_hook(lambda *_a, n=n: calls.append(n)) for n in entries]
    try:
        with torch.inference_mode():
            net.backbone(x)
    finally:
        for h in handles:
            h.remove()
    for g, name in out.items():
        if name not in calls:
            inside = [c for c in calls if c.startswith(name + ".") and groups_of[c] == {g}]
            if not inside:
                raise ThawlabError(f"diagnostics: no module of block group {g} runs in the backbone's forward "
                                   f"(use diagnostics=none)")
            out[g] = inside[-1]
    return out


def _outermost(net) -> "OrderedDict[str, str]":
    entries = [(name, groups) for name, _, groups in net._module_groups if name.startswith("backbone.")]
    params = {n for n, _ in net.named_parameters()}
    owns = [any(p.startswith(name + ".") for p in params) for name, _ in entries]
    last_param = max((i for i, o in enumerate(owns) if o), default=-1)
    alone = {name: next(iter(groups)) for i, (name, groups) in enumerate(entries[:last_param + 1])
             if len(groups) == 1}
    out: dict[str, str] = {}
    for name, g in alone.items():  # forward (registration) order: a later outermost module replaces an earlier one
        parent = name.rsplit(".", 1)[0]
        if alone.get(parent) != g:
            out[g] = name
    return OrderedDict((g, out[g]) for g in net.groups if g in out)


def sample_indices(n: int, k: int, seed: int, name: str) -> torch.Tensor:
    """k of n sample indices (all when k >= n), sorted, from (seed, set name) alone: the same images for every
    schedule, rank and rerun of a seed."""
    if k >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randperm(n, generator=g)[:k].sort().values


def _first_tensor(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


@torch.inference_mode()
def _features(backbone_owner, modules: "OrderedDict[str, str]", loader, device, channels_last: bool
              ) -> dict[str, torch.Tensor]:
    """{group: (n, ...) outputs, POOLED: (n, d)} of a ThawNet's backbone over a loader, on `device`."""
    named = dict(backbone_owner.named_modules())
    got: dict[str, list[torch.Tensor]] = {g: [] for g in modules}
    seen: dict[str, torch.Tensor] = {}
    handles = [named[m].register_forward_hook(lambda _m, _i, o, g=g: seen.__setitem__(g, _first_tensor(o)))
               for g, m in modules.items()]
    pooled = []
    try:
        for x, *_ in loader:
            x = x.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            seen.clear()
            # the backbone itself, not the ThawNet: trainer.compile compiles the ThawNet, and hooks run eagerly
            pooled.append(backbone_owner.backbone(x).float())
            for g in modules:
                if g not in seen:
                    raise RuntimeError(f"diagnostics: the output module of group {g} ({modules[g]}) did not run")
                got[g].append(seen[g].float().contiguous())
    finally:
        for h in handles:
            h.remove()
    out = {g: torch.cat(v) for g, v in got.items()}
    out[POOLED] = torch.cat(pooled)
    return out


def _gather(t: torch.Tensor, index: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's rows (`index`: each row's sample index in its set), in sample-index order: the same
    matrix whichever rank measured which sample, and whether they came from the test pass or from a pass of
    the monitor's own."""
    if world > 1:
        import torch.distributed as dist

        index = index.to(t.device)
        n = torch.tensor([len(t)], device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n)
        most = int(max(s.item() for s in sizes))
        padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: len(t)] = t
        where = torch.full((most,), -1, dtype=torch.long, device=t.device)
        where[: len(index)] = index
        parts = [torch.empty_like(padded) for _ in range(world)]
        places = [torch.empty_like(where) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        dist.all_gather(places, where)
        t = torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])
        index = torch.cat([p[: int(s.item())] for p, s in zip(places, sizes)])
    if bool((index[1:] > index[:-1]).all()):  # already in order (one process): no copy of the features
        return t
    return t[torch.argsort(index.to(t.device))]


def check_sets(wanted, available: list[str]) -> list[str]:
    """diagnostics.sets (null: every test set) against the run's test sets; an unknown name is one line."""
    if wanted is None:
        return list(available)
    wanted = list(wanted)
    if not wanted:
        raise ThawlabError(f"diagnostics.sets=[] names no set (null: every test set: {', '.join(available)})")
    for name in wanted:
        if name not in available:
            raise ThawlabError(f"diagnostics.sets: unknown set {name!r} (the test sets: {', '.join(available)})"
                               f"{did_you_mean(name, available)}")
    return wanted


class DriftMonitor(L.Callback):
    """Measures drift every `every` epochs during fit (results.json `diagnostics.history`, W&B `diag/...`) and,
    through `measure`, on the selected checkpoint after fit (`diagnostics.final`)."""

    def __init__(self, net, sets: dict[str, torch.utils.data.Dataset], samples: int, seed: int,
                 every: int | None = None, batch_size: int = 256, channels_last: bool = False):
        super().__init__()
        # theta_0: taken before training (and before trainer.compile, so the copy runs eagerly on its own weights)
        self.reference = copy.deepcopy(net).eval().requires_grad_(False)
        self.groups = {g: list(names) for g, names in net.groups.items()}
        self.samples, self.every, self.batch_size, self.channels_last = samples, every, batch_size, channels_last
        self.subsets = {name: (ds, sample_indices(len(ds), samples, seed, name)) for name, ds in sets.items()}
        ds, idx = next(iter(self.subsets.values()))  # one image: which modules the forward really calls
        self.modules = output_modules(self.reference, ds[int(idx[0])][0].unsqueeze(0))
        self.history: list[dict] = []
        self._measured_epoch: int | None = None
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self._cached_bytes = 0
        self._capture: dict | None = None  # capture_next_test
        self.final_features: str | None = None  # where the last measurement's features of the network came from

    # ---- what is measured --------------------------------------------------------------------------------
    def _loader(self, name: str, rank: int, world: int):
        ds, idx = self.subsets[name]
        return torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx[rank::world].tolist()),
                                           batch_size=self.batch_size, shuffle=False, num_workers=0)

    def measure(self, net, rank: int = 0, world: int = 1, epoch: int | None = None, from_test: bool = False
                ) -> dict:
        """The drift of `net` from theta_0 on every set (all ranks must call it together under DDP). from_test:
        `net`'s features are those the test pass just captured (`capture_next_test`) where that capture is whole;
        measured by a pass of the monitor's own otherwise."""
        device = next(net.parameters()).device
        self.reference.to(device)
        captured = self._take_capture(rank, world) if from_test else None
        self.final_features = "the test pass" if captured is not None else "a pass of their own"
        was_training = net.training
        net.eval()
        cka: dict[str, dict] = {}
        change: dict[str, dict] = {}
        try:
            for name in self.subsets:
                if captured is not None:
                    now, now_index = captured[name]
                else:
                    now = _features(net, self.modules, self._loader(name, rank, world), device, self.channels_last)
                    now_index = self._share(name, rank, world)
                before = self._reference_features(name, rank, world, device)
                cka[name], change[name] = {}, {}
                for g in now:
                    f = _gather(now[g], now_index, world)
                    f0 = _gather(before[g], self._share(name, rank, world), world)
                    cka[name][g], change[name][g] = linear_cka(f, f0), relative_change(f, f0)
                del now
        finally:
            net.train(was_training)
        return {"epoch": epoch, "cka": cka, "feature_change": change,
                "weight_change": weight_change(net, self.reference, self.groups),
                "distortion": distortion(change)}

    def _share(self, name: str, rank: int, world: int) -> torch.Tensor:
        """The sample indices this rank's own loader reads (`_loader`), in its order."""
        return self.subsets[name][1][rank::world]

    def _reference_features(self, name: str, rank: int, world: int, device) -> dict[str, torch.Tensor]:
        """theta_0's features on a set: they never change, so they are kept after the first measurement when
        the sample's features are small (REFERENCE_CACHE_BYTES over all sets), computed afresh otherwise."""
        key = (name, rank, world, str(device))
        if key in self._cache:
            return self._cache[key]
        out = _features(self.reference, self.modules, self._loader(name, rank, world), device, self.channels_last)
        size = sum(t.numel() * t.element_size() for t in out.values())
        if self._cached_bytes + size <= REFERENCE_CACHE_BYTES:
            self._cache[key], self._cached_bytes = out, self._cached_bytes + size
        return out

    # ---- the selected checkpoint's features from the run's own test pass -----------------------------------
    # The test pass of the selected checkpoint already sends every sampled image through the network: hooks on
    # the group outputs keep the sampled rows, so the final measurement runs only theta_0's pass (half the
    # forward passes). Only where the test pass computes what a pass of the monitor's own would: eager modules
    # (a compiled network's hooks are traced away), full precision (no autocast), and every group run on every
    # batch (a frozen backbone's test features from the probe's store skip the body). Otherwise, or if any
    # sampled image is missing, the measurement makes its own pass as before.
    def capture_next_test(self, net, sets: list[str], precision: str) -> None:
        """Arms the capture for the next trainer.test (`sets`: its dataloaders' set names, in order)."""
        eager = getattr(net, "_compiled_call_impl", None) is None
        self._capture = None
        if eager and str(precision) in ("32-true", "32", "64-true", "64"):
            self._capture = {"net": net, "sets": list(sets), "seen": {}, "rows": {}, "handles": [], "whole": True}

    def on_test_start(self, trainer, module):
        c = self._capture
        if c is None or c["handles"]:
            return
        named = dict(c["net"].named_modules())
        seen = c["seen"]
        c["handles"] = [named[m].register_forward_hook(lambda _m, _i, o, g=g: seen.__setitem__(g, _first_tensor(o)))
                        for g, m in self.modules.items()]
        c["handles"].append(c["net"].backbone.register_forward_hook(
            lambda _m, _i, o: seen.__setitem__(POOLED, o)))
        c["wanted"] = {}
        for name, (ds, idx) in self.subsets.items():
            mask = torch.zeros(len(ds), dtype=torch.bool)
            mask[idx] = True
            c["wanted"][name] = mask

    def on_test_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        if self._capture is not None:
            self._capture["seen"].clear()

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        c = self._capture
        if (c is None or not c["whole"] or dataloader_idx >= len(c["sets"])
                or c["sets"][dataloader_idx] not in c["wanted"]):
            return
        name = c["sets"][dataloader_idx]
        index = batch[2].cpu()
        keep = c["wanted"][name][index]
        if not keep.any():
            return
        outputs = (*self.modules, POOLED)
        if any(g not in c["seen"] or len(c["seen"][g]) != len(index) for g in outputs):
            c["whole"] = False  # the body did not run on this batch (or not batch-first): a pass of its own
            return
        rows = c["rows"].setdefault(name, {"index": [], **{g: [] for g in outputs}})
        rows["index"].append(index[keep])
        where = keep.to(c["seen"][POOLED].device)
        for g in outputs:
            rows[g].append(c["seen"][g][where].float().contiguous())

    def on_test_end(self, trainer, module):
        if self._capture is not None:
            for h in self._capture["handles"]:
                h.remove()
            self._capture["handles"], self._capture["seen"] = [], {}

    def _take_capture(self, rank: int, world: int) -> dict | None:
        """{set: ({group: features}, sample indices)} of the armed test pass if it holds every sampled image of
        this rank's share (Shard: samples rank, rank + world, ...), else None; disarms."""
        c, self._capture = self._capture, None
        if c is None or not c["whole"]:
            return None
        out = {}
        for name, (_, idx) in self.subsets.items():
            rows = c["rows"].get(name)
            if rows is None:
                return None
            mine = idx[idx % world == rank]
            index = torch.cat(rows["index"])
            if len(index) != len(mine) or not torch.equal(index.sort().values, mine):
                return None
            out[name] = ({g: torch.cat(v) for g, v in rows.items() if g != "index"}, index)
        return out

    def settings(self) -> dict:
        return {"every": self.every, "samples": {n: len(idx) for n, (_, idx) in self.subsets.items()},
                "final_features": self.final_features,
                "groups": [*self.modules, POOLED], "outputs": dict(self.modules)}

    # ---- during fit ----------------------------------------------------------------------------------------
    def _maybe(self, trainer, module) -> None:
        epoch = trainer.current_epoch
        if (self.every is None or trainer.sanity_checking or self._measured_epoch == epoch
                or (epoch + 1) % self.every):
            return
        self._measured_epoch = epoch
        entry = self.measure(module.net, trainer.global_rank, trainer.world_size, epoch)
        self.history = [h for h in self.history if h["epoch"] < epoch] + [entry]
        if trainer.logger is not None and trainer.global_rank == 0:
            trainer.logger.log_metrics(flatten(entry), step=trainer.global_step)

    def on_validation_end(self, trainer, module):  # before the epoch's checkpoints (callbacks run in list order)
        self._maybe(trainer, module)

    def on_train_epoch_end(self, trainer, module):  # epochs without validation
        self._maybe(trainer, module)

    def state_dict(self):
        return {"history": self.history}

    def load_state_dict(self, state):
        # a union by epoch: a resumed fit starts empty and gets the checkpoint's; trainer.test loading the
        # selected (earlier) checkpoint must not cut the history measured after it
        mine = {h["epoch"] for h in self.history}
        self.history = sorted(self.history + [h for h in state.get("history", []) if h["epoch"] not in mine],
                              key=lambda h: h["epoch"])


def distortion(change: dict[str, dict]) -> dict[str, float | None]:
    """LP-FT's feature distortion: OOD over ID relative feature change at the pooled output, per OOD set and for
    the OOD mean (the mean change over the OOD sets, over the ID change). None where the ID features did not move
    at all (a linear probe's body): the ratio is undefined there."""
    if "id" not in change:
        return {}
    base = change["id"][POOLED]
    ood = {name: c[POOLED] for name, c in change.items() if name.startswith("ood/")}
    out = {name: (v / base if base else None) for name, v in ood.items()}
    if ood:
        out["ood/mean"] = (sum(ood.values()) / len(ood)) / base if base else None
    return out


def flatten(entry: dict, prefix: str = "diag") -> dict[str, float]:
    """W&B keys: diag/cka/<set>/<group>, diag/feature_change/<set>/<group>, diag/weight_change/<group>,
    diag/distortion/<set>."""
    out = {}
    for kind in ("cka", "feature_change"):
        for name, per_group in entry[kind].items():
            out.update({f"{prefix}/{kind}/{name}/{g}": v for g, v in per_group.items()})
    out.update({f"{prefix}/weight_change/{g}": v for g, v in entry["weight_change"].items() if v is not None})
    out.update({f"{prefix}/distortion/{k}": v for k, v in entry["distortion"].items()})
    return {k: v for k, v in out.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}


def check(d, max_epochs: int) -> None:
    """What can be checked before anything runs: samples and every (the sets need the data, see check_sets)."""
    if d is None or not d.enabled:
        return
    if d.samples < 1:
        raise ThawlabError(f"diagnostics.samples={d.samples} must be a positive integer")
    if d.every is not None and not 1 <= d.every <= max_epochs:
        raise ThawlabError(f"diagnostics.every={d.every} is beyond the run's trainer.max_epochs={max_epochs} "
                           f"(null: after training only)" if d.every > max_epochs else
                           f"diagnostics.every={d.every} must be a positive integer (null: after training only)")
