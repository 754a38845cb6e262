"""Projection toward theta_0, the pretrained weights (`regularization.projection`): FTP, SPD and TPGM.

Each acts on the optimizer's step, after thawlab's own optimizer (AdamW or SGD over the named block groups,
with their lr multipliers: LLRD, discriminative lrs, schedules) has taken it: the reference optimizers compute
the same unprojected step and then project it, so the projection is a function of (the weights before the step,
the gradient, the weights after it, theta_0, its own state). Only the pretrained body is projected (parameters
of the backbone that have a theta_0); the new head takes the plain step, as every reference excludes it.

  ftp   Fast Trainable Projection (Tian et al., NeurIPS 2023; GT-RIPL/FTP util/FTP.py, AdamP and SGDP): after
        the step, w = w0 + clip(gamma / ||w~ - w0||_mars, 0, 1) (w~ - w0), with one learned radius gamma per
        tensor, updated by Adam (lr 1e-2) on the hyper-gradient <grad_t, c_{t-1} / ||c_{t-1}||> (positive
        hyper-gradients scaled by k).
  spd   Selective Projection Decay (Tian et al., NeurIPS 2024; GT-RIPL/Selective-Projection-Decay adamSPD.py):
        Adam without weight decay, then, for a tensor whose gradient points away from theta_0
        (-<g, w - w0> < 0), w~ -= lambda r (w~ - w0) with r = clip((||w~ - w0|| - ||w - w0||) / ||w~ - w0||, 0, 1).
  tpgm  Trainable Projected Gradient Method (Tian et al., CVPR 2023; PotatoTian/TPGM utils/tpgm.py): after the
        step, a radius per tensor is trained by Adam on the loss of the projected network on ID validation
        batches, then the weights are projected into it (thawlab.tpgm).

A tensor that does not train in a phase has no gradient and is left alone: frozen groups stay frozen. The state
of FTP (its radii and their Adam moments) lives in the optimizer's per-parameter state, so a checkpoint keeps it
and a phase that resets the optimizer (fastai's unfreeze) resets it too.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from thawlab.errors import ThawlabError, did_you_mean

PROJECTIONS = ("ftp", "spd", "tpgm")
TPGM_NORMS = ("mars", "l2")  # TPGM's norm of w - w0: L1 per output row (the reference's "mars"), or the whole L2

# FTP's constants, hard-coded in the reference (util/FTP.py, class FTP.__init__): the Adam that updates each
# radius gamma, and gamma's starting value on the first step
FTP_MU, FTP_BETA1, FTP_BETA2, FTP_GAMMA0 = 1e-2, 0.9, 0.999, 1e-8


def mars_norm(t: torch.Tensor) -> torch.Tensor:
    """The reference's "MARS" norm: the L1 norm of each output row (dims 1.. summed, kept). For a 1-d tensor
    `dim=()` sums every element (torch's reading of an empty dim tuple), one norm for the whole tensor."""
    return torch.sum(torch.abs(t), dim=tuple(range(1, t.dim())), keepdim=True)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sum(a * b, dim=tuple(range(1, a.dim())), keepdim=True)


class Projection:
    """The step of a projection method around a torch optimizer's own step. `anchors` maps each projected
    parameter (by identity) to a function returning its theta_0 (a buffer of the module: it moves with it)."""

    name = ""

    def __init__(self, anchors: dict[int, Callable[[], torch.Tensor]]):
        self.anchors = anchors

    def projected(self, optimizer) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
        """(parameter, theta_0, its optimizer state) of each projected parameter that has a gradient this step."""
        out = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) in self.anchors:
                    out.append((p, self.anchors[id(p)](), optimizer.state[p]))
        return out

    def before(self, optimizer) -> object:  # gradients computed (and clipped), weights not yet stepped
        return None

    def after(self, optimizer, before) -> None:  # the optimizer's own step taken
        raise NotImplementedError


class FTP(Projection):
    """FTP's step (util/FTP.py, FTP.step), per parameter, on the weights AdamW / SGD have just stepped to.

    The reference keeps one global step counter t for every tensor (its buffers are a list filled on the first
    step); here each tensor counts its own steps, the same numbers when every projected tensor trains from the
    first step, and a tensor that starts training later (gradual unfreezing) starts its radius as the reference
    starts every radius."""

    name = "ftp"

    def __init__(self, anchors, k: float):
        super().__init__(anchors)
        self.k = k

    @torch.no_grad()
    def after(self, optimizer, before) -> None:
        for p, pre, state in self.projected(optimizer):
            c_t = p - pre  # the reference: (curr - d_p) - pre, the unprojected step's distance from theta_0
            norms = mars_norm(c_t) + 1e-8
            t = state.get("ftp_t", 0) + 1
            if t == 1:
                gamma = torch.tensor(FTP_GAMMA0, device=p.device, dtype=p.dtype)
                state["ftp_m"] = torch.zeros((), device=p.device, dtype=p.dtype)
                state["ftp_v"] = torch.zeros((), device=p.device, dtype=p.dtype)
            else:
                # d loss / d gamma at the previous step: the gradient at the weights it projected to, along the
                # direction it scaled (c_{t-1} / ||c_{t-1}||)
                gamma_grad = torch.sum(_rowdot(p.grad, state["ftp_c"]) * state["ftp_scale"])
                if gamma_grad > 0:
                    gamma_grad = gamma_grad * self.k  # annealing: only growth of the radius is slowed
                m = FTP_BETA1 * state["ftp_m"] + (1 - FTP_BETA1) * gamma_grad
                v = FTP_BETA2 * state["ftp_v"] + (1 - FTP_BETA2) * gamma_grad ** 2
                state["ftp_m"], state["ftp_v"] = m, v
                m_hat, v_hat = m / (1 - FTP_BETA1 ** t), v / (1 - FTP_BETA2 ** t)
                gamma = state["ftp_gamma"] - FTP_MU * m_hat / (torch.sqrt(v_hat) + 1e-8)
                gamma = F.hardtanh(gamma, 1e-8, float(norms.max()))
            denom = 1 / norms
            p.copy_(pre + F.hardtanh(gamma * denom, 0.0, 1.0) * c_t)
            state["ftp_gamma"], state["ftp_c"], state["ftp_scale"], state["ftp_t"] = gamma, c_t, denom, t


