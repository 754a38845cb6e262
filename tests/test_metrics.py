"""Metric definitions users compare across papers: micro accuracy, NLL, ECE on probabilities, class subsets."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from thawlab.metrics import eval_metrics, evaluate, restrict


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


def test_accuracy_is_micro_and_ece_reads_probabilities():
    m = eval_metrics(3)
    probs = torch.tensor([[0.9, 0.05, 0.05]] * 8 + [[0.1, 0.8, 0.1]] * 2)
    m.update(probs, torch.tensor([0] * 8 + [2] * 2))
    out = m.compute()
    assert abs(float(out["acc"]) - 0.8) < 1e-6  # micro: 8 of 10 (macro over present classes would be 0.5)
    assert int(out["count"]) == 10
    # bins: 8 at confidence 0.9 all right (|0.9 - 1| = 0.1), 2 at 0.8 all wrong (|0.8 - 0| = 0.8)
    assert abs(float(out["ece"]) - (0.8 * 0.1 + 0.2 * 0.8)) < 1e-6
