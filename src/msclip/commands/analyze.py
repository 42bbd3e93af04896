"""``msclip analyze``: how a checkpoint mixes the modalities (the MS-CLIP paper's analysis); the work is
msclip.analysis.pipeline. Writes into --output-dir:
* ``pooled_hidden.pt``: per trunk layer, the pooled hidden states (image class token, caption end token);
* ``analysis.json``: the modality gap of the final embeddings, and per layer the NMI between a 2-way
  k-means of the pooled states and the modality labels (low = mixed) plus the layer's centroid gap;
* ``attention/*.png``: class-token attention per head over the image grid and token-to-token attention
  for captions, for the chosen layers and heads, taken from the same model's forward_intermediates;
* ``nmi.png``, ``gap.png`` and ``report.md`` showing the numbers, the plots and the attention maps.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msclip.commands._common import (UsageError, add_model_arguments, check_sizes, pick_device, progress_flag,
                                    run_main)

NAME = "analyze"
HELP = "modality gap, per-layer modality NMI and attention maps for a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--images", required=True, metavar="DIR|LIST",
                        help="a folder of images (searched recursively) or a text file of image paths")
    parser.add_argument("--texts", required=True, metavar="FILE",
                        help="captions, one per line (blank lines are dropped and listed)")
    parser.add_argument("--output-dir", default="analysis", metavar="DIR")
    parser.add_argument("--max-samples", type=int, default=None, help="use at most N images and N captions (at least 10 of each are needed)")
    parser.add_argument("--attn-layers", type=int, nargs="*", default=None,
                        help="trunk layers to draw attention for (default: first, middle and last)")
    parser.add_argument("--attn-heads", type=int, nargs="*", default=None, help="heads to draw (default: all)")
    parser.add_argument("--attn-samples", type=int, default=2, help="images and captions to draw")
    parser.add_argument("--raw-pooled", action="store_true",
                        help="cluster raw pooled states (default: L2-normalised, so norms alone do not separate)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import msclip
    from msclip import io as mio
    from msclip.analysis.pipeline import analyze, read_inputs, report_markdown
    from msclip.eval.loading import load_model, model_report, resolve_checkpoint

    check_sizes(args)
    if args.max_samples is not None and args.max_samples < 1:
        raise UsageError("--max-samples must be >= 1")
    if args.attn_samples < 0:
        raise UsageError("--attn-samples must be >= 0")
    inputs = read_inputs(args.images, args.texts, args.max_samples)
    if inputs.blank_lines:
        print(f"dropped {len(inputs.blank_lines)} blank caption line(s) of {args.texts}: "
              f"{', '.join(map(str, inputs.blank_lines[:20]))}", file=sys.stderr)
    device = pick_device(args.device)
    checkpoint = resolve_checkpoint(args.model, args.pretrained)
    model = load_model(args.model, checkpoint, device, args.precision)
    out_dir = Path(args.output_dir)
    result = analyze(model, msclip.get_tokenizer(model.cfg), inputs, out_dir, device, attn_layers=args.attn_layers,
                     attn_heads=args.attn_heads, attn_samples=args.attn_samples,
                     normalize_pooled=not args.raw_pooled, seed=args.seed, batch_size=args.batch_size,
                     workers=args.workers, progress=progress_flag(args))
    report = {"task": "analyze", **model_report(args.model, model, checkpoint, device, args.precision), **result}
    mio.write_json(out_dir / "analysis.json", report)
    mio.write_text(out_dir / "report.md", report_markdown(report, out_dir))
    for s in report["skipped"]:
        print(f"skipped image {s['path']}: {s['error']}", file=sys.stderr)
    for note in report["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"modality gap (final embeddings): {report['modality_gap']:.4f}; "
          f"NMI of final embeddings: {report['embedding_nmi']:.3f}")
    print("| layer | NMI | centroid gap |\n|---:|---:|---:|")
    for r in report["layers"]:
        print(f"| {r['layer']} | {r['nmi']:.3f} | {r['gap']:.4f} |")
    print(f"wrote {out_dir / 'report.md'}, analysis.json, pooled_hidden.pt and "
          f"{len(report['attention_pngs'])} attention PNGs")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(NAME, argv)


if __name__ == "__main__":
    from msclip.cli import run_command

    raise SystemExit(run_command("analyze"))
