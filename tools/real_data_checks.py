"""Real-data checks on data that installs from Debian packages (offline), with numbers to report.

fmnist-probe   Linear probe (CLIP L-BFGS protocol) of the models ``make demo`` pre-trained, on Fashion-MNIST
               (60k train / 10k test), beside logistic regression on the raw pixels, fitted in the same run
               with the same protocol.
tux-retrieval  Short contrastive pre-training of tiny MS-CLIP-S and CLIP models on 80 % of the Tux Paint
               stamps (Debian ``tuxpaint-stamps-default``: PNG clip-art, each with an English description),
               then image<->text recall@1/5/10 on the held-out 20 %, beside the untrained model and chance.

    python tools/real_data_checks.py fmnist-probe --demo reports/demo-YYYYmmdd-HHMMSS
    python tools/real_data_checks.py tux-retrieval --steps 300
Both write JSON and print a markdown table.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sys
import time
from pathlib import Path

import torch

from msclip.cli import main as msclip_main
from msclip import io as mio

TUX_ROOT = Path("/usr/share/tuxpaint/stamps")  # where Debian's tuxpaint-stamps-default installs
RAW_PIXEL_REFERENCE = 83.4  # a commonly quoted raw-pixel logistic-regression accuracy, for context only


def _run_cli(args: list[str]) -> None:
    rc = msclip_main(args)
    if rc != 0:
        raise SystemExit(f"msclip {' '.join(args)} exited {rc}")


def _demo_runs(demo: Path) -> dict[str, tuple[str, Path]]:
    """{run name: (model config, exported weights)} for every run folder of a demo report."""
    import yaml

    runs = {}
    for run_dir in sorted((demo / "runs").iterdir()):
        weights, recipe = run_dir / "model.safetensors", run_dir / "recipe.yaml"
        if weights.is_file() and recipe.is_file():
            runs[run_dir.name] = (yaml.safe_load(recipe.read_text())["model"], weights)
    if not runs:
        raise SystemExit(f"{demo}/runs holds no run folder with model.safetensors; run `make demo` first")
    return runs


def raw_pixel_probe(limit: int | None, C: float = 1.0) -> dict:
    """Logistic regression on the 784 raw pixels (scaled to [0, 1]) at scikit-learn's default C and tolerance.

    One fit instead of the C search: on 784-d inputs each L-BFGS pass costs ~10x a 64-d one, and the
    reference only has to show where pixels stand (83.4 % is the commonly quoted figure)."""
    from msclip.data.fashion_mnist import load_fashion_mnist
    from msclip.eval.linear_probe import fit_logistic

    def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = load_fashion_mnist(name)
        return torch.tensor(x[:limit]).flatten(1).double() / 255.0, torch.tensor(y[:limit])

    (xtr, ytr), (xte, yte) = split("train"), split("test")
    t0 = time.perf_counter()
    w, b = fit_logistic(xtr, ytr, C, num_classes=10, tol=1e-4)
    acc = 100 * ((xte @ w + b).argmax(1) == yte).double().mean().item()
    return {"score_pct": acc, "hparam": {"C": C}, "n_train": len(xtr), "n_val": 0, "n_test": len(xte),
            "fit_s": time.perf_counter() - t0}


def fmnist_probe(args: argparse.Namespace) -> int:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, (model, weights) in _demo_runs(Path(args.demo)).items():
        res_file = out / f"fmnist-probe-{name}.json"
        _run_cli(["linprobe", "--model", model, "--pretrained", str(weights), "--dataset",
                  f"fashion_mnist:{args.fashion_mnist_root}", "--protocol", "clip", "--features", args.features,
                  "--output", str(res_file),
                  "--cache-dir", str(out / "features"), "--batch-size", "500", "--no-progress"]
                 + (["--limit", str(args.limit)] if args.limit else []))
        r = json.loads(res_file.read_text())["datasets"]["fashion_mnist"]
        rows[f"{name} (`{model}`, {args.features})"] = r
    rows["raw pixels (784-d, one fit at C=1)"] = raw_pixel_probe(args.limit)
    lines = ["| features | test accuracy | C | train / val / test | extraction | classifier fits |",
             "|---|---:|---|---|---:|---:|"]
    for label, r in rows.items():
        times = r.get("time_s", {"features": 0.0, "probe": r.get("fit_s", float("nan"))})
        lines.append(f"| {label} | {r['score_pct']:.1f} % | {r['hparam']['C']:.3g} | "
                     f"{r['n_train']} / {r['n_val']} / {r['n_test']} | {times['features']:.0f} s | "
                     f"{times['probe']:.0f} s |")
    table = "\n".join(lines) + f"\n\n(Raw-pixel logistic regression is commonly quoted at {RAW_PIXEL_REFERENCE} %.)"
    mio.write_json(out / "fmnist-probe.json", rows)
    print(table)
    return 0


def tux_pairs(root: Path) -> list[tuple[Path, str]]:
    """(png, English description) for every stamp with a PNG; SVG-only stamps are left out (no rasteriser)."""
    pairs = []
    for txt in sorted(root.rglob("*.txt")):
        png = txt.with_suffix(".png")
        lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        if png.is_file() and lines and lines[0].strip():
            pairs.append((png, lines[0].strip()))  # line 1 is English; the rest are `lang.utf8=...` translations
    return pairs


def _write_split(pairs: list[tuple[Path, str]], folder: Path, csv_path: Path, size: int) -> None:
    """RGBA clip-art composited on white, shortest side ``size``; a CSV of (image, caption)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    table = io.StringIO()
    w = csv.writer(table)
    w.writerow(["image", "caption"])
    for i, (png, caption) in enumerate(pairs):
        with Image.open(png) as im:
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, "white")
            im = Image.alpha_composite(bg, im).convert("RGB")
            scale = size / min(im.size)
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                           Image.Resampling.BICUBIC)
        name = f"{i:04d}.png"
        mio.atomic_write(folder / name, lambda tmp, im=im: im.save(tmp, format="PNG"))
        w.writerow([name, caption])
    mio.write_text(csv_path, table.getvalue())


