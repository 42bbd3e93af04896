"""CLIP_benchmark (LAION's `clip_benchmark`) with msclip models: a model loader and its registration.

CLIP_benchmark picks a loader by `--model_type` from `clip_benchmark.models.TYPE2FUNC` and calls it as
``loader(model_name=..., pretrained=..., cache_dir=..., device=...)``, expecting ``(model, transform,
tokenizer)``. Its metrics only call ``model.encode_image(images)`` / ``model.encode_text(tokens)`` (and
normalise the outputs themselves) and ``tokenizer(list_of_str) -> LongTensor``, so the loader returns the
`MSCLIP` model itself, its eval transform and its tokenizer, with nothing wrapped.

`register()` adds "msclip" to that table and to `MODEL_TYPES` *in place*: the CLI builds its
``--model_type`` choices from that very list object when it parses, so registering before
`clip_benchmark.cli.main()` is all the CLI needs (`python -m msclip.interop.clip_benchmark eval ...`).
Differences between CLIP_benchmark's metrics and msclip's own evaluations: docs/clip-benchmark.md.
"""
from __future__ import annotations

import logging
import os
import string
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from msclip.errors import MissingFileError, MsclipError

log = logging.getLogger(__name__)

MODEL_TYPE = "msclip"
# `--pretrained` values that mean "no weights file" (CLIP_benchmark always passes some string).
NO_WEIGHTS = ("", "none", "random")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ClipBenchmarkError(MsclipError):
    """CLIP_benchmark is missing or cannot run, or a loader argument is unusable; the message says which."""


def _is_none(pretrained: str | os.PathLike | None) -> bool:
    return pretrained is None or str(pretrained).strip().lower() in NO_WEIGHTS


def resolve(model_name: str | os.PathLike, pretrained: str | os.PathLike | None) -> tuple[str, str | None]:
    """(model spec for `msclip.create_model`, weights file or None) of a loader call. None means the spec's own
    weights (a model or run folder's `model.safetensors`, a weights file given as the model) or, for a named
    config, random ones; a `pretrained` file may be named relative to a model folder."""
    name = str(model_name)
    if _is_none(pretrained):
        return name, None
    weights = Path(str(pretrained))
    if not weights.is_file() and Path(name).is_dir() and (Path(name) / weights).is_file():
        weights = Path(name) / weights
    if not weights.is_file():
        raise MissingFileError(f"msclip loader: pretrained {str(pretrained)!r} is not a file; pass a weights "
                               f"file, or 'none' for random weights (CLIP_benchmark's default 'laion400m_e32' "
                               f"names an open_clip download, not an msclip checkpoint)")
    return name, str(weights)


def load_msclip(model_name: str, pretrained: str | None = None, cache_dir: str | None = None,
                device: str | torch.device = "cpu", precision: str = "fp32", **_: Any) -> tuple[Any, Any, Any]:
    """CLIP_benchmark loader -> (model in eval mode on `device`, eval transform, tokenizer).

    `model_name`: a named config (`msclip info`), a JSON config, an official MS-CLIP yaml, a model folder
    (`msclip.save_pretrained(model, DIR)`, or a training run's folder holding `model.safetensors`), or an
    msclip weights file (config embedded). `pretrained`: a weights file in any layout `msclip.load_pretrained`
    reads, or none/random/"" for random weights (for a folder: its own `model.safetensors`). `cache_dir` is
    unused (nothing is downloaded)."""
    from msclip.device import pick_device
    from msclip.eval.loading import eval_transform, load_model, resolve_checkpoint
    from msclip.factory import get_tokenizer

    if precision not in _DTYPES:
        raise ClipBenchmarkError(f"msclip loader: precision must be one of {sorted(_DTYPES)}, got {precision!r}")
    spec, weights = resolve(model_name, pretrained)
    dev = pick_device(str(device))
    checkpoint = resolve_checkpoint(spec, weights)  # a folder's or weights file's own weights when none given
    model = load_model(spec, checkpoint, dev, precision)
    log.info("msclip loader: %s (%s) from %s on %s", model_name, model.cfg.name, checkpoint or "random weights", dev)
    return model, eval_transform(model), get_tokenizer(model.cfg)


