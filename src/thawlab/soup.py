"""`thawlab-soup`: weight-space ensembles over finished runs fine-tuned from one theta_0.

    thawlab-soup <sweep dir> --recipe uniform|greedy|model_stock [--where KEY=VALUE ...] [--out DIR]

Recipes, each as its source defines it:
- uniform (Wortsman et al., ICML 2022, "Model soups"): the mean of the ingredients' weights.
- greedy (the same paper, Algorithm 1; mlfoundations/model-soups main.py): ingredients sorted by ID validation
  accuracy, decreasing; the best is the soup; each next one is added only if the soup's ID validation accuracy
  with it is >= the soup's without it.
- model_stock (Jang et al., ECCV 2024, naver-ai/model-stock): per layer (state-dict tensor), cos(theta) between
  the ingredients' changes from theta_0 (N > 2: the mean over pairs), t = N cos / (1 + (N - 1) cos) and
  merged = t * mean(fine-tuned) + (1 - t) * theta_0; an epsilon of 1e-8 in the denominators of cos and t (as the
  repository's example notebook is recalled to do: its code was not available to check against).

theta_0 of model_stock is the pretrained backbone, which every ingredient starts from. A new head has no
pretrained anchor (its random initialisation differs between seeds and is no point a fine-tuned model should be
pulled back to), so the head is averaged uniformly, as are the BatchNorm running statistics (buffers, not
trained weights: the ratio is defined on fine-tuned weights). Integer buffers (BatchNorm's step counters) are
taken from the first ingredient.

BatchNorm statistics are averaged as weights in every recipe: what the model-soups and Model Stock papers do for
their CLIP ViTs, which have no BatchNorm, is moot; averaging keeps the soup a function of the ingredients' files
alone (no pass over training data) and equals WiSE-FT's treatment in thawlab/wise.py. `--recompute-bn` recomputes
them on the training data instead (torch.optim.swa_utils.update_bn, as SWA does after averaging).

The soup is evaluated with the runs' own evaluation code (thawlab.metrics.evaluate) on ID and every OOD test set
of the ingredients' data, and written as a run directory with the results contract (thawlab/results.py) plus
`soup`, so thawlab-report reads it as a row.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

from thawlab.errors import ThawlabError, did_you_mean

PROG = "thawlab-soup"
RECIPES = ("uniform", "greedy", "model_stock")
EPS = 1e-8  # in the cosine's and the ratio's denominators (a layer that did not move: cos 0, t 0, theta_0)
# config subtrees that define theta_0 and the network's shape: every ingredient must agree on them
SAME_THETA0 = ("backbone", "head", "data", "schedule.adapter", "task")
# keys inside those that only change how a run trains or where files are, never theta_0 or the network
TRAINING_ONLY = ("backbone.drop_path_rate", "head.dropout", "data.batch_size", "data.eval_batch_size",
                 "data.num_workers", "data.pin_memory", "data.persistent_workers", "data.augment", "data.download",
                 "data.root", "data.paths", "data.source.num_workers")


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _defines_theta0(key: str) -> bool:
    if any(key == k or key.startswith(k + ".") for k in TRAINING_ONLY):
        return False
    return any(key == k or key.startswith(k + ".") for k in SAME_THETA0)


def run_name(run, root: Path) -> str:
    d = Path(run.path).parent
    try:
        return str(d.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(d)


def check_same_theta0(runs, root: Path) -> None:
    """One line naming the runs when they do not start from the same theta_0 (backbone and its weights, data,
    head, adapters)."""
    flats = [_flatten(r.config) for r in runs]
    keys = sorted({k for f in flats for k in f if _defines_theta0(k)})
    missing = object()
    for key in keys:
        values: dict[str, list[str]] = {}
        for r, f in zip(runs, flats):
            values.setdefault(repr(f.get(key, missing)) if key in f else "(absent)", []).append(run_name(r, root))
        if len(values) > 1:
            parts = " vs ".join(f"{v} ({', '.join(names)})" for v, names in values.items())
            raise ThawlabError(f"runs differ in {key}: {parts}; a soup averages runs fine-tuned from one theta_0 "
                               f"(same backbone, weights, data and head)")


# ------------------------------------------------------------------------------------------------- recipes

def uniform(states: list[dict]) -> dict:
    """The mean of the state dicts (floating-point entries; integer ones from the first)."""
    import torch

    out = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            out[k] = (torch.stack([s[k].double() for s in states]).sum(0) / len(states)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def cosine(a, b) -> float:
    """cos = <a, b> / (|a| |b| + eps), clamped to [-1, 1] (float64)."""
    import torch

    a, b = a.double().flatten(), b.double().flatten()
    value = float((a * b).sum() / (torch.sqrt((a * a).sum() * (b * b).sum()) + EPS))
    return max(-1.0, min(1.0, value))


def stock_ratio(cos: float, n: int) -> float:
    """Model Stock's interpolation ratio for n fine-tuned models at angle cos: t = n cos / (1 + (n - 1) cos)."""
    return n * cos / ((n - 1) * cos + 1 + EPS)


