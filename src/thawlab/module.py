"""The LightningModule: training steps, the schedule's phases, per-set metrics, and the per-epoch trace.

Every parameter group is created once, named after its block group (fastai's rule); a phase changes which
groups train and their lr multipliers through one LambdaLR that knows every group from the first step, so no
group is ignored by the scheduler and no lr scale waits for a scheduler that never applies it.

Batches are (images, labels, sample indices): the indices key the feature cache of frozen phases.

The training loss: cross-entropy, with `regularization.label_smoothing`; under Mixup / CutMix (timm's `Mixup`,
`regularization.mixup` / `cutmix`) each training batch is mixed with itself reversed, the targets become the
same mixture of (smoothed) one-hot vectors, and the loss is timm's soft-target cross-entropy. Evaluation
batches are never mixed, and evaluation NLL is the plain NLL.
"""
from __future__ import annotations

import functools
import hashlib
import os
import random
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from thawlab.auto_lr import AutoLR
from thawlab.metrics import eval_metrics, ood_mean, restrict
from thawlab.model import ThawNet
from thawlab.prefix_cache import PrefixCache
from thawlab.schedules import Phase, lr_factor, momentum_at, phase_at

# The per-set values logged at the end of an evaluation epoch come from torchmetrics objects that have already
# gathered every rank's state: they are the same on every rank, and Lightning's advice to sync them again would
# only average identical numbers.
warnings.filterwarnings("ignore", message=r".*sync_dist=True.*when logging on epoch level")

# optimizer.* keys of the lr shapes
SHAPE_KEYS = ("warmup_epochs", "cut_frac", "ratio", "pct_start", "div", "div_final", "milestones", "gamma", "moms")


# optimizer.name -> constructor over the named parameter groups
OPTIMIZERS = {
    "adamw": lambda groups, c: torch.optim.AdamW(groups, lr=c["lr"], weight_decay=c["weight_decay"],
                                                 betas=tuple(c.get("betas", (0.9, 0.999))), eps=c.get("eps", 1e-8)),
    "sgd": lambda groups, c: torch.optim.SGD(groups, lr=c["lr"], momentum=c["momentum"],
                                             weight_decay=c["weight_decay"], nesterov=c.get("nesterov", False)),
}


class PhaseScheduler(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR (one lr function per named group) that also sets each step's momentum: Adam's beta1 or SGD's
    momentum, which fastai's one-cycle cycles against the lr (schedules.momentum_at)."""

    def __init__(self, optimizer, lr_lambdas, momentum):
        self.momentum = momentum
        self.base_momentum = [g["betas"][0] if "betas" in g else g.get("momentum", 0.0)
                              for g in optimizer.param_groups]
        super().__init__(optimizer, lr_lambdas)

    def step(self, epoch=None):
        super().step(epoch)
        for g, base in zip(self.optimizer.param_groups, self.base_momentum):
            m = self.momentum(self.last_epoch, default=base)
            if "betas" in g:
                g["betas"] = (m, g["betas"][1])
            elif "momentum" in g:
                g["momentum"] = m

    def state_dict(self):
        state = super().state_dict()
        state.pop("momentum", None)  # a function of the step: rebuilt, never saved
        return state


def make_mixup(reg: dict, num_classes: int):
    """timm's Mixup for regularization.mixup / cutmix (alphas; 0 = off), or None when both are off."""
    if not (reg.get("mixup") or reg.get("cutmix")):
        return None
    # label_smoothing passed explicitly: timm's default is 0.1
    return Mixup(mixup_alpha=reg.get("mixup", 0.0), cutmix_alpha=reg.get("cutmix", 0.0),
                 prob=reg.get("mix_prob", 1.0), label_smoothing=reg.get("label_smoothing", 0.0),
                 num_classes=num_classes)


def host_rng_state() -> dict:
    """python's and numpy's global random states as plain containers (checkpoints load with weights_only)."""
    np_state = np.random.get_state(legacy=False)
    return {"python": random.getstate(), "numpy": {**np_state, "state": {
        "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": np_state["state"]["pos"]}}}


def set_host_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": state["numpy"]["state"]["key"].numpy().astype(np.uint32),
                         "pos": state["numpy"]["state"]["pos"]}
    np.random.set_state(np_state)


