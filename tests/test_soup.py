"""thawlab-soup on a real tiny sweep (3 smoke runs of schedule=full, seeds 0-2, from one source-pretrained
test_resnet): uniform soup = the mean of the selected checkpoints, greedy's order and >= rule against a hand
computation, Model Stock's per-layer ratio against the formula, the soup as a thawlab-report row, bad input."""
from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import forked_cli
from conftest import BASE, compose_cfg, pretrained_weights
from thawlab import soup
from thawlab.results import read_results
from thawlab.train import train


@pytest.fixture(scope="session")
def sweep(tmp_path_factory, cache_dir) -> Path:
    """Three finished runs in one sweep directory, as `thawlab-train -m seed=0,1,2` leaves them."""
    root = tmp_path_factory.mktemp("soup-sweep")
    for seed in range(3):
        # validated on the whole set, as the soups are (smoke runs validate one batch)
        overrides = [*BASE, f"cache_dir={cache_dir}", "optimizer.lr=0.01", f"seed={seed}",
                     "trainer.limit_val_batches=null"]
        train(compose_cfg(overrides, root / f"seed={seed}"))
    return root


def make(sweep: Path, recipe: str, *extra: str) -> dict:
    out = sweep.parent / f"{sweep.name}-soups" / "".join([recipe, *extra])
    if not (out / "done").exists():
        assert soup.main([str(sweep), "--recipe", recipe, "--include-smoke", "--out", str(out), *extra]) == 0
    return read_results(out) | {"dir": out}


def states(sweep: Path) -> dict[str, dict]:
    """Each run's selected weights, read straight from its checkpoint file."""
    out = {}
    for d in sorted(sweep.glob("seed=*")):
        ckpt = d / read_results(d)["selection"]["checkpoint"]
        sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        out[d.name] = {k.removeprefix("net."): v for k, v in sd.items() if k.startswith("net.")}
    return out


def test_uniform_is_the_mean_of_the_ingredients(sweep):
    res = make(sweep, "uniform")
    got = load_file(str(res["dir"] / "soup.safetensors"))
    ing = list(states(sweep).values())
    assert set(got) == set(ing[0])
    for k, v in got.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, sum(s[k] for s in ing) / 3, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(v, ing[0][k])  # integer counters: the first ingredient's
    assert res["status"] == "done" and res["soup"]["recipe"] == "uniform"
    assert sorted(Path(p).name for p in res["soup"]["ingredient_dirs"]) == ["seed=0", "seed=1", "seed=2"]
    one = read_results(sweep / "seed=0")
    # every test set of the runs, and the runs' own evaluation code: the soup's metrics of the soup's weights
    assert {k for k in one["metrics"] if k.startswith("test/")} <= set(res["metrics"])
    assert res["config"]["seed"] is None and res["config"]["backbone"] == one["config"]["backbone"]


def _val_acc_fn(config: dict):
    """ID validation accuracy of a state dict, built here from the runs' config as train.py builds a run."""
    from thawlab.build import build_datamodule, build_net
    from thawlab.metrics import evaluate
    from thawlab.pretrain import source_weights

    cfg = OmegaConf.create(config)
    dm = build_datamodule(cfg.data, None)
    net, dm.preprocess = build_net(cfg, dm.num_classes, str(source_weights(cfg)))
    dm.setup("fit")
    loader = {"id": dm.eval_dataloaders("val", distributed=False)["id"]}

    def acc(state):
        net.load_state_dict(state)
        return evaluate(net, loader, dm.num_classes, "val")["val/id/acc"]

    return acc


