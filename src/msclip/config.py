"""Typed, validated model configuration.

One `ModelCfg` describes every point of the sharing spectrum: plain CLIP (nothing shared), MS-CLIP
(attention + MLP shared), fully shared, and MS-CLIP-S (conv stem, private first text layer, parallel
conv branch with lateral adapters). Unknown keys are errors, and so are combinations the model cannot
build (a shared component between towers of different widths, a lateral layer the image never reaches).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from .errors import MsclipError
from .typed_config import from_dict

# Trunk block components that can be shared between the modalities, in block order.
COMPONENTS = ("ln_1", "attn_in", "attn_out", "ln_2", "mlp")
COMPONENT_ALIASES = {
    "attn": ("attn_in", "attn_out"),
    "norm": ("ln_1", "ln_2"),
    "all": COMPONENTS,
}
MODALITIES = ("image", "text")

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(MsclipError):
    """A configuration value or key is invalid; the message names it."""


LayerSpec = Union[str, list, dict]


@dataclass
class VisionCfg:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    # Trunk layer slots used by the image, counting the stem slot: with stem="conv" the
    # residual conv stem takes slot 0 (early specialization) and blocks 1..layers-1 run.
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    stem: str = "patch"  # "patch" (ViT patchify conv) | "conv" (MS-CLIP-S residual conv stem)
    stem_strides: list[int] | None = None  # 4 stage strides of the conv stem; None = derive from patch_size
    stem_first_kernel: int = 3


@dataclass
class TextCfg:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    # "eot": over-long texts keep EOT as the last token (open_clip / OpenAI);
    # "hard": cut to the first context_length ids with no EOT (official MS-CLIP tokenizer).
    truncate: str = "eot"


@dataclass
class ShareRule:
    components: list[str] = field(default_factory=lambda: ["attn", "mlp"])
    # "all" = every layer both modalities run; a list of trunk indices; or {"from": k}.
    layers: LayerSpec = "all"


@dataclass
class ParallelCfg:
    """Parallel conv branch (image only) fused into the token stream by lateral adapters."""

    lateral_layers: list[int] = field(default_factory=lambda: [2, 4, 6, 8, 10])
    strides: list[int] | None = None  # per stage; None = 2 until the cumulative stride reaches patch_size
    t2b_kernels: list[int] | None = None  # adapter depthwise kernel = stride; None = patch / cumulative stride
    bottleneck_bn_eps: float = 1e-6


@dataclass
class PreprocessCfg:
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"  # resize shorter side then centre crop
    train_crop_scale: tuple[float, float] = (0.9, 1.0)


@dataclass
class ModelCfg:
    embed_dim: int = 512
    vision: VisionCfg = field(default_factory=VisionCfg)
    text: TextCfg = field(default_factory=TextCfg)
    share: list[ShareRule] = field(default_factory=list)
    parallel: ParallelCfg | None = None
    norm_eps: float = 1e-5
    init_logit_scale: float = math.log(1 / 0.07)  # raw value of the learnable log-temperature
    preprocess: PreprocessCfg = field(default_factory=PreprocessCfg)
    name: str = ""

    # ----------------------------------------------------------------- (de)serialisation
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ModelCfg":
        cfg = from_dict(cls, data, source=source, error=ConfigError)  # every unknown / mistyped key at once
        cfg.validate(source)
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelCfg":
        path = Path(path)
        data = {**read_json_object(path), "name": path.stem}  # a config file is named by its file
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ----------------------------------------------------------------- derived geometry
    @property
    def num_layers(self) -> int:
        return max(self.vision.layers, self.text.layers)

    def runs(self, modality: str, layer: int) -> bool:
        """Does `modality` pass through trunk block `layer`?"""
        if modality == "image":
            return (self.vision.stem != "conv" or layer > 0) and layer < self.vision.layers
        return layer < self.text.layers

    def modality_layers(self, modality: str) -> list[int]:
        return [i for i in range(self.num_layers) if self.runs(modality, i)]

    def shared_components(self, layer: int) -> set[str]:
        """Components of block `layer` held once for both modalities."""
        out: set[str] = set()
        if not (self.runs("image", layer) and self.runs("text", layer)):
            return out
        for rule in self.share:
            if layer in _expand_layers(rule.layers, self):
                out.update(_expand_components(rule.components))
        return out

    def stem_strides(self) -> list[int]:
        if self.vision.stem_strides is not None:
            return list(self.vision.stem_strides)
        # conv1 has stride 2; each of the 4 stages halves until the total reaches the patch size.
        strides, total = [], 2
        for _ in range(4):
            s = 2 if total < self.vision.patch_size else 1
            strides.append(s)
            total *= s
        return strides

    def grid_size(self) -> int:
        if self.vision.stem == "conv":
            total = 2 * math.prod(self.stem_strides())
        else:
            total = self.vision.patch_size
        return self.vision.image_size // total

    def parallel_strides(self) -> list[int]:
        assert self.parallel is not None
        if self.parallel.strides is not None:
            return list(self.parallel.strides)
        strides, total = [], 1
        for _ in self.parallel.lateral_layers:
            s = 2 if total < self.vision.patch_size else 1
            strides.append(s)
            total *= s
        return strides

    def parallel_t2b_kernels(self) -> list[int]:
        assert self.parallel is not None
        if self.parallel.t2b_kernels is not None:
            return list(self.parallel.t2b_kernels)
        kernels, total = [], 1
        for s in self.parallel_strides():
            total *= s
            kernels.append(max(1, self.vision.patch_size // total))
        return kernels

    # ----------------------------------------------------------------- validation
    def validate(self, source: str = "config") -> None:
        v, t = self.vision, self.text

        def fail(msg: str) -> None:
            raise ConfigError(f"{source}: {msg}")

        for name, value in (("embed_dim", self.embed_dim), ("vision.width", v.width), ("text.width", t.width),
                            ("vision.layers", v.layers), ("text.layers", t.layers), ("vision.heads", v.heads),
                            ("text.heads", t.heads), ("text.context_length", t.context_length),
                            ("text.vocab_size", t.vocab_size), ("vision.image_size", v.image_size),
                            ("vision.patch_size", v.patch_size)):
            if not isinstance(value, int) or value <= 0:
                fail(f"{name} must be a positive integer, got {value!r}")
        if v.width % v.heads:
            fail(f"vision.width={v.width} is not divisible by vision.heads={v.heads}")
        if t.width % t.heads:
            fail(f"text.width={t.width} is not divisible by text.heads={t.heads}")
        if v.stem not in ("patch", "conv"):
            fail(f"vision.stem must be 'patch' or 'conv', got {v.stem!r}")
        if t.truncate not in ("eot", "hard"):
            fail(f"text.truncate must be 'eot' or 'hard', got {t.truncate!r}")
        if self.preprocess.interpolation not in ("bicubic", "bilinear", "nearest"):
            fail(f"preprocess.interpolation {self.preprocess.interpolation!r} is not supported")
        if self.preprocess.resize_mode not in ("shortest", "squash"):
            fail(f"preprocess.resize_mode must be 'shortest' or 'squash', got {self.preprocess.resize_mode!r}")
        if v.stem == "conv":
            if v.width % 16:
                fail(f"vision.width={v.width} must be divisible by 16 for the conv stem")
            strides = self.stem_strides()
            if len(strides) != 4 or any(s not in (1, 2) for s in strides):
                fail(f"vision.stem_strides must be 4 values of 1 or 2, got {strides}")
            if 2 * math.prod(strides) != v.patch_size:  # conv1's stride 2 times the stages' make one patch
                fail(f"vision.stem_strides={strides} give patches of {2 * math.prod(strides)} px (2 x their "
                     f"product), but vision.patch_size={v.patch_size}")
            if v.layers < 2:
                fail("vision.layers must be >= 2 with the conv stem (slot 0 is the stem)")
        elif v.image_size % v.patch_size:
            fail(f"vision.image_size={v.image_size} is not a multiple of patch_size={v.patch_size}")
        if self.grid_size() < 1:
            fail("the image is smaller than one token")
        for i, rule in enumerate(self.share):
            _expand_components(rule.components, f"{source}: share[{i}].components")
            layers = _expand_layers(rule.layers, self, f"{source}: share[{i}].layers")
            for layer in layers:
                missing = [m for m in MODALITIES if not self.runs(m, layer)]
                if missing and rule.layers != "all" and not isinstance(rule.layers, dict):
                    fail(f"share[{i}].layers includes layer {layer}, which the {missing[0]} never runs")
        for layer in range(self.num_layers):
            shared = self.shared_components(layer)
            if shared and v.width != t.width:
                fail(f"share: component {sorted(shared)[0]!r} at layer {layer} needs equal widths, "
                     f"got vision.width={v.width} and text.width={t.width}")
            if "mlp" in shared and v.mlp_ratio != t.mlp_ratio:
                fail(f"share: mlp at layer {layer} needs equal mlp_ratio, got {v.mlp_ratio} and {t.mlp_ratio}")
        if self.parallel is not None:
            self._validate_parallel(fail)

    def _validate_parallel(self, fail) -> None:
        p, v = self.parallel, self.vision
        n = len(p.lateral_layers)
        if n == 0:
            fail("parallel.lateral_layers must not be empty")
        if sorted(set(p.lateral_layers)) != list(p.lateral_layers):
            fail(f"parallel.lateral_layers must be strictly increasing, got {p.lateral_layers}")
        for layer in p.lateral_layers:
            if not self.runs("image", layer):
                fail(f"parallel.lateral_layers: the image never runs layer {layer}")
        if v.width % (2 ** (n - 1)):
            fail(f"vision.width={v.width} must be divisible by {2 ** (n - 1)} for {n} parallel stages")
        strides, kernels = self.parallel_strides(), self.parallel_t2b_kernels()
        if len(strides) != n or len(kernels) != n:
            fail(f"parallel.strides / t2b_kernels need {n} values (one per lateral layer)")
        size, grid = v.image_size, self.grid_size()
        for j, (s, k) in enumerate(zip(strides, kernels)):
            size = (size - 1) // s + 1
            if size // k != grid:
                fail(f"parallel stage {j}: a {size}x{size} map with t2b kernel {k} does not land on the "
                     f"{grid}x{grid} token grid")


def _expand_components(names: list[str], where: str = "share.components") -> set[str]:
    if isinstance(names, str) or not isinstance(names, list):
        raise ConfigError(f"{where} must be a list of component names, got {names!r}")
    out: set[str] = set()
    for name in names:
        if name in COMPONENT_ALIASES:
            out.update(COMPONENT_ALIASES[name])
        elif name in COMPONENTS:
            out.add(name)
        else:
            raise ConfigError(f"{where}: unknown component {name!r} "
                              f"(choose from {list(COMPONENTS) + list(COMPONENT_ALIASES)})")
    return out


def _expand_layers(spec: LayerSpec, cfg: ModelCfg, where: str = "share.layers") -> list[int]:
    n = cfg.num_layers
    if spec == "all":
        return list(range(n))
    if isinstance(spec, dict):
        if set(spec) != {"from"} or not isinstance(spec["from"], int):
            raise ConfigError(f"{where}: expected {{'from': k}}, got {spec!r}")
        return list(range(spec["from"], n))
    if isinstance(spec, list) and all(isinstance(i, int) for i in spec):
        bad = [i for i in spec if not 0 <= i < n]
        if bad:
            raise ConfigError(f"{where}: layer {bad[0]} is outside 0..{n - 1}")
        return sorted(set(spec))
    raise ConfigError(f"{where}: expected 'all', a list of layer indices or {{'from': k}}, got {spec!r}")


def read_json_object(path: Path) -> dict[str, Any]:
    """A model config file's JSON object; a clear ConfigError naming the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of model config keys, got {type(data).__name__}")
    return data
