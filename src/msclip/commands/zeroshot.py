"""``msclip zeroshot``: zero-shot classification of a labelled image folder, the official MS-CLIP way.

Every input is checked before any work starts (data folder, class names, templates, checkpoint,
config/checkpoint fit); then class embeddings are built, images scored, and a JSON report written
atomically, with a short table on stdout.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
import torch

from msclip.commands._common import (  # noqa: F401  (re-exported for tools/eval_zeroshot.py)
    UsageError, add_model_arguments, eval_transform, load_model, model_report, pick_device, progress_flag,
    resolve_checkpoint)

NAME = "zeroshot"
HELP = "zero-shot classification of an image folder (official MS-CLIP procedure), JSON report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, metavar="ROOT", help="folder of class sub-folders of images")
    parser.add_argument("--classnames", default=None, metavar="FILE",
                        help="one name per line (sorted-folder order) or JSON {folder: name}; default: ImageNet "
                             "names for a 1000-wnid folder, else the folder names")
    parser.add_argument("--templates", default="imagenet80", metavar="imagenet80|simple|FILE",
                        help="prompt templates with a {} placeholder (default: the 80 OpenAI ImageNet templates)")
    parser.add_argument("--text-batch-size", type=int, default=256, help="prompts per text forward")
    parser.add_argument("--output", default=None, metavar="result.json", help="write the JSON report here")


@dataclass
class Plan:
    index: object
    classnames: list[str]
    names_source: str
    templates: object
    device: torch.device
    checkpoint: str | None


def prepare(args: argparse.Namespace) -> Plan:
    from msclip.eval.imagefolder import resolve_classnames, scan_image_folder
    from msclip.eval.templates import load_templates

    for flag in ("batch_size", "text_batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.workers < 0:
        raise UsageError("--workers must be >= 0")
    if args.output is not None and os.path.isdir(args.output):
        raise UsageError(f"--output {args.output!r} is a folder; give a file name such as result.json")
    device = pick_device(args.device)
    checkpoint = resolve_checkpoint(args.model, args.pretrained)
    index = scan_image_folder(args.data)
    names, source = resolve_classnames(index.classes, args.classnames)
    templates = load_templates(args.templates)
    return Plan(index, names, source, templates, device, checkpoint)


def run(args: argparse.Namespace) -> int:
    from msclip.eval.imagefolder import DataError
    from msclip.eval.templates import TemplateError

    try:
        plan = prepare(args)
        model = load_model(args.model, plan.checkpoint, plan.device, args.precision)
    except (UsageError, DataError, TemplateError) as e:
        print(f"msclip zeroshot: error: {e}", file=sys.stderr)
        return 2
    report = evaluate(args, plan, model)
    if args.output:
        from msclip.eval.zeroshot import write_json_atomic

        write_json_atomic(report, args.output)
    print(format_table(report))
    if args.output:
        print(f"report: {args.output}")
    return 0


def evaluate(args: argparse.Namespace, plan: Plan, model) -> dict:
    import msclip
    from msclip.eval.imagefolder import SafeImageDataset, make_loader
    from msclip.eval.zeroshot import build_classifier, evaluate_loader

    progress = progress_flag(args)
    t0 = time.perf_counter()
    tokenizer = msclip.get_tokenizer(model.cfg)
    classifier = build_classifier(model, tokenizer, plan.classnames, plan.templates.templates, plan.device,
                                  text_batch_size=args.text_batch_size, workers=args.workers, progress=progress)
    t_cls = time.perf_counter() - t0
    dataset = SafeImageDataset.from_index(plan.index, eval_transform(model))
    loader = make_loader(dataset, args.batch_size, args.workers, pin_memory=plan.device.type == "cuda")
    out = evaluate_loader(model, classifier, loader, plan.device, len(plan.classnames), dataset.paths, progress)
    total = time.perf_counter() - t0
    metrics = out["metrics"].compute(plan.index.classes, plan.classnames)
    n_ok = metrics["images_scored"]
    report = {"task": "zeroshot", **model_report(args.model, model, plan.checkpoint, plan.device, args.precision)}
    report.update({
        "data": {"root": plan.index.root, "classes": len(plan.classnames), "class_names_source": plan.names_source},
        "templates": plan.templates.describe(),
        "procedure": "per-template L2-normalised text embeddings, mean per class, renormalised; logits = 100 * "
                     "normalised image features @ W",
        "preprocess": {"image_size": model.cfg.vision.image_size, **asdict(model.cfg.preprocess)},
        "images": len(dataset), "images_scored": n_ok,
        "skipped_count": len(out["skipped"]), "skipped": out["skipped"],
        "top1": metrics["top1"], "top5": metrics["top5"], "top5_k": metrics["top5_k"],
        "mean_per_class_recall": metrics["mean_per_class_recall"],
        "per_class": metrics["per_class"],
        "timing": {"class_embedding_seconds": t_cls, "image_seconds": out["seconds"], "total_seconds": total,
                   "images_per_second": n_ok / total if total > 0 else None,
                   "images_per_second_excluding_class_embedding": out["images_per_second"],
                   "batch_size": args.batch_size, "workers": args.workers},
    })
    return report


def _pct(x: float | None) -> str:
    return "   n/a" if x is None else f"{x:6.2f}"


def format_table(report: dict, max_classes: int = 20) -> str:
    ck = report["checkpoint"]
    tm = report["timing"]
    lines = [
        f"msclip zero-shot | model {report['model']['spec']} | checkpoint "
        f"{ck['path'] if ck else 'NONE (random weights)'} | {report['device']} {report['precision']}",
        f"data {report['data']['root']}: {report['data']['classes']} classes "
        f"(names: {report['data']['class_names_source']}), templates {report['templates']['name']} "
        f"({report['templates']['count']})",
        f"images {report['images_scored']} scored, {report['skipped_count']} skipped",
        f"top-1 {_pct(report['top1'])}   top-{report['top5_k']} {_pct(report['top5'])}   "
        f"mean per-class recall {_pct(report['mean_per_class_recall'])}",
        f"throughput {tm['images_per_second'] or 0:.1f} img/s end to end "
        f"(class embeddings {tm['class_embedding_seconds']:.1f} s, images {tm['image_seconds']:.1f} s)",
    ]
    per = report["per_class"]
    if len(per) <= max_classes:
        lines.append(f"{'class':<32} {'images':>7} {'top-1':>7}")
        lines += [f"{(c.get('name') or c.get('folder'))[:32]:<32} {c['images']:>7} {_pct(c['accuracy']):>7}"
                  for c in per]
    for s in report["skipped"][:5]:
        lines.append(f"skipped {s['path']}: {s['error']}")
    if report["skipped_count"] > 5:
        lines.append(f"... {report['skipped_count'] - 5} more skipped images listed in the report")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "msclip zeroshot") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    from msclip.cli import run_command

    raise SystemExit(run_command("zeroshot"))
