"""`msclip analyze`'s work: how a checkpoint mixes the modalities, from one pass over the images and captions.

Each image batch goes through `forward_intermediates` once (pooled hidden state of every trunk layer, and
the attention maps for the first batch, from which the drawn images are taken) and through `encode_image`
once (the final embedding); captions likewise. Writes into the output folder:
* ``pooled_hidden.pt``: per trunk layer, the pooled states (image class token, caption end token);
* ``analysis.json``: modality gap of the final embeddings and, per layer, the NMI between a 2-way k-means
  of the pooled states and the modality labels (low = mixed) plus the layer's centroid gap;
* ``attention/*.png``: class-token attention per head over the image grid and token-to-token attention
  of the drawn captions; ``nmi.png``, ``gap.png``; ``report.md`` that shows them all.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from msclip import io as mio
from msclip.errors import MissingFileError, MsclipError
from msclip.eval.features import SafeDataset, encode_tokens, extract_image_features, progress_bar
from msclip.eval.imagefolder import scan_images
from msclip.eval.loading import eval_transform
from msclip.eval.retrieval import ImageSource
from msclip.open_clip_files import open_clip_module

from .attention_maps import denormalize, save_image_attention, save_text_attention
from .modality import layerwise_nmi, modality_gap, modality_nmi
from .plots import save_layer_plot

log = logging.getLogger(__name__)
# A 2-way k-means and its NMI against the modality labels need enough points of each modality to say more
# than chance: below 10 images or 10 captions the statistics are refused.
MIN_SAMPLES_PER_MODALITY = 10


class TooFewSamples(MsclipError):
    """Fewer usable images or captions than the statistics need; the message gives both counts."""


class AnalysisInputError(MsclipError):
    """An analysis option the model or the data cannot satisfy (a layer or head it lacks, a negative count)."""


@dataclass
class AnalysisInputs:
    paths: list[str]
    texts: list[str]
    blank_lines: list[int] = field(default_factory=list)  # 1-based line numbers of blank captions (dropped)


def read_inputs(images: str, texts: str, max_samples: int | None = None) -> AnalysisInputs:
    """Image paths (a folder, searched recursively, or a file listing paths) and captions (one per line)."""
    if max_samples is not None and max_samples < 1:
        raise AnalysisInputError(f"max_samples must be >= 1, got {max_samples}")
    p = Path(images)
    if p.is_dir():
        paths = scan_images(p)
    elif p.is_file():
        listed = mio.read_user_text(p, "--images", AnalysisInputError).splitlines()
        paths = [str(p.parent / ln.strip()) for ln in listed if ln.strip()]
    else:
        raise MissingFileError(f"--images {images!r} does not exist")
    lines = mio.read_user_text(texts, "--texts", AnalysisInputError).splitlines()
    blank = [i + 1 for i, ln in enumerate(lines) if not ln.strip()]
    kept = [ln.strip() for ln in lines if ln.strip()]
    inputs = AnalysisInputs(paths[:max_samples], kept[:max_samples], blank)
    check_counts(len(inputs.paths), len(inputs.texts), "given")
    return inputs


def check_attention_choice(model: Any, layers: Sequence[int], heads: Sequence[int] | None, samples: int) -> None:
    """Layers and heads the model has, and a sample count >= 0, checked before the pass over the images."""
    n_trunk, n_heads = len(model.trunk.blocks), min(model.cfg.vision.heads, model.cfg.text.heads)
    problems = [f"attention layer {la} is not in the trunk's layers 0..{n_trunk - 1}" for la in layers
                if not 0 <= la < n_trunk]
    problems += [f"attention head {h} is not in the model's heads 0..{n_heads - 1}" for h in heads or ()
                 if not 0 <= h < n_heads]
    if samples < 0:
        problems.append(f"attention samples must be >= 0, got {samples}")
    if problems:
        raise AnalysisInputError("; ".join(problems))


def check_counts(n_images: int, n_texts: int, what: str) -> None:
    need = MIN_SAMPLES_PER_MODALITY
    if n_images < need or n_texts < need:
        raise TooFewSamples(f"the modality statistics need at least {need} images and {need} captions; "
                            f"{what}: {n_images} images and {n_texts} captions")


def _token_strings(ids: list[int]) -> list[str]:
    try:  # readable labels when open_clip's BPE decoder is installed; ids otherwise
        dec = open_clip_module("tokenizer").SimpleTokenizer().decoder
        return [dec.get(i, str(i)).replace("</w>", "") for i in ids]
    except ImportError:
        return [str(i) for i in ids]


class _Pass:
    """One pass per batch: `encode_image`/`encode_text` return [final embedding | pooled state of each layer]
    so that the shared feature loops of eval/features.py carry both; the first image batch's attention is kept."""

    def __init__(self, model: Any, attn_layers: Sequence[int]):
        self.model, self.attn_layers = model, tuple(attn_layers)
        self.layers: dict[str, list[int]] = {"image": [], "text": []}
        self.first_images: torch.Tensor | None = None
        self.first_attn: dict = {}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        want_attn = self.first_images is None
        out = self.model.forward_intermediates(images=images, attn_layers=self.attn_layers if want_attn else ())
        if want_attn:
            self.first_images, self.first_attn = images.cpu(), {k: v.cpu() for k, v in out["image_attn"].items()}
        self.layers["image"] = list(out["image_layers"])
        return torch.cat([self.model.encode_image(images).float(), *[h.float() for h in out["image_pooled"]]], 1)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        out = self.model.forward_intermediates(tokens=tokens)
        self.layers["text"] = list(out["text_layers"])
        return torch.cat([self.model.encode_text(tokens).float(), *[h.float() for h in out["text_pooled"]]], 1)


