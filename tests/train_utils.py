"""A tiny, fast, deterministic training recipe for the trainer tests."""
from __future__ import annotations

from pathlib import Path

from msclip.train.recipe import Recipe, recipe_from_dict

TINY = "clip-b32-tiny"


def tiny_recipe(tmp_path: Path, name: str, **over: object) -> Recipe:
    """Synthetic colour captions (learnable), fp32, no workers. ``section__key=value`` sets one field,
    ``section={...}`` replaces a whole section."""
    base: dict = {
        "model": TINY, "name": name, "output_dir": str(tmp_path), "seed": 0,
        "data": {"kind": "synthetic", "num_samples": 48, "batch_size": 8, "workers": 0},
        "optim": {"lr": 1e-3, "weight_decay": 0.1, "warmup": 1},
        # one thread: tiny models gain little from two, and a shared CPU makes two threads thrash
        "train": {"steps": 4, "precision": "fp32", "deterministic": True, "threads": 1},
        "checkpoint": {"every": 0, "keep_last": 2},
        "log": {"every": 1, "progress": False, "tensorboard": False},
    }
    for dotted, value in over.items():
        section, _, key = dotted.partition("__")
        if key:
            base.setdefault(section, {})[key] = value
        else:
            base[section] = value
    return recipe_from_dict(base, source="test")


_SLOW_STEPS = """
import time
from msclip.train import loop

_step = loop.TrainLoop.train_step


def _slow_step(self, micro):
    time.sleep({seconds})
    return _step(self, micro)


loop.TrainLoop.train_step = _slow_step
"""


def slow_steps_hook(folder: Path, seconds: float) -> Path:
    """A folder with a sitecustomize that makes every training step of a process with it first on PYTHONPATH
    sleep ``seconds``: a test that signals or kills a run mid-way then surely finds it mid-way, however loaded
    the machine, while few steps keep the test short."""
    hook = folder / "slow-steps"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(_SLOW_STEPS.format(seconds=seconds))
    return hook
