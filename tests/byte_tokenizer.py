"""An invertible stand-in for the BPE tokenizer in data tests: utf-8 bytes, zero padded to CTX
(module level, so DataLoader workers can pickle it)."""
from __future__ import annotations

import torch

CTX = 24


def byte_tokenize(texts: list[str]) -> torch.Tensor:
    out = torch.zeros(len(texts), CTX, dtype=torch.long)
    for i, t in enumerate(texts):
        b = list(t.encode())[:CTX]
        out[i, :len(b)] = torch.tensor(b)
    return out


def decode(tokens: torch.Tensor) -> list[str]:
    return [bytes([v for v in row.tolist() if v]).decode() for row in tokens]
