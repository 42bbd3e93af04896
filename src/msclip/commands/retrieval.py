"""``msclip retrieval``: image<->text recall@1/5/10 (CLIP-paper definition) on a captioned image set.

Annotations: Karpathy-split JSON (COCO, Flickr30k/8k; with --images ROOT), a CSV/TSV of (image, caption)
rows, or WebDataset shards (a folder of .tar files or one .tar; captions in .txt, one per line, or .json).
Images that cannot be read are skipped and counted; their captions are dropped with them.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from msclip.commands._common import (UsageError, add_model_arguments, eval_transform, load_model, model_report,
                                      pick_device, progress_flag, resolve_checkpoint)

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


def encode_texts(model, tokenizer, captions: list[str], device: torch.device, batch_size: int, amp: bool,
                 progress: bool | None) -> torch.Tensor:
    from tqdm.auto import tqdm

    from msclip.eval.features import autocast_context

    out = []
    starts = range(0, len(captions), batch_size)
    with autocast_context(device, amp):
        for s in tqdm(starts, desc="captions", disable=None if progress is None else not progress):
            out.append(model.encode_text(tokenizer(captions[s:s + batch_size]).to(device)).float().cpu())
    return torch.cat(out)


def run(args: argparse.Namespace) -> int:
    import msclip
    from msclip.eval.features import SafeDataset, extract
    from msclip.eval.retrieval import ImageSource, read_annotations, recall_at_k
    from msclip.eval.zeroshot import write_json_atomic

    try:
        data = read_annotations(args.annotations, args.images, args.split, args.csv_image_key, args.csv_caption_key)
        device = pick_device(args.device)
        checkpoint = resolve_checkpoint(args.model, args.pretrained)
        model = load_model(args.model, checkpoint, device, args.precision)
    except (UsageError, FileNotFoundError, ValueError) as e:
        print(f"msclip retrieval: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    progress = progress_flag(args)
    feats = extract(model.encode_image, SafeDataset(ImageSource(data.images), eval_transform(model)), device,
                    args.batch_size, args.workers, args.amp, progress, desc="images")
    kept = feats["labels"].tolist()  # ImageSource labels are image indices
    new_index = {old: new for new, old in enumerate(kept)}
    caps = [(c, new_index[o]) for c, o in zip(data.captions, data.caption_image) if o in new_index]
    texts = encode_texts(model, msclip.get_tokenizer(model.cfg), [c for c, _ in caps], device,
                         args.text_batch_size, args.amp, progress)
    owner = torch.tensor([o for _, o in caps])
    metrics = recall_at_k(F.normalize(feats["features"].to(device), dim=-1), F.normalize(texts.to(device), dim=-1),
                          owner, (1, 5, 10), args.chunk)
    report = {"task": "retrieval", **model_report(args.model, model, checkpoint, device, args.precision),
              "annotations": args.annotations, "format": data.format, "split": args.split,
              "images": len(kept), "captions": len(caps), "skipped_images": feats["skipped"],
              "skipped_examples": feats["skipped_examples"], "dropped_captions": len(data.captions) - len(caps),
              "score_unit": "percent",
              "metrics": {k: (100.0 * v if "R@" in k else v) for k, v in metrics.items()},
              "seconds": time.perf_counter() - t0}
    if args.output:
        write_json_atomic(report, args.output)
    print(format_table(report))
    return 0


def format_table(report: dict) -> str:
    m = report["metrics"]
    lines = [f"retrieval on {report['annotations']} ({report['format']}): {report['images']} images, "
             f"{report['captions']} captions, {report['skipped_images']} unreadable images skipped",
             "| direction | R@1 | R@5 | R@10 | mean rank |", "|---|---:|---:|---:|---:|"]
    for d, label in (("image_to_text", "image→text"), ("text_to_image", "text→image")):
        lines.append(f"| {label} | {m[f'{d}_R@1']:.2f} | {m[f'{d}_R@5']:.2f} | {m[f'{d}_R@10']:.2f} "
                     f"| {m[f'{d}_mean_rank']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    from msclip.cli import run_command

    raise SystemExit(run_command("retrieval"))
