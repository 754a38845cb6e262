"""schedule.solver=lbfgs: the linear probe as LP-FT and CLIP fit it (thawlab/probe.py), against scikit-learn's
LogisticRegression itself, and the shared feature store it reads (thawlab/feature_store.py)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn
from torch.utils.data import TensorDataset

from conftest import cli
from thawlab import feature_store
from thawlab.errors import ThawlabError
from thawlab.probe import fit_logistic, parse_grid, probabilities, sweep, to_head


def feature_set(kind: str):
    """Two feature sets unlike each other: 6 classes of shifted Gaussians (128-d, scaled like pooled CNN
    features: positive, large), and a binary problem (sklearn fits one logit there)."""
    rng = np.random.default_rng(0)
    k, d = (6, 128) if kind == "multiclass" else (2, 32)
    means = rng.normal(size=(k, d)) * 0.6
    def draw(n):
        y = rng.integers(0, k, n)
        return np.abs(means[y] + rng.normal(size=(n, d))) * 3 + 1, y
    return draw(240), draw(120), k


def lpft_sklearn(X, y, Xv, yv, grid, max_iter, tol):
    """LP-FT's test_log_reg_warm_starting (unlabeled_extrapolation/log_reg_sk.py), its accuracies and choice."""
    clf = LogisticRegression(random_state=0, warm_start=True, max_iter=max_iter, tol=tol)
    best, accs = None, []
    for C in grid:
        clf.C = C
        clf.fit(X, y)
        acc = float(np.mean(clf.predict(Xv) == yv))
        accs.append(acc)
        if best is None or acc > best[1]:
            best = (C, acc, copy.deepcopy(clf))
    return best, accs


def head_of(clf, k):
    W, b = clf.coef_, clf.intercept_
    if k == 2:
        W, b = np.concatenate([np.zeros_like(W), W]), np.concatenate([np.zeros_like(b), b])
    return W, b


@pytest.mark.parametrize("kind", ["multiclass", "binary"])
def test_single_fit_equals_sklearn(kind):
    (X, y), _, k = feature_set(kind)
    # standardised, as the probe fits them: on the raw features (all positive, mean 5) the intercepts lie in a
    # valley so flat that both solvers stop on scipy's ftol a few 1e-3 apart from each other and from the optimum
    X = (X - X.mean()) / X.std()
    for C in (1e-3, 0.3, 30.0):
        clf = LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(X, y)
        params, info = fit_logistic(torch.from_numpy(X), torch.from_numpy(y), k, C, max_iter=10000, tol=1e-10)
        W, b = to_head(params, k)
        skW, skb = head_of(clf, k)
        assert info["converged"]
        np.testing.assert_allclose(W, skW, atol=1e-4, rtol=0)
        np.testing.assert_allclose(b, skb, atol=1e-4, rtol=0)
        np.testing.assert_allclose(probabilities(params, torch.from_numpy(X), k).numpy(), clf.predict_proba(X),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["multiclass", "binary"])
def test_grid_equals_lpft_loop(kind):
    """The warm-started grid at LP-FT's settings (max_iter 200, tol 1e-4, features standardised by one scalar
    mean and std) gives LP-FT's loop's accuracies, choice and head, mapped back to raw features."""
    (X, y), (Xv, yv), k = feature_set(kind)
    grid = parse_grid("logspace(-4, 2, 13)")
    m, s = X.mean(), X.std()
    (C, acc, clf), accs = lpft_sklearn((X - m) / s, y, (Xv - m) / s, yv, grid, 200, 1e-4)
    out = sweep(torch.from_numpy(X), torch.from_numpy(y), torch.from_numpy(Xv), torch.from_numpy(yv), k, grid)
    rec = out["record"]
    assert rec["val_acc"] == pytest.approx(accs, abs=1e-12)
    assert rec["chosen"]["C"] == C and rec["chosen"]["val_acc"] == acc
    assert rec["chosen"]["index"] == int(np.argmax(accs))  # the first of the best
    skW, skb = head_of(clf, k)
    np.testing.assert_allclose(out["weight"] * s, skW, atol=1e-4, rtol=0)  # normalised-feature weights
    raw = X @ out["weight"].T + out["bias"]  # the raw-feature head = sklearn on normalised features
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(raw), 1).numpy(), clf.predict_proba((X - m) / s),
                               atol=1e-4, rtol=0)


def test_choice_is_the_first_best_on_val():
    (X, y), (Xv, yv), k = feature_set("multiclass")
    out = sweep(torch.from_numpy(X), torch.from_numpy(y), torch.from_numpy(Xv), torch.from_numpy(yv), k,
                [1e-7, 1e-6, 1e-2, 1.0], normalize=False)
    accs = out["record"]["val_acc"]
    assert accs[0] == accs[1]  # both predict one class: a tie, broken towards the smaller C (LP-FT's strict >)
    best = max(accs)
    assert out["record"]["chosen"]["index"] == accs.index(best) and best > accs[0]


def test_bad_grid():
    for bad in ([0.1, 0.0], [-1.0], "logspace(-7, 2)", []):
        with pytest.raises(ThawlabError, match="probe_grid"):
            parse_grid(bad)
    assert parse_grid("logspace(-7, 2, 50)") == pytest.approx(list(np.logspace(-7, 2, 50)))


def test_bad_input_is_one_line(tmp_path, cache_dir):
    r = cli("debug=smoke", "logger=none", "schedule=frozen", "schedule.solver=lbfgs", "schedule.probe_grid=[1.0,-0.5]",
            f"hydra.run.dir={tmp_path}/r", cwd=tmp_path, cache=cache_dir)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "C=-0.5 is not positive" in r.stderr


