"""The LightningModule: training steps, the schedule's phases, per-set metrics, and the per-epoch trace.

Every parameter group is created once, named after its block group (fastai's rule); a phase changes which
groups train and their lr multipliers through one LambdaLR that knows every group from the first step, so no
group is ignored by the scheduler and no lr scale waits for a scheduler that never applies it.
"""
from __future__ import annotations

import functools
from dataclasses import asdict

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from thawlab.metrics import eval_metrics
from thawlab.model import ThawNet
from thawlab.schedules import Phase, lr_factor, phase_at


# optimizer.name -> constructor over the named parameter groups
OPTIMIZERS = {
    "adamw": lambda groups, c: torch.optim.AdamW(groups, lr=c["lr"], weight_decay=c["weight_decay"]),
    "sgd": lambda groups, c: torch.optim.SGD(groups, lr=c["lr"], momentum=c["momentum"],
                                             weight_decay=c["weight_decay"]),
}


class FineTuner(L.LightningModule):
    def __init__(self, net: ThawNet, phases: list[Phase], optimizer: dict, num_classes: int,
                 eval_sets: dict[str, list[str]]):
        super().__init__()
        # plain containers only: checkpoints must load with weights_only=True
        self.save_hyperparameters({"optimizer": dict(optimizer), "num_classes": num_classes,
                                   "phases": [asdict(p) for p in phases], "eval_sets": eval_sets})
        self.net, self.phases, self.opt_cfg, self.eval_sets = net, phases, dict(optimizer), eval_sets
        self.metrics = nn.ModuleDict({f"{stage}_{i}": eval_metrics(num_classes)
                                      for stage, names in eval_sets.items() for i in range(len(names))})
        self.trace: list[dict] = []
        self.computed: dict[str, dict[str, float]] = {}  # stage -> {"test/id/acc": ...}
        self.counts: dict[str, int] = {}  # "test/id" -> samples evaluated

    def forward(self, x):
        return self.net(x)

    # ---- training -------------------------------------------------------------------------------------
    def on_train_epoch_start(self):
        _, phase, _ = phase_at(self.phases, self.current_epoch)
        self.net.apply_phase(phase)
        lrs = {g["name"]: g["lr"] for g in self.optimizers().optimizer.param_groups}
        entry = {"epoch": self.current_epoch, "phase": phase.name, "trainable_groups": list(phase.trainable),
                 "trainable_params": self.net.trainable_parameter_count(), "lr": lrs}
        self.trace = [t for t in self.trace if t["epoch"] < self.current_epoch] + [entry]
        self.log("trace/trainable_params", float(entry["trainable_params"]), on_epoch=True, on_step=False)
        self.log_dict({f"lr/{g}": lr for g, lr in lrs.items()}, on_epoch=True, on_step=False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        return loss

    def configure_optimizers(self):
        groups = [{"params": ps, "name": g} for g, ps in self.net.named_group_parameters().items()]
        c = self.opt_cfg
        opt = OPTIMIZERS[c["name"]](groups, c)
        steps_per_epoch = max(1, self.trainer.estimated_stepping_batches // self.trainer.max_epochs)
        lambdas = [functools.partial(lr_factor, self.phases, g["name"], steps_per_epoch=steps_per_epoch,
                                     shape=c["schedule"], warmup_epochs=c["warmup_epochs"]) for g in groups]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        checkpoint["thawlab_trace"] = self.trace

    def on_load_checkpoint(self, checkpoint):
        self.trace = checkpoint.get("thawlab_trace", [])

    # ---- evaluation -----------------------------------------------------------------------------------
    def _eval_step(self, stage, batch, dataloader_idx):
        x, y = batch
        probs = torch.softmax(self.net(x).float(), dim=-1)
        self.metrics[f"{stage}_{dataloader_idx}"].update(probs, y)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self._eval_step("test", batch, dataloader_idx)

    def _eval_epoch_end(self, stage):
        values: dict[str, float] = {}
        for i, name in enumerate(self.eval_sets[stage]):
            collection = self.metrics[f"{stage}_{i}"]
            for metric, v in collection.compute().items():
                if metric == "count":
                    self.counts[f"{stage}/{name}"] = int(v)
                else:
                    values[f"{stage}/{name}/{metric}"] = float(v)
            collection.reset()
        ood = [n for n in self.eval_sets[stage] if n.startswith("ood/")]
        for metric in ("acc", "nll", "ece"):
            if ood:
                values[f"{stage}/ood/mean/{metric}"] = sum(values[f"{stage}/{n}/{metric}"] for n in ood) / len(ood)
        self.computed[stage] = values
        headline = f"{stage}/id/acc"  # on the progress bar; the rest only in the logger
        self.log_dict({k: v for k, v in values.items() if k != headline}, add_dataloader_idx=False)
        self.log(headline, values[headline], prog_bar=True, add_dataloader_idx=False)

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")
