"""Linear probes on frozen features, in torch (CPU or GPU).

Two protocols:
* ``clip``: the CLIP paper's L2-regularised logistic regression fitted with L-BFGS (float64 by default).
  The inverse strength C is searched on a validation split coarse-to-fine (decades 1e-6..1e6, then three
  halvings of the step, i.e. 1/8-decade resolution like the paper's 96 log-spaced values; the coarse
  sweep stops after 3 decades in a row below the best, `patience=None` sweeps all 13), then the model
  is refitted on train+val and scored on test. Objective = mean loss + ||W||^2 / (2 C N), which is
  scikit-learn's `C * sum(loss) + ||W||^2 / 2` divided by C*N (bias unpenalised, as sklearn's lbfgs).
* ``sgd``: a linear layer trained with AdamW and a cosine schedule (the official MS-CLIP config's
  "50 epochs linear classifier"), on standardised features; the weight decay is searched the same way.
  All candidate decays of one search round train together as one batched [K, D, C] head.
Multi-label datasets (VOC 2007) use per-class sigmoid losses; targets of -1 ("difficult") are ignored.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from .metrics import score

CLIP_C_EXPONENTS = [float(e) for e in range(-6, 7)]  # C = 10**e
SGD_WD_EXPONENTS = [float(e) for e in range(1, -7, -1)]  # strongest first, so ties prefer regularisation


# ------------------------------------------------------------------------- losses
def _loss(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Mean loss over samples; logits [..., N, C]."""
    if not multilabel:  # sum over heads of each head's mean cross-entropy
        heads = logits.numel() // (y.shape[0] * logits.shape[-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(heads)) * heads
    mask = (y >= 0).to(logits.dtype)
    per = F.binary_cross_entropy_with_logits(logits, y.clamp(min=0).to(logits.dtype).expand_as(logits),
                                             reduction="none")
    return (per * mask).sum(dim=(-2, -1)).sum() / y.shape[0]


def num_outputs(y: torch.Tensor, multilabel: bool) -> int:
    return y.shape[1] if multilabel else int(y.max().item()) + 1


