"""msclip: Modality-Shared Contrastive Language-Image Pre-training."""
from .checkpoint import load_pretrained
from .config import ConfigError, ModelCfg
from .factory import (add_model_config, create_model, create_model_and_transforms, create_model_from_config,
                      get_model_config, get_tokenizer, list_models)
from .model import MSCLIP
from .pretrained_folder import save_pretrained
from .version import __version__

__all__ = [
    "MSCLIP", "ModelCfg", "ConfigError", "create_model", "create_model_and_transforms", "create_model_from_config",
    "get_model_config", "get_tokenizer", "list_models", "add_model_config", "load_pretrained", "save_pretrained",
    "__version__",
]
