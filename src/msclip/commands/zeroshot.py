"""``msclip zeroshot``: zero-shot classification of a labelled image folder, the official MS-CLIP way
(the work is msclip.eval.zeroshot_report; this module parses and prints)."""
from __future__ import annotations

import argparse
import os

from msclip.commands._common import (UsageError, add_model_arguments, check_sizes, pick_device, progress_flag,
                                     run_main)

NAME = "zeroshot"
HELP = "zero-shot classification of an image folder (official MS-CLIP procedure), JSON report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, metavar="ROOT", help="folder of class sub-folders of images")
    parser.add_argument("--classnames", default=None, metavar="FILE",
                        help="one name per line (sorted-folder order) or JSON {folder: name}; default: ImageNet "
                             "names for a 1000-wnid folder, else the folder names (`3_three` -> three)")
    parser.add_argument("--templates", default="imagenet80", metavar="imagenet80|simple|generic|fashion_mnist|FILE",
                        help="prompt templates with a {} placeholder (default: the 80 OpenAI ImageNet templates)")
    parser.add_argument("--text-batch-size", type=int, default=256, help="prompts per text forward")
    parser.add_argument("--output", default=None, metavar="result.json", help="write the JSON report here")


def run(args: argparse.Namespace) -> int:
    import msclip
    from msclip import io as mio
    from msclip.eval.loading import load_model, resolve_checkpoint
    from msclip.eval.zeroshot_report import folder_report, format_report, plan_folder

    check_sizes(args, "text_batch_size")
    if args.output is not None and os.path.isdir(args.output):
        raise UsageError(f"--output {args.output!r} is a folder; give a file name such as result.json")
    device = pick_device(args.device)
    checkpoint = resolve_checkpoint(args.model, args.pretrained)
    plan = plan_folder(args.data, args.classnames, args.templates)
    model = load_model(args.model, checkpoint, device, args.precision)
    report = folder_report(model, msclip.get_tokenizer(model.cfg), plan, device, model_spec=args.model,
                           checkpoint=checkpoint, precision=args.precision, batch_size=args.batch_size,
                           text_batch_size=args.text_batch_size, workers=args.workers, progress=progress_flag(args))
    if args.output:
        mio.write_json(args.output, report)
    print(format_report(report))
    if args.output:
        print(f"report: {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(NAME, argv)


if __name__ == "__main__":
    from msclip.cli import run_command

    raise SystemExit(run_command("zeroshot"))