# ------------------------------------------------------------------------- clip protocol
def _loss_and_grad(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, l2: float,
                   multilabel: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Objective and its analytic gradient (about 2x cheaper than autograd for these tiny graphs)."""
    n = x.shape[0]
    z = torch.addmm(b, x, w)
    if multilabel:
        mask = (y >= 0).to(z.dtype)
        t = y.clamp(min=0).to(z.dtype)
        loss = ((F.softplus(z) - t * z) * mask).sum() / n
        gz = (torch.sigmoid(z) - t) * mask / n
    else:
        lse = torch.logsumexp(z, dim=1)
        loss = (lse - z.gather(1, y.view(-1, 1)).squeeze(1)).mean()
        gz = torch.exp(z - lse.unsqueeze(1))
        gz[torch.arange(n, device=z.device), y] -= 1.0
        gz /= n
    loss = loss + l2 * (w * w).sum()
    return loss, x.T @ gz + 2.0 * l2 * w, gz.sum(0)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, C: float, multilabel: bool = False,
                 num_classes: int | None = None, max_iter: int = 1000,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None,
                 tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """L-BFGS fit of softmax (or per-class sigmoid) regression; returns (W [D, C], b [C]) in x's dtype.

    `tol` bounds the largest gradient entry of the mean-scaled objective: scikit-learn's `tol` (gtol of
    its L-BFGS, default 1e-4, on the same 1/N-scaled objective since scikit-learn 1.1)."""
    n, d = x.shape
    c = num_classes or num_outputs(y, multilabel)
    w = torch.zeros(d, c, dtype=x.dtype, device=x.device) if init is None else init[0].clone()
    b = torch.zeros(c, dtype=x.dtype, device=x.device) if init is None else init[1].clone()
    l2 = 1.0 / (2.0 * C * n)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        loss, w.grad, b.grad = _loss_and_grad(x, y, w, b, l2, multilabel)
        return loss

    with torch.no_grad():
        opt.step(closure)
    return w, b


def search_hparam(evaluate: Callable[[list[float]], list[float]], coarse: list[float],
                  refine_steps: int = 3, patience: int | None = None) -> tuple[float, list[tuple[float, float]]]:
    """Coarse grid then `refine_steps` halvings around the best exponent (never beyond the grid's ends).

    `evaluate(exponents) -> validation scores` (higher is better). Ties keep the earlier coarse value
    and, when refining, the current best. With `patience`, the coarse grid is walked one value at a time
    and abandoned after `patience` consecutive values below the best so far (the weakly regularised
    end of a C sweep is by far the slowest to fit). Returns (best exponent, [(exponent, score), ...]
    in call order).
    """
    seen: dict[float, float] = {}
    history: list[tuple[float, float]] = []

    def run(exps: list[float]) -> None:
        new = [e for e in exps if e not in seen]
        if new:
            for e, s in zip(new, evaluate(new)):
                seen[e] = s
                history.append((e, s))

    if patience:
        worse = 0
        for e in coarse:
            run([e])
            worse = 0 if seen[e] >= max(seen.values()) else worse + 1
            if worse >= patience:
                break
    else:
        run(coarse)
    best = max(seen, key=lambda e: (seen[e], -coarse.index(e)))
    step = abs(coarse[1] - coarse[0]) / 2 if len(coarse) > 1 else 0.0
    for _ in range(refine_steps if step else 0):
        lo, hi = min(coarse), max(coarse)
        cand = [e for e in (best - step, best + step) if lo <= e <= hi]  # stay inside the searched range
        run(cand)
        for e in cand:
            if seen[e] > seen[best]:
                best = e
        step /= 2
    return best, history


def _split_val(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_val = max(1, int(round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def probe_clip(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
               test: tuple[torch.Tensor, torch.Tensor], metric: str, multilabel: bool = False,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64,
               coarse: list[float] | None = None, refine_steps: int = 3, max_iter: int = 1000,
               patience: int | None = 3, tol: float = 1e-4) -> dict:
    """CLIP-paper protocol: choose C on val (warm-started sweep), refit on train+val, score on test."""
    dev = torch.device(device)
    xs = [t[0].to(dev, dtype) for t in (train, val, test)]
    ys = [t[1].to(dev) for t in (train, val, test)]
    c = ys[0].shape[1] if multilabel else num_outputs(torch.cat(ys), False)  # a class may be test-only
    solutions: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}

    def evaluate(exps: list[float]) -> list[float]:
        out = []
        for e in exps:
            near = min(solutions, key=lambda k: abs(k - e)) if solutions else None  # warm start
            w, b = fit_logistic(xs[0], ys[0], 10.0 ** e, multilabel, c, max_iter,
                                solutions[near] if near is not None else None, tol)
            solutions[e] = (w, b)
            out.append(score(metric, xs[1] @ w + b, ys[1]))
        return out

    t0 = time.perf_counter()
    best, history = search_hparam(evaluate, coarse or CLIP_C_EXPONENTS, refine_steps, patience)
    x_all, y_all = torch.cat([xs[0], xs[1]]), torch.cat([ys[0], ys[1]])
    w, b = fit_logistic(x_all, y_all, 10.0 ** best, multilabel, c, max_iter, solutions[best], tol)
    return {"protocol": "clip", "metric": metric, "score": score(metric, xs[2] @ w + b, ys[2]),
            "hparam": {"C": 10.0 ** best}, "val_score": dict(history)[best],
            "search": [{"C": 10.0 ** e, "val": s} for e, s in history], "fit_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------- sgd protocol
def train_linear_heads(x: torch.Tensor, y: torch.Tensor, wds: list[float], num_classes: int,
                       multilabel: bool = False, epochs: int = 50, lr: float = 1e-2, batch_size: int = 256,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Train len(wds) linear heads at once (AdamW, cosine LR, decoupled weight decay per head on W)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    k, (n, d) = len(wds), x.shape
    w = (torch.randn(k, d, num_classes, generator=g, dtype=torch.float32) * 0.01).to(x.device).requires_grad_()
    b = torch.zeros(k, 1, num_classes, device=x.device, requires_grad=True)
    decay = torch.tensor(wds, dtype=torch.float32, device=x.device).view(k, 1, 1)
    opt = torch.optim.AdamW([w, b], lr=lr, weight_decay=0.0)  # decay applied by hand, per head
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total, step = epochs * steps_per_epoch, 0
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g).to(x.device)
            for i in range(steps_per_epoch):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                cur = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                for group in opt.param_groups:
                    group["lr"] = cur
                logits = torch.baddbmm(b, x[idx].unsqueeze(0).expand(k, -1, -1), w)
                loss = _loss(logits, y[idx], multilabel)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():
                    w.mul_(1 - cur * decay)
                opt.step()
                step += 1
    return w.detach(), b.detach()


def probe_sgd(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
              test: tuple[torch.Tensor, torch.Tensor], metric: str, multilabel: bool = False,
              device: str | torch.device = "cpu", epochs: int = 50, lr: float = 1e-2, batch_size: int = 256,
              coarse: list[float] | None = None, refine_steps: int = 2, seed: int = 0) -> dict:
    """AdamW linear layer; weight decay chosen on val, refit on train+val, scored on test."""
    dev = torch.device(device)
    xs = [t[0].to(dev, torch.float32) for t in (train, val, test)]
    ys = [t[1].to(dev) for t in (train, val, test)]
    c = ys[0].shape[1] if multilabel else num_outputs(torch.cat(ys), False)  # a class may be test-only

    def standardise(fit_on: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        mu, sd = fit_on.mean(0), fit_on.std(0).clamp(min=1e-6)
        return lambda t: (t - mu) / sd

    norm = standardise(xs[0])
    xtr, xva = norm(xs[0]), norm(xs[1])

    def evaluate(exps: list[float]) -> list[float]:
        w, b = train_linear_heads(xtr, ys[0], [10.0 ** e for e in exps], c, multilabel, epochs, lr,
                                  batch_size, seed)
        return [score(metric, xva @ w[i] + b[i], ys[1]) for i in range(len(exps))]

    t0 = time.perf_counter()
    best, history = search_hparam(evaluate, coarse or SGD_WD_EXPONENTS, refine_steps)
    x_all, y_all = torch.cat([xs[0], xs[1]]), torch.cat([ys[0], ys[1]])
    norm = standardise(x_all)
    w, b = train_linear_heads(norm(x_all), y_all, [10.0 ** best], c, multilabel, epochs, lr, batch_size, seed)
    return {"protocol": "sgd", "metric": metric, "score": score(metric, norm(xs[2]) @ w[0] + b[0], ys[2]),
            "hparam": {"weight_decay": 10.0 ** best, "lr": lr, "epochs": epochs, "batch_size": batch_size},
            "val_score": dict(history)[best], "search": [{"weight_decay": 10.0 ** e, "val": s} for e, s in history],
            "fit_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------- entry point
def run_probe(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
              metric: str, val: tuple[torch.Tensor, torch.Tensor] | None = None, protocol: str = "clip",
              multilabel: bool = False, val_fraction: float = 0.2, seed: int = 0,
              normalize: bool = True, device: str | torch.device = "cpu", **kwargs) -> dict:
    """Probe features: carve a validation split from train when the dataset has none (as CLIP did),
    optionally L2-normalise features, dispatch to the protocol; adds sample counts to the result."""
    if val is None or len(val[0]) == 0:
        tr, va = _split_val(len(train[0]), val_fraction, seed)
        train, val = (train[0][tr], train[1][tr]), (train[0][va], train[1][va])
    if normalize:
        train, val, test = [(F.normalize(t[0].float(), dim=-1), t[1]) for t in (train, val, test)]
    if protocol == "clip":
        res = probe_clip(train, val, test, metric, multilabel, device, **kwargs)
    elif protocol == "sgd":
        res = probe_sgd(train, val, test, metric, multilabel, device, seed=seed, **kwargs)
    else:
        raise ValueError(f"unknown protocol {protocol!r}; expected 'clip' or 'sgd'")
    res.update(n_train=len(train[0]), n_val=len(val[0]), n_test=len(test[0]))
    return res
