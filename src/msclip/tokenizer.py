"""CLIP BPE tokenizer with the truncation rule of the model's config.

The vocabulary and BPE come from open_clip_torch (the same file the official MS-CLIP repo ships).
Texts become [SOT] + ids + [EOT], zero-padded to the context length. Over-long texts are cut either
keeping EOT last (open_clip / OpenAI, truncate="eot") or hard with no EOT (official MS-CLIP,
truncate="hard"; pooling then lands on position 0, exactly as in the official model).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch

from .open_clip_files import open_clip_module


@lru_cache(maxsize=1)
def _bpe():
    return open_clip_module("tokenizer").SimpleTokenizer()


class Tokenizer:
    def __init__(self, context_length: int = 77, truncate: str = "eot"):
        if truncate not in ("eot", "hard"):
            raise ValueError(f"truncate must be 'eot' or 'hard', got {truncate!r}")
        self.context_length = context_length
        self.truncate = truncate
        bpe = _bpe()
        self.sot = bpe.sot_token_id
        self.eot = bpe.eot_token_id
        self.vocab_size = len(bpe.encoder)

    def encode(self, text: str) -> list[int]:
        return _bpe().encode(text)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"tokenizer: text {row} is {type(text).__name__}, expected str")
            ids = [self.sot] + self.encode(text) + [self.eot]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                if self.truncate == "eot":
                    ids[-1] = self.eot
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def __repr__(self) -> str:
        return f"Tokenizer(context_length={self.context_length}, truncate={self.truncate!r})"