def test_greedy_keeps_the_best_first_and_adds_only_if_val_does_not_drop(sweep):
    res = make(sweep, "greedy")
    ing = states(sweep)
    recorded = {d.name: read_results(d)["selection"]["value"] for d in sweep.glob("seed=*")}
    entries = res["soup"]["ingredients"]
    order = [e["run"] for e in entries]
    # sorted by ID val accuracy, decreasing; the accuracies are those the runs recorded for their checkpoints
    assert [e["val/id/acc"] for e in entries] == sorted((e["val/id/acc"] for e in entries), reverse=True)
    for e in entries:
        assert e["val/id/acc"] == pytest.approx(recorded[e["run"]], abs=1e-6)
    assert order[0] == max(recorded, key=recorded.get) and entries[0]["kept"]
    # the hand computation: Algorithm 1 with >=
    acc = _val_acc_fn(res["config"] | {"seed": 0})
    soup_members, best = [ing[order[0]]], recorded[order[0]]
    for e in entries[1:]:
        candidate = [*soup_members, ing[e["run"]]]
        value = acc({k: sum(s[k] for s in candidate) / len(candidate) if v.is_floating_point() else v
                     for k, v in candidate[0].items()})
        assert e["kept"] == (value >= best), (e, value, best)
        if value >= best:
            soup_members, best = candidate, value
        assert e["soup_val_acc"] == pytest.approx(best, abs=1e-6)
    got = load_file(str(res["dir"] / "soup.safetensors"))
    key = next(k for k, v in got.items() if v.is_floating_point())
    torch.testing.assert_close(got[key], sum(s[key] for s in soup_members) / len(soup_members))
    assert res["selection"]["value"] == pytest.approx(best, abs=1e-6)


def test_model_stock_ratio_by_hand_on_two_state_dicts():
    theta0 = {"w": torch.zeros(2), "b": torch.ones(3)}
    a = {"w": torch.tensor([1.0, 0.0]), "b": torch.ones(3) * 2}
    b = {"w": torch.tensor([1.0, 1.0]), "b": torch.ones(3) * 2}
    merged, ratios = soup.model_stock([a, b], theta0, {"w", "b"})
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)  # Jang et al. eq.: t = N cos / (1 + (N - 1) cos), N = 2
    assert ratios["w"]["cos"] == pytest.approx(cos) and ratios["w"]["t"] == pytest.approx(t)
    torch.testing.assert_close(merged["w"], t * torch.tensor([1.0, 0.5]))  # t * mean + (1 - t) * 0
    assert ratios["b"]["t"] == pytest.approx(1.0, abs=1e-7)  # parallel changes: the mean itself
    torch.testing.assert_close(merged["b"], torch.ones(3) * 2)


