"""Read model yamls in the official MS-CLIP (yacs) format and translate them into a `ModelCfg`.

Supports BASE merging (paths relative to the yaml, depth first), MODEL.SPEC, TRAIN/TEST image size,
INPUT mean/std and the CUSTOM switches that the released models use. A key the official code does not
know is reported as unknown; an official CUSTOM switch that msclip does not implement is accepted only
with its off value. CUSTOM.LR_SHARE / WD_SHARE are returned for the trainer (`msclip train` uses them
for the shared parameter groups when the recipe's model is the yaml).
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, ModelCfg
from .typed_config import read_yaml_mapping

# Sections of the official default tree whose keys are fixed (yacs rejects others); None = open.
_TOP = {
    "BASE": None, "NAME": None, "DATA_DIR": None, "DIST_BACKEND": None, "GPUS": None,
    "MULTIPROCESSING_DISTRIBUTED": None, "OUTPUT_DIR": None, "PIN_MEMORY": None, "PRINT_FREQ": None,
    "RANK": None, "VERBOSE": None, "WORKERS": None, "LOGGING_LEVEL": None, "USE_DEEPSPEED": None,
    "AMP": {"ENABLED", "MEMORY_FORMAT"},
    "CUDNN": {"BENCHMARK", "DETERMINISTIC", "ENABLED"},
    "MODEL": None, "LOSS": None, "DATASET": None, "INPUT": {"MEAN", "STD"}, "AUG": None, "SWA": None,
    "TRAIN": None, "TEST": None, "FINETUNE": None, "DEBUG": None, "DEEPSPEED": None, "CUSTOM": None,
}
_MODEL_KEYS = {"NAME", "INIT_WEIGHTS", "PRETRAINED", "PRETRAINED_LAYERS", "NUM_CLASSES", "SPEC", "PRETRAINED_MODEL"}
_SPEC_KEYS = {"EMBED_DIM", "GATHER_TENSORS", "VISION", "TEXT", "POOL_TYPE", "SKIP_CLS"}
_VISION_KEYS = {"MODEL", "PATCH_SIZE", "WIDTH", "LAYERS", "DROP_PATH"}
_TEXT_KEYS = {"TOKENIZER", "STYLE", "CONTEXT_LENGTH", "VOCAB_SIZE", "WIDTH", "HEADS", "LAYERS"}
_MODEL_NAMES = {"clip_openai", "clip_openai_pe_res_v1"}
# CUSTOM keys msclip implements (the released MS-CLIP-S configuration space), with the official code's
# defaults (the value a yaml that omits the key gets). CUSTOM_ATTN selects the official hand-written
# attention instead of torch's nn.MultiheadAttention: the same algorithm, so both values give msclip's.
# N_LAYERS: the official default -1 means "share from layer 0", as 0 does.
_CUSTOM_DEFAULTS: dict[str, Any] = {
    "CUSTOM_ATTN": False, "SHARE_MODULES": [], "N_LAYERS": -1, "SHARE_BOTTOM_LAYER": False,
    "LR_SHARE": 0.0, "WD_SHARE": 0.0,
    "EARLY_CONV": False, "EARLY_CONV_NEW_IMPLEMENT": False, "VISUAL_LAYER_MINUS1": False,
    "EARLY_CONV_RES": False, "EARLY_CONV_RES_FIRSTCONV_KERNEL": 3, "EARLY_CONV_RES_BLOCK": "basic_v0",
    "EARLY_CONV_RES_LAYERS": [1, 1, 1, 1], "EARLY_CONV_RES_STRIDES": [2, 2, 2, 2],
    "PARALLEL_IN_V": False, "PARALLEL_N_LAYERS": 5, "PARALLEL_LATERAL_LAYER": [2, 4, 6, 8, 10],
    "PARALLEL_KERNELS": [3, 3, 3, 3, 3], "PARALLEL_PADDINGS": [1, 1, 1, 1, 1], "PARALLEL_STRIDES": [2, 2, 2, 2, 2],
    "PRALLEL_T2B_KERNELS": [16, 8, 4, 2, 1], "PRALLEL_T2B_PADDINGS": [0, 0, 0, 0, 0],
    "PRALLEL_T2B_STRIDES": [16, 8, 4, 2, 1], "PRALLEL_T2B_USECLS": True,
    "PARALLEL_RESNET": False, "PARALLEL_RESNET_LAYERS": [0, 1, 1, 1, 1],
}
# CUSTOM keys the official model code (lib/models/clip_openai_pe_res_v1.py, lib/config/default.py) reads
# but msclip does not implement (experimental branches no released model uses), with their off values:
# a yaml may name them only with these values.
_CUSTOM_OFF: dict[str, Any] = {
    "ADAPTER_ATTN_DIM": 0, "ADAPTER_FLAG": False, "ADAPTER_LAYERS": [],
    "CONTAINER_IN_V": False, "CONTAINER_V_KERNEL": 3, "CONTAINER_V_PAD": 1, "CONTAINER_V_STRIDE": 1,
    "CONVIT_IN_V": False, "CONVIT_LAYERS": [], "CONVIT_LOCAL_STRENGTH": 1,
    "CVT_IN_V": False, "CVT_INSIDE": False, "CVT_INSIDE_K": False, "CVT_INSIDE_Q": False, "CVT_INSIDE_V": False,
    "CVT_LAYERS": [], "CVT_V_KERNEL": False, "CVT_V_PAD": False, "CVT_V_RES": False, "CVT_V_STRIDE": False,
    "TWO_DWC_IN_CVT": False, "THREE_DWC_IN_CVT": False,
    "GET_GRADIENT_FROMCKPT": False, "SAVE_GRADIENT": False, "LOAD_SEARCHED_ARCH": None,
    "GUMBEL_SELECT": False, "GUMBEL_ADDTWO": False, "GUMBEL_LR": 0.0,
    "LORA_OPEN": False, "LORA_ATTN_DIM": 0, "LORA_ATTN_ALPHA": 0, "LORA_DROPOUT": 0, "LORA_R_DROPOUT": 0,
    "LORA_INIT": False, "LORA_WHERE_ADD": "v0", "LORA_MOE": 0, "LORA_MOE_ACT": "linear", "LORA_MOE_GROUP": 1,
    "LORA_MOE_LAMBDA": 1.0, "LORA_MOE_SOFTMAX": 0,
    "VISUAL_LORA_LOCAL": False, "VISUAL_LORA_LOCAL_KERNEL": 3, "VISUAL_LORA_LOCAL_PAD_KV": 1,
    "VISUAL_LORA_LOCAL_PAD_Q": 1, "VISUAL_LORA_LOCAL_STRIDE_KV": 1, "VISUAL_LORA_LOCAL_STRIDE_Q": 1,
    "OUTPUT_AFTER_ATTN": False, "OUTPUT_AFTER_ATTN_LN": False, "OUTPUT_ATTN_RAW": False,
    "OUTPUT_BEFORE_ATTN": False, "OUTPUT_LAST_LN": False,
    "PARALLEL_B2T": False, "PARALLEL_B2T_BILINEAR": False, "PARALLEL_B2T_CROSSATTN": False,
    "PARALLEL_B2T_LAYER": [True] * 5, "PARALLEL_B2T_NO_LASTLAYER": False,
    "PARALLEL_REUSE_EARLYCONV_ALLLAYER": False, "PARALLEL_REUSE_EARLYCONV_FIRSTLAYER": False,
    "PARALLEL_T2B_POOL_SIZE": False, "PARALLEL_T2B_WINDOWATTN": False,
    "T2B_WINDOWATTN_RELATIVE_POS": None, "T2B_WINDOWATTN_RELATIVE_POS_NOWD": False,
    "PRALLEL_T2B_ADD_BN_LN_RELU": False, "PRALLEL_T2B_ADD_BN_RELU": False, "PRALLEL_T2B_NOLN_ADD": False,
    "PERCEIVER_IN_T": False, "PERCEIVER_IN_V": False, "PERCEIVER_LAYER": [], "PERCEIVER_N_LATENT": 0,
}
_SHARE_MODULE_MAP = {"attn.in_proj_weight": "attn_in", "attn.in_proj_bias": "attn_in",
                     "attn.out_proj": "attn_out", "mlp": "mlp", "ln_1": "ln_1", "ln_2": "ln_2"}


@dataclass
class OfficialConfig:
    model_cfg: ModelCfg
    pretrained_path: str | None  # MODEL.PRETRAINED_MODEL as written (relative to the working directory)
    raw: dict  # merged yaml tree
    # Shared parameter groups' lr / weight decay (CUSTOM.LR_SHARE / WD_SHARE; lr per GPU, as TRAIN.LR);
    # None = the yaml does not set them. LR_SHARE 0 also means unset: the official config code treats
    # it so (it rescales LR_SHARE by the world size only when non-zero) and a zero lr would freeze the
    # shared layers. A WD_SHARE written in the yaml is used as is, 0 included.
    lr_share: float | None
    wd_share: float | None
    source: str


def _merge(base: dict, new: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_merged_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: BASE files include each other")
    data = read_yaml_mapping(path, "model yaml", ConfigError)
    merged: dict = {}
    bases = data.get("BASE") or []
    bases = [bases] if isinstance(bases, str) else bases  # `BASE: b32.yaml` means one file, not its letters
    if not isinstance(bases, list):
        raise ConfigError(f"{path}: BASE must be a list of yaml files, got {bases!r}")
    for base in bases:
        if base:
            merged = _merge(merged, read_merged_yaml(path.parent / base, _seen + (path.resolve(),)))
    return _merge(merged, {k: v for k, v in data.items() if k != "BASE"})


# Values the translation converts, with their type: a mistyped one is named here, not left to a bare
# TypeError further down. "int": an integer (not a bool); "ints": a list of them; "numbers": floats or ints.
_VALUE_TYPES: dict[str, str] = {
    "TRAIN": "mapping", "TEST": "mapping", "INPUT": "mapping",
    "TRAIN.IMAGE_SIZE": "ints", "INPUT.MEAN": "numbers", "INPUT.STD": "numbers",
    "MODEL.SPEC.EMBED_DIM": "int",
    **{f"MODEL.SPEC.VISION.{k}": "int" for k in ("PATCH_SIZE", "WIDTH", "LAYERS")},
    **{f"MODEL.SPEC.TEXT.{k}": "int" for k in ("CONTEXT_LENGTH", "VOCAB_SIZE", "WIDTH", "HEADS", "LAYERS")},
    **{f"CUSTOM.{k}": "int" for k in ("N_LAYERS", "PARALLEL_N_LAYERS", "EARLY_CONV_RES_FIRSTCONV_KERNEL")},
    **{f"CUSTOM.{k}": "ints" for k, v in _CUSTOM_DEFAULTS.items() if isinstance(v, list) and k != "SHARE_MODULES"},
}


def _type_problems(raw: dict) -> list[str]:
    problems = []
    for dotted, kind in _VALUE_TYPES.items():
        value: Any = raw
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            continue
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if kind == "mapping":
            ok = isinstance(value, dict)
        elif kind == "int":
            ok = is_int
        else:
            allowed = (int,) if kind == "ints" else (int, float)
            needed = dotted.startswith(("TRAIN.", "INPUT."))  # read by index; CUSTOM lengths are checked later
            ok = isinstance(value, list) and (bool(value) or not needed) and all(
                isinstance(v, allowed) and not isinstance(v, bool) for v in value)
        if not ok:
            want = {"mapping": "a mapping", "int": "an integer", "ints": "a list of integers",
                    "numbers": "a list of numbers"}[kind]
            problems.append(f"{dotted} must be {want}, got {value!r}")
    return problems


def _unknown_keys(section: Any, allowed: set[str], where: str) -> list[str]:
    """Problems with one section of an official yaml: not a mapping, or keys the official code lacks."""
    if not isinstance(section, dict):
        return [f"{where} must be a mapping"]
    return [f"unknown key {where}.{key} (known: {', '.join(sorted(allowed))})" for key in section if key not in allowed]


def _check_sections(raw: dict, source: str) -> None:
    """Every unknown key of every section (CUSTOM included) in one error, as for msclip's own configs."""
    problems = [f"unknown top-level key {key!r}" for key in raw if key not in _TOP]
    for key, value in raw.items():
        if _TOP.get(key) is not None:
            problems += _unknown_keys(value, _TOP[key], key)
    model = raw.get("MODEL") or {}
    problems += _unknown_keys(model, _MODEL_KEYS, "MODEL")
    spec = (model.get("SPEC") or {}) if isinstance(model, dict) else {}
    problems += _unknown_keys(spec, _SPEC_KEYS, "MODEL.SPEC")
    if isinstance(spec, dict):
        problems += _unknown_keys(spec.get("VISION") or {}, _VISION_KEYS, "MODEL.SPEC.VISION")
        problems += _unknown_keys(spec.get("TEXT") or {}, _TEXT_KEYS, "MODEL.SPEC.TEXT")
    given = raw.get("CUSTOM") or {}
    problems += _custom_problems(given) if isinstance(given, dict) else ["CUSTOM must be a mapping"]
    problems += _type_problems(raw)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def load_official_yaml(path: str | Path) -> OfficialConfig:
    source = str(path)
    raw = read_merged_yaml(path)
    _check_sections(raw, source)
    model = raw.get("MODEL") or {}
    name = model.get("NAME", "")
    if name not in _MODEL_NAMES:
        raise ConfigError(f"{source}: MODEL.NAME {name!r} is not an MS-CLIP model (expected one of {sorted(_MODEL_NAMES)})")
    spec = model.get("SPEC") or {}
    vision, text = spec.get("VISION") or {}, spec.get("TEXT") or {}
    _require(vision.get("MODEL", "vit") == "vit", source, "MODEL.SPEC.VISION.MODEL", vision.get("MODEL"), "'vit'")
    _require(vision.get("DROP_PATH", 0.0) in (0, 0.0), source, "MODEL.SPEC.VISION.DROP_PATH",
             vision.get("DROP_PATH"), "0.0")
    _require(spec.get("POOL_TYPE", "default") == "default", source, "MODEL.SPEC.POOL_TYPE", spec.get("POOL_TYPE"), "'default'")
    _require(not spec.get("SKIP_CLS", False), source, "MODEL.SPEC.SKIP_CLS", spec.get("SKIP_CLS"), "False")
    for key, want in (("TOKENIZER", "clip"), ("STYLE", "clip")):
        _require(text.get(key, want) == want, source, f"MODEL.SPEC.TEXT.{key}", text.get(key), repr(want))

    given = raw.get("CUSTOM") or {}
    custom = {**_CUSTOM_DEFAULTS, **{k: v for k, v in given.items() if k in _CUSTOM_DEFAULTS}}
    train_size = (raw.get("TRAIN") or {}).get("IMAGE_SIZE", [224, 224])
    input_cfg = raw.get("INPUT") or {}
    width = vision.get("WIDTH", 768)
    cfg: dict[str, Any] = {
        "name": Path(path).stem,
        "embed_dim": spec.get("EMBED_DIM", 512),
        # The official code hard-wires the image head count to width // 64 (no config key).
        "vision": {"image_size": int(train_size[0]), "patch_size": vision.get("PATCH_SIZE", 32), "width": width,
                   "layers": vision.get("LAYERS", 12), "heads": max(1, width // 64)},
        "text": {"context_length": text.get("CONTEXT_LENGTH", 77), "vocab_size": text.get("VOCAB_SIZE", 49408),
                 "width": text.get("WIDTH", 512), "layers": text.get("LAYERS", 12), "heads": text.get("HEADS", 8),
                 "truncate": "hard"},
        "norm_eps": 1e-12,
        "init_logit_scale": 1.0,
        "preprocess": {"mean": list(input_cfg.get("MEAN", [0.485, 0.456, 0.406])),
                       "std": list(input_cfg.get("STD", [0.229, 0.224, 0.225])),
                       "interpolation": "bicubic", "resize_mode": "shortest"},
        "share": _share_rules(custom, source),
    }
    if name == "clip_openai" and (custom["EARLY_CONV"] or custom["PARALLEL_IN_V"] or custom["SHARE_MODULES"]):
        raise ConfigError(f"{source}: MODEL.NAME clip_openai has no sharing, early conv or parallel branch; "
                          f"use clip_openai_pe_res_v1")
    _early_conv(custom, cfg, source)
    _parallel(custom, cfg, source)
    model_cfg = ModelCfg.from_dict(cfg, source=source)
    return OfficialConfig(model_cfg=model_cfg, pretrained_path=model.get("PRETRAINED_MODEL") or None, raw=raw,
                          lr_share=_number(given, "LR_SHARE", source, zero_is_unset=True),
                          wd_share=_number(given, "WD_SHARE", source, zero_is_unset=False), source=source)


def _custom_problems(given: dict) -> list[str]:
    """Every CUSTOM key is implemented, or official and off; the offenders."""
    problems = []
    for key, value in given.items():
        if key in _CUSTOM_DEFAULTS:
            continue
        if key in _CUSTOM_OFF:
            if value != _CUSTOM_OFF[key]:
                problems.append(f"CUSTOM.{key}={value!r} is an official switch that msclip does not implement "
                                f"(only its off value {_CUSTOM_OFF[key]!r} is accepted)")
            continue
        known = list(_CUSTOM_DEFAULTS) + list(_CUSTOM_OFF)
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"CUSTOM.{key} is unknown: the official code has no such switch{hint}")
    return problems


def _number(given: dict, key: str, source: str, zero_is_unset: bool) -> float | None:
    value = given.get(key)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: CUSTOM.{key} must be a number, got {value!r}") from None
    if number < 0:
        raise ConfigError(f"{source}: CUSTOM.{key} must be >= 0, got {value!r}")
    return None if (zero_is_unset and number == 0) else number


def _require(ok: bool, source: str, key: str, value: Any, want: str) -> None:
    if not ok:
        raise ConfigError(f"{source}: {key}={value!r} is not supported by msclip (only {want})")


def _share_rules(custom: dict, source: str) -> list[dict]:
    modules = custom["SHARE_MODULES"] or []
    if not isinstance(modules, list):
        raise ConfigError(f"{source}: CUSTOM.SHARE_MODULES must be a list, got {modules!r}")
    if not modules:
        return []
    _require(not custom["SHARE_BOTTOM_LAYER"], source, "CUSTOM.SHARE_BOTTOM_LAYER", custom["SHARE_BOTTOM_LAYER"], "False")
    comps = set()
    for m in modules:
        if m not in _SHARE_MODULE_MAP:
            raise ConfigError(f"{source}: CUSTOM.SHARE_MODULES entry {m!r} is not supported "
                              f"(known: {sorted(_SHARE_MODULE_MAP)})")
        comps.add(_SHARE_MODULE_MAP[m])
    if ("attn.in_proj_weight" in modules) != ("attn.in_proj_bias" in modules):
        raise ConfigError(f"{source}: CUSTOM.SHARE_MODULES must share attn.in_proj_weight and attn.in_proj_bias together")
    return [{"components": sorted(comps), "layers": {"from": max(0, int(custom["N_LAYERS"]))}}]


def _early_conv(custom: dict, cfg: dict, source: str) -> None:
    if not custom["EARLY_CONV"]:
        return
    for key, want in (("EARLY_CONV_NEW_IMPLEMENT", True), ("EARLY_CONV_RES", True), ("VISUAL_LAYER_MINUS1", False),
                      ("EARLY_CONV_RES_BLOCK", "basic_v0"), ("EARLY_CONV_RES_LAYERS", [1, 1, 1, 1])):
        _require(custom[key] == want, source, f"CUSTOM.{key}", custom[key], repr(want))
    kernel = custom["EARLY_CONV_RES_FIRSTCONV_KERNEL"]
    _require(kernel in (3, 7), source, "CUSTOM.EARLY_CONV_RES_FIRSTCONV_KERNEL", kernel, "3 or 7")
    cfg["vision"].update(stem="conv", stem_strides=list(custom["EARLY_CONV_RES_STRIDES"]), stem_first_kernel=kernel)


def _parallel(custom: dict, cfg: dict, source: str) -> None:
    if not custom["PARALLEL_IN_V"]:
        return
    n = int(custom["PARALLEL_N_LAYERS"])
    laterals = list(custom["PARALLEL_LATERAL_LAYER"])
    for key in ("PARALLEL_LATERAL_LAYER", "PARALLEL_KERNELS", "PARALLEL_PADDINGS", "PARALLEL_STRIDES",
                "PRALLEL_T2B_KERNELS", "PRALLEL_T2B_PADDINGS", "PRALLEL_T2B_STRIDES", "PARALLEL_RESNET_LAYERS"):
        if len(custom[key]) != n:
            raise ConfigError(f"{source}: CUSTOM.{key} needs PARALLEL_N_LAYERS={n} values, got {custom[key]}")
    _require(all(k == 3 for k in custom["PARALLEL_KERNELS"]), source, "CUSTOM.PARALLEL_KERNELS", custom["PARALLEL_KERNELS"], "3s")
    _require(all(p == 1 for p in custom["PARALLEL_PADDINGS"]), source, "CUSTOM.PARALLEL_PADDINGS", custom["PARALLEL_PADDINGS"], "1s")
    _require(custom["PRALLEL_T2B_KERNELS"] == custom["PRALLEL_T2B_STRIDES"], source, "CUSTOM.PRALLEL_T2B_STRIDES",
             custom["PRALLEL_T2B_STRIDES"], "equal to PRALLEL_T2B_KERNELS")
    _require(all(p == 0 for p in custom["PRALLEL_T2B_PADDINGS"]), source, "CUSTOM.PRALLEL_T2B_PADDINGS",
             custom["PRALLEL_T2B_PADDINGS"], "0s")
    _require(custom["PRALLEL_T2B_USECLS"] is True, source, "CUSTOM.PRALLEL_T2B_USECLS", custom["PRALLEL_T2B_USECLS"], "True")
    _require(custom["PARALLEL_RESNET"] is True, source, "CUSTOM.PARALLEL_RESNET", custom["PARALLEL_RESNET"], "True")
    _require(list(custom["PARALLEL_RESNET_LAYERS"][1:]) == [1] * (n - 1), source, "CUSTOM.PARALLEL_RESNET_LAYERS",
             custom["PARALLEL_RESNET_LAYERS"], "[0, 1, 1, ...]")
    cfg["parallel"] = {"lateral_layers": laterals, "strides": list(custom["PARALLEL_STRIDES"]),
                       "t2b_kernels": list(custom["PRALLEL_T2B_KERNELS"])}