class FeatureCache:
    """Backbone features by sample index, one table per data set, filled on first sight.

    Valid while the backbone is frozen and the inputs of a sample never change (a deterministic training
    transform): the module clears it when a phase trains the backbone. Only training and validation use it;
    the final test always runs the whole network.
    """

    def __init__(self):
        self.tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # the digest of the backbone weights whose features fill the test tables (put() by the L-BFGS probe from
        # the shared store, thawlab/probe.py); the test uses them only while the backbone still has these weights
        self.test_digest: str | None = None

    def clear(self) -> None:
        self.tables.clear()
        self.test_digest = None

    def put(self, key: str, feats: torch.Tensor) -> None:
        """A whole table at once: the features of every sample of a set, in index order."""
        self.tables[key] = (feats, torch.ones(len(feats), dtype=torch.bool))

    def has_test(self, index: int) -> bool:
        return self.test_digest is not None and f"test/{index}" in self.tables

    def __call__(self, key: str, size: int, x: torch.Tensor, idx: torch.Tensor, compute) -> torch.Tensor:
        """Features of the samples `idx` (inputs x), computing only those not seen before."""
        if key not in self.tables:
            out = compute(x)
            feats = out.new_empty((size, *out.shape[1:]))
            seen = torch.zeros(size, dtype=torch.bool, device=out.device)
            self.tables[key] = (feats, seen)
            feats[idx], seen[idx] = out, True
            return out
        feats, seen = self.tables[key]
        if feats.device != x.device:  # filled before Lightning moved the module (the probe's tables): follow it
            feats, seen = feats.to(x.device), seen.to(x.device)
            self.tables[key] = (feats, seen)
        new = ~seen[idx]
        if new.any():
            feats[idx[new]], seen[idx[new]] = compute(x[new]), True
        return feats[idx]


