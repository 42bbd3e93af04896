"""``msclip linprobe``: linear probes on frozen image features, for one dataset or the whole suite.

Features are extracted once per (model, checkpoint, dataset, split) and cached on disk; the classifier
is the CLIP paper's L-BFGS logistic regression (``--protocol clip``) or an AdamW linear layer
(``--protocol sgd``). Results: JSON (per-dataset metric, chosen hyper-parameter, sample counts, skipped
images, suite mean) plus a markdown table next to it. Missing datasets are reported, not fatal.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import torch

from msclip.commands._common import UsageError, add_model_arguments, check_sizes, pick_device, progress_flag, run_main

NAME = "linprobe"
HELP = "linear-probe evaluation (CLIP L-BFGS or AdamW protocol) on one dataset or the msclip24 suite"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME:ROOT",
                        help="a registry name (e.g. cifar10, voc2007, fashion_mnist) or any name for a generic "
                             "folder/csv/wds dataset, and its root folder; repeatable")
    parser.add_argument("--suite", choices=("msclip24",), default=None, help="run every dataset of the suite")
    parser.add_argument("--data-root", default=None, metavar="ROOT",
                        help="with --suite: each dataset is read from ROOT/<name> (or a CLIP_benchmark wds_* name)")
    parser.add_argument("--protocol", choices=("clip", "sgd"), default="clip")
    parser.add_argument("--output", default="linprobe_results.json", metavar="FILE.json",
                        help="JSON results; a markdown table is written beside it (.md)")
    parser.add_argument("--cache-dir", default=None,
                        help="feature cache (default $MSCLIP_FEATURE_CACHE or ~/.cache/msclip/features)")
    parser.add_argument("--no-cache", action="store_true", help="always extract features, store nothing")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast during feature extraction")
    parser.add_argument("--limit", type=int, default=None, help="at most N samples per split (seeded subset)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of train held out for the hyper-parameter search when there is no val split")
    parser.add_argument("--features", choices=("pre-projection", "embedding"), default="pre-projection",
                        help="image features to probe: the pooled output before the projection (default, as the "
                             "CLIP paper's ViT probes) or the joint image-text embedding (as CLIP_benchmark)")
    parser.add_argument("--no-normalize", action="store_true", help="probe raw instead of L2-normalised features")
    parser.add_argument("--probe-device", default=None, help="device of the classifier fits (default: --device)")
    parser.add_argument("--max-iter", type=int, default=1000, help="clip protocol: L-BFGS iterations per fit")
    parser.add_argument("--tol", type=float, default=1e-4,
                        help="clip protocol: L-BFGS stops when no gradient entry of the mean loss exceeds this "
                             "(default: scikit-learn's 1e-4; tighter values make weakly regularised fits slower)")
    parser.add_argument("--full-sweep", action="store_true",
                        help="clip protocol: fit all 13 coarse C values (default: stop 3 decades past the best)")
    parser.add_argument("--epochs", type=int, default=50, help="sgd protocol: epochs per fit")
    parser.add_argument("--lr", type=float, default=1e-2, help="sgd protocol: peak AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0)


def check_values(args: argparse.Namespace) -> None:
    """Every out-of-range value at once, before any model or dataset is loaded."""
    problems = [f"{flag} must be {want}, got {value}" for flag, value, ok, want in (
        ("--limit", args.limit, args.limit is None or args.limit >= 1, ">= 1"),
        ("--val-fraction", args.val_fraction, 0 < args.val_fraction < 1, "between 0 and 1 (exclusive)"),
        ("--max-iter", args.max_iter, args.max_iter >= 1, ">= 1"),
        ("--tol", args.tol, args.tol > 0, "> 0"),
        ("--epochs", args.epochs, args.epochs >= 1, ">= 1"),
        ("--lr", args.lr, args.lr > 0, "> 0")) if not ok]
    if os.path.splitext(args.output)[1].lower() == ".md":
        problems.append(f"--output {args.output}: the markdown table is written beside the JSON results as .md; "
                        "give the results another suffix (e.g. .json)")
    if problems:
        raise UsageError("; ".join(problems))


def _entries(args: argparse.Namespace) -> list:
    from msclip.eval.suite import SUITES, find_root, get_spec

    if args.suite and not args.data_root:
        raise UsageError("--suite needs --data-root ROOT")
    if not args.suite and not args.dataset:
        raise UsageError("give --dataset NAME:ROOT (repeatable) or --suite msclip24 --data-root ROOT")
    entries = [(spec, find_root(spec, args.data_root)) for spec in SUITES[args.suite]] if args.suite else []
    for item in args.dataset:
        name, sep, root = item.partition(":")
        if not sep or not name or not root:
            raise UsageError(f"--dataset {item!r}: expected NAME:ROOT")
        entries.append((get_spec(name), Path(root)))
    return entries


def run(args: argparse.Namespace) -> int:
    from msclip import io as mio
    from msclip.eval.features import bf16_autocast, default_cache_dir
    from msclip.eval.linear_probe import run_probe
    from msclip.eval.loading import eval_transform, load_model, model_report, resolve_checkpoint
    from msclip.eval.suite import CachedFeaturizer, run_suite

    check_sizes(args)
    check_values(args)
    entries = _entries(args)
    device = pick_device(args.device)
    probe_device = pick_device(args.probe_device) if args.probe_device else device  # a bad name: exit 2 now
    checkpoint = resolve_checkpoint(args.model, args.pretrained)
    torch.manual_seed(args.seed)  # random-init weights are then reproducible, so caching them is sound
    model = load_model(args.model, checkpoint, device, args.precision)
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    encode = functools.partial(model.encode_image, project=args.features == "embedding")
    extra = {"precision": args.precision, "amp": args.amp, "limit": args.limit, "features": args.features,
             "image_size": model.cfg.vision.image_size, "seed": args.seed if checkpoint is None else None}

    featurize = CachedFeaturizer(
        encode, eval_transform(model), device, model_name=args.model, checkpoint=checkpoint, cache_dir=cache_dir,
        extra=extra, limit=args.limit, seed=args.seed, batch_size=args.batch_size, workers=args.workers,
        autocast=bf16_autocast(device) if args.amp else None, progress=progress_flag(args),
        report=lambda line: print(line, file=sys.stderr), model_config=model.cfg.to_dict())

    if args.protocol == "clip":
        kw = {"max_iter": args.max_iter, "tol": args.tol, "patience": None if args.full_sweep else 3}
    else:
        kw = {"epochs": args.epochs, "lr": args.lr}
    probe = functools.partial(run_probe, protocol=args.protocol, val_fraction=args.val_fraction, seed=args.seed,
                              normalize=not args.no_normalize, device=probe_device, **kw)
    result = run_suite(entries, featurize, probe, args.seed)
    report = {"task": "linprobe", **model_report(args.model, model, checkpoint, device, args.precision),
              "protocol": args.protocol, "suite": args.suite,
              "settings": {"features": args.features, "val_fraction": args.val_fraction,
                           "normalize": not args.no_normalize, "amp": args.amp,
                           "limit": args.limit, "seed": args.seed, **kw},
              **result.summary(), "datasets": result.results}
    mio.write_json(args.output, report)
    table = format_markdown(report)
    md = os.path.splitext(args.output)[0] + ".md"
    mio.write_text(md, table + "\n")
    print(table)
    print(f"results: {args.output} and {md}")
    return 0 if result.summary()["n_ok"] else 1


def _hp(res: dict) -> str:
    hp = res.get("hparam", {})
    if "C" in hp:
        return f"C={hp['C']:.3g}"
    return f"wd={hp['weight_decay']:.3g}" if "weight_decay" in hp else ""


def format_markdown(report: dict) -> str:
    ck = report.get("checkpoint") or {}
    lines = [f"Linear probe ({report['protocol']} protocol), model `{report['model']['spec']}`, checkpoint "
             f"`{ck.get('path', 'none: random weights')}`", "",
             "| dataset | metric | score % | hyper-parameter | train | val | test | skipped | status |",
             "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for name, r in report["datasets"].items():
        if r.get("status") == "ok":
            skipped = sum(r.get("skipped_corrupt", {}).values())
            lines.append(f"| {name} | {r['metric']} | {r['score_pct']:.2f} | {_hp(r)} | {r['n_train']} | {r['n_val']} "
                         f"| {r['n_test']} | {skipped} | ok |")
        else:
            lines.append(f"| {name} | | | | | | | | {r.get('status')} |")
    mean = report.get("mean_pct")
    lines.append(f"| **mean ({report.get('n_ok', 0)} datasets)** | | {'' if mean is None else f'{mean:.2f}'} "
                 "| | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_main(NAME, argv)


if __name__ == "__main__":
    from msclip.cli import run_command

    raise SystemExit(run_command("linprobe"))
