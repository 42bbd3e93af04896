"""Training data: WebDataset shards, CSV/TSV, Fashion-MNIST demo pairs and synthetic pairs."""
from .build import build_train_data
from .common import COUNT_FIELDS, DataInfo, DataSpec, DataStats

__all__ = ["build_train_data", "DataInfo", "DataSpec", "DataStats", "COUNT_FIELDS"]
