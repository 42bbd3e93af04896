"""Trainer: recipes, DDP set-up, optimiser groups, schedule, precision, train-state checkpoints, the loop.

``train(recipe)`` is imported lazily so that ``python -m msclip.train.main`` does not load the module twice.
"""
from __future__ import annotations

from typing import Any

from msclip.train.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict, save_recipe

__all__ = ["Recipe", "RecipeError", "load_recipe", "recipe_from_dict", "save_recipe", "train"]


def train(recipe: Recipe, **kwargs: Any) -> Any:
    from msclip.train.main import train as _train

    return _train(recipe, **kwargs)
