"""``msclip export``: the encoders as ONNX graphs, or the model as a self-describing folder.

`--format onnx` writes DIR/image_encoder.onnx, DIR/text_encoder.onnx and DIR/preprocess.json, then checks
both graphs with ONNX Runtime (CPU) against the torch model on random inputs (`--no-check` skips it).
`--format folder` writes config.json, model.safetensors, preprocess.json and README.md (`msclip.save_pretrained`),
loadable with `msclip.create_model(DIR)`.
"""
from __future__ import annotations

import argparse

from msclip.commands._common import UsageError, run_main

NAME = "export"
HELP = "export the encoders to ONNX (+ preprocess.json), or the model to a self-describing folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="NAME|JSON|YAML|DIR",
                        help="named config (see `msclip info`), a .json config, an official .yaml or a model folder")
    parser.add_argument("--pretrained", default=None, metavar="PATH",
                        help="weights (msclip / official / open_clip layout); default: random init, or the folder's")
    parser.add_argument("--format", choices=("onnx", "folder"), default="onnx")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write (created if missing)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime comparison")


def _check(model, output: str) -> dict[str, float]:
    import torch

    from msclip.export.onnx import compare_with_onnxruntime
    from msclip.export.torch_export import example_inputs

    g = torch.Generator().manual_seed(1)
    size = model.cfg.vision.image_size
    images = torch.randn(3, 3, size, size, generator=g)  # batch 3: not the traced batch of 2
    tokens = example_inputs(model, "text", batch=3)[:, : max(2, model.cfg.text.context_length // 2)]
    return compare_with_onnxruntime(model, output, images, tokens)


def run(args: argparse.Namespace) -> int:
    import time

    from msclip.factory import create_model

    if args.opset is not None and args.format != "onnx":
        raise UsageError("--opset applies to --format onnx only")
    model = create_model(args.model, args.pretrained, device="cpu")
    if args.format == "folder":
        from msclip.pretrained_folder import save_pretrained

        save_pretrained(model, args.output)
        print(f"wrote model folder {args.output} (config.json, model.safetensors, preprocess.json, README.md); "
              f"load it with msclip.create_model({args.output!r})")
        return 0
    from msclip.export.onnx import FILES, export_onnx

    t0 = time.perf_counter()
    spec = export_onnx(model, args.output, opset=args.opset)
    print(f"exported {model.cfg.name} to {args.output}: {FILES['image']}, {FILES['text']}, preprocess.json "
          f"(opset {spec['opset']}, {time.perf_counter() - t0:.1f} s)")
    if not args.no_check:
        diffs = _check(model, args.output)
        print("ONNX Runtime vs torch, max abs diff of the unnormalised features: "
              + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
        if max(diffs.values()) > 1e-4:
            print("warning: a difference above 1e-4; the graphs may not match the model")
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(NAME, argv)
