"""State-dict conversion between msclip and the official MS-CLIP / OpenAI / open_clip layouts.

The official MS-CLIP code ties shared tensors by attribute aliasing, so its state_dict lists every
shared tensor under both its `visual.` and its text name (88 aliases in the released models). OpenAI
and open_clip CLIP use the same key layout without aliases. One key map serves all of them: each
msclip key maps to one or more external names.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch

from .config import ModelCfg
from .errors import MsclipError

# msclip component suffix -> key suffix inside an official/OpenAI residual block
_BLOCK_SUFFIX = {
    "ln_1.weight": "ln_1.weight", "ln_1.bias": "ln_1.bias",
    "attn_in.weight": "attn.in_proj_weight", "attn_in.bias": "attn.in_proj_bias",
    "attn_out.weight": "attn.out_proj.weight", "attn_out.bias": "attn.out_proj.bias",
    "ln_2.weight": "ln_2.weight", "ln_2.bias": "ln_2.bias",
    "mlp.c_fc.weight": "mlp.c_fc.weight", "mlp.c_fc.bias": "mlp.c_fc.bias",
    "mlp.c_proj.weight": "mlp.c_proj.weight", "mlp.c_proj.bias": "mlp.c_proj.bias",
}
_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
# (msclip regex, official template) for the image-only convolutional parts
_CONV_RULES = [
    (r"image\.stem\.conv\.weight", "visual.conv1.weight"),
    (r"image\.stem\.conv1\.weight", "visual.transformer.resblocks.0.conv1.weight"),
    (rf"image\.stem\.bn1\.{_BN}", "visual.transformer.resblocks.0.bn1.{0}"),
    (r"image\.stem\.stages\.(\d+)\.conv1\.weight", "visual.transformer.resblocks.0.resnet_stage.conv_{0}.conv1.weight"),
    (rf"image\.stem\.stages\.(\d+)\.bn1\.{_BN}", "visual.transformer.resblocks.0.resnet_stage.conv_{0}.bn1.{1}"),
    (r"image\.stem\.stages\.(\d+)\.down_conv\.weight",
     "visual.transformer.resblocks.0.resnet_stage.conv_{0}.downsample.0.weight"),
    (rf"image\.stem\.stages\.(\d+)\.down_bn\.{_BN}",
     "visual.transformer.resblocks.0.resnet_stage.conv_{0}.downsample.1.{1}"),
    (r"image\.stem\.last_conv\.weight", "visual.transformer.resblocks.0.last_conv.weight"),
    (r"image\.parallel\.stages\.0\.conv\.weight", "visual.transformer.parallel_branch_v.0.conv.weight"),
    (rf"image\.parallel\.stages\.0\.bn\.{_BN}", "visual.transformer.parallel_branch_v.0.bn.{0}"),
    (r"image\.parallel\.stages\.(\d+)\.((?:conv\d|residual_conv)\.weight)",
     "visual.transformer.parallel_branch_v.{0}.resnet_stage.conv_0.{1}"),
    (rf"image\.parallel\.stages\.(\d+)\.((?:bn\d|residual_bn)\.{_BN})",
     "visual.transformer.parallel_branch_v.{0}.resnet_stage.conv_0.{1}"),
    (r"image\.parallel\.adapters\.(\d+)\.t2b_dw\.weight",
     "visual.transformer.parallel_lateral_adapter.{0}.top2bottom_dw_conv.conv.weight"),
    (rf"image\.parallel\.adapters\.(\d+)\.t2b_bn\.{_BN}",
     "visual.transformer.parallel_lateral_adapter.{0}.top2bottom_dw_conv.bn.{1}"),
    (r"image\.parallel\.adapters\.(\d+)\.t2b_pw\.weight",
     "visual.transformer.parallel_lateral_adapter.{0}.top2bottom_pw_conv.conv.weight"),
    (r"image\.parallel\.adapters\.(\d+)\.bottom_dw\.weight",
     "visual.transformer.parallel_lateral_adapter.{0}.bottom_dw_conv.conv.weight"),
    (rf"image\.parallel\.adapters\.(\d+)\.bottom_bn\.{_BN}",
     "visual.transformer.parallel_lateral_adapter.{0}.bottom_dw_conv.bn.{1}"),
    (r"image\.parallel\.adapters\.(\d+)\.ln\.(weight|bias)", "visual.transformer.parallel_lateral_adapter.{0}.ln_adapt.{1}"),
]
_FIXED = {
    "logit_scale": "logit_scale",
    "image.class_embedding": "visual.class_embedding",
    "image.positional_embedding": "visual.positional_embedding",
    "image.proj": "visual.proj",
    "image.ln_pre.weight": "visual.ln_pre.weight", "image.ln_pre.bias": "visual.ln_pre.bias",
    "image.ln_post.weight": "visual.ln_post.weight", "image.ln_post.bias": "visual.ln_post.bias",
    "text.token_embedding.weight": "token_embedding.weight",
    "text.positional_embedding": "positional_embedding",
    "text.proj": "text_projection",
    "text.ln_final.weight": "ln_final.weight", "text.ln_final.bias": "ln_final.bias",
}
_TOWER_PREFIX = {"image": "visual.transformer.resblocks.{}.", "text": "transformer.resblocks.{}."}
# Keys some external checkpoints carry that hold no weights (OpenAI JIT metadata, open_clip buffers).
_IGNORED_EXTERNAL = {"input_resolution", "context_length", "vocab_size", "attn_mask", "text.attn_mask"}


class CheckpointMismatch(MsclipError):
    """Keys or shapes of a checkpoint do not fit the model; the message lists all of them."""


def mismatch_report(source: str, model_name: str, problems: Iterable[tuple[str, list[str]]],
                    shown: int = 20) -> str | None:
    """The one format for "this checkpoint does not fit the model": a section per kind of problem
    (title, items), at most `shown` items each. None when every list is empty."""
    sections = []
    for title, items in problems:
        if items:
            lines = "\n    ".join(items[:shown])
            more = f"\n    ... and {len(items) - shown} more" if len(items) > shown else ""
            sections.append(f"  {title} ({len(items)}):\n    {lines}{more}")
    if not sections:
        return None
    return f"{source} does not fit model {model_name or '(unnamed)'}:\n" + "\n".join(sections)


def check_mismatch(source: str, model_name: str, problems: Iterable[tuple[str, list[str]]]) -> None:
    """Raise CheckpointMismatch listing every problem at once, if there is any."""
    report = mismatch_report(source, model_name, problems)
    if report is not None:
        raise CheckpointMismatch(report)


def tensor_problem(name: str, value: object, shape: tuple[int, ...]) -> str | None:
    """Why `value` cannot be loaded as a tensor of `shape` (None when it can)."""
    if not isinstance(value, torch.Tensor):
        return f"{name}: not a tensor ({type(value).__name__})"
    if tuple(value.shape) != tuple(shape):
        return f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(shape)}"
    return None


def external_names(key: str, cfg: ModelCfg) -> list[str]:
    """Names of msclip `key` in the official / OpenAI layout (two for a shared trunk tensor)."""
    if key in _FIXED:
        return [_FIXED[key]]
    m = re.fullmatch(r"trunk\.blocks\.(\d+)\.(\w+)\.(shared|image|text)\.(.+)", key)
    if m:
        layer, comp, owner, rest = int(m[1]), m[2], m[3], m[4]
        suffix = _BLOCK_SUFFIX[f"{comp}.{rest}"]
        owners = [o for o in ("image", "text") if cfg.runs(o, layer)] if owner == "shared" else [owner]
        return [_TOWER_PREFIX[o].format(layer) + suffix for o in owners]
    for pattern, template in _CONV_RULES:
        m = re.fullmatch(pattern, key)
        if m:
            return [template.format(*m.groups())]
    raise KeyError(f"no official name for msclip key {key!r}")


def to_official(state_dict: dict[str, torch.Tensor], cfg: ModelCfg) -> dict[str, torch.Tensor]:
    """msclip state_dict -> official layout, shared tensors listed under both names."""
    out = {}
    for key, value in state_dict.items():
        for name in external_names(key, cfg):
            out[name] = value
    return out


def from_official(external: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor], cfg: ModelCfg,
                  source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Official / OpenAI / open_clip state_dict -> msclip state_dict, checked strictly.

    Every msclip key must be present under all its external names with the right shape; aliased
    copies of a shared tensor must agree; nothing may be left over. All problems are reported at once.
    """
    missing, wrong_shape, disagree, out, used = [], [], [], {}, set()
    for key, target in model_state.items():
        names = external_names(key, cfg)
        values = []
        for name in names:
            if name not in external:
                missing.append(name)
                continue
            used.add(name)
            problem = tensor_problem(name, external[name], target.shape)
            if problem:
                wrong_shape.append(problem)
                continue
            values.append(external[name])
        if len(values) == len(names) and values:
            if any(not _same(values[0], v) for v in values[1:]):
                disagree.append(" / ".join(names))
            out[key] = values[0]
    unexpected = sorted(k for k in external if k not in used and k not in _IGNORED_EXTERNAL)
    check_mismatch(source, cfg.name, [("missing keys", missing), ("unexpected keys", unexpected),
                                      ("wrong shapes or types", wrong_shape),
                                      ("aliased copies of a shared tensor disagree", disagree)])
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN equal to NaN (a diverged run's shared tensor is still one tensor)."""
    if torch.equal(a, b):
        return True
    return (a.is_floating_point() and a.shape == b.shape and a.dtype == b.dtype
            and torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))


def looks_official(state: dict) -> bool:
    """True for the official MS-CLIP / OpenAI / open_clip key layout."""
    return "visual.class_embedding" in state or "token_embedding.weight" in state
