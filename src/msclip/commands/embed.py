"""``msclip embed``: L2-normalised image or text embeddings for downstream use.

Writes OUT (`.npy`: float32 [N, E]; `.safetensors`: tensor "embeddings", bf16 when --precision bf16)
and, next to it, OUT's stem + `.json` with the row names (image paths relative to ROOT, or the text
lines), the skipped images and the exact model / checkpoint used. Row i of OUT is names[i].
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from msclip.commands._common import (UsageError, add_model_arguments, check_sizes, pick_device, progress_flag,
                                     run_main)
from msclip.io import read_user_text

NAME = "embed"
HELP = "export L2-normalised image or text embeddings (.npy / .safetensors) with their names"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="ROOT", help="embed every image under ROOT (recursively, sorted)")
    src.add_argument("--texts", metavar="FILE", help="embed every line of a UTF-8 text file")
    parser.add_argument("--output", required=True, metavar="OUT.npy|OUT.safetensors")


def _items(args: argparse.Namespace) -> list[str]:
    from msclip.eval.imagefolder import scan_images

    if args.images is not None:
        return scan_images(args.images)
    items = read_user_text(args.texts, "--texts", UsageError).splitlines()
    if not items:
        raise UsageError(f"--texts {args.texts!r} has no lines")
    return items


def run(args: argparse.Namespace) -> int:
    from msclip.eval.embed import SUFFIXES, embed_images, embed_texts, sidecar_path, write_embeddings
    from msclip.eval.loading import load_model, model_report, resolve_checkpoint

    if Path(args.output).suffix not in SUFFIXES:
        raise UsageError(f"--output {args.output!r} must end in {' or '.join(SUFFIXES)}")
    source = args.texts if args.images is None else None
    if source is not None and Path(source).resolve() == Path(sidecar_path(args.output)).resolve():
        raise UsageError(f"--output {args.output!r} would write its names file over --texts {source!r}; "
                         "give the output another name")
    check_sizes(args)
    device = pick_device(args.device)
    checkpoint = resolve_checkpoint(args.model, args.pretrained)
    items = _items(args)
    model = load_model(args.model, checkpoint, device, args.precision)
    progress = progress_flag(args)
    t0 = time.perf_counter()
    skipped: list[dict] = []
    if args.images is not None:
        emb, kept, skipped = embed_images(model, items, device, args.batch_size, args.workers, progress)
        names, kind = [os.path.relpath(items[i], args.images) for i in kept], "images"
    else:
        emb = embed_texts(model, items, device, args.batch_size, progress)
        names, kind = items, "texts"
    seconds = time.perf_counter() - t0
    sidecar = sidecar_path(args.output)
    meta = {"task": "embed", "kind": kind, "source": args.images or args.texts, "embeddings": args.output,
            "count": emb.shape[0], "dim": emb.shape[1] if emb.ndim == 2 else None,
            "dtype": "float32" if args.output.endswith(".npy") else str(emb.dtype).replace("torch.", ""),
            "normalized": "L2", **model_report(args.model, model, checkpoint, device, args.precision),
            "seconds": seconds, "per_second": emb.shape[0] / seconds if seconds > 0 else None,
            "skipped_count": len(skipped), "skipped": skipped, "names": names}
    write_embeddings(emb, args.output, {"kind": kind, "model": args.model, "count": str(emb.shape[0]),
                                        "names_file": os.path.basename(sidecar)}, sidecar=meta)
    print(f"embedded {emb.shape[0]} {kind} ({len(skipped)} skipped) with {args.model} in {seconds:.1f} s "
          f"-> {args.output} (+ names in {sidecar})")
    for s in skipped[:5]:
        print(f"skipped {s['path']}: {s['error']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(NAME, argv)


if __name__ == "__main__":
    from msclip.cli import run_command

    raise SystemExit(run_command("embed"))
