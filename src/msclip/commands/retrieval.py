"""``msclip retrieval``: image<->text recall@1/5/10 (CLIP-paper definition) on a captioned image set.

Annotations: Karpathy-split JSON (COCO, Flickr30k/8k; with --images ROOT), a CSV/TSV of (image, caption)
rows, or WebDataset shards (a folder of .tar files or one .tar; captions in .txt, one per line, or .json).
Images that cannot be read are skipped and counted; their captions are dropped with them.
"""
from __future__ import annotations

import argparse
import time

from msclip.commands._common import add_model_arguments, check_sizes, pick_device, progress_flag, run_main

NAME = "retrieval"
HELP = "image-text retrieval recall@k (Karpathy JSON, CSV or WebDataset captions)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--annotations", required=True, metavar="FILE|DIR",
                        help="Karpathy .json, .csv/.tsv of image,caption rows, or WebDataset shard(s)")
    parser.add_argument("--images", default=None, metavar="ROOT",
                        help="image root for relative paths (default for CSV: the CSV's folder)")
    parser.add_argument("--split", default="test", help="Karpathy split to evaluate (test, val, train, all)")
    parser.add_argument("--csv-image-key", default=None, help="CSV image column (default: image/filepath/...)")
    parser.add_argument("--csv-caption-key", default=None, help="CSV caption column (default: caption/text/...)")
    parser.add_argument("--text-batch-size", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=1024, help="queries per similarity chunk (memory bound)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for the encoders")
    parser.add_argument("--output", default=None, metavar="FILE.json")
    parser.add_argument("--html", default=None, metavar="FILE.html",
                        help="gallery of the worst and best text->image queries (own image marked)")
    parser.add_argument("--html-queries", type=int, default=5, metavar="N", help="worst and best queries shown (5)")
    parser.add_argument("--html-k", type=int, default=5, metavar="K", help="images per gallery row (5)")


def run(args: argparse.Namespace) -> int:
    from msclip import io as mio
    from msclip.eval.features import bf16_autocast
    from msclip.eval.loading import load_model, model_report, resolve_checkpoint
    from msclip.eval.retrieval import evaluate_retrieval, read_annotations

    check_sizes(args, "text_batch_size", "chunk", "html_queries", "html_k")
    data = read_annotations(args.annotations, args.images, args.split, args.csv_image_key, args.csv_caption_key)
    device = pick_device(args.device)
    checkpoint = resolve_checkpoint(args.model, args.pretrained)
    model = load_model(args.model, checkpoint, device, args.precision)
    t0 = time.perf_counter()
    kept: list = []
    result = evaluate_retrieval(model, data, device, batch_size=args.batch_size, text_batch_size=args.text_batch_size,
                                workers=args.workers, autocast=bf16_autocast(device) if args.amp else None,
                                progress=progress_flag(args), chunk=args.chunk,
                                on_features=kept.append if args.html else None)
    report = {"task": "retrieval", **model_report(args.model, model, checkpoint, device, args.precision),
              "annotations": args.annotations, "format": data.format, "split": args.split, **result,
              "seconds": time.perf_counter() - t0}
    if args.output:
        mio.write_json(args.output, report)
    print(format_table(report))
    if args.html:
        _write_gallery(args, kept[0], report)
    return 0


def _write_gallery(args: argparse.Namespace, feats, report: dict) -> None:
    import os

    from msclip import io as mio
    from msclip.eval.suite_datasets import open_image
    from msclip.index.gallery import render_gallery, retrieval_rows

    def name(src) -> str:
        return os.path.basename(src) if isinstance(src, str) else f"{os.path.basename(src.shard)}@{src.offset}"

    rows = retrieval_rows(feats.image_emb, feats.text_emb, feats.caption_image, feats.captions,
                          [name(s) for s in feats.images], lambda i: open_image(feats.images[i]),
                          worst=args.html_queries, best=args.html_queries, k=args.html_k, chunk=args.chunk)
    m = report["metrics"]
    mio.write_text(args.html, render_gallery(
        rows, f"msclip retrieval: {args.annotations}",
        f"{report['images']} images, {report['captions']} captions; model {report['model']['name']}; text->image "
        f"R@1 {m['text_to_image_R@1_pct']:.1f} %; the {args.html_queries} worst and best captions, own image "
        "framed green; cosine similarity under each image"))
    print(f"gallery: {args.html} ({len(rows)} rows)")


def format_table(report: dict) -> str:
    m = report["metrics"]
    lines = [f"retrieval on {report['annotations']} ({report['format']}): {report['images']} images, "
             f"{report['captions']} captions, {report['skipped_images']} unreadable images skipped",
             "| direction | R@1 % | R@5 % | R@10 % | mean rank |", "|---|---:|---:|---:|---:|"]
    for d, label in (("image_to_text", "image→text"), ("text_to_image", "text→image")):
        lines.append(f"| {label} | {m[f'{d}_R@1_pct']:.2f} | {m[f'{d}_R@5_pct']:.2f} | {m[f'{d}_R@10_pct']:.2f} "
                     f"| {m[f'{d}_mean_rank']:.1f} |")
    for e in report["skipped_examples"][:5]:
        lines.append(f"skipped image {e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_main(NAME, argv)


if __name__ == "__main__":
    from msclip.cli import run_command

    raise SystemExit(run_command("retrieval"))
