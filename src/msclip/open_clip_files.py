"""open_clip_torch's data modules (the CLIP BPE tokenizer with its vocabulary, the zero-shot class names and
templates), loaded from their files without running open_clip's package ``__init__``.

``import open_clip.tokenizer`` first imports ``open_clip``, which imports its model code and torchvision,
and torchvision imports ``torch._dynamo``: nearly as long again as importing torch. Tokenizing needs none
of it (a training process imports ``torch._dynamo`` anyway, through its optimizer; one that only tokenizes
or reads files does not).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def open_clip_module(name: str) -> ModuleType:
    """``open_clip.<name>`` from its file (an import error, as ``import open_clip.<name>`` would raise, when
    open_clip is not installed). Already imported open_clip modules are reused."""
    full = f"open_clip.{name}"
    if full in sys.modules:
        return sys.modules[full]
    own = f"msclip._open_clip_{name}"
    if own in sys.modules:
        return sys.modules[own]
    package = importlib.util.find_spec("open_clip")  # locates the package without executing it
    if package is None or not package.submodule_search_locations:
        raise ModuleNotFoundError("No module named 'open_clip' (pip install open_clip_torch)", name="open_clip")
    path = Path(list(package.submodule_search_locations)[0]) / f"{name}.py"
    spec = importlib.util.spec_from_file_location(own, path)
    if spec is None or spec.loader is None or not path.is_file():
        return importlib.import_module(full)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:  # a later open_clip whose module needs its package: the ordinary (slower) import
        return importlib.import_module(full)
    sys.modules[own] = module
    return module
