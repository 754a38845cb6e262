"""Metric definitions users compare across papers: micro accuracy, NLL from log_softmax, ECE with Guo et al.'s
binning (against a plain numpy reference and torchmetrics), class subsets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassCalibrationError
from torch.utils.data import DataLoader, TensorDataset

from thawlab.metrics import ECE, NLL, eval_metrics, evaluate, limited, restrict


def test_restricted_logits_predict_only_the_sets_classes():
    # class 3 has the largest logit, but the set (like ImageNet-R) only has classes 0 and 1
    logits = torch.tensor([[0.0, 1.0, 0.5, 9.0], [2.0, 0.0, 0.0, 9.0]])
    probs = torch.softmax(restrict(logits, torch.tensor([0, 1])), dim=-1)
    assert probs[:, 2:].abs().max() == 0 and torch.allclose(probs.sum(-1), torch.ones(2))
    assert probs.argmax(-1).tolist() == [1, 0]
    assert restrict(logits, None) is logits


def test_evaluate_applies_class_subsets_per_set():
    x = torch.eye(4)
    y = torch.tensor([1, 1, 0, 0])
    net = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():  # predicts class 3 for everything, class 1 second for rows 0-1, class 0 for rows 2-3
        net.weight.copy_(torch.tensor([[0, 0, 1, 1.0], [1, 1, 0, 0], [0, 0, 0, 0], [5, 5, 5, 5]]))
    loaders = {"id": DataLoader(TensorDataset(x, y), batch_size=2), "ood/r": DataLoader(TensorDataset(x, y), 2)}
    out = evaluate(net, loaders, 4, "test", {"ood/r": torch.tensor([0, 1])})
    assert out["test/id/acc"] == 0.0 and out["test/ood/r/acc"] == 1.0


def test_accuracy_is_micro_and_ece_reads_log_probabilities():
    m = eval_metrics(3)
    probs = torch.tensor([[0.9, 0.05, 0.05]] * 8 + [[0.1, 0.8, 0.1]] * 2)
    m.update(probs.log(), torch.tensor([0] * 8 + [2] * 2))  # log-probabilities are logits whose softmax is probs
    out = m.compute()
    assert abs(float(out["acc"]) - 0.8) < 1e-6  # micro: 8 of 10 (macro over present classes would be 0.5)
    assert int(out["count"]) == 10
    # bins: 8 at confidence 0.9 all right (|0.9 - 1| = 0.1), 2 at 0.8 all wrong (|0.8 - 0| = 0.8)
    assert abs(float(out["ece"]) - (0.8 * 0.1 + 0.2 * 0.8)) < 1e-6


# ---- ECE: Guo et al. 2017, 15 equal-width bins (k/15, (k+1)/15] -----------------------------------------------
def ece_reference(logits: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Guo et al.'s ECE written out in numpy, float64: bins (k/n, (k+1)/n], the first [0, 1/n]."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    conf, correct = p.max(axis=1), (p.argmax(axis=1) == labels).astype(np.float64)
    total = 0.0
    for k in range(n_bins):
        lo, hi = k / n_bins, (k + 1) / n_bins
        in_bin = (conf <= hi) & ((conf > lo) if k else (conf >= lo))
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return total


def _ece(logits: torch.Tensor, labels: torch.Tensor) -> float:
    m = ECE()
    m.update(logits, labels)
    return float(m.compute())


def _torchmetrics_ece(logits: torch.Tensor, labels: torch.Tensor) -> float:
    m = MulticlassCalibrationError(logits.shape[1], n_bins=15, norm="l1")
    m.update(torch.softmax(logits.double(), -1).float(), labels)
    return float(m.compute())


def _saturated_case(dtype=torch.float32):
    """Half the samples at confidence 1.0 (a logit gap of 50), half of those wrong; half at 0.97, all right."""
    sure = torch.tensor([[50.0, 0.0]] * 4)
    mild = torch.tensor([[0.97, 0.03]] * 4).log()
    return torch.cat([sure, mild]).to(dtype), torch.tensor([0, 0, 1, 1] + [0] * 4)


def test_ece_puts_confidence_one_in_the_last_bin_as_guo_et_al():
    logits, labels = _saturated_case()
    assert torch.softmax(logits[:4], -1)[:, 0].eq(1.0).all()  # exactly 1.0 in float32
    # standard binning: all 8 in (14/15, 1]: mean confidence 0.985, accuracy 0.75 -> 0.235
    assert ece_reference(logits.numpy(), labels.numpy()) == pytest.approx(0.2350, abs=1e-7)
    assert _ece(logits, labels) == pytest.approx(0.2350, abs=1e-6)
    # torchmetrics 1.9 gives confidence 1.0 a 16th bin of its own: 0.5 * |1 - 0.5| + 0.5 * |0.97 - 1| = 0.265
    assert _torchmetrics_ece(logits, labels) == pytest.approx(0.2650, abs=1e-6)


def test_ece_with_saturated_bf16_logits():
    logits, labels = _saturated_case(torch.bfloat16)
    want = ece_reference(logits.float().numpy(), labels.numpy())
    assert _ece(logits, labels) == pytest.approx(want, abs=1e-6)
    # every sample saturated, half wrong: ECE is |0.5 - 1| whatever the width of the float
    sat = torch.tensor([[30.0, -30.0, 0.0]] * 6, dtype=torch.bfloat16)
    y = torch.tensor([0, 0, 0, 1, 2, 1])
    assert _ece(sat, y) == pytest.approx(0.5, abs=1e-7) == ece_reference(sat.float().numpy(), y.numpy())


def test_ece_agrees_with_the_reference_and_with_torchmetrics_off_the_edges():
    g = torch.Generator().manual_seed(0)
    for classes, scale in ((10, 3.0), (2, 1.0), (100, 5.0)):
        logits = torch.randn(3000, classes, generator=g) * scale
        labels = torch.where(torch.rand(3000, generator=g) < 0.6, logits.argmax(1),
                             torch.randint(0, classes, (3000,), generator=g))
        conf = torch.softmax(logits.double(), -1).max(1).values
        edges = torch.arange(16, dtype=torch.float64) / 15
        assert (conf - edges[:, None]).abs().min() > 1e-6  # no confidence at a bin edge (or 1.0)
        ours = _ece(logits, labels)
        assert ours == pytest.approx(ece_reference(logits.numpy(), labels.numpy()), abs=1e-6)
        assert ours == pytest.approx(_torchmetrics_ece(logits, labels), abs=1e-6)


def test_ece_states_are_sums_that_merge_like_ddp_ranks():
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(500, 7, generator=g) * 4, torch.randint(0, 7, (500,), generator=g)
    whole, a, b = ECE(), ECE(), ECE()
    whole.update(logits, labels)
    a.update(logits[:300], labels[:300])
    b.update(logits[300:], labels[300:])
    a.merge_state(b)  # each state reduced with its dist_reduce_fx (sum), as a DDP all-reduce does
    assert float(a.compute()) == pytest.approx(float(whole.compute()), abs=1e-7)
    assert int(a.samples.sum()) == 500 and a.samples.shape == (15,)


# ---- NLL: log_softmax of the logits, no clamped probabilities ------------------------------------------------
def test_nll_is_exact_for_a_confident_mistake():
    m = NLL()
    m.update(torch.tensor([[100.0, 0.0]]), torch.tensor([1]))
    assert float(m.compute()) == pytest.approx(100.0, rel=1e-6)  # probabilities clamped at 1e-12 gave 27.63
    m = NLL()  # the case: a logit gap of 50, wrong, against torch's own cross-entropy (clamped: 27.63)
    logits, y = torch.tensor([[50.0, 0.0], [0.0, 50.0]]), torch.tensor([1, 1])
    m.update(logits, y)
    assert float(m.compute()) == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert float(m.compute()) == pytest.approx(25.0, rel=1e-6)  # (50 + 0) / 2
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.tensor([[100.0, 0.0, -3.0], [2.0, 1.0, 0.0]], dtype=dtype)
        y = torch.tensor([1, 0])
        m = NLL()
        m.update(logits, y)
        assert float(m.compute()) == pytest.approx(F.cross_entropy(logits.double(), y).item(), rel=1e-6)


def test_nll_and_ece_of_restricted_logits_are_those_of_the_subset():
    """ImageNet-R/-A style: class 3 (outside the set's classes) has the largest logit; restricted, the metrics
    are those of the 2-class problem alone."""
    logits = torch.tensor([[0.0, 1.0, 0.5, 90.0], [2.0, -40.0, 0.0, 90.0], [3.0, 1.0, 0.0, 90.0]])
    y = torch.tensor([1, 1, 0])
    subset = torch.tensor([0, 1])
    m = eval_metrics(4)
    m.update(restrict(logits, subset), y)
    out = m.compute()
    assert float(out["nll"]) == pytest.approx(F.cross_entropy(logits[:, :2], y).item(), rel=1e-6)
    assert float(out["nll"]) > 14  # row 1: a 42-logit mistake within the subset
    assert float(out["acc"]) == pytest.approx(2 / 3)
    assert float(out["ece"]) == pytest.approx(ece_reference(logits[:, :2].numpy(), y.numpy()), abs=1e-6)


def test_evaluate_passes_logits_to_the_metrics():
    """evaluate() (WiSE-FT's alphas, forgetting): a net 100 logits sure of the wrong class costs NLL 100."""
    net = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[100.0, 0.0], [0.0, 0.0]]))
    loader = DataLoader(TensorDataset(torch.tensor([[1.0, 0.0]]), torch.tensor([1])), batch_size=1)
    out = evaluate(net, {"id": loader}, 2, "test")
    assert out["test/id/nll"] == pytest.approx(100.0, rel=1e-6)
    assert out["test/id/ece"] == pytest.approx(1.0) and out["test/id/acc"] == 0.0