def test_model_stock_on_the_sweep_anchors_at_the_pretrained_backbone(sweep):
    res = make(sweep, "model_stock")
    ing = list(states(sweep).values())
    theta0 = pretrained_weights(read_results(sweep / "seed=0"))  # timm names: the backbone without "backbone."
    got = load_file(str(res["dir"] / "soup.safetensors"))
    ratios = res["soup"]["ratios"]
    checked = 0
    for key, r in ratios.items():
        assert key.startswith("backbone.")
        w0 = theta0[key.removeprefix("backbone.")].double()
        deltas = [s[key].double() - w0 for s in ing]
        cos = sum(float((x * y).sum() / (x.norm() * y.norm())) for x, y in itertools.combinations(deltas, 2)) / 3
        if all(d.norm() > 0 for d in deltas):
            assert r["cos"] == pytest.approx(cos, abs=1e-6)
            assert r["t"] == pytest.approx(3 * r["cos"] / (1 + 2 * r["cos"]), rel=1e-6)  # t = N cos / (1 + (N-1) cos)
            t = r["t"]
            mean = sum(s[key].double() for s in ing) / 3
            torch.testing.assert_close(got[key].double(), t * mean + (1 - t) * w0, rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked > 10
    # the head has no pretrained anchor: averaged uniformly
    assert not any(k.startswith("head.") for k in ratios)
    torch.testing.assert_close(got["head.fc.weight"], sum(s["head.fc.weight"] for s in ing) / 3)


def test_the_soup_is_a_report_row(sweep, tmp_path):
    for recipe in ("uniform", "greedy"):
        res = make(sweep, recipe)
        shutil.copytree(res["dir"], tmp_path / "sweep" / f"soup={recipe}")
    for d in sweep.glob("seed=*"):
        shutil.copytree(d, tmp_path / "sweep" / d.name)
    r = subprocess.run([sys.executable, "-m", "thawlab.report", str(tmp_path / "sweep"), "--include-smoke",
                        "--no-figures", "--out", str(tmp_path / "report")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = (tmp_path / "report" / "table.csv").read_text().splitlines()
    soups = [line for line in rows if line.startswith("soup=")]
    assert [s.split(",")[0] for s in soups] == ["soup=greedy", "soup=uniform"]
    assert "no run of this seed" not in (tmp_path / "report" / "table.md").read_text()  # a soup over seeds: one run


def cli(*args) -> subprocess.CompletedProcess:
    """thawlab-soup as a user runs it: a process of its own (forked from one that imported thawlab, as
    conftest.cli's thawlab-train), with its exit status and its streams."""
    return forked_cli.run(["thawlab-soup", *map(str, args)], cwd=Path.cwd(), env=dict(os.environ), timeout=300,
                          entry="thawlab.soup:main")


def test_runs_from_another_backbone_are_one_line(sweep, tmp_path):
    for name in ("seed=0", "seed=1"):
        shutil.copytree(sweep / name, tmp_path / name, ignore=shutil.ignore_patterns("*.ckpt"))
    path = tmp_path / "seed=1" / "results.json"
    data = json.loads(path.read_text())
    data["config"]["backbone"]["name"] = "resnet18"
    path.write_text(json.dumps(data))
    r = cli(tmp_path, "--recipe", "uniform", "--include-smoke")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "backbone.name" in r.stderr and "seed=0" in r.stderr and "seed=1" in r.stderr and "resnet18" in r.stderr


def test_bad_input_is_one_line(sweep, tmp_path):
    for args, words in (((sweep, "--recipe", "greedyy"), "did you mean greedy"),
                        ((tmp_path, "--recipe", "uniform"), "no results"),
                        ((sweep, "--recipe", "uniform", "--include-smoke", "--where", "seed=7"), "at least 2")):
        r = cli(*args)
        assert r.returncode == 2 and words in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr


def test_recompute_bn_takes_the_statistics_from_the_training_data(sweep):
    from torch.optim.swa_utils import update_bn
    from torch.utils.data import DataLoader

    from thawlab.build import build_datamodule, build_net
    from thawlab.pretrain import source_weights

    res = make(sweep, "uniform", "--recompute-bn")
    assert res["soup"]["batchnorm"].startswith("running statistics recomputed")
    assert res["overrides"] == ["soup=uniform", "soup.recompute_bn=true"]  # its own row, beside soup=uniform
    got = load_file(str(res["dir"] / "soup.safetensors"))
    ing = list(states(sweep).values())
    mean = {k: sum(s[k] for s in ing) / 3 if v.is_floating_point() else v for k, v in ing[0].items()}
    key = next(k for k in got if k.endswith("running_var"))
    assert not torch.allclose(got[key], mean[key])  # not the averaged statistics
    # by hand: the averaged weights, one pass over the training set in train mode (SWA's update_bn)
    cfg = OmegaConf.create(res["config"] | {"seed": 0})
    dm = build_datamodule(cfg.data, None)
    net, dm.preprocess = build_net(cfg, dm.num_classes, str(source_weights(cfg)))
    dm.setup("fit")
    net.load_state_dict(mean)
    update_bn(DataLoader(dm.train_set, batch_size=cfg.data.batch_size), net)
    torch.testing.assert_close(got[key], net.state_dict()[key], rtol=1e-4, atol=1e-5)
    for k in got:  # every weight is still the mean
        if not any(k.endswith(b) for b in ("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(got[k], mean[k], rtol=1e-6, atol=1e-7)


def test_thawlab_soup_is_a_console_script():
    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["thawlab-soup"] == "thawlab.soup:main"
    r = cli("--help")
    assert r.returncode == 0 and "--recipe" in r.stdout and "--recompute-bn" in r.stdout