def tux_retrieval(args: argparse.Namespace) -> int:
    root = Path(args.tux_root)
    pairs = tux_pairs(root) if root.is_dir() else []
    if not pairs:
        raise SystemExit(f"no Tux Paint stamps under {root}: apt-get install tuxpaint-stamps-default")
    random.Random(args.seed).shuffle(pairs)
    n_test = round(len(pairs) * args.test_fraction)
    out = Path(args.output_dir)
    splits = {"test": pairs[:n_test], "train": pairs[n_test:]}
    for name, part in splits.items():
        _write_split(part, out / "tux" / name, out / "tux" / f"{name}.csv", size=96)
    print(f"[tux] {len(pairs)} stamps with a PNG: {len(splits['train'])} train, {n_test} held out", flush=True)
    results = {}
    for model in args.models:
        run_name = f"tux-{model}"
        _run_cli(["train", "--overwrite", "--model", model, "--name", run_name, "--output_dir", str(out / "runs"),
                  "data.kind=csv", f"data.path={out / 'tux' / 'train.csv'}", "data.csv_image_key=image",
                  f"data.image_root={out / 'tux' / 'train'}",
                  "data.csv_caption_key=caption", f"data.batch_size={args.batch_size}", "data.workers=1",
                  f"train.steps={args.steps}", "optim.lr=1e-3", "optim.weight_decay=0.1",
                  f"optim.warmup={max(1, args.steps // 20)}", "optim.min_lr=1e-5", "logit_scale_max=4.6052",
                  f"seed={args.seed}", "log.tensorboard=false", "log.progress=false",
                  f"checkpoint.every={args.steps}", "checkpoint.keep_last=1"])
        weights = out / "runs" / run_name / "model.safetensors"
        for label, extra in (("untrained", []), ("trained", ["--pretrained", str(weights)])):
            res_file = out / f"tux-retrieval-{model}-{label}.json"
            torch.manual_seed(args.seed)
            _run_cli(["retrieval", "--model", model, *extra, "--annotations", str(out / "tux" / "test.csv"),
                      "--images", str(out / "tux" / "test"), "--output", str(res_file), "--no-progress"])
            results[f"{model} {label}"] = json.loads(res_file.read_text())
    n_img = next(iter(results.values()))["images"]
    n_cap = next(iter(results.values()))["captions"]
    chance = {f"{d}_R@{k}_pct": 100 * k / n for d, n in (("image_to_text", n_cap), ("text_to_image", n_img))
              for k in (1, 5, 10)}
    keys = [f"{d}_R@{k}_pct" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
    lines = [f"Held-out Tux Paint stamps: {n_img} images, {n_cap} captions; {args.steps} steps of "
             f"{args.batch_size} on {len(splits['train'])} training pairs.", "",
             "| model | i→t R@1 | R@5 | R@10 | t→i R@1 | R@5 | R@10 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, rep in [*results.items(), ("chance", {"metrics": chance})]:
        lines.append(f"| {label} | " + " | ".join(f"{rep['metrics'][k]:.1f}" for k in keys) + " |")
    mio.write_json(out / "tux-retrieval.json", {"chance": chance, **{k: v["metrics"] for k, v in results.items()}})
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    from msclip.data.fashion_mnist import default_root

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="check", required=True)
    p = sub.add_parser("fmnist-probe", help="linear probe of the demo's models vs raw pixels")
    p.add_argument("--demo", required=True, help="a report folder written by `make demo`")
    p.add_argument("--fashion-mnist-root", default=str(default_root()))
    p.add_argument("--features", choices=("pre-projection", "embedding"), default="pre-projection")
    p.add_argument("--limit", type=int, default=None, help="at most N samples per split (quick look)")
    p.add_argument("--output-dir", default="reports/real-data-checks")
    p.set_defaults(fn=fmnist_probe)
    t = sub.add_parser("tux-retrieval", help="retrieval on held-out Tux Paint stamps after short training")
    t.add_argument("--tux-root", default=str(TUX_ROOT))
    t.add_argument("--models", nargs="+", default=["msclip-s-b32-tiny", "clip-b32-tiny"])
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--test-fraction", type=float, default=0.2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--output-dir", default="reports/real-data-checks")
    t.set_defaults(fn=tux_retrieval)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