def _split(rows: torch.Tensor, embed_dim: int, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, E + L*D] -> (embeddings [N, E], pooled [L, N, D])."""
    emb, pooled = rows[:, :embed_dim], rows[:, embed_dim:]
    return emb, pooled.reshape(rows.shape[0], n_layers, -1).transpose(0, 1).contiguous()


def analyze(model: Any, tokenizer: Any, inputs: AnalysisInputs, out_dir: str | Path, device: torch.device, *,
            attn_layers: Sequence[int] | None = None, attn_heads: Sequence[int] | None = None, attn_samples: int = 2,
            normalize_pooled: bool = True, seed: int = 0, batch_size: int = 64, workers: int = 0,
            progress: bool | None = None) -> dict:
    """Run the analysis and write its files; returns the report (also written as analysis.json)."""
    out_dir = Path(out_dir)
    n_trunk = len(model.trunk.blocks)
    attn_layers = sorted(set(attn_layers if attn_layers is not None else [0, n_trunk // 2, n_trunk - 1]))
    check_attention_choice(model, attn_layers, attn_heads, attn_samples)
    run = _Pass(model, attn_layers)
    feats = extract_image_features(run.encode_image, SafeDataset(ImageSource(inputs.paths), eval_transform(model)),
                                   device, batch_size=batch_size, workers=workers, progress=progress, desc="images",
                                   allow_empty=True)
    skipped = [{"path": inputs.paths[i], "error": err} for i, err in feats["failures"]]
    check_counts(int(feats["indices"].numel()), len(inputs.texts), "readable")
    tokens = tokenizer(inputs.texts)
    with progress_bar(len(inputs.texts), "captions", "text", progress) as bar:
        text_rows = encode_tokens(run, tokens, device, batch_size=batch_size, bar=bar).cpu()
    ie, ip = _split(feats["features"], model.cfg.embed_dim, len(run.layers["image"]))
    te, tp = _split(text_rows, model.cfg.embed_dim, len(run.layers["text"]))

    pngs = _draw_images(run, feats["indices"], inputs.paths, model, out_dir, attn_heads, attn_samples)
    pngs += _draw_texts(model, tokens[:attn_samples], inputs.texts, attn_layers, out_dir, attn_heads, device)
    notes = [f"{name}s do not pass trunk layer(s) {absent}; no {name} attention drawn there"
             for name in ("image", "text")
             if (absent := [la for la in attn_layers if la not in run.layers[name]])]  # MS-CLIP-S: images skip 0

    layers = layerwise_nmi(list(ip), list(tp), run.layers["image"], run.layers["text"], normalize=normalize_pooled,
                           seed=seed)
    kept = [inputs.paths[i] for i in feats["indices"].tolist()]
    mio.torch_save({"image_pooled": ip, "text_pooled": tp, "image_layers": run.layers["image"],
                    "text_layers": run.layers["text"], "image_embeddings": ie, "text_embeddings": te,
                    "image_paths": kept, "texts": inputs.texts}, out_dir / "pooled_hidden.pt")
    plots = [save_layer_plot(layers, "nmi", "NMI of a 2-way k-means vs modality", out_dir / "nmi.png"),
             save_layer_plot(layers, "gap", "centroid gap of the pooled states", out_dir / "gap.png")]
    report = {"images": int(ie.shape[0]), "texts": len(inputs.texts), "skipped_images": len(skipped),
              "skipped": skipped, "blank_caption_lines": inputs.blank_lines,
              "minimum_samples_per_modality": MIN_SAMPLES_PER_MODALITY,
              "modality_gap": modality_gap(ie, te), "embedding_nmi": modality_nmi(ie, te, normalize=True, seed=seed),
              "pooled_normalised_before_clustering": normalize_pooled, "layers": layers,
              "attention_layers": attn_layers, "attention_pngs": pngs, "plots": [str(p) for p in plots],
              "notes": notes}
    return report


def _draw_images(run: _Pass, indices: torch.Tensor, paths: list[str], model: Any, out_dir: Path,
                 heads: Sequence[int] | None, samples: int) -> list[str]:
    if run.first_images is None:
        return []
    pngs = []
    for j in range(min(samples, len(run.first_images))):
        pic = denormalize(run.first_images[j], model.cfg.preprocess.mean, model.cfg.preprocess.std)
        name = Path(paths[int(indices[j])]).name
        for layer, a in run.first_attn.items():
            pngs.append(str(save_image_attention(a[j], out_dir / "attention" / f"image{j:03d}_layer{layer:02d}.png",
                                                 heads, pic, title=f"{name} | layer {layer} | class-token attention")))
    return pngs


def _draw_texts(model: Any, tokens: torch.Tensor, texts: list[str], attn_layers: Sequence[int], out_dir: Path,
                heads: Sequence[int] | None, device: torch.device) -> list[str]:
    if len(tokens) == 0:
        return []
    with torch.inference_mode():  # the attention maps of the few drawn captions only ([k, H, L, L] per layer)
        att = model.forward_intermediates(tokens=tokens.to(device), attn_layers=tuple(attn_layers))["text_attn"]
    pngs = []
    for j in range(len(tokens)):
        n = int(tokens[j].argmax()) + 1  # up to and including the end token
        labels = _token_strings(tokens[j, :n].tolist())
        for layer, a in att.items():
            pngs.append(str(save_text_attention(a[j].cpu(), labels,
                                                out_dir / "attention" / f"text{j:03d}_layer{layer:02d}.png", heads,
                                                title=f"{texts[j][:60]!r} | layer {layer}")))
    return pngs


def report_markdown(report: dict, out_dir: str | Path) -> str:
    """report.md: the numbers, the plots and the attention maps (paths relative to the output folder)."""
    out_dir = Path(out_dir)

    def rel(p: str) -> str:
        return Path(p).relative_to(out_dir).as_posix() if Path(p).is_relative_to(out_dir) else p

    ck = report.get("checkpoint") or {}
    lines = ["# msclip analyze", "",
             f"Model `{report['model']['spec']}`, checkpoint `{ck.get('path', 'none: random weights')}`; "
             f"{report['images']} images ({report['skipped_images']} unreadable skipped), {report['texts']} captions "
             f"({len(report['blank_caption_lines'])} blank lines dropped).", "",
             f"- modality gap of the final embeddings (distance of the normalised centroids): "
             f"**{report['modality_gap']:.4f}**",
             f"- NMI of a 2-way k-means of the final embeddings vs modality: **{report['embedding_nmi']:.3f}** "
             "(1 = the modalities are separable, 0 = mixed)", "",
             "| trunk layer | NMI | centroid gap |", "|---:|---:|---:|",
             *[f"| {r['layer']} | {r['nmi']:.3f} | {r['gap']:.4f} |" for r in report["layers"]], "",
             *[f"![{Path(p).stem}]({rel(p)})" for p in report["plots"]], "",
             "## Attention maps", "", *[f"![{Path(p).stem}]({rel(p)})" for p in report["attention_pngs"]]]
    if report["notes"]:
        lines += ["", *[f"Note: {n}." for n in report["notes"]]]
    if report["skipped"]:
        lines += ["", "## Skipped images", "", *[f"- `{s['path']}`: {s['error']}" for s in report["skipped"]]]
    return "\n".join(lines) + "\n"