def test_evaluate_reads_the_batches_limit_test_batches_lets_the_test_pass_read():
    """As Lightning reads trainer.limit_test_batches: an int is a number of batches, a float a fraction of them
    (rounded down), null all; each set is cut alike."""
    from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
    from lightning.pytorch.trainer.states import RunningStage

    limits = (None, 1, 2, 9, 1.0, 0.5, 0.2)
    assert [limited(5, lim) for lim in limits] == [5, 1, 2, 5, 5, 2, 1]
    # the reference: Lightning's own count of a test loader's batches (the Trainer turns null into 1.0; a fraction
    # that leaves no batch is refused by Lightning's test pass, before these evaluations run)
    cases = [(n, lim) for n in (5, 13, 40) for lim in limits]
    assert [limited(n, lim) for n, lim in cases] == [
        _parse_num_batches(RunningStage.TESTING, n, 1.0 if lim is None else lim) for n, lim in cases]
    x, y = torch.eye(10, 4), torch.arange(10) % 4  # 10 samples, 5 batches of 2
    net = torch.nn.Linear(4, 4)
    loaders = {"id": DataLoader(TensorDataset(x, y), batch_size=2), "ood/a": DataLoader(TensorDataset(x, y), 2)}
    seen = []
    net.register_forward_hook(lambda m, inp, out: seen.append(len(inp[0])))
    for limit, batches in ((None, 5), (2, 2), (0.5, 2)):
        seen.clear()
        evaluate(net, loaders, 4, "test", limit=limit)
        assert seen == [2] * batches * 2, (limit, seen)
