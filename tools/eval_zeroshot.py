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

    if not args.model.endswith((".yaml", ".yml")):
        print(f"eval_zeroshot: error: --model {args.model!r} is not a yaml file", file=sys.stderr)
        return 2
    import msclip
    from msclip import io as mio
    from msclip.device import pick_device
    from msclip.errors import MsclipError
    from msclip.eval.loading import load_model, resolve_checkpoint
    from msclip.eval.zeroshot_report import folder_report, format_report, plan_folder

    data, ds_name = dataset_folder(args.ds)
    output = args.output or os.path.join("OUTPUT", Path(args.model).stem, f"zeroshot_{ds_name}.json")
    try:
        device = pick_device(args.device or "auto")
        checkpoint = resolve_checkpoint(args.model, args.pretrained)
        if checkpoint is None:
            raise MsclipError(f"{args.model} sets no MODEL.PRETRAINED_MODEL; pass --pretrained")
        plan = plan_folder(data, None, "imagenet80")
        model = load_model(args.model, checkpoint, device, args.precision)
    except MsclipError as e:
        print(f"eval_zeroshot: error: {e}", file=sys.stderr)
        return 2
    if plan.names_source != "imagenet-1k":
        print(f"warning: {data} is not a 1000-class ImageNet folder; class names are the folder names",
              file=sys.stderr)
    report = folder_report(model, msclip.get_tokenizer(model.cfg), plan, device, model_spec=args.model,
                           checkpoint=checkpoint, precision=args.precision, batch_size=args.batch_size,
                           workers=args.workers, progress=False if args.no_progress else None)
    mio.write_json(output, report)
    print(format_report(report))
    top1 = report["top1_pct"]
    # The official script's summary line.
    print(f"=> TEST: Error@1 {100.0 - top1:.3f}% accuracy@1 {top1:.3f}%")
    print(f"report: {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
