"""Trainer: recipes, DDP set-up, optimiser groups, schedule, precision, train-state checkpoints, the loop.

``train(recipe)`` imports the orchestration lazily, so reading a recipe does not load the trainer.
"""
from __future__ import annotations

from typing import Any

from msclip.train.failures import DataWorkerDied, NonFiniteLossError
from msclip.train.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict, save_recipe

__all__ = ["DataWorkerDied", "NonFiniteLossError", "Recipe", "RecipeError", "load_recipe", "recipe_from_dict",
           "save_recipe", "train"]


def train(recipe: Recipe, **kwargs: Any) -> Any:
    """Run the training `recipe` describes (see msclip.train.main.train); returns its TrainResult."""
    from msclip.train.main import train as _train

    recipe.resolve_model_defaults()  # a recipe built in Python gets an official yaml's LR_SHARE / WD_SHARE too
    return _train(recipe, **kwargs)
