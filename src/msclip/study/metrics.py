"""One run's measurements: the evaluations of the study (eval/ and analysis/ functions, one image pass and
one caption pass over the held-out data, reused by every metric) plus parameters, FLOPs and training speed.

Image pass: per held-out image, the pre-projection pooled feature (linear probe), the embedding
(zero-shot, modality gap) and the pooled state of every trunk layer (per-layer NMI), all from one
`forward_intermediates` (the embedding is the last layer's pooled output projected, exactly what
`encode_image` computes). Caption pass: the same for one caption per image of the modality subset.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

import msclip
from msclip.analysis.modality import layerwise_nmi, modality_gap, modality_nmi
from msclip.eval.features import SafeDataset, encode_tokens, extract_image_features
from msclip.eval.in_training import ArrayImages
from msclip.eval.linear_probe import run_probe
from msclip.eval.loading import eval_transform
from msclip.eval.templates import fill_template, resolve_templates
from msclip.eval.zeroshot import build_classifier, zeroshot_logits, zeroshot_metrics
from msclip.loss import ClipLoss
from msclip.train.logger import read_metrics

from .spec import EvalSpec

log = logging.getLogger(__name__)
EVAL_FILE = "study-eval.json"  # written into the run folder next to the trainer's files
FINAL_LOSS_RECORDS = 5  # the final loss is the mean of the last logged training losses


@dataclass
class LabelledSet:
    train: Dataset  # (PIL image, label) for the probe fit
    test: Dataset  # held-out (PIL image, label)
    classnames: list[str]
    templates: tuple[str, ...]  # zero-shot prompts
    captions: Callable[[int, int], str]  # (held-out index, label) -> one caption for the modality statistics


class _SyntheticImages(Dataset):
    """The trainer's synthetic colour fields as (PIL image, colour index); held out by a different seed."""

    def __init__(self, n: int, seed: int) -> None:
        from msclip.data.mapstyle import SyntheticCaptions

        self.data = SyntheticCaptions(n, transform=lambda im: im, seed=seed)
        self.colors = list(self.data.colors)

    def __len__(self) -> int:
        return len(self.data)

    def caption(self, i: int) -> str:
        return self.data[i][1]

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        image, caption, _ = self.data[i]
        return image, next(k for k, c in enumerate(self.colors) if f" {c} " in caption)


def _spread(n_total: int, n: int) -> np.ndarray:
    """Evenly spaced indices: every class stays represented whatever the split's order."""
    return np.linspace(0, n_total - 1, min(n, n_total)).round().astype(int)


def labelled_set(spec: EvalSpec, fashion_mnist_root: str | None = None) -> LabelledSet:
    if spec.data == "synthetic":
        train, test = _SyntheticImages(spec.probe_train_samples, 1), _SyntheticImages(spec.test_samples, 2)
        templates = resolve_templates(spec.templates or ["a photo of a {} square.", "a photo of a {} circle.",
                                                         "a photo of a {} triangle.", "a photo of a {} star."],
                                      "generic").templates
        return LabelledSet(train, test, test.colors, templates, lambda i, label: test.caption(i))
    from msclip.data.fashion_mnist import (DEFAULT_CAPTION_TEMPLATES, FASHION_MNIST_CAPTION_NAMES,
                                           load_fashion_mnist)

    root = spec.fashion_mnist_root or fashion_mnist_root
    sets = {}
    for split, n in (("train", spec.probe_train_samples), ("test", spec.test_samples)):
        images, labels = load_fashion_mnist(split, root)
        keep = _spread(len(labels), n)
        sets[split] = ArrayImages(np.asarray(images)[keep], np.asarray(labels)[keep])
    names = list(FASHION_MNIST_CAPTION_NAMES)
    templates = resolve_templates(spec.templates, "fashion_mnist").templates
    caps = DEFAULT_CAPTION_TEMPLATES  # the training captions' templates, cycled over the held-out images

    def caption(i: int, label: int) -> str:
        return fill_template(caps[i % len(caps)], names[label])

    return LabelledSet(sets["train"], sets["test"], names, templates, caption)


class _Pass:
    """`encode_image` / `encode_text` returning [embedding | pre-projection | pooled state of each layer], so that
    eval/features.py's loops carry everything from one forward per batch."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.layers: dict[str, list[int]] = {"image": [], "text": []}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        out = m.forward_intermediates(images=images)
        self.layers["image"] = list(out["image_layers"])
        pre = m.image.pool(out["image_hidden"][-1])
        return torch.cat([pre @ m.image.proj, pre, *out["image_pooled"]], 1).float()

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        m = self.model
        out = m.forward_intermediates(tokens=tokens)
        self.layers["text"] = list(out["text_layers"])
        emb = m.text.ln_final(out["text_pooled"][-1]) @ m.text.proj
        return torch.cat([emb, *out["text_pooled"]], 1).float()


def flops_per_pair(model: Any, tokenizer: Callable, caption: str) -> float:
    """Training FLOPs of one (image, caption) pair: forward, the loss and backward of a batch of 2, halved
    (torch's FlopCounterMode: matrix products and convolutions, 2 FLOPs per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = model.cfg.vision.image_size
    images, tokens = torch.randn(2, 3, size, size), tokenizer([caption, caption])
    was = model.training
    model.train()
    try:
        with FlopCounterMode(display=False) as counter:
            out = model(images, tokens)
            ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)
    return counter.get_total_flops() / 2


