"""One factory: named configs, JSON configs and official yamls -> models, transforms, tokenizers."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .checkpoint import load_pretrained
from .config import ConfigError, ModelCfg
from .model import MSCLIP
from .errors import MissingFileError
from .pretrained_folder import (folder_config, folder_weights, is_model_folder, is_weights_file,
                                load_embedded_config)
from .tokenizer import Tokenizer

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_REGISTRY: dict[str, Path] = {}
log = logging.getLogger(__name__)


def _scan() -> None:
    if not _REGISTRY:
        for path in sorted(_CONFIG_DIR.glob("*.json")):
            _REGISTRY[path.stem] = path


def list_models() -> list[str]:
    _scan()
    return sorted(_REGISTRY)


def add_model_config(path: str | os.PathLike) -> None:
    """Register a JSON config file, or every JSON file in a folder, under its file stem."""
    _scan()
    path = Path(path)
    for p in sorted(path.glob("*.json")) if path.is_dir() else [path]:
        ModelCfg.from_json(p)  # validate now, not at first use
        _REGISTRY[p.stem] = p


def _is_yaml(name: str) -> bool:
    return str(name).endswith((".yaml", ".yml"))


def _local(name_or_path: str | os.PathLike) -> Path | None:
    """The model folder or weights file meant by `name_or_path`, if any. A registered name wins over a folder
    or file of the same name in the working directory (so a name means the same everywhere); write `./NAME`."""
    name = str(name_or_path)
    _scan()
    if name in _REGISTRY and not isinstance(name_or_path, os.PathLike):
        return None
    return Path(name) if is_model_folder(name) or is_weights_file(name) else None


def get_model_config(name_or_path: str | os.PathLike) -> ModelCfg:
    """A registered name, a model folder (`save_pretrained`, or a training run's folder), one of msclip's
    weights files (its embedded config), a JSON config path, or an official MS-CLIP yaml path -> ModelCfg."""
    name = str(name_or_path)
    local = _local(name_or_path)
    if local is not None:
        return folder_config(local) if local.is_dir() else load_embedded_config(local)
    if _is_yaml(name):
        from .official_config import load_official_yaml

        return load_official_yaml(name).model_cfg
    if name.endswith(".json"):
        if not Path(name).is_file():
            raise FileNotFoundError(f"model config not found: {name}")
        return ModelCfg.from_json(name)
    _scan()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(list_models())} "
                          f"(or pass a model folder, a weights file, a .json config or an official .yaml)")
    return ModelCfg.from_json(_REGISTRY[name])


def default_weights(name_or_path: str | os.PathLike, strict: bool = False) -> Path | None:
    """The weights `create_model(name_or_path)` loads when no `pretrained` is given: a model folder's
    `model.safetensors`, the weights file itself, an official yaml's MODEL.PRETRAINED_MODEL; None = random.
    A yaml's missing PRETRAINED_MODEL is a warning (random weights), or with `strict` an error."""
    name = str(name_or_path)
    local = _local(name_or_path)
    if local is not None:
        return folder_weights(local) if local.is_dir() else local
    if _is_yaml(name):
        from .official_config import load_official_yaml

        default = load_official_yaml(name).pretrained_path
        if default and Path(default).is_file():
            return Path(default)
        if default and strict:
            raise MissingFileError(f"{name}: MODEL.PRETRAINED_MODEL {default!r} does not exist (relative to the "
                                   f"working directory {os.getcwd()!r}); download it or pass the weights")
        if default:
            log.warning("%s: MODEL.PRETRAINED_MODEL %s not found; using random weights", name, default)
    return None


def create_model_from_config(cfg: ModelCfg) -> MSCLIP:
    return MSCLIP(cfg)


_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def create_model(name_or_path: str | os.PathLike, pretrained: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, precision: str = "fp32") -> MSCLIP:
    """Build a model in eval mode. `pretrained` is a weights file in any supported layout; without it the
    model's own weights are loaded (`default_weights`: a folder's `model.safetensors`, a weights file named as
    the model, an official yaml's MODEL.PRETRAINED_MODEL when it exists), else the weights are random."""
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
    cfg = get_model_config(name_or_path)
    if pretrained is None:
        pretrained = default_weights(name_or_path)
    model = MSCLIP(cfg, fit_batchnorm_stats=pretrained is None)  # loaded weights bring their own statistics
    if pretrained is not None:
        load_pretrained(model, pretrained)
    model.to(device=device, dtype=_PRECISIONS[precision])
    return model.eval()


def create_model_and_transforms(name_or_path: str | os.PathLike, pretrained: str | os.PathLike | None = None,
                                device: str | torch.device | None = None, precision: str = "fp32"):
    from .transforms import image_transform  # torchvision is slow to import; only load it when needed

    model = create_model(name_or_path, pretrained, device, precision)
    size = model.cfg.vision.image_size
    return (model, image_transform(model.cfg.preprocess, size, is_train=True),
            image_transform(model.cfg.preprocess, size, is_train=False))


def get_tokenizer(name_or_path: str | os.PathLike | ModelCfg) -> Tokenizer:
    cfg = name_or_path if isinstance(name_or_path, ModelCfg) else get_model_config(name_or_path)
    return Tokenizer(cfg.text.context_length, cfg.text.truncate)