class SPD(Projection):
    """AdamSPD's step (adamSPD.py, AdamSPD.adam) after thawlab's AdamW, which takes the plain Adam step for these
    parameters (their groups' weight decay is 0: lambda is the reference's `weight_decay`, SPD's strength)."""

    name = "spd"

    def __init__(self, anchors, strength: float):
        super().__init__(anchors)
        self.strength = strength

    @torch.no_grad()
    def before(self, optimizer):
        # the reference's condition and ||w - w0|| need the weights before the step: two numbers per tensor
        return {id(p): (-torch.sum(p.grad * (p - pre)), torch.norm(p - pre))
                for p, pre, _ in self.projected(optimizer)}

    @torch.no_grad()
    def after(self, optimizer, before) -> None:
        for p, pre, _ in self.projected(optimizer):
            condition, prev_norm = before[id(p)]
            if condition < 0.0:  # the step moves away from theta_0 against the gradient's pull: decay it
                curr_norm = torch.norm(p - pre)
                ratio = F.hardtanh((curr_norm - prev_norm) / curr_norm, 0.0, 1.0)
                p.copy_(p - self.strength * ratio * (p - pre))


def projected_step(self, closure=None):
    """optimizer.step with the projection around it: the closure (forward, backward, gradient clipping under
    Lightning) first, then the projection's `before`, the optimizer's own step, the projection's `after`."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    projection = self.thawlab_projection
    before = projection.before(self)
    self.thawlab_base_step()
    projection.after(self, before)
    return loss


def attach(optimizer: torch.optim.Optimizer, projection: Projection) -> torch.optim.Optimizer:
    """Give `optimizer` the projected step, in place (its class becomes a subclass of its own, as Lightning's
    LightningOptimizer does), so its param groups, lr scheduler and state dict are thawlab's as before."""
    base = type(optimizer)
    optimizer.thawlab_projection = projection
    optimizer.thawlab_base_step = base.step.__get__(optimizer, base)
    optimizer.__class__ = type(f"{projection.name.upper()}{base.__name__}", (base,), {"step": projected_step})
    return optimizer


def check(cfg) -> None:
    """regularization.projection against the rest of the run: one line for what cannot be done exactly."""
    r = cfg.regularization
    method = r.get("projection")
    if method is None:
        return
    if method not in PROJECTIONS:
        raise ThawlabError(f"regularization.projection={method!r} is not one of {', '.join(PROJECTIONS)}"
                           f"{did_you_mean(method, PROJECTIONS)}")
    if cfg.backbone.pretrained is False or cfg.backbone.pretrained in ("false", "False"):
        raise ThawlabError(f"regularization.projection={method} projects toward the pretrained weights theta_0: "
                           f"backbone.pretrained=false has none (use true, source or a weights file)")
    adapter = cfg.schedule.get("adapter")
    if adapter:
        raise ThawlabError(f"regularization.projection={method} with schedule.adapter={adapter}: the adapter's "
                           f"parameters have no pretrained value to project toward (use a schedule that trains "
                           f"the backbone's own weights)")
    if method == "spd" and cfg.optimizer.name != "adamw":
        raise ThawlabError(f"regularization.projection=spd with optimizer.name={cfg.optimizer.name}: SPD's "
                           f"reference is Adam's step (AdamSPD) only; use optimizer.name=adamw")
    if method == "tpgm":
        from thawlab import ranks

        if r.tpgm_norm not in TPGM_NORMS:
            raise ThawlabError(f"regularization.tpgm_norm={r.tpgm_norm!r} is not one of {', '.join(TPGM_NORMS)}")
        if ranks.world_size(cfg) > 1:
            raise ThawlabError(f"regularization.projection=tpgm with {ranks.world_size(cfg)} processes: each rank "
                               f"would train the radii on its own validation batches and the ranks would drift "
                               f"apart; run TPGM on one device")


def anchors_of(module: nn.Module, names: list[str], anchor: Callable[[str], torch.Tensor]) -> dict:
    """id(parameter) -> theta_0 lookup, for the parameters `names` of `module`."""
    params = dict(module.named_parameters())
    return {id(params[n]): (lambda n=n: anchor(n)) for n in names}


def make(method: str, anchors: dict, reg: dict) -> Projection:
    if method == "ftp":
        return FTP(anchors, reg.get("ftp_k", 1.0))
    if method == "spd":
        return SPD(anchors, reg.get("spd_weight_decay", 1.0))
    raise ValueError(method)