def model_stock(states: list[dict], theta0: dict, anchored: set[str]) -> tuple[dict, dict]:
    """(merged state dict, {key: {"cos": ..., "t": ...}}): per anchored key, the mean pairwise cosine of the
    changes from theta0 and t; merged = t * mean + (1 - t) * theta0. Other keys: the uniform mean."""
    mean = uniform(states)
    ratios = {}
    for k in sorted(anchored):
        deltas = [s[k].double() - theta0[k].double() for s in states]
        cos = sum(cosine(a, b) for a, b in itertools.combinations(deltas, 2)) / math.comb(len(states), 2)
        t = stock_ratio(cos, len(states))
        mean[k] = (t * mean[k].double() + (1 - t) * theta0[k].double()).to(states[0][k].dtype)
        ratios[k] = {"cos": cos, "t": t}
    return mean, ratios


def greedy(states: list[dict], val_acc) -> tuple[dict, list[bool], list[float]]:
    """Algorithm 1 of Model soups: states sorted by ID val accuracy, decreasing; val_acc(state dict) -> accuracy.
    (soup, kept flags, the soup's val accuracy after each ingredient was considered)."""
    kept, steps = [True], []
    best = val_acc(states[0])
    steps.append(best)
    for s in states[1:]:
        candidate = uniform([x for x, k in zip(states, kept) if k] + [s])
        acc = val_acc(candidate)
        keep = acc >= best  # model-soups main.py: `if held_out_val_accuracy >= best_val_acc_so_far`
        kept.append(keep)
        if keep:
            best = acc
        steps.append(best)
    return uniform([x for x, k in zip(states, kept) if k]), kept, steps


def recompute_bn(net, dataset, batch_size: int, device) -> None:
    """Every BatchNorm layer's running statistics from one pass over the training data in train mode, a
    cumulative average (momentum None): torch.optim.swa_utils.update_bn, what SWA does after averaging weights.
    A model without BatchNorm is left as it is."""
    from torch.optim.swa_utils import update_bn
    from torch.utils.data import DataLoader

    update_bn(DataLoader(dataset, batch_size=batch_size, shuffle=False), net, device)


# ----------------------------------------------------------------------------------------------- the command

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG, description="Average the selected weights of finished runs fine-tuned from one theta_0 (a "
                               "sweep's jobs), evaluate the soup on ID and every OOD test set and write it as a run "
                               "directory that thawlab-report reads as a row.")
    ap.add_argument("sweep", type=Path, metavar="SWEEP_DIR", help="directory searched for finished runs")
    ap.add_argument("--recipe", required=True, metavar="RECIPE", help=f"one of {', '.join(RECIPES)}")
    ap.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                    help="only runs whose config has KEY=VALUE (dotted key, e.g. seed=0; repeatable): one soup "
                         "per seed pairs with the sweep's rows")
    ap.add_argument("--out", type=Path, metavar="DIR",
                    help="the soup's run directory (default: <SWEEP_DIR>/soup=<recipe>[,<where>...])")
    ap.add_argument("--recompute-bn", action="store_true",
                    help="recompute the soup's BatchNorm running statistics on the training data (one pass in train "
                         "mode, cumulative average) instead of averaging them")
    ap.add_argument("--include-smoke", action="store_true", help="use smoke runs as ingredients (as thawlab-report)")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from thawlab.report.runs import ReportError

    try:
        make_soup(args)
    except ReportError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.code
    except ThawlabError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _where(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ThawlabError(f"--where {item!r}: expected KEY=VALUE, e.g. seed=0")
        out.append((key, value))
    return out


def ingredients(args) -> tuple[list, Path]:
    """The finished runs under the sweep directory that the soup averages (soups left out), checked to share
    theta_0; (runs, root)."""
    from thawlab.report.runs import _fmt_value, _override_key, load

    if args.recipe not in RECIPES:
        raise ThawlabError(f"--recipe {args.recipe!r} is not one of {', '.join(RECIPES)}"
                           f"{did_you_mean(args.recipe, RECIPES)}")
    where = _where(args.where)
    runs = load([args.sweep], include_smoke=args.include_smoke)
    root = runs.root
    incompatible = [s for s in runs.skipped if s.kind == "incompatible"]
    if incompatible:
        raise ThawlabError(f"runs on other data than the rest: {', '.join(str(s.path.parent) for s in incompatible)}"
                           f" ({incompatible[0].reason}); a soup averages runs fine-tuned from one theta_0")
    for s in runs.skipped:
        print(f"{PROG}: warning: left out {s.path}: {s.reason}", file=sys.stderr)
    chosen = []
    for r in runs.runs:
        if r.path is None or any(_override_key(o) == "soup" for o in r.overrides):
            continue  # a missing seed's placeholder, or an earlier soup
        if any(_fmt_value(r.get(k)) != v for k, v in where):
            continue
        if not r.done:
            print(f"{PROG}: warning: left out {r.where()}: {r.status} ({r.error})", file=sys.stderr)
            continue
        chosen.append(r)
    if len(chosen) < 2:
        what = f" with {', '.join(args.where)}" if where else ""
        raise ThawlabError(f"{args.sweep}: {len(chosen)} finished run(s){what}; a soup needs at least 2")
    check_same_theta0(chosen, root)
    return chosen, root


def selected_state(run) -> dict:
    """The network's weights in the run's selected checkpoint (results.json `selection.checkpoint`)."""
    import torch

    run_dir = Path(run.path).parent
    rel = (run.selection or {}).get("checkpoint")
    path = run_dir / rel if rel else None
    if path is None or not path.is_file():
        raise ThawlabError(f"{run_dir}: its selected checkpoint {rel!r} is missing (results.json selection."
                           f"checkpoint); a soup needs each run's weights")
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}


