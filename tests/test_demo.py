"""The demo's step budget: fitted to the time left, with room for a concurrent data loader."""
import pytest

from msclip import demo
from msclip.train.recipe import load_recipe


@pytest.fixture()
def recipes():
    return {label: load_recipe(demo._REPO / "recipes" / fname) for label, fname in demo.RECIPES.items()}


@pytest.mark.parametrize("cores,expected_threads,margin", [(2, 2, 1.5), (8, 2, 1.2)])
def test_plan_budget_fits_the_time_left(monkeypatch, recipes, cores, expected_threads, margin):
    monkeypatch.setattr(demo.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(demo, "_step_time", lambda recipe, threads: {1: 0.8, 2: 0.5}[threads])
    monkeypatch.setattr(demo, "_batch_time", lambda recipe: 0.1)
    threads, steps = demo.plan_budget(recipes, budget_s=300.0, overhead_s=75.0)
    per_step = 0.5 + 0.5 + 2 * 0.1  # both models at the faster thread count, plus their data
    assert threads == expected_threads
    assert steps == int((300 - 75) / (margin * per_step)) // 10 * 10
    assert steps * per_step * margin <= 300 - 75


def test_plan_budget_never_exceeds_the_recipes(monkeypatch, recipes):
    monkeypatch.setattr(demo, "_step_time", lambda recipe, threads: 0.001)
    monkeypatch.setattr(demo, "_batch_time", lambda recipe: 0.0)
    _, steps = demo.plan_budget(recipes, budget_s=3600.0)
    assert steps == next(iter(recipes.values())).train.steps == 400
