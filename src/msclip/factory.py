"""One factory: named configs, JSON configs and official yamls -> models, transforms, tokenizers."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .checkpoint import load_pretrained
from .config import ConfigError, ModelCfg
from .model import MSCLIP
from .pretrained_folder import folder_weights, is_model_folder, load_folder_config
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


def _folder(name_or_path: str | os.PathLike) -> Path | None:
    """The model folder meant by `name_or_path`, if any. A registered name wins over a folder of the same
    name in the working directory (so a name means the same everywhere); write `./NAME` for the folder."""
    name = str(name_or_path)
    _scan()
    if name in _REGISTRY and not isinstance(name_or_path, os.PathLike):
        return None
    return Path(name) if is_model_folder(name) else None


def get_model_config(name_or_path: str | os.PathLike) -> ModelCfg:
    """A registered name, a model folder (`save_pretrained`), a JSON config path, or an official MS-CLIP
    yaml path -> ModelCfg."""
    name = str(name_or_path)
    folder = _folder(name_or_path)
    if folder is not None:
        return load_folder_config(folder)
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
                          f"(or pass a model folder / a .json config / an official .yaml)")
    return ModelCfg.from_json(_REGISTRY[name])


def create_model_from_config(cfg: ModelCfg) -> MSCLIP:
    return MSCLIP(cfg)


_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def create_model(name_or_path: str | os.PathLike, pretrained: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, precision: str = "fp32") -> MSCLIP:
    """Build a model in eval mode. `pretrained` is a weights file in any supported layout; for an
    official yaml with MODEL.PRETRAINED_MODEL set, that file is loaded when it exists; for a model folder
    its `model.safetensors` (strict keys) unless `pretrained` names other weights."""
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
    name = str(name_or_path)
    folder = _folder(name_or_path)
    cfg = get_model_config(name_or_path)
    if folder is not None and pretrained is None:
        pretrained = folder_weights(folder)
    if pretrained is None and _is_yaml(name):
        from .official_config import load_official_yaml

        default = load_official_yaml(name).pretrained_path
        if default and Path(default).is_file():
            pretrained = default
        elif default:
            log.warning("%s: MODEL.PRETRAINED_MODEL %s not found; using random weights", name, default)
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
