"""The paper-style linear probe (`schedule.solver=lbfgs`): multinomial logistic regression on cached features,
fit full-batch by L-BFGS in float64 over an L2 grid, warm-started along it, the C with the best ID validation
accuracy chosen (LP-FT, Kumar et al. 2022, `unlabeled_extrapolation/log_reg_sk.py`; CLIP, Radford et al. 2021,
appendix A.3). Both fit scikit-learn's `LogisticRegression`; this is that estimator's problem and solver:

  objective  mean_i CE(W x_i + b, y_i) + ||W||^2 / (2 C n)      (sklearn: C sum_i CE + ||W||^2 / 2, same argmin;
                                                                the intercept is not penalised)
  solver     scipy's L-BFGS-B as sklearn 1.x calls it (maxls 50, gtol = tol, ftol = 64 eps), from zeros at the
             first C and from the previous C's solution after (sklearn's warm_start=True, LP-FT's loop)
  2 classes  sklearn fits one logit (binary logistic regression): so does this (class 0's row stays 0)

The loss and its gradient are computed by torch in float64 on the run's device (a GPU holds ImageNet's features);
only the (classes x (features + 1)) parameter vector goes through scipy. LP-FT standardises the features by one
scalar mean and standard deviation of the training features before the grid (so that one grid suits every
backbone) and maps the weights back to raw features: `schedule.probe_normalize` (default true, as LP-FT).
The choice: the first C (increasing order) whose ID validation accuracy is the highest (LP-FT's strict `>`).
"""
from __future__ import annotations

import math
import re
import time
from typing import TYPE_CHECKING

import numpy as np

from thawlab.errors import ThawlabError

# torch is imported inside the functions: schedules imports this module for its config checks, which answer
# before torch loads
if TYPE_CHECKING:
    import torch

SOLVERS = ("adamw", "lbfgs")
# LP-FT's grid: np.logspace(-7, 2, num_reg_values=50) (scripts/run_adaptation_experiments.py: linprobe_run)
DEFAULT_GRID = "logspace(-7, 2, 50)"
_LOGSPACE = re.compile(r"^\s*logspace\(\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*,\s*(\d+)\s*\)\s*$")


def parse_grid(value) -> list[float]:
    """schedule.probe_grid: a list of C values (inverse L2 strengths, sklearn's C), or "logspace(a, b, n)" =
    numpy.logspace(a, b, n). Every C must be positive and finite."""
    if isinstance(value, str):
        m = _LOGSPACE.match(value)
        if not m:
            raise ThawlabError(f"schedule.probe_grid={value!r} must be a list of C values or 'logspace(a, b, n)'")
        grid = [float(c) for c in np.logspace(float(m[1]), float(m[2]), int(m[3]))]
    else:
        try:
            grid = [float(c) for c in value]
        except (TypeError, ValueError):
            raise ThawlabError(f"schedule.probe_grid={value!r} must be a list of C values or "
                               f"'logspace(a, b, n)'") from None
    if not grid:
        raise ThawlabError("schedule.probe_grid is empty: give at least one C value")
    bad = [c for c in grid if not (c > 0 and math.isfinite(c))]
    if bad:
        raise ThawlabError(f"schedule.probe_grid: C={bad[0]:g} is not positive (C is the inverse L2 strength, "
                           f"sklearn's LogisticRegression C)")
    return grid