class FineTuner(L.LightningModule):
    def __init__(self, net: ThawNet, phases: list[Phase], optimizer: dict, num_classes: int,
                 eval_sets: dict[str, list[str]], regularization: dict | None = None,
                 cache_features: bool | dict = False, keep_probe_weights: bool = False,
                 class_subsets: dict[str, torch.Tensor] | None = None, channels_last: bool = False,
                 fail_rank: int | None = None, note=None):
        super().__init__()
        reg = dict(regularization or {})
        # cache_features: a bool (both caches, default bounds) or the config's block {enabled, max_gb, disk_gb, prefix}
        caching = dict(cache_features) if isinstance(cache_features, dict) else {"enabled": bool(cache_features)}
        # plain containers only: checkpoints must load with weights_only=True
        self.save_hyperparameters({"optimizer": dict(optimizer), "num_classes": num_classes,
                                   "phases": [asdict(p) for p in phases], "eval_sets": eval_sets,
                                   "regularization": reg, "cache_features": caching})
        self.net, self.phases, self.opt_cfg, self.eval_sets = net, phases, dict(optimizer), eval_sets
        self.metrics = nn.ModuleDict({f"{stage}_{i}": eval_metrics(num_classes)
                                      for stage, names in eval_sets.items() for i in range(len(names))})
        self.class_subsets = dict(class_subsets or {})  # set name -> the classes its logits are restricted to
        self.channels_last = channels_last  # inputs in the layout the (channels_last) weights are in
        self.fail_rank = fail_rank  # ddp.fail_rank: this rank raises in its first training step (tests)
        self._ddp_trainable: frozenset[str] | None = None  # what the current DDP wrapper all-reduces
        self.rank_report: dict | None = None  # DDP: each rank's pid, seed and weights at the end of fit
        self.trace: list[dict] = []
        # the run's experiment-defining config (a resume must match it) and its overrides, W&B name and group
        self.identity: dict | None = None
        self.stopped: list[dict] = []  # phases cut short by early stopping (thawlab.stopping)
        self.computed: dict[str, dict[str, float]] = {}  # stage -> {"test/id/acc": ...}
        self.metric_prefix: dict[str, str] = {}  # stage -> the prefix of its metric names, when not the stage
        self.counts: dict[str, int] = {}  # "test/id" -> samples evaluated
        self.label_smoothing = reg.get("label_smoothing", 0.0)
        self.mix = make_mixup(reg, num_classes)
        self.soft_target_loss = SoftTargetCrossEntropy()
        # a mixed batch is a new input every step: cached features of the unmixed images would be wrong
        cached = caching["enabled"] and self.mix is None
        self.cache = FeatureCache() if cached else None
        # the same rule for a frozen prefix, and the boundary moves with the phase (thawlab/prefix_cache.py)
        self.prefix = PrefixCache(caching.get("max_gb", 2.0), caching.get("disk_gb", 20.0), note) \
            if cached and caching.get("prefix", True) else None
        # WiSE-FT's theta_0: the weights when the first phase that trains more than the head starts (the end of
        # the linear probe; with a head that starts trained and no probe, the zero-shot model as built)
        self.keep_probe_weights = keep_probe_weights
        self.theta0: dict[str, torch.Tensor] | None = None
        self._clip_loss = None  # FLYP's loss (open_clip.ClipLoss), made on first use
        self.auto_lr = AutoLR()  # per-tensor lr multipliers of auto phases (Auto-RGN / Auto-SNR, thawlab/auto_lr.py)
        self.l2sp_alpha, self.l2sp_beta = reg.get("l2sp_alpha", 0.0), reg.get("l2sp_beta", 0.0)
        self.projection = reg.get("projection")  # toward w0 after each step (thawlab/projection.py), or None
        self.note = note
        self.tpgm = None  # TPGM's radii and their optimizer (thawlab/tpgm.py), made with the optimizer
        if self.l2sp_alpha or self.projection:  # w0 of L2-SP and the projections: the body as loaded; moves
            self.w0 = nn.Module()  # buffers by position (a buffer's name cannot hold dots)
            self._w0_index: dict[str, int] = {}
            for name, p in net.backbone.named_parameters():
                if "lora_" not in name:  # LoRA's A and B are no weights of the model: see l2sp_penalty
                    self._w0_index[name] = len(self._w0_index)
                    self.w0.register_buffer(str(self._w0_index[name]), p.detach().clone(), persistent=False)

    def forward(self, x):
        return self.net(x)

    # ---- training -------------------------------------------------------------------------------------
    def on_train_epoch_start(self):
        index, phase, start = phase_at(self.phases, self.current_epoch)
        self.net.apply_phase(phase)
        self._match_ddp_to_phase()
        if self.prefix is not None:
            self.prefix.begin_phase(index)
        optimizer = self.optimizers().optimizer
        if self.tpgm is not None:
            self.tpgm.step_in_epoch = 0  # the reference counts its projection frequency by batch index
        if self.current_epoch == start and phase.reset_optimizer:
            optimizer.state.clear()
        auto = self.auto_lr.update(self, phase, self.current_epoch)
        if auto is not None:
            optimizer.state.clear()  # the reference builds a new Adam whenever it recomputes the multipliers
            sched = self.lr_schedulers()  # this step's lrs with the new multipliers, not the last step's
            for g, lam, base in zip(optimizer.param_groups, sched.lr_lambdas, sched.base_lrs):
                g["lr"] = base * lam(sched.last_epoch)
        if self.cache is not None and not self.net.backbone_frozen:
            self.cache.clear()
        i, _, _ = phase_at(self.phases, self.current_epoch)
        if (self.keep_probe_weights and self.current_epoch == start and phase.trainable != ("head",)
                and all(p.trainable == ("head",) for p in self.phases[:i])):
            self.theta0 = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        lrs: dict[str, float] = {}  # a block group's lr: that of its top layer (the highest, under layer_decay)
        for g in optimizer.param_groups:
            lrs[g["name"]] = max(lrs.get(g["name"], 0.0), g["lr"])
        entry = {"epoch": self.current_epoch, "phase": phase.name, "trainable_groups": list(phase.trainable),
                 "trainable_params": self.net.trainable_parameter_count(), "lr": lrs}
        if auto is not None:  # per block group, the mean lr multiplier of its tensors this epoch
            entry["auto_lr"] = auto
            self.log_dict({f"auto_lr/{g}": m for g, m in auto.items()}, on_epoch=True, on_step=False)
        self.trace = [t for t in self.trace if t["epoch"] < self.current_epoch] + [entry]
        self.log("trace/trainable_params", float(entry["trainable_params"]), on_epoch=True, on_step=False)
        self.log_dict({f"lr/{g}": lr for g, lr in lrs.items()}, on_epoch=True, on_step=False)

    def _match_ddp_to_phase(self) -> None:
        """DDP all-reduces the gradients of the parameters that required grad when it wrapped the model. A
        parameter unfrozen later would train on each rank's own gradients and the ranks would drift apart
        (Lightning #20340), so whenever a phase changes which parameters train, wrap the module again: the new
        wrapper broadcasts rank 0's weights and all-reduces exactly the trainable set."""
        from torch.nn.parallel import DistributedDataParallel

        strategy = self.trainer.strategy
        if not isinstance(strategy.model, DistributedDataParallel):
            return
        trainable = frozenset(n for n, p in self.named_parameters() if p.requires_grad)
        if trainable != self._ddp_trainable:
            strategy.model = strategy._setup_model(self)
            strategy._register_ddp_hooks()
            self._ddp_trainable = trainable

    def _digests(self) -> dict[str, str]:
        return {g: hashlib.sha1(b"".join(p.detach().float().cpu().numpy().tobytes() for p in ps)).hexdigest()
                for g, ps in self.net.named_group_parameters().items()}

    def on_train_start(self):
        self._start_digests = self._digests() if self.trainer.world_size > 1 else None

    def on_fit_end(self):
        if self.prefix is not None:
            self.prefix.clear()  # its memory-mapped tables' files go with it

    def on_train_end(self):
        """Under DDP, every rank's pid, seed, a digest of its weights per block group and the groups whose
        weights changed in fit, gathered from all ranks (results.json `distributed`): the ranks must end fit
        with identical weights, and exactly the groups the schedule trained must have moved."""
        if self.trainer.world_size == 1:
            return
        import torch.distributed as dist

        digests = self._digests()
        mine = {"rank": self.global_rank, "pid": os.getpid(), "seed": int(os.environ.get("PL_GLOBAL_SEED", -1)),
                "weights": digests, "changed": [g for g, d in digests.items() if d != self._start_digests[g]]}
        everyone: list = [None] * self.trainer.world_size
        dist.all_gather_object(everyone, mine)
        self.rank_report = {"world_size": self.trainer.world_size, "backend": dist.get_backend(),
                            "ranks": everyone}

    @property
    def ranks_in_sync(self) -> bool | None:
        if self.rank_report is None:
            return None
        return all(r["weights"] == self.rank_report["ranks"][0]["weights"] for r in self.rank_report["ranks"])

    def _logits(self, stage: str, batch, dataloader_idx: int = 0) -> torch.Tensor:
        x, _, idx = batch
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if stage == "test" and self.cache is not None and self.net.backbone_frozen and self.cache.has_test(
                dataloader_idx):  # a frozen backbone's test features from the L-BFGS probe's store
            return self.net.head(self.cache(f"test/{dataloader_idx}", 0, x, idx, self.net.features))
        if self.cache is None or stage == "test":
            return self.net(x)
        dm = self.trainer.datamodule
        size = len(dm.train_set) if stage == "train" else len(list(dm.sets[stage].values())[dataloader_idx])
        if self.net.backbone_frozen:
            feats = self.cache(f"{stage}/{dataloader_idx}", size, x, idx, self.net.features)
            return self.net.head(feats)
        if self.prefix is None or self.prefix.phase is None:  # (validation before the first phase starts)
            return self.net(x)
        if not self.prefix.prepared and stage == "train":
            samples = len(dm.train_set) + sum(len(s) for s in dm.sets["val"].values())
            self.prefix.prepare(self.net, x, samples, Path(self.trainer.default_root_dir) / "prefix_cache",
                                self.phases[self.prefix.phase].name, rank=self.global_rank)
        if not self.prefix.active:
            return self.net(x)
        return self.net.head(self.prefix.features(self.net, f"{stage}/{dataloader_idx}", size, x, idx))

    def training_step(self, batch, batch_idx):
        if self.fail_rank is not None and self.global_rank == self.fail_rank:
            raise RuntimeError(f"injected failure on rank {self.global_rank} (ddp.fail_rank={self.fail_rank})")
        y = batch[1]
        if self.net.phase is not None and self.net.phase.loss == "contrastive":
            loss = self.contrastive_loss(batch)
        elif self.mix is None:
            loss = F.cross_entropy(self._logits("train", batch), y, label_smoothing=self.label_smoothing)
        else:
            x, _, idx = batch
            if len(y) % 2:  # timm pairs sample i with sample n-1-i: an odd batch (a training set smaller than
                x, y, idx = x[:-1], y[:-1], idx[:-1]  # the batch) leaves its last sample out of this step
            x, target = self.mix(x, y)  # label smoothing included (Mixup's own)
            loss = self.soft_target_loss(self._logits("train", (x, y, idx)), target)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        if self.l2sp_alpha or self.l2sp_beta:
            penalty = self.l2sp_penalty()
            self.log("train/l2sp", penalty, on_step=False, on_epoch=True, batch_size=len(y))
            loss = loss + penalty
        return loss

    def contrastive_loss(self, batch) -> torch.Tensor:
        """FLYP: CLIP's loss (open_clip.ClipLoss: symmetric cross-entropy over the batch, the model's logit scale)
        between each image and a prompt of its class, a template drawn per image and step (the zero-shot head's
        prompts). Images of the same class are each other's negatives, as in FLYP's batches. Under DDP the
        features of every rank are gathered (with gradients), as OpenCLIP trains."""
        from open_clip import ClipLoss

        x, y, _ = batch
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._clip_loss is None:
            ws = self.trainer.world_size if self._trainer is not None else 1
            self._clip_loss = ClipLoss(gather_with_grad=ws > 1, rank=self.global_rank, world_size=ws)
        prompts = self.net.head.prompts
        pick = torch.randint(len(prompts[0]), (len(y),)).tolist()
        text = self.net.text
        tokens = text.tokenize([prompts[c][t] for c, t in zip(y.tolist(), pick)]).to(x.device)
        image = F.normalize(self.net.backbone(x), dim=-1)
        return self._clip_loss(image, text(tokens, normalize=True), text.logit_scale.exp())

    def _refresh_head(self) -> None:
        """A phase that trains the text tower (FLYP) is evaluated with the zero-shot head of the tower as it is now."""
        phase = self.net.phase
        if phase is not None and "text" in phase.trainable and callable(getattr(self.net.head, "refresh", None)):
            self.net.head.refresh(self.net.text)

    def on_validation_epoch_start(self):
        self._refresh_head()  # before validation and before this epoch's checkpoints are written

    def on_train_epoch_end(self):
        self._refresh_head()

    def l2sp_penalty(self) -> torch.Tensor:
        """L2-SP (Li et al. 2018): alpha/2 ||w - w0||^2 over the trainable body, beta/2 ||w||^2 over the head.

        w is each weight the network computes with. A LoRA layer's is its base weight plus the adapter's change,
        merged as PEFT merges it (adapters.merged_weights), so the penalty is alpha/2 ||W + (alpha_lora / r) B A -
        W0||^2, as on the merged model; the factors A and B are not weights of the model and are not penalised
        themselves (their own distance to their initialisation is a different regulariser)."""
        total = torch.zeros((), device=self.device)
        if self.l2sp_alpha:
            from thawlab.adapters import merged_weights

            merged = merged_weights(self.net.backbone)
            for name, p in self.net.backbone.named_parameters():
                if "lora_" in name:
                    continue
                w, trains = merged.get(name, (p, False))
                if p.requires_grad or trains:
                    w0 = getattr(self.w0, str(self._w0_index[name]))
                    total = total + self.l2sp_alpha / 2 * (w - w0).pow(2).sum()
        if self.l2sp_beta:
            total = total + self.l2sp_beta / 2 * sum(p.pow(2).sum() for p in self.net.head.parameters())
        return total

    def configure_optimizers(self):
        c = self.opt_cfg
        exempt = self.net.no_decay() if c["weight_decay"] and c.get("no_decay_exemptions", True) else set()
        scales = self.net.layer_decay_scales(c.get("layer_decay", 1.0))
        names = {id(p): n for n, p in self.net.named_parameters()}
        groups = []
        per_tensor = any(p.auto for p in self.phases)  # auto phases scale each tensor's lr by its own multiplier
        for g, ps in self.net.named_group_parameters().items():
            # one optimizer group per (block group, weight decay or not, layer-decay scale), all named after the
            # block group: the phase's lr multiplier applies to all of them; weight decay and timm's per-parameter
            # layer-decay scale differ. Forward order within a name: the last is the group's top layer.
            parts: dict[tuple, list] = {}
            for p in ps:
                n = names[id(p)]
                parts.setdefault((n in exempt, scales[n], n if per_tensor else ""), []).append(p)
            # SPD takes Adam's step without weight decay on what it projects: its lambda replaces the decay there
            spd_body = self.projection == "spd" and g not in ("head", "text")
            for (no_decay, scale, tensor), params in sorted(parts.items()):
                groups.append({"params": params, "name": g, "layer_decay_scale": scale,
                               **({"tensor": tensor} if tensor else {}),
                               **({"weight_decay": 0.0} if no_decay or spd_body else {})})
        opt = OPTIMIZERS[c["name"]](groups, c)
        if self.projection:
            self._attach_projection(opt)
        steps_per_epoch = max(1, self.trainer.estimated_stepping_batches // self.trainer.max_epochs)
        shape = {"name": c["schedule"], **{k: c.get(k) for k in SHAPE_KEYS}}
        lambdas = [functools.partial(lr_factor, self.phases, g["name"], steps_per_epoch=steps_per_epoch, shape=shape,
                                     scale=g["layer_decay_scale"]) for g in groups]
        lambdas = [self.auto_lr.wrap(f, g["tensor"]) if "tensor" in g else f for f, g in zip(lambdas, groups)]
        momentum = functools.partial(momentum_at, self.phases, steps_per_epoch=steps_per_epoch, shape=shape)
        sched = PhaseScheduler(opt, lambdas, momentum)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _attach_projection(self, opt) -> None:
        """The projection toward w0 around the optimizer's step, over the backbone's weights that have a w0 (the
        head and a CLIP text tower are not projected)."""
        from thawlab import projection

        names = [f"backbone.{n}" for n in self._w0_index]
        anchors = projection.anchors_of(self.net, names, lambda n: getattr(self.w0, str(
            self._w0_index[n.removeprefix("backbone.")])))
        reg = self.hparams["regularization"]
        if self.projection == "tpgm":
            from thawlab.tpgm import TPGM, val_batches

            if self.tpgm is None:
                seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
                self.tpgm = TPGM(self.net, names, reg, val_batches(self.trainer.datamodule, seed), self.device,
                                 self.channels_last)
                if getattr(self, "_tpgm_state", None) is not None:  # a resumed run's radii
                    self.tpgm.load_state_dict(self._tpgm_state)
            method = self.tpgm.projection(anchors)
        else:
            method = projection.make(self.projection, anchors, reg)
        projection.attach(opt, method)
        if self.note is not None:
            sizes = dict(self.net.named_parameters())
            trained = {n for p in self.phases for n, t in self.net.trains(p).items() if t and n in names}
            self.note(f"projection {self.projection}: {len(trained)} of the backbone's {len(names)} tensors "
                      f"({sum(sizes[n].numel() for n in trained):,} parameters) train in some phase and are "
                      f"projected toward the pretrained weights after each step they train in; the head is not"
                      + ("" if trained else " (no phase trains the backbone: the projection does nothing)"))

    def on_save_checkpoint(self, checkpoint):
        checkpoint["thawlab_trace"] = self.trace
        if self.identity is not None:
            checkpoint["thawlab_identity"] = self.identity
        checkpoint["thawlab_plan"] = {"epochs": [p.epochs for p in self.phases], "stopped": self.stopped}
        # dropout, drop-path (torch), augmentations (torch, python: timm RandAugment), Mixup (numpy): a resumed
        # run continues exactly (loader worker processes aside: they are seeded afresh)
        checkpoint["thawlab_rng"] = torch.get_rng_state()
        checkpoint["thawlab_rng_host"] = host_rng_state()
        if self._trainer is not None and self.trainer.world_size > 1:
            # every rank has its own streams (ranks.rank_seed); rank 0 writes the file: it carries them all.
            # Every rank dumps the checkpoint (Lightning's save_checkpoint), so all take part in the gather.
            import torch.distributed as dist

            everyone: list = [None] * self.trainer.world_size
            dist.all_gather_object(everyone, (torch.get_rng_state(), host_rng_state()))
            checkpoint["thawlab_rng_ranks"] = everyone
        if self.theta0 is not None:
            checkpoint["thawlab_theta0"] = self.theta0
        if self.tpgm is not None:
            checkpoint["thawlab_tpgm"] = self.tpgm.state_dict()

    def on_load_checkpoint(self, checkpoint):
        self.trace = checkpoint.get("thawlab_trace", [])
        if "thawlab_theta0" in checkpoint:
            self.theta0 = checkpoint["thawlab_theta0"]
        # TPGM's radii: its object is made with the optimizer, after a checkpoint's weights are loaded
        self._tpgm_state = checkpoint.get("thawlab_tpgm")
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if "thawlab_rng" in checkpoint and fitting:
            torch.set_rng_state(checkpoint["thawlab_rng"])
            if "thawlab_rng_host" in checkpoint:
                set_host_rng_state(checkpoint["thawlab_rng_host"])
            mine = checkpoint.get("thawlab_rng_ranks") or []
            if len(mine) == self.trainer.world_size > 1:  # this rank's own streams, as saved
                torch.set_rng_state(mine[self.global_rank][0])
                set_host_rng_state(mine[self.global_rank][1])
        if "thawlab_plan" in checkpoint and fitting:  # a resumed run continues the plan as early stopping cut it
            for i, epochs in enumerate(checkpoint["thawlab_plan"]["epochs"]):
                self.phases[i] = replace(self.phases[i], epochs=epochs)  # in place: the lr lambdas hold the list
            self.stopped = checkpoint["thawlab_plan"]["stopped"]

    # ---- evaluation -----------------------------------------------------------------------------------
    def on_test_start(self):
        if self.cache is not None and self.cache.test_digest is not None:
            from thawlab.feature_store import weights_digest

            if weights_digest(self.net.backbone) != self.cache.test_digest:  # e.g. a checkpoint of a later phase
                self.cache.tables = {k: v for k, v in self.cache.tables.items() if not k.startswith("test/")}
                self.cache.test_digest = None

    def _eval_step(self, stage, batch, dataloader_idx):
        logits = restrict(self._logits(stage, batch, dataloader_idx), self.class_subsets.get(
            self.eval_sets[stage][dataloader_idx]))
        self.metrics[f"{stage}_{dataloader_idx}"].update(logits, batch[1])  # logits: NLL from log_softmax

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self._eval_step("test", batch, dataloader_idx)

    def _eval_epoch_end(self, stage):
        values: dict[str, float] = {}
        # the test of another selection rule's checkpoint logs as test/<rule>/... (train.evaluate_selected), so
        # the primary rule's keys keep their meaning in W&B
        prefix = self.metric_prefix.get(stage, stage)
        for i, name in enumerate(self.eval_sets[stage]):
            collection = self.metrics[f"{stage}_{i}"]
            for metric, v in collection.compute().items():
                if metric == "count":
                    self.counts[f"{stage}/{name}"] = int(v)
                else:
                    values[f"{prefix}/{name}/{metric}"] = float(v)
            collection.reset()
        values.update(ood_mean(values, prefix, self.eval_sets[stage]))
        self.computed[stage] = values
        headline = f"{prefix}/id/acc"  # on the progress bar; the rest only in the logger
        self.log_dict({k: v for k, v in values.items() if k != headline}, add_dataloader_idx=False)
        self.log(headline, values[headline], prog_bar=True, add_dataloader_idx=False)

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")
