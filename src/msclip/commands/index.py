"""``msclip index``: embed an image folder (or WebDataset shards) into a FAISS index for `msclip search`.

Re-runs embed only new or changed files (keyed by relative path + size + mtime) and drop the ones that are
gone. A different model (config or weights) than the index was built with is refused. Unreadable images are
skipped, counted and listed in INDEX/meta.json. See docs/search.md.
"""
from __future__ import annotations

import argparse

from msclip.commands._common import (UsageError, add_model_arguments, check_sizes, pick_device, progress_flag,
                                     run_main)

NAME = "index"
HELP = "embed an image folder or WebDataset shards into a FAISS index (incremental) for `msclip search`"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from msclip.index.store import DEFAULT_IVF_THRESHOLD, DEFAULT_NPROBE

    add_model_arguments(parser)
    parser.add_argument("--images", required=True, metavar="DIR|SHARDS",
                        help="image folder (recursive), or a .tar / folder of WebDataset .tar shards")
    parser.add_argument("--captions", default=None, metavar="CSV",
                        help="CSV/TSV of image,caption rows (paths relative to --images) stored with the images")
    parser.add_argument("--output", required=True, metavar="INDEX", help="index folder (created or updated)")
    parser.add_argument("--rebuild", action="store_true", help="ignore an existing index and embed everything")
    parser.add_argument("--ivf-threshold", type=int, default=DEFAULT_IVF_THRESHOLD, metavar="N",
                        help=f"IVF (approximate) index from N images on, exact flat search below "
                             f"(default {DEFAULT_IVF_THRESHOLD})")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: 4 sqrt(N))")
    parser.add_argument("--nprobe", type=int, default=DEFAULT_NPROBE,
                        help=f"IVF lists searched per query, stored as the index's default (default {DEFAULT_NPROBE})")


def run(args: argparse.Namespace) -> int:
    from msclip.eval.loading import load_model, resolve_checkpoint
    from msclip.index.store import model_identity, update_index

    check_sizes(args)
    for flag in ("ivf_threshold", "nprobe") + (("nlist",) if args.nlist is not None else ()):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    checkpoint = resolve_checkpoint(args.model, args.pretrained)
    if checkpoint is None:
        raise UsageError("an index needs trained weights (--pretrained PATH): random weights give embeddings that "
                         "no later run, search included, could reproduce")
    device = pick_device(args.device)
    model = load_model(args.model, checkpoint, device, args.precision)
    rep = update_index(args.output, args.images, model, model_identity(args.model, model, checkpoint, args.precision),
                       device, captions_csv=args.captions, rebuild=args.rebuild, ivf_threshold=args.ivf_threshold,
                       nlist=args.nlist, nprobe=args.nprobe, batch_size=args.batch_size, workers=args.workers,
                       progress=progress_flag(args))
    print(f"index {rep.path}: {rep.count} images ({rep.embedded} embedded now, {rep.reused} reused, {rep.removed} "
          f"dropped), {len(rep.skipped)} unreadable skipped ({rep.skipped_new} new), {rep.index_type} index, "
          f"{args.model} in {rep.seconds:.1f} s")
    if rep.captions_unmatched:
        print(f"{rep.captions_unmatched} captioned images of {args.captions} are not under {args.images}")
    for s in rep.skipped[:5]:
        print(f"skipped {s['id']}: {s['error']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(NAME, argv)


if __name__ == "__main__":
    from msclip.cli import run_command

    raise SystemExit(run_command("index"))