def fit_logistic(X: torch.Tensor, y: torch.Tensor, num_classes: int, C: float, init: np.ndarray | None = None,
                 max_iter: int = 100, tol: float = 1e-4) -> tuple[np.ndarray, dict]:
    """sklearn's LogisticRegression(C=C, solver='lbfgs', fit_intercept=True) on float64 features X (n, d), labels
    y (n,) in 0..num_classes-1. Returns (params, info): params (rows, d + 1) [W | b], rows = num_classes (one for
    2 classes: the logit of class 1), and {"iterations", "converged", "loss"}. init: a previous solution."""
    import torch
    import torch.nn.functional as F
    from scipy import optimize

    n, d = X.shape
    rows = 1 if num_classes == 2 else num_classes
    reg = 1.0 / (C * n)  # sklearn's l2_reg_strength = 1 / (C sw_sum)
    onehot = F.one_hot(y, num_classes).to(X.dtype)
    w0 = np.zeros((rows, d + 1)) if init is None else np.array(init, dtype=np.float64)

    def loss_grad(v: np.ndarray):
        # sklearn's parameter vector is the (rows, d + 1) matrix raveled in Fortran order: the same order here,
        # so that scipy sees the same vector (L-BFGS is order-invariant up to rounding)
        P = torch.from_numpy(v).to(X.device).view(d + 1, rows).T
        W, b = P[:, :d], P[:, d]
        z = X @ W.T + b
        if rows == 1:  # binary: logits (0, z), softmax = (1 - sigmoid(z), sigmoid(z))
            z = torch.cat([torch.zeros_like(z), z], dim=1)
        lse = torch.logsumexp(z, dim=1)
        loss = (lse - (z * onehot).sum(1)).mean() + 0.5 * reg * (W * W).sum()
        r = (torch.softmax(z, dim=1) - onehot) / n
        if rows == 1:
            r = r[:, 1:]
        g = torch.cat([r.T @ X + reg * W, r.sum(0)[:, None]], dim=1)
        return float(loss), g.T.reshape(-1).cpu().numpy()

    res = optimize.minimize(loss_grad, w0.T.reshape(-1), method="L-BFGS-B", jac=True,
                            options={"maxiter": max_iter, "maxls": 50, "gtol": tol,
                                     "ftol": 64 * np.finfo(float).eps})
    params = res.x.reshape(d + 1, rows).T.copy()
    return params, {"iterations": int(res.nit), "converged": bool(res.status == 0), "loss": float(res.fun)}