def register(name: str = MODEL_TYPE, fix_numpy2: bool = True) -> Callable[..., tuple[Any, Any, Any]]:
    """Add `load_msclip` to CLIP_benchmark's loader table under `name` (idempotent); returns the loader.
    With `fix_numpy2`, also `fix_numpy2_accuracy()` (without it CLIP_benchmark 1.6.2's zero-shot and linear
    probe fail under numpy 2)."""
    try:
        import clip_benchmark.models as cbm
    except ImportError as e:
        raise ClipBenchmarkError(f"CLIP_benchmark is not importable ({e}); pip install clip-benchmark") from e
    cbm.TYPE2FUNC[name] = load_msclip
    if name not in cbm.MODEL_TYPES:
        cbm.MODEL_TYPES.append(name)  # in place: load_clip's check and the CLI's choices read this list
    if fix_numpy2:
        fix_numpy2_accuracy()
    return load_msclip


def _float_of_one(x: Any) -> float:
    # numpy 1.x turned a one-element array into a float (deprecated in 1.25); numpy 2 raises TypeError.
    import numpy as np

    return float(x.reshape(())) if isinstance(x, np.ndarray) and x.size == 1 else float(x)


def fix_numpy2_accuracy() -> bool:
    """Make CLIP_benchmark's `accuracy` (zero-shot and linear probe) run under numpy 2; True if it was needed.

    It ends in ``float(tensor.sum(0, keepdim=True).numpy())``, a one-element array that numpy 2 no longer
    converts. The fix is CLIP_benchmark's own function (same code object) with `float` in its globals
    accepting one-element arrays as numpy 1 did, so every number it computes is unchanged."""
    import types

    import clip_benchmark.metrics.linear_probe as lp
    import clip_benchmark.metrics.zeroshot_classification as zc

    original = zc.accuracy
    if getattr(original, "_msclip_numpy2_fix", False):
        return True
    try:
        original(torch.zeros(1, 2), torch.zeros(1))
        return False  # an old numpy: nothing to fix
    except TypeError:
        pass
    fixed = types.FunctionType(original.__code__, {**original.__globals__, "float": _float_of_one},
                               original.__name__, original.__defaults__, original.__closure__)
    fixed._msclip_numpy2_fix = True  # type: ignore[attr-defined]
    for module in (zc, lp):  # linear_probe imported the function by name
        if module.accuracy is original:
            module.accuracy = fixed
    return True


def clip_benchmark_templates(templates: Sequence[str]) -> list[str]:
    """msclip templates (``"a photo of a {}."``, filled by ``str.format(name)``) in CLIP_benchmark's form
    (``"a photo of a {c}."``, filled by ``str.format(c=name)``); escaped braces stay as they are."""
    out = []
    for t in templates:
        try:
            parts = list(string.Formatter().parse(t))
        except ValueError as e:
            raise ClipBenchmarkError(f"template {t!r}: {e}") from None
        if not any(field in ("", "0") for _, field, _, _ in parts):
            raise ClipBenchmarkError(f"template {t!r} has no '{{}}' for the class name")
        text = []
        for literal, field, spec, conversion in parts:
            text.append(literal.replace("{", "{{").replace("}", "}}"))  # parse() unescaped them
            if field is not None:
                name = "c" if field in ("", "0") else field
                text.append("{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}")
        out.append("".join(text))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLIP_benchmark's own command line with "msclip" registered (`python -m msclip.interop.clip_benchmark`)."""
    register()
    try:
        import clip_benchmark.cli as cli
    except ImportError as e:  # its CLI imports every task's and dataset's dependencies at the top
        raise ClipBenchmarkError(
            f"clip_benchmark's command line cannot be imported ({e}); it needs the dependencies CLIP_benchmark "
            f"declares (pip install clip-benchmark without --no-deps). The Python API (load_clip + "
            f"clip_benchmark.metrics.*) works without them") from e
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    return cli.main() or 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MsclipError as err:
        print(f"msclip clip_benchmark: error: {err}", file=sys.stderr)
        sys.exit(2)