def parameter_summary(model: Any) -> dict[str, Any]:
    counts = model.parameter_counts()
    trunk = {"shared": 0, "specific": 0}
    for name, group in model.param_modality().items():
        if name.startswith("trunk."):
            trunk["shared" if group == "shared" else "specific"] += dict(model.named_parameters())[name].numel()
    trunk_total = trunk["shared"] + trunk["specific"]
    return {"shared": counts["shared"], "image_only": counts["image"], "text_only": counts["text"],
            "other": counts["other"], "total": counts["total"],
            "fraction_shared": counts["shared"] / counts["total"],
            "trunk_fraction_shared": trunk["shared"] / trunk_total if trunk_total else 0.0}


def training_summary(run_dir: Path) -> dict[str, Any]:
    """Loss curve, final loss and samples/s from the run's metrics.jsonl (every invocation, resumes included)."""
    train = read_metrics(run_dir, "train")
    summaries = [r for r in read_metrics(run_dir, "summary")]
    curve = [(int(r["step"]), float(r["loss"])) for r in train if "loss" in r]
    tail = [loss for _, loss in curve[-FINAL_LOSS_RECORDS:]]
    last = summaries[-1] if summaries else {}
    wall = sum(float(s.get("wall_s", 0.0)) for s in summaries)  # each invocation's own wall time
    samples = float(last.get("samples", 0))
    return {"loss_curve": curve, "final_loss": sum(tail) / len(tail) if tail else float("nan"),
            "steps": int(last.get("steps_total", 0)), "train_wall_s": wall,
            "samples_per_s": samples / wall if wall > 0 else float("nan"), "invocations": len(summaries)}


def evaluate_run(run_dir: str | Path, model_name: str, spec: EvalSpec, device: torch.device | str = "cpu",
                 fashion_mnist_root: str | None = None, data: LabelledSet | None = None) -> dict[str, Any]:
    """Every measurement of one finished run (its exported weights); the dict written as study-eval.json."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    device = torch.device(device)
    model = msclip.create_model(model_name, pretrained=str(run_dir / "model.safetensors"), device=device).eval()
    tokenizer = msclip.get_tokenizer(model_name)
    data = data or labelled_set(spec, fashion_mnist_root)
    result: dict[str, Any] = {"model": model_name, "run_dir": str(run_dir), "params": parameter_summary(model),
                              "train": training_summary(run_dir)}
    result["flops_per_pair"] = flops_per_pair(model, tokenizer, data.captions(0, int(data.test[0][1])))
    run = _Pass(model)
    tf = eval_transform(model)
    e_dim, width = model.cfg.embed_dim, model.cfg.vision.width
    test = extract_image_features(run.encode_image, SafeDataset(data.test, tf), device, batch_size=spec.batch_size,
                                  progress=False, desc="held-out images")
    emb, pre, pooled = test["features"][:, :e_dim], test["features"][:, e_dim:e_dim + width], \
        test["features"][:, e_dim + width:]
    labels = test["labels"]
    if spec.zeroshot:
        W = build_classifier(model, tokenizer, data.classnames, data.templates, device)
        zs = zeroshot_metrics(zeroshot_logits(F.normalize(emb, dim=-1), W.cpu()), labels, len(data.classnames))
        result["zeroshot"] = {k: zs[k] for k in ("top1_pct", "top5_pct", "mean_per_class_recall_pct", "images")}
    if spec.linear_probe:
        fit = extract_image_features(lambda x: run.encode_image(x)[:, e_dim:e_dim + width],
                                     SafeDataset(data.train, tf), device, batch_size=spec.batch_size,
                                     progress=False, desc="probe train images")
        probe = run_probe((fit["features"], fit["labels"]), (pre, labels), "accuracy", protocol="clip",
                          max_iter=spec.probe_max_iter)
        result["linear_probe"] = {"top1_pct": 100.0 * probe["score"], "C": probe["hparam"]["C"],
                                  "n_train": probe["n_train"], "n_val": probe["n_val"], "n_test": probe["n_test"]}
    if spec.modality:
        result["modality"] = _modality(model, tokenizer, run, data, emb, pooled, labels, spec, device)
    if spec.retrieval:
        from msclip.eval.retrieval import evaluate_retrieval, read_annotations

        ret = evaluate_retrieval(model, read_annotations(spec.retrieval, spec.retrieval_images), device,
                                 batch_size=spec.batch_size, progress=False)
        result["retrieval"] = {k: v for k, v in ret["metrics"].items() if "R@" in k}
    result["skipped_images"] = test["skipped"]
    result["eval_s"] = time.perf_counter() - t0
    return result


def _modality(model: Any, tokenizer: Callable, run: _Pass, data: LabelledSet, emb: torch.Tensor,
              pooled: torch.Tensor, labels: torch.Tensor, spec: EvalSpec, device: torch.device) -> dict[str, Any]:
    n = min(spec.modality_samples, len(labels))
    captions = [data.captions(i, int(labels[i])) for i in range(n)]
    rows = encode_tokens(run, tokenizer(captions), device, batch_size=spec.batch_size).cpu()
    e_dim = model.cfg.embed_dim
    t_emb, t_pooled = rows[:, :e_dim], rows[:, e_dim:]
    img_layers, txt_layers = run.layers["image"], run.layers["text"]
    ip = pooled[:n].reshape(n, len(img_layers), -1).transpose(0, 1)
    tp = t_pooled.reshape(n, len(txt_layers), -1).transpose(0, 1)
    layers = layerwise_nmi(list(ip), list(tp), img_layers, txt_layers)
    return {"gap": modality_gap(emb[:n], t_emb), "embedding_nmi": modality_nmi(emb[:n], t_emb),
            "layers": layers, "samples": n}
