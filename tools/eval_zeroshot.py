"""Drop-in for the official MS-CLIP command, run from the repository root:

    python tools/eval_zeroshot.py --model experiments/model/b32-laion-msclips.yaml

Like the official script: the checkpoint is the yaml's MODEL.PRETRAINED_MODEL, the data is
ImageNet val at DATASET/imagenet/val (DATASET.ROOT / DATASET.TEST_SET of the `--ds` dataset yaml),
with the 1000 ImageNet class names and the 80 OpenAI templates, batch 32, 6 workers, fp32, and it
logs top-1 accuracy. Unlike it, it also runs on CPU when there is no GPU, and writes a full JSON
report (default OUTPUT/<model>/zeroshot_<dataset>.json). Everything else is `msclip zeroshot`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

try:
    import msclip  # noqa: F401
except ImportError:  # not installed: use the source tree next to this script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DEFAULT_DS = os.path.join("experiments", "dataset", "imagenet.yaml")


def dataset_folder(ds_yaml: str | None) -> tuple[str, str]:
    """-> (image folder, dataset name) from an official dataset yaml (DATASET.ROOT/TEST_SET)."""
    import yaml

    root, test_set, name = os.path.join("DATASET", "imagenet"), "val", "imagenet"
    path = ds_yaml if ds_yaml is not None else (DEFAULT_DS if os.path.isfile(DEFAULT_DS) else None)
    if path is not None:
        if not os.path.isfile(path):
            raise SystemExit(f"eval_zeroshot: error: dataset yaml --ds {path!r} does not exist")
        data = (yaml.safe_load(Path(path).read_text()) or {}).get("DATASET") or {}
        root, test_set = data.get("ROOT", root), data.get("TEST_SET", test_set)
        name = data.get("DATASET", name)
    return os.path.join(root, test_set), str(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="official model yaml, e.g. experiments/model/b32-laion-msclips.yaml")
    parser.add_argument("--pretrained", default=None, help="weights file (default: MODEL.PRETRAINED_MODEL)")
    parser.add_argument("--ds", default=None, help=f"dataset yaml (default {DEFAULT_DS} if present)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(6, os.cpu_count() or 1))
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--output", default=None, help="JSON report path")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from msclip.commands import zeroshot

    data, ds_name = dataset_folder(args.ds)
    output = args.output or os.path.join("OUTPUT", Path(args.model).stem, f"zeroshot_{ds_name}.json")
    cmd = ["--model", args.model, "--data", data, "--templates", "imagenet80", "--batch-size", str(args.batch_size),
           "--workers", str(args.workers), "--precision", args.precision, "--output", output]
    if args.device:
        cmd += ["--device", args.device]
    if args.pretrained:
        cmd += ["--pretrained", args.pretrained]
    if args.no_progress:
        cmd.append("--no-progress")
    if not args.model.endswith((".yaml", ".yml")):
        print(f"eval_zeroshot: error: --model {args.model!r} is not a yaml file", file=sys.stderr)
        return 2
    sub = argparse.ArgumentParser(prog="eval_zeroshot")
    zeroshot.add_arguments(sub)
    zargs = sub.parse_args(cmd)
    try:
        plan = zeroshot.prepare(zargs)
        if plan.checkpoint is None:
            raise zeroshot.UsageError(f"{args.model} sets no MODEL.PRETRAINED_MODEL; pass --pretrained")
        model = zeroshot.load_model(args.model, plan.checkpoint, plan.device, args.precision)
    except (ValueError, FileNotFoundError) as e:  # UsageError / DataError / TemplateError are ValueErrors
        print(f"eval_zeroshot: error: {e}", file=sys.stderr)
        return 2
    if plan.names_source != "imagenet-1k":
        print(f"warning: {data} is not a 1000-class ImageNet folder; class names are the folder names",
              file=sys.stderr)
    report = zeroshot.evaluate(zargs, plan, model)
    from msclip.eval.zeroshot import write_json_atomic

    write_json_atomic(report, output)
    print(zeroshot.format_table(report))
    top1 = report["top1"] if report["top1"] is not None else 0.0
    # The official script's summary line.
    print(f"=> TEST: Error@1 {100.0 - top1:.3f}% accuracy@1 {top1:.3f}%")
    print(f"report: {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
