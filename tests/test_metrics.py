"""Metrics of the linear-probe suite against values worked out by hand."""
import math

import pytest
import torch

from msclip.eval import metrics as M


def test_topk_accuracy():
    scores = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3], [0.5, 0.1, 0.4]])
    targets = torch.tensor([0, 1, 1, 2])
    acc = M.topk_accuracy(scores, targets, (1, 2, 5))
    assert acc[1] == pytest.approx(2 / 4)  # rows 0 and 2 correct
    assert acc[2] == pytest.approx(4 / 4)  # row 1: class 1 is second; row 3: class 2 is second
    assert acc[5] == 1.0  # k capped at the number of classes


def test_mean_per_class_recall_hand_computed():
    # class 0: 3 samples, 3 right; class 1: 1 sample, 0 right -> (1 + 0) / 2, while accuracy is 3/4
    preds = torch.tensor([0, 0, 0, 0])
    targets = torch.tensor([0, 0, 0, 1])
    logits = torch.nn.functional.one_hot(preds, 3).float()
    assert M.mean_per_class_recall(logits, targets, 3) == pytest.approx(0.5)
    assert M.score("accuracy", logits, targets) == pytest.approx(0.75)
    assert M.score("mean_per_class", logits, targets) == pytest.approx(0.5)  # class 2 absent: not averaged


def test_11point_ap_hand_computed():
    # ranking: + - + -  (2 positives). precision at ranks 1..4: 1, 1/2, 2/3, 1/2; recall: .5 .5 1 1
    # recall >= 0..0.5 (6 points): max precision 1; recall >= 0.6..1.0 (5 points): 2/3
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    targets = torch.tensor([1, 0, 1, 0])
    expected = (6 * 1.0 + 5 * (2 / 3)) / 11
    assert M.average_precision_11point(scores, targets) == pytest.approx(expected)
    # a 'difficult' (-1) sample is ignored, even when ranked first
    assert M.average_precision_11point(torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6]),
                                       torch.tensor([-1, 1, 0, 1, 0])) == pytest.approx(expected)


def test_map_averages_classes_with_positives():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.9, 0.0], [0.7, 0.2, 0.0], [0.6, 0.3, 0.0]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    ap0 = (6 + 5 * 2 / 3) / 11  # class 0: + - + -
    ap1 = 1.0  # class 1: its only positive is ranked first
    assert M.map_11point(scores, targets) == pytest.approx((ap0 + ap1) / 2)  # class 2: no positive, skipped


def test_roc_auc_hand_computed_with_ties():
    # positives score 0.9, 0.5; negatives 0.5, 0.1. Pairs: (0.9>0.5) (0.9>0.1) (0.5=0.5 -> 1/2) (0.5>0.1)
    scores = torch.tensor([0.9, 0.5, 0.5, 0.1])
    targets = torch.tensor([1, 1, 0, 0])
    assert M.roc_auc(scores, targets) == pytest.approx(3.5 / 4)
    # two-column logits use the margin of class 1
    logits = torch.stack([torch.zeros(4), scores], dim=1)
    assert M.score("roc_auc", logits, targets) == pytest.approx(3.5 / 4)
    with pytest.raises(ValueError, match="both classes"):
        M.roc_auc(scores, torch.ones(4, dtype=torch.long))


def test_metrics_match_sklearn_on_random_data():
    sk = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (200,), generator=g)
    s = torch.randn(200, generator=g) + y.float()
    assert M.roc_auc(s, y) == pytest.approx(sk.roc_auc_score(y.numpy(), s.numpy()), abs=1e-12)
    yc = torch.randint(0, 7, (300,), generator=g)
    lc = torch.randn(300, 7, generator=g) + 2 * torch.nn.functional.one_hot(yc, 7)
    assert M.mean_per_class_recall(lc, yc, 7) == pytest.approx(
        sk.balanced_accuracy_score(yc.numpy(), lc.argmax(1).numpy()))
    assert not math.isnan(M.map_11point(lc, torch.nn.functional.one_hot(yc, 7)))