def _common_config(runs) -> dict:
    """The ingredients' config where they agree; keys where they differ (the seed, an lr) are null."""
    flats = [_flatten(r.config) for r in runs]
    keys = dict.fromkeys(k for f in flats for k in f)
    missing = object()
    merged = {k: (flats[0].get(k) if all(f.get(k, missing) == flats[0].get(k, missing) for f in flats) else None)
              for k in keys}
    return _unflatten(merged)


def make_soup(args) -> Path:
    import torch
    from omegaconf import OmegaConf

    from thawlab.build import build_datamodule, build_net, console, print_metrics
    from thawlab.metrics import evaluate
    from thawlab.results import DONE, RunRecord

    runs, root = ingredients(args)
    names = [run_name(r, root) for r in runs]
    out = args.out or Path(args.sweep) / ",".join([f"soup={args.recipe}", *(["recompute_bn"] if args.recompute_bn
                                                                              else []), *args.where])
    if (out / DONE).exists():
        raise ThawlabError(f"{out} already holds a finished soup ({DONE} marker); its results are kept: pass "
                           f"--out DIR for another")
    cfg = OmegaConf.create(runs[0].config)
    if cfg.schedule.get("adapter"):
        # a LoRA layer's weight is W + (alpha / r) B A: the mean of the factors is not the mean of the weights
        raise ThawlabError(f"schedule.adapter={cfg.schedule.adapter}: souping adapter runs (averaging merged "
                           f"weights) is not implemented; soup runs that fine-tune the weights themselves")
    states = []
    for r, name in zip(runs, names):
        states.append(selected_state(r))
        if set(states[-1]) != set(states[0]) or any(states[-1][k].shape != v.shape for k, v in states[0].items()):
            raise ThawlabError(f"runs {names[0]} and {name}: their networks' weights differ in names or shapes")

    dm = build_datamodule(cfg.data, None, shuffle_seed=cfg.seed)
    dm.prepare_data()
    pretrained = cfg.backbone.pretrained
    if pretrained == "source":
        from thawlab.pretrain import source_weights

        pretrained = str(source_weights(cfg))
    net, dm.preprocess = build_net(cfg, dm.num_classes, pretrained)
    # model_stock's theta_0: the network as built, before any ingredient is loaded into it (the pretrained backbone)
    theta0 = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    dm.setup("fit")
    dm.setup("test")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net.to(device)
    n_params = sum(p.numel() for p in net.parameters())
    console.print(f"soup ({args.recipe}) of {len(runs)} runs, {n_params:,} parameters each: {', '.join(names)}")

    val = {"id": dm.eval_dataloaders("val", distributed=False)["id"]}

    def val_acc(state: dict, is_soup: bool = True) -> float:
        """ID val accuracy; a soup (not an ingredient, which keeps its own statistics) with --recompute-bn gets
        its BatchNorm statistics from the training data first, so greedy's choices see what is reported."""
        net.load_state_dict(state)
        if is_soup and args.recompute_bn:
            recompute_bn(net, dm.train_set, dm.batch_size, device)
        return evaluate(net, val, dm.num_classes, "val", dm.class_subsets)["val/id/acc"]

    accs = [val_acc(s, is_soup=False) for s in states]
    # decreasing ID val accuracy; ties keep the sweep's order (sorted() is stable)
    order = sorted(range(len(runs)), key=lambda i: -accs[i])
    record: dict = {"recipe": args.recipe, "ingredients": [
        {"run": names[i], "seed": runs[i].seed, "val/id/acc": accs[i], "kept": True} for i in order]}
    if args.recipe == "uniform":
        soup = uniform(states)
    elif args.recipe == "greedy":
        first = order[0]  # Algorithm 1 starts from the best ingredient's own accuracy
        soup, kept, steps = greedy([states[i] for i in order],
                                   lambda s: accs[first] if s is states[first] else val_acc(s))
        for entry, keep, step in zip(record["ingredients"], kept, steps):
            entry.update(kept=keep, soup_val_acc=step)
    else:
        anchored = {f"backbone.{n}" for n, _ in net.backbone.named_parameters()}
        soup, ratios = model_stock(states, theta0, anchored)
        record["theta0"] = f"the pretrained backbone (backbone.pretrained={cfg.backbone.pretrained}); head and " \
                           f"buffers averaged uniformly"
        record["ratios"] = ratios
        ts = [v["t"] for v in ratios.values()]
        console.print(f"model_stock: t per layer over {len(ts)} backbone tensors: min {min(ts):.3f}, "
                      f"mean {sum(ts) / len(ts):.3f}, max {max(ts):.3f}")
        outside = [k for k, v in ratios.items() if not 0 <= v["t"] <= 1]
        if outside:  # cos < 0: the formula extrapolates away from the ingredients' mean (the repo does not clip)
            console.print(f"[yellow]warning: model_stock: t outside [0, 1] in {len(outside)} of {len(ts)} layers "
                          f"(their changes from theta_0 point apart, cos < 0): the ingredients may not share a "
                          f"basin[/yellow]")
    record["batchnorm"] = ("running statistics recomputed on the training data (torch.optim.swa_utils.update_bn)"
                           if args.recompute_bn else "running statistics averaged as weights")
    for entry in record["ingredients"]:
        console.print(f"  {entry['run']}: val/id/acc {100 * entry['val/id/acc']:.1f}"
                      + ("" if entry["kept"] else " (not kept: the soup's ID val accuracy would drop)"))

    soup_val = val_acc(soup)
    loaders = dm.eval_dataloaders("test", distributed=False)
    metrics = evaluate(net, loaders, dm.num_classes, "test", dm.class_subsets)
    if cfg.backbone.pretrained == "source":
        from thawlab.pretrain import source_retention

        # on the CPU, as train.py calls it after Lightning's teardown: the source head it builds lives there
        metrics.update(source_retention(cfg, net.cpu(), dm.preprocess, Path(pretrained)))
    counts = {f"test/{k}": len(ds) for k, ds in dm.sets["test"].items()}

    config = _common_config(runs)
    config["soup"] = {"recipe": args.recipe, "recompute_bn": bool(args.recompute_bn)}
    seeds = sorted({r.seed for r in runs})
    # the row label in thawlab-report: recipe, BatchNorm treatment (another soup), the ingredients' subset
    overrides = [f"soup={args.recipe}", *(["soup.recompute_bn=true"] if args.recompute_bn else []), *args.where]
    rec = RunRecord(out, config, seeds[0], overrides=overrides)
    from safetensors.torch import save_file

    # the evaluated weights: the soup, its BatchNorm statistics recomputed with --recompute-bn
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(out / "soup.safetensors"))
    record["ingredient_dirs"] = [str(Path(r.path).parent.resolve()) for r in (runs[i] for i in order)]
    rec.finish(metrics=metrics, counts=counts, soup=record, wise=None,
               selection={"rule": f"soup ({args.recipe})", "phases": [], "phase": None,
                          "checkpoint": "soup.safetensors", "value": soup_val, "epoch": None})
    print_metrics(metrics, selected=f"by {args.recipe} soup of {sum(e['kept'] for e in record['ingredients'])} "
                                    f"runs, val/id/acc {100 * soup_val:.1f}")
    console.print(f"results: {out / 'results.json'}")
    return out


if __name__ == "__main__":
    sys.exit(main())
