"""Zero-shot classification of a labelled image folder with a full JSON report: what `msclip zeroshot` and
tools/eval_zeroshot.py run. Every input is checked before any work starts (folder, class names, templates);
the scoring is eval/zeroshot.evaluate_zeroshot. Scores are percent, the unit in each key (`top1_pct`)."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from .imagefolder import FolderIndex, folder_dataset, resolve_classnames, scan_image_folder
from .loading import eval_transform, model_report
from .templates import TemplateSet, load_templates
from .zeroshot import PROCEDURE, evaluate_zeroshot


@dataclass
class FolderPlan:
    index: FolderIndex
    classnames: list[str]
    names_source: str
    templates: TemplateSet


def plan_folder(data: str, classnames: str | None = None, templates: str = "imagenet80") -> FolderPlan:
    """Scan the folder and resolve class names and templates (raises DataError / TemplateError)."""
    index = scan_image_folder(data)
    names, source = resolve_classnames(index.classes, classnames)
    return FolderPlan(index, names, source, load_templates(templates))


def folder_report(model: Any, tokenizer: Callable, plan: FolderPlan, device: torch.device, *, model_spec: str,
                  checkpoint: str | None, precision: str, batch_size: int = 64, text_batch_size: int = 256,
                  workers: int = 0, progress: bool | None = False) -> dict:
    t0 = time.perf_counter()
    dataset = folder_dataset(plan.index, eval_transform(model))
    res = evaluate_zeroshot(model, tokenizer, dataset, plan.classnames, plan.templates.templates, device,
                            batch_size=batch_size, text_batch_size=text_batch_size, workers=workers,
                            progress=progress)
    total = time.perf_counter() - t0
    per_class = [{**c, "folder": plan.index.classes[c["index"]], "name": plan.classnames[c["index"]]}
                 for c in res["per_class"]]
    skipped = [{"path": plan.index.samples[i][0], "error": err} for i, err in res["failures"]]
    n_ok = res["images"]
    report = {"task": "zeroshot", **model_report(model_spec, model, checkpoint, device, precision)}
    report.update({
        "data": {"root": plan.index.root, "classes": len(plan.classnames), "class_names_source": plan.names_source},
        "templates": plan.templates.describe(),
        "procedure": PROCEDURE,
        "preprocess": {"image_size": model.cfg.vision.image_size, **asdict(model.cfg.preprocess)},
        "images": len(dataset), "images_scored": n_ok, "skipped_count": len(skipped), "skipped": skipped,
        "top1_pct": res["top1_pct"], "top5_pct": res["top5_pct"], "top5_k": res["top5_k"],
        "mean_per_class_recall_pct": res["mean_per_class_recall_pct"],
        "per_class": per_class,
        "timing": {"class_embedding_seconds": res["class_embedding_seconds"], "image_seconds": res["seconds"],
                   "total_seconds": total, "images_per_second": n_ok / total if total > 0 else None,
                   "images_per_second_excluding_class_embedding": n_ok / res["seconds"] if res["seconds"] else None,
                   "batch_size": batch_size, "workers": workers},
    })
    return report


def _pct(x: float | None) -> str:
    return "   n/a" if x is None else f"{x:6.2f}"


def format_report(report: dict, max_classes: int = 20) -> str:
    """The console table of a folder_report (percent)."""
    ck = report["checkpoint"]
    tm = report["timing"]
    lines = [
        f"msclip zero-shot | model {report['model']['spec']} | checkpoint "
        f"{ck['path'] if ck else 'NONE (random weights)'} | {report['device']} {report['precision']}",
        f"data {report['data']['root']}: {report['data']['classes']} classes "
        f"(names: {report['data']['class_names_source']}), templates {report['templates']['name']} "
        f"({report['templates']['count']})",
        f"images {report['images_scored']} scored, {report['skipped_count']} skipped",
        f"top-1 {_pct(report['top1_pct'])} %   "
        + (f"top-{report['top5_k']} {_pct(report['top5_pct'])} %   " if report["top5_k"] > 1 else "")
        + f"mean per-class recall {_pct(report['mean_per_class_recall_pct'])} %",
        f"throughput {tm['images_per_second'] or 0:.1f} img/s end to end "
        f"(class embeddings {tm['class_embedding_seconds']:.1f} s, images {tm['image_seconds']:.1f} s)",
    ]
    per = report["per_class"]
    if len(per) <= max_classes:
        lines.append(f"{'class':<32} {'images':>7} {'top-1 %':>7}")
        lines += [f"{(c.get('name') or c.get('folder'))[:32]:<32} {c['images']:>7} {_pct(c['recall_pct']):>7}"
                  for c in per]
    for s in report["skipped"][:5]:
        lines.append(f"skipped {s['path']}: {s['error']}")
    if report["skipped_count"] > 5:
        lines.append(f"... {report['skipped_count'] - 5} more skipped images listed in the report")
    return "\n".join(lines)
