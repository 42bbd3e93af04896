"""Training data: WebDataset shards, CSV/TSV, Fashion-MNIST demo pairs and synthetic pairs."""
from .build import build_train_data
from .common import COUNT_FIELDS, KINDS, DataInfo, DataSpec, DataSpecError, DataStats

__all__ = ["build_train_data", "DataInfo", "DataSpec", "DataSpecError", "DataStats", "COUNT_FIELDS", "KINDS"]