def to_head(params: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(weight (K, d), bias (K,)) of a K-way linear head from fit_logistic's params (binary: row 0 is zero)."""
    if params.shape[0] == 1 and num_classes == 2:
        params = np.concatenate([np.zeros_like(params), params])
    return params[:, :-1], params[:, -1]


def probabilities(params: np.ndarray, X: torch.Tensor, num_classes: int) -> torch.Tensor:
    import torch

    W, b = to_head(params, num_classes)
    return torch.softmax(X @ torch.from_numpy(W).to(X).T + torch.from_numpy(b).to(X), dim=1)


def sweep(X: torch.Tensor, y: torch.Tensor, Xv: torch.Tensor, yv: torch.Tensor, num_classes: int,
          grid: list[float], max_iter: int = 200, tol: float = 1e-4, normalize: bool = True, note=None) -> dict:
    """The grid in the order given, each fit warm-started from the one before, scored by accuracy on (Xv, yv);
    the first best wins. Returns {"weight", "bias" (raw-feature head, float64 numpy), "record" (results.json)}."""
    X, Xv = X.double(), Xv.double()
    mean, std = 0.0, 1.0
    if normalize:  # LP-FT's normalize_features: one scalar mean and std over every entry of the training features
        mean, std = float(X.mean()), float(X.std(unbiased=False))
        std = std if std > 0 else 1.0
        X, Xv = (X - mean) / std, (Xv - mean) / std
    params, best, rows, start = None, None, [], time.perf_counter()
    for C in grid:
        params, info = fit_logistic(X, y, num_classes, C, init=params, max_iter=max_iter, tol=tol)
        acc = float((probabilities(params, Xv, num_classes).argmax(1) == yv).double().mean())
        rows.append({"C": C, "val_acc": acc, "iterations": info["iterations"], "converged": info["converged"]})
        if best is None or acc > best[1]:
            best = (C, acc, params.copy())
    C, acc, params = best
    W, b = to_head(params, num_classes)
    # back to raw features (LP-FT's inv_normalize_weights): W (x - m) / s + b = (W / s) x + (b - m/s W 1)
    W, b = W / std, b - (mean / std) * W.sum(1)
    seconds = time.perf_counter() - start
    record = {"solver": "lbfgs", "grid": [r["C"] for r in rows], "val_acc": [r["val_acc"] for r in rows],
              "iterations": [r["iterations"] for r in rows], "converged": [r["converged"] for r in rows],
              "chosen": {"C": C, "index": grid.index(C), "val_acc": acc}, "normalize": normalize,
              "max_iter": max_iter, "tol": tol, "train_samples": len(X),
              "seconds": round(seconds, 3)}
    if note:
        unconverged = sum(not r["converged"] for r in rows)
        note(f"L-BFGS probe: {len(grid)} C values over {len(X)} samples x {X.shape[1]} features in {seconds:.2f} s; "
             f"chosen C={C:.3g} (ID val acc {100 * acc:.1f}%)"
             + (f"; {unconverged} of them stopped at schedule.probe_max_iter={max_iter} before tol" if unconverged
                else ""))
    return {"weight": W, "bias": b, "record": record}


def check_run(cfg, net, dm) -> None:
    """What an L-BFGS probe needs of the run, checked when the module is built: a linear head to put the
    solution in, and training inputs that are the same every epoch (features computed once must be the inputs)."""
    head = net.head
    if not callable(getattr(head, "fc_input", None)):
        raise ThawlabError(f"schedule.solver=lbfgs fits a linear head on the backbone's features: "
                           f"the head {type(head).__name__} is not one; use head=linear (or head=zeroshot, "
                           f"probed from scratch)")
    if not dm.train_transform_deterministic:
        raise ThawlabError(f"schedule.solver=lbfgs fits cached features, and data.augment="
                           f"{cfg.data.get('augment')} changes the training inputs every epoch: use data.augment=none")


def solve_probe(cfg, net, dm, cache, device, bound_gb: float, note=print) -> dict:
    """The probe phase solved: features of the training, validation and test sets from the shared store
    (thawlab.feature_store), the grid fit on the head's input (head.fc_input: LinearHead's features as they are,
    the zero-shot head's normalised ones), the chosen C's weights put in head.fc. `cache` (the module's
    FeatureCache, or None) is filled with the features, so the probe's epoch and, while the backbone stays
    frozen, the final test run no backbone. bound_gb: cache_features.shared_gb. Returns results.json `probe`."""
    import torch
    from omegaconf import OmegaConf

    from thawlab import feature_store

    if not dm.sets["test"]:
        dm.setup("test")
    sets = {("train", "all"): dm.train_set, **{("val", n): ds for n, ds in dm.sets["val"].items()},
            **{("test", n): ds for n, ds in dm.sets["test"].items()}}
    data = OmegaConf.to_container(cfg.data, resolve=True)
    net.to(device)
    try:
        feats, info = feature_store.features(
            cfg.cache_dir, net.backbone, sets, data=data, preprocess=repr(dm.preprocess), device=device,
            batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers,
            bound_gb=bound_gb, note=note)
    finally:
        net.to("cpu")
    head, s = net.head, cfg.schedule
    as_input = lambda k: head.fc_input(torch.from_numpy(feats[k][0]).to(device, torch.float64))  # noqa: E731
    labels = lambda k: torch.from_numpy(feats[k][1]).to(device).long()  # noqa: E731
    out = sweep(as_input(("train", "all")), labels(("train", "all")), as_input(("val", "id")), labels(("val", "id")),
                dm.num_classes, parse_grid(s.probe_grid), max_iter=s.probe_max_iter, tol=s.probe_tol,
                normalize=s.probe_normalize, note=note)
    with torch.no_grad():
        head.fc.weight.copy_(torch.from_numpy(out["weight"]))
        head.fc.bias.copy_(torch.from_numpy(out["bias"]))
    if cache is not None:
        tables = {"train/0": ("train", "all")}
        for stage in ("val", "test"):
            tables.update({f"{stage}/{i}": (stage, n) for i, n in enumerate(dm.sets[stage])})
        for key, k in tables.items():
            cache.put(key, torch.from_numpy(feats[k][0]))
        cache.test_digest = info["digest"]  # test sets from the cache only while the backbone is these weights
    dim = int(feats[("train", "all")][0].shape[1])
    return {**out["record"], "features": {"key": info["key"], "cached": info["cached"],
                                          "seconds": round(info["seconds"], 3), "dim": dim}}
