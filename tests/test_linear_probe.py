"""Linear-probe protocols: agreement with scikit-learn, separable data, the hyper-parameter search."""
import numpy as np
import pytest
import torch

from msclip.eval.linear_probe import fit_logistic, run_probe, search_hparam


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    perm = np.random.RandomState(0).permutation(len(x))
    x, y = torch.tensor(x[perm] / 16.0), torch.tensor(y[perm])
    return (x[:500], y[:500]), (x[500:800], y[500:800]), (x[800:], y[800:])


def test_fit_matches_sklearn_solution(digits):
    lm = pytest.importorskip("sklearn.linear_model")
    (xtr, ytr), _, (xte, yte) = digits
    w, b = fit_logistic(xtr, ytr, C=0.05, tol=1e-9)
    ref = lm.LogisticRegression(C=0.05, max_iter=5000, tol=1e-10).fit(xtr.numpy(), ytr.numpy())
    assert np.abs(ref.coef_.T - w.numpy()).max() < 1e-4  # same objective, same optimum
    # the bias is unpenalised, so it is only defined up to a shared shift
    assert np.abs((ref.intercept_ - ref.intercept_.mean()) - (b - b.mean()).numpy()).max() < 1e-4
    acc = ((xte @ w + b).argmax(1) == yte).double().mean().item()
    assert abs(acc - ref.score(xte.numpy(), yte.numpy())) < 1e-9


@pytest.fixture(scope="module")
def gaussians():
    """Overlapping classes, few training samples: validation accuracy peaks at a moderate C."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(6, 30, generator=g, dtype=torch.float64) * 0.6

    def draw(n):
        y = torch.randint(0, 6, (n,), generator=g)
        return centers[y] + torch.randn(n, 30, generator=g, dtype=torch.float64), y

    return draw(150), draw(300), draw(2000)


def test_clip_protocol_reproduces_sklearn(gaussians):
    lm = pytest.importorskip("sklearn.linear_model")
    train, val, test = gaussians
    # Default tolerance (scikit-learn's 1e-4) for the outcome; a tight one to compare every grid point.
    res = run_probe(train, test, "accuracy", val=val, protocol="clip", normalize=False)
    tight = run_probe(train, test, "accuracy", val=val, protocol="clip", normalize=False, tol=1e-8)

    def sk_fit(x, y, c):
        return lm.LogisticRegression(C=c, max_iter=5000, tol=1e-8).fit(x.numpy(), y.numpy())

    def sk_eval(exps):  # the same coarse-to-fine search, driven by scikit-learn's validation accuracies
        return [sk_fit(*train, 10.0 ** e).score(val[0].numpy(), val[1].numpy()) for e in exps]

    best, history = search_hparam(sk_eval, [float(e) for e in range(-6, 7)], 3, patience=3)
    for r in (res, tight):
        assert r["hparam"]["C"] == pytest.approx(10.0 ** best)  # same strength chosen
    assert -3 < best < 1  # and it is an interior optimum, not a grid edge
    ours = {round(float(np.log10(h["C"])), 6): h["val"] for h in tight["search"]}
    for e, acc in history:
        # within one validation sample of sklearn's; with almost no regularisation (C >= 1e3) the
        # training data are separable, the optimum runs off to infinity and neither solver converges
        tol = 1.0 / len(val[0]) if e < 3 else 0.02
        assert abs(ours[round(e, 6)] - acc) <= tol + 1e-6, (e, ours[round(e, 6)], acc)
    ref = sk_fit(torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]), 10.0 ** best)
    for r in (res, tight):
        assert abs(r["score"] - ref.score(test[0].numpy(), test[1].numpy())) * 100 < 0.5
    assert (res["n_train"], res["n_val"], res["n_test"]) == (150, 300, 2000)


def _separable(n=300, d=24, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 3
    y = torch.randint(0, k, (n,), generator=g)
    return centers[y] + 0.3 * torch.randn(n, d, generator=g), y


@pytest.mark.parametrize("protocol,kw", [("clip", {}), ("sgd", {"epochs": 20, "batch_size": 64})])
def test_protocols_reach_100_on_separable(protocol, kw):
    x, y = _separable()
    res = run_probe((x[:200], y[:200]), (x[200:], y[200:]), "accuracy", protocol=protocol, **kw)
    assert res["score"] >= 0.99
    assert res["n_val"] == 40 and res["n_train"] == 160  # 20 % carved from train when there is no val split


def test_multilabel_probe_map():
    g = torch.Generator().manual_seed(1)
    y = (torch.rand(240, 4, generator=g) < 0.4).long()
    x = torch.cat([y.float() * 2 - 1, 0.2 * torch.randn(240, 6, generator=g)], 1)
    y[0, 0] = -1  # a "difficult" label is ignored, not a crash
    for protocol, kw in (("clip", {}), ("sgd", {"epochs": 50, "batch_size": 32})):
        res = run_probe((x[:160], y[:160]), (x[160:], y[160:]), "map11", protocol=protocol,
                        multilabel=True, **kw)
        assert res["score"] > 0.99


def test_search_refines_to_one_eighth_decade():
    calls = []

    def evaluate(exps):
        calls.extend(exps)
        return [-(e - 1.3) ** 2 for e in exps]  # peak at 10**1.3

    best, history = search_hparam(evaluate, [float(e) for e in range(-6, 7)], refine_steps=3)
    assert best == pytest.approx(1.25)  # closest point of the 1/8-decade lattice to 1.3
    assert len(calls) == len(set(calls)) == 13 + 6  # no point is evaluated twice
    assert [e for e, _ in history] == calls
    best, history = search_hparam(lambda exps: [e for e in exps], [float(e) for e in range(-6, 7)])
    assert best == 6.0 and max(e for e, _ in history) == 6.0  # refinement stays inside the grid
    calls.clear()
    best, _ = search_hparam(evaluate, [float(e) for e in range(-6, 7)], refine_steps=0, patience=3)
    assert best == 1.0 and calls == [float(e) for e in range(-6, 5)]  # stopped 3 decades past the peak


def test_unknown_protocol_raises():
    x, y = _separable(40)
    with pytest.raises(ValueError, match="protocol"):
        run_probe((x, y), (x, y), "accuracy", protocol="svm")
