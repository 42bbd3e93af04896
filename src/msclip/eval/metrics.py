"""Classification metrics used by the CLIP paper's linear-probe suite (torch only, no sklearn).

All functions return fractions in [0, 1]; reports multiply by 100.
Conventions:
* single-label: `scores` [N, C] (logits or probabilities), `targets` [N] int64 class ids;
* multi-label (VOC 2007): `targets` [N, C] with 1 = present, 0 = absent, -1 = ignore ("difficult");
* binary ROC AUC: `scores` [N] (or [N, 2], then the margin of class 1 is used), `targets` [N] in {0, 1}.
"""
from __future__ import annotations

import torch

METRICS = ("accuracy", "mean_per_class", "map11", "roc_auc")


def topk_accuracy(scores: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Fraction of samples whose target is among the k highest scores (k is capped at C)."""
    n, c = scores.shape
    if n == 0:
        raise ValueError("topk_accuracy: empty input")
    top = scores.topk(min(max(ks), c), dim=1).indices
    hit = top == targets.view(-1, 1)
    return {k: hit[:, : min(k, c)].any(dim=1).double().mean().item() for k in ks}


def per_class_counts(scores: torch.Tensor, targets: torch.Tensor,
                     num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(support, correct) per class [C] of the top-1 predictions (`scores` [N, C], or predicted ids [N])."""
    preds = scores.argmax(dim=1) if scores.dim() == 2 else scores
    c = max(num_classes or 0, int(max(preds.max().item(), targets.max().item())) + 1)
    support = torch.bincount(targets, minlength=c)
    correct = torch.bincount(targets[preds == targets], minlength=c)
    return support, correct


def mean_per_class_recall(scores: torch.Tensor, targets: torch.Tensor, num_classes: int | None = None) -> float:
    """Mean over the classes present in `targets` of the per-class recall (balanced accuracy)."""
    support, correct = per_class_counts(scores, targets, num_classes)
    present = support > 0
    return (correct[present].double() / support[present].double()).mean().item()


def average_precision_11point(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """VOC 2007 11-point interpolated AP for one class; targets -1 are ignored."""
    keep = targets >= 0
    scores, targets = scores[keep].double(), targets[keep]
    n_pos = int((targets == 1).sum())
    if n_pos == 0:
        return float("nan")
    order = torch.argsort(scores, descending=True, stable=True)
    tp = (targets[order] == 1).double().cumsum(0)
    ranks = torch.arange(1, len(order) + 1, dtype=torch.float64)
    precision, recall = tp / ranks, tp / n_pos
    ap = 0.0
    for t in torch.linspace(0, 1, 11, dtype=torch.float64):
        reached = recall >= t - 1e-12
        ap += precision[reached].max().item() if reached.any() else 0.0
    return ap / 11.0


def map_11point(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean of the per-class 11-point APs over classes with at least one positive."""
    aps = [average_precision_11point(scores[:, j], targets[:, j]) for j in range(scores.shape[1])]
    aps = [a for a in aps if a == a]  # drop NaN (class without positives)
    if not aps:
        raise ValueError("map_11point: no class has a positive sample")
    return sum(aps) / len(aps)


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties replaced by their mean rank (as in the Mann-Whitney U statistic)."""
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    _, counts = torch.unique_consecutive(sorted_x, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2  # mean of ranks start..end of each tie group
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.repeat_interleave(mean_rank, counts)
    return ranks


def roc_auc(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Binary ROC AUC = probability that a random positive outranks a random negative (ties count 1/2)."""
    if scores.dim() == 2:
        scores = scores[:, 1] - scores[:, 0] if scores.shape[1] == 2 else scores[:, -1]
    targets = targets.long().view(-1)
    n_pos, n_neg = int((targets == 1).sum()), int((targets == 0).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc: needs both classes, got {n_pos} positives and {n_neg} negatives")
    ranks = _average_ranks(scores.double().view(-1))
    u = ranks[targets == 1].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def score(metric: str, scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Dispatch by the metric name a dataset declares (see METRICS)."""
    scores, targets = scores.detach().cpu(), targets.detach().cpu()
    if metric == "accuracy":
        return topk_accuracy(scores, targets, (1,))[1]
    if metric == "mean_per_class":
        return mean_per_class_recall(scores, targets, scores.shape[1])
    if metric == "map11":
        return map_11point(scores, targets)
    if metric == "roc_auc":
        return roc_auc(scores, targets)
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