def test_solver_needs_a_probe_phase_and_fixed_inputs(run):
    with pytest.raises(ThawlabError, match="schedule=full has no probe phase"):
        run("schedule=full", "schedule.solver=lbfgs")
    with pytest.raises(ThawlabError, match="data.augment=crop_flip changes the training inputs"):
        run("schedule=frozen", "schedule.solver=lbfgs", "data.augment=crop_flip")
    with pytest.raises(ThawlabError, match="the head MLPHead is not one"):
        run("schedule=frozen", "schedule.solver=lbfgs", "head=mlp")


def test_frozen_lbfgs_run_and_shared_features(run):
    """A real frozen run: the solved head is the selected checkpoint (its val acc is the probe's choice), one
    epoch; a second job on the same backbone and data reads the features from the store, and a job without the
    module's cache (every test batch through the network) reports the same test metrics as the cached test.
    Validation on the whole set (trainer.limit_val_batches=null), as the solver's."""
    a = run("schedule=frozen", "schedule.solver=lbfgs", "schedule.probe_grid='logspace(-3, 1, 5)'",
            "trainer.limit_val_batches=null")
    p = a["probe"]
    assert len(p["grid"]) == len(p["val_acc"]) == 5 and p["chosen"]["val_acc"] == max(p["val_acc"])
    assert a["selection"]["value"] == pytest.approx(p["chosen"]["val_acc"], abs=1e-6)
    assert [t["phase"] for t in a["trace"]] == ["probe"] and a["trace"][0]["lr"]["head"] == 0.0
    b = run("schedule=frozen", "schedule.solver=lbfgs", "schedule.probe_grid='logspace(-3, 1, 5)'", "seed=1",
            "cache_features=false")
    assert b["probe"]["features"]["cached"] and b["probe"]["features"]["key"] == p["features"]["key"]
    assert b["probe"]["chosen"] == p["chosen"]
    for k, v in a["metrics"].items():
        if k.startswith("test/") and k.endswith("/acc"):
            assert b["metrics"][k] == pytest.approx(v, abs=1e-6), k


def test_lp_ft_lbfgs_run(run):
    """LP-FT: the solved probe's epoch at lr 0, then fine-tuning from that head for the epochs it would have."""
    r = run("schedule=lp_ft", "schedule.solver=lbfgs", "schedule.probe_grid=[0.01,1.0]", "trainer.max_epochs=3")
    assert [t["phase"] for t in r["trace"]] == ["lp", "ft", "ft"]
    assert r["trace"][0]["lr"]["head"] == 0.0 and r["trace"][1]["lr"]["head"] > 0
    assert r["selection"]["phase"] == "ft" and r["probe"]["chosen"]["C"] in (0.01, 1.0)


def test_zeroshot_head_probed_from_scratch(run):
    """head=zeroshot (CLIP): the probe fits the head's fc on its input, the normalised features; the module's
    validation of the solved head (through the head's own forward, on the whole set) gives the accuracy the probe
    chose it by."""
    r = run("backbone.name=open_clip:thawlab-mini-clip", "head=zeroshot", "schedule=frozen", "schedule.solver=lbfgs",
            "schedule.probe_grid=[0.1,10.0]", "diagnostics=none", "trainer.limit_val_batches=null")
    assert r["selection"]["value"] == pytest.approx(r["probe"]["chosen"]["val_acc"], abs=1e-6)
    assert "test/zeroshot/id/acc" in r["metrics"]


class Counting(nn.Module):
    def __init__(self, seed: int, d: int = 8):
        super().__init__()
        torch.manual_seed(seed)
        self.fc, self.calls = nn.Linear(4, d), 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


def test_store_computes_once_and_stays_bounded(tmp_path):
    sets = {("train", "all"): TensorDataset(torch.randn(500, 4), torch.zeros(500, dtype=torch.long))}
    kw = dict(data={"_target_": "x", "batch_size": 1}, preprocess="p", device="cpu", batch_size=100, note=lambda s: None)
    one = 500 * 8 * 4 / 1e9  # an entry's features in GB (labels and meta on top)
    m = Counting(0)
    f1, i1 = feature_store.features(tmp_path, m, sets, bound_gb=1, **kw)
    f2, i2 = feature_store.features(tmp_path, m, sets, bound_gb=1, **{**kw, "data": {"_target_": "x", "batch_size": 7}})
    assert m.calls == 5 and not i1["cached"] and i2["cached"]  # loader settings are not part of the key
    np.testing.assert_array_equal(f1[("train", "all")][0], f2[("train", "all")][0])
    size = feature_store.entries(feature_store.store_dir(tmp_path))[0][1]
    bound = 2.5 * size / 1e9  # room for two entries, not three
    for seed in (1, 2):
        feature_store.features(tmp_path, Counting(seed), sets, bound_gb=bound, **kw)
    left = feature_store.entries(feature_store.store_dir(tmp_path))
    assert [d.name for d, _, _ in left] == [feature_store.entry_key(feature_store.weights_digest(Counting(s)),
                                                                    kw["data"], "p", "cpu") for s in (1, 2)]
    assert sum(n for _, n, _ in left) <= bound * 1e9
    feature_store.features(tmp_path, Counting(3), sets, bound_gb=one / 2, **kw)  # larger than the bound: not kept
    assert len(feature_store.entries(feature_store.store_dir(tmp_path))) == 2
    feature_store.main(["clear", "--cache-dir", str(tmp_path)])
    assert not feature_store.store_dir(tmp_path).exists()
