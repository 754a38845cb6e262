"""TPGM, the Trainable Projected Gradient Method (Tian et al., CVPR 2023; github.com/PotatoTian/TPGM,
DomainNet_ResNet_Exp/utils/tpgm.py and engine_finetune.py): `regularization.projection=tpgm`.

After each optimizer step the pretrained body is projected toward w0: w = w0 + clip(c / (||w - w0|| + 1e-8),
0, 1) (w - w0), with one radius c per tensor (norm: "mars", the L1 norm of each output row, or "l2", the whole
tensor's). Every `tpgm_every` steps (counted within the epoch, as the reference's batch index) the radii first
take `tpgm_iters` Adam steps (lr `tpgm_lr`) on the cross-entropy of the projected network, in eval mode, on ID
validation batches (the reference's pgm loader: the validation split, shuffled, batches of the training batch
size; here the draws are a function of their count, so a resume continues them). A radius starts at half its
tensor's smallest norm the first time the tensor is projected, and is clipped to [1e-8, max norm] before each use.

The reference runs the projected network as a deep copy with the radii's graph copied into its weights; here the
same function is `torch.func.functional_call` of the network with the projected weights, every module in eval
mode for that forward and its own mode after, and the radii's gradient taken with `torch.autograd.grad`, so no
gradient reaches the network's own parameters (the reference's copy takes them, then is dropped).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from thawlab.projection import Projection, mars_norm


class ValBatches:
    """The reference's pgm loader (the ID validation set, shuffled, batches of the training batch size, started
    again when it runs out) as a function of how many batches were drawn: pass e is the permutation seeded by
    (seed, e), so a resumed run draws the batches the uninterrupted run would have."""

    def __init__(self, dataset, batch_size: int, seed: int = 0):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.per_pass = -(-len(dataset) // batch_size)  # the last batch of a pass may be smaller (drop_last=False)

    def __call__(self, k: int):
        from torch.utils.data import default_collate

        e, i = divmod(k, self.per_pass)
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed * 100003 + e))
        return default_collate([self.dataset[int(j)] for j in order[i * self.batch_size:(i + 1) * self.batch_size]])


def val_batches(datamodule, seed: int) -> ValBatches:
    return ValBatches(datamodule.sets["val"]["id"], datamodule.batch_size, seed)


class Radii(nn.Module):
    """The radius of each projected tensor (shape [1], as the reference's constraints), by position."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.index = {n: i for i, n in enumerate(names)}
        self.values = nn.ParameterList([nn.Parameter(torch.zeros(1)) for _ in names])
        self.register_buffer("started", torch.zeros(len(names), dtype=torch.bool))

    def __getitem__(self, name: str) -> nn.Parameter:
        return self.values[self.index[name]]


class TPGM:
    """The radii, their Adam, the validation batches, and the projection step, over the parameters `names` of
    `net`. `batch_at(k)` is the k-th validation batch drawn, (images, labels, ...)."""

    def __init__(self, net: nn.Module, names: list[str], reg: dict, batch_at, device=None,
                 channels_last: bool = False):
        self.net, self.names, self.batch_at, self.channels_last = net, names, batch_at, channels_last
        self.device = device if device is not None else next(net.parameters()).device
        self.norm, self.every, self.iters = reg.get("tpgm_norm", "mars"), reg.get("tpgm_every", 1), \
            reg.get("tpgm_iters", 1)
        self.radii = Radii(names).to(self.device)
        self.optimizer = torch.optim.Adam(self.radii.parameters(), lr=reg.get("tpgm_lr", 1e-2))
        self.drawn = 0  # validation batches drawn so far
        self.step_in_epoch = 0  # the reference's batch index i: `if i % proj_freq == 0` trains the radii

    # ---- the reference's TPGM._project_ratio --------------------------------------------------------------
    def _ratio(self, name: str, new: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        t = new.detach() - anchor.detach()
        norms = torch.norm(t) if self.norm == "l2" else mars_norm(t)
        radius = self.radii[name]
        i = self.radii.index[name]
        with torch.no_grad():
            if not self.radii.started[i]:  # the reference initialises every radius on its first projection
                radius.copy_(norms.min() / 2)
                self.radii.started[i] = True
            radius.copy_(F.hardtanh(radius, 1e-8, float(norms.max())))
        return F.hardtanh(radius / (norms + 1e-8), 0.0, 1.0)

    def _trained(self, anchors) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
        params = dict(self.net.named_parameters())
        return [(n, params[n], anchors[id(params[n])]()) for n in self.names if params[n].requires_grad]

    def train_radii(self, anchors) -> None:
        """The reference's tpgm_iters (apply=False): `iters` Adam steps of the radii on validation batches."""
        if not self._trained(anchors):  # no tensor of the body trains in this phase (a linear probe)
            return
        net = self.net
        modes = {m: m.training for m in net.modules()}
        net.eval()  # the reference's new_copy.eval()
        try:
            for _ in range(self.iters):
                batch = self.batch_at(self.drawn)
                self.drawn += 1
                x, y = batch[0].to(self.device), batch[1].to(self.device)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                trained = self._trained(anchors)
                used = [self.radii[n] for n, _, _ in trained]
                with torch.enable_grad():  # (the optimizer's step runs without)
                    weights = {n: (p.detach() - pre.detach()) * self._ratio(n, p, pre) + pre.detach()
                               for n, p, pre in trained}
                    loss = F.cross_entropy(torch.func.functional_call(net, weights, (x,)), y)
                    grads = torch.autograd.grad(loss, used)
                self.optimizer.zero_grad(set_to_none=True)
                for r, g in zip(used, grads):
                    r.grad = g
                self.optimizer.step()
        finally:
            for m, mode in modes.items():
                m.training = mode

    @torch.no_grad()
    def apply(self, anchors) -> None:
        """The reference's apply_constraints(apply=True): each trained tensor into its radius."""
        for n, p, pre in self._trained(anchors):
            p.copy_((p - pre) * self._ratio(n, p, pre) + pre)

    def projection(self, anchors) -> Projection:
        return _Step(self, anchors)

    def state_dict(self) -> dict:
        return {"radii": self.radii.state_dict(), "adam": self.optimizer.state_dict(), "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.radii.load_state_dict(state["radii"])
        self.optimizer.load_state_dict(state["adam"])
        self.drawn = state["drawn"]


class _Step(Projection):
    """TPGM as the optimizer's step hook: engine_finetune.py's `if i % proj_freq == 0: tpgm_iters(model) else:
    tpgm_iters(model, apply=True)` after optimizer.step()."""

    name = "tpgm"

    def __init__(self, tpgm: TPGM, anchors):
        super().__init__(anchors)
        self.tpgm = tpgm

    def after(self, optimizer, before) -> None:
        if self.tpgm.step_in_epoch % self.tpgm.every == 0:
            self.tpgm.train_radii(self.anchors)
        self.tpgm.apply(self.anchors)
        self.tpgm.step_in_epoch += 1
