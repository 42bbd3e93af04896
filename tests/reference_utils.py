"""Helpers for the official tiny reference (tests/data/official_tiny, produced by the official code).

The reference weights are not stored: they are regenerated from the manifest with the deterministic
per-key recipe below (the one the reference was made with: a seeded generator per key, values set by the
key's role) and checked against the stored fingerprints (tests/data/official_tiny/weight-fingerprints.tsv).
"""
from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch

import msclip
from msclip.checkpoint import convert_state_dict

REF_DIR = Path(__file__).parent / "data" / "official_tiny"
SPEC_MANIFESTS = Path(__file__).parent / "data" / "manifests"  # copies of shared/spec/manifests


def read_manifest(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    rows = []
    for line in lines[1:]:
        if line.strip():
            row = dict(zip(header, line.split("\t")))
            row["shape"] = () if row["shape"] == "scalar" else tuple(int(s) for s in row["shape"].split("x"))
            rows.append(row)
    return rows


def recipe_tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The value the reference recipe assigns to `key` (first matching rule wins)."""
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    g = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
    if key.endswith("running_mean"):
        return 0.1 * torch.randn(shape, generator=g)
    if key.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=g)
    if key == "logit_scale":
        return torch.tensor(math.log(1 / 0.07))
    if "embedding" in key:
        return 0.02 * torch.randn(shape, generator=g)
    if key in ("visual.proj", "text_projection"):
        return torch.randn(shape, generator=g) * shape[0] ** -0.5
    if len(shape) == 1 and key.endswith("weight"):
        return 1 + 0.1 * torch.randn(shape, generator=g)
    if len(shape) == 1 and key.endswith("bias"):
        return 0.02 * torch.randn(shape, generator=g)
    if len(shape) >= 2 and key.endswith("weight"):
        return torch.randn(shape, generator=g) * math.prod(shape[1:]) ** -0.5
    raise KeyError(f"no recipe rule for {key} {shape}")


def recipe_state_dict(manifest: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for row in read_manifest(manifest):
        tied = row.get("tied_to", "")
        out[row["key"]] = out[tied] if tied else recipe_tensor(row["key"], row["shape"])
    return out


def load_reference_model():
    """-> (model, inputs, outputs): msclip built from the reference config.yaml with recipe weights."""
    model = msclip.create_model(str(REF_DIR / "config.yaml"))
    official = recipe_state_dict(REF_DIR / "manifest.tsv")
    model.load_state_dict(convert_state_dict(official, model, "recipe weights"), strict=True)
    inputs = torch.load(REF_DIR / "inputs.pt", weights_only=True)
    outputs = torch.load(REF_DIR / "outputs.pt", weights_only=True)
    return model.eval(), inputs, outputs
