"""``msclip demo`` / ``make demo`` / ``python -m msclip.demo``: pre-train a tiny MS-CLIP-S and a CLIP baseline (same depth, width
and step budget) on Fashion-MNIST captions, evaluate both zero-shot on the 10k test images with prompt
ensembling (eval/in_training.py: the path `msclip zeroshot` and the trainer use), and write a report folder
(markdown, PNG plots, resolved recipes, checkpoints). The two recipes ship in the package (msclip/recipes/)."""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from msclip import io as mio

RECIPES = {"MS-CLIP-S": "demo-fmnist-msclip-s.yaml", "CLIP": "demo-fmnist-clip.yaml"}
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # package data: found from any working directory


def _check_data() -> bool:
    from msclip.data.fashion_mnist import ROOT_ENV, default_root, fashion_mnist_available

    if fashion_mnist_available():
        return True
    print(f"msclip demo: Fashion-MNIST not found in {default_root()}.\n"
          f"  Install the Debian package:  sudo apt-get install dataset-fashion-mnist   (or `make data` as root)\n"
          f"  or set {ROOT_ENV} to a folder holding the four *-ubyte.gz files.", file=sys.stderr)
    return False


def _step_time(recipe: Any, threads: int, reps: int = 3) -> float:
    """Seconds per optimiser step of ``recipe``'s model and batch (synthetic tensors, best of ``reps``)."""
    import msclip
    from msclip.loss import ClipLoss
    from msclip.train.precision import get_precision

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = msclip.create_model(recipe.model).train()
        size, b = model.cfg.vision.image_size, recipe.data.batch_size
        images = torch.randn(b, 3, size, size)
        tokens = msclip.get_tokenizer(recipe.model)(["a black and white photo of an ankle boot."] * b)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        autocast = get_precision(recipe.train.precision, torch.device("cpu")).autocast
        best = float("inf")
        for i in range(reps + 1):  # the first call warms up allocators and kernels
            t0 = time.perf_counter()
            with autocast():
                out = model(images, tokens)
                loss = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            best = min(best, time.perf_counter() - t0) if i else best
        return best
    finally:
        torch.set_num_threads(old)


def _batch_time(recipe: Any, batches: int = 3) -> float:
    """Seconds to load and transform one training batch in this process (the CPU cost of the data)."""
    import msclip
    from msclip.data import build_train_data

    _, train_tf, _ = msclip.create_model_and_transforms(recipe.model)
    # the recipe's own data section, read in this process (workers=0): the per-batch CPU cost
    data = build_train_data(recipe.data, image_transform=train_tf, tokenizer=msclip.get_tokenizer(recipe.model),
                            workers=0)
    it = iter(data.loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - t0) / batches


def plan_budget(recipes: dict[str, Any], budget_s: float, overhead_s: float = 75.0) -> tuple[int, int]:
    """(threads, steps): the faster thread count (a CPU shared with other jobs can make two threads
    several times slower than one), and the recipes' step budget capped so that both runs fit ``budget_s``."""
    first = next(iter(recipes.values()))
    options = sorted({torch.get_num_threads(), 1}, reverse=True)
    times = {n: _step_time(first, n) for n in options}
    threads = min(times, key=times.get)
    per_step = times[threads] + sum(_step_time(r, threads) for r in list(recipes.values())[1:])
    per_step += len(recipes) * _batch_time(first)  # on 2 cores the data work competes with the model
    # 20 % for logging, evaluation and noise; when torch threads plus loader workers outnumber the cores the
    # calibration (run without a concurrent loader) was measured 1.5x optimistic, so allow for that instead.
    oversubscribed = threads + first.data.workers > (os.cpu_count() or 1)
    margin = 1.5 if oversubscribed else 1.2
    fit = int((budget_s - overhead_s) / (margin * per_step))
    steps = min(first.train.steps, max(10, fit // 10 * 10))
    if steps < first.train.steps:  # the safety net: say so loudly, the table is then not the reference one
        print(f"[demo] WARNING: this machine is too slow (or too busy) for the recipes' {first.train.steps} steps in "
              f"{budget_s / 60:.1f} min: CUTTING both runs to {steps} steps; the numbers will differ from a full "
              "run's. Run `msclip demo --steps 400` to train the full recipe regardless of time.",
              file=sys.stderr, flush=True)
    print(f"[demo] calibration: {per_step:.2f} s per step for both models with data with {threads} thread(s) "
          f"({', '.join(f'{n} threads: {t:.2f} s' for n, t in times.items())} for the first); "
          f"step budget {steps} (recipes ask {first.train.steps}; {budget_s / 60:.1f} min left)", flush=True)
    return threads, steps


def final_zeroshot(model: Any, recipe: Any, autocast: Any = None, num_samples: int | None = None) -> dict[str, Any]:
    """Prompt-ensembled zero-shot on the Fashion-MNIST test images (all 10,000 by default), with per-class
    recall: eval/in_training's task for the recipe, scored by eval/zeroshot (percent, `_pct` keys)."""
    import msclip
    from msclip.data.fashion_mnist import FASHION_MNIST_CLASSNAMES
    from msclip.eval.in_training import ZeroShotEvaluator, recipe_task

    _, _, eval_tf = msclip.create_model_and_transforms(recipe.model)
    task = recipe_task(recipe, eval_tf, num_samples)
    ev = ZeroShotEvaluator(task, msclip.get_tokenizer(recipe.model), torch.device("cpu"), autocast, batch_size=500)
    out = ev.full(model)
    out["templates"] = len(task.templates.templates)
    out["display_names"] = list(FASHION_MNIST_CLASSNAMES)
    return out


def _plot(runs: dict[str, dict], out: Path) -> list[str]:
    from msclip.analysis.plots import pyplot, save_figure
    from msclip.train.logger import read_metrics

    plt = pyplot()
    files = []
    for key, ylabel, fname in (("loss", "contrastive loss (training batch)", "loss.png"),
                               ("top1_pct", "zero-shot top-1 % (1,000 test images)", "accuracy.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, run in runs.items():
            kind = "train" if key == "loss" else "zeroshot"
            recs = read_metrics(run["run_dir"], kind)
            ax.plot([r["step"] for r in recs], [float(r[key]) for r in recs], marker="" if key == "loss" else "o",
                    label=label)
        if key == "top1_pct":
            ax.axhline(10.0, color="grey", linestyle=":", label="chance (10 %)")
            ax.set_ylim(0, 100)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        save_figure(fig, out / fname)
        files.append(fname)
    return files


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _images_scored(zeroshot: dict) -> str:
    n = zeroshot.get("images")
    return "all 10,000 test images" if n in (None, 10_000) else f"{n:,} test images, evenly spread over the test set"


def _report(runs: dict[str, dict], out: Path, plots: list[str], wall: float, threads: int) -> Path:
    rows = ["| model | params (shared) | steps x batch | train time | samples/s | final loss | "
            "zero-shot top-1 | top-5 | mean per-class recall |", "|---|---|---|---|---|---|---|---|---|"]
    for label, r in runs.items():
        z, res = r["zeroshot"], r["result"]
        rows.append(f"| {label} (`{r['recipe'].model}`) | {r['params']['total'] / 1e6:.2f} M "
                    f"({r['params']['shared'] / 1e6:.2f} M) | {res.state.step} x {r['batch']} | {res.wall_s:.0f} s | "
                    f"{r['sps']:.0f} | {r['final_loss']:.3f} | **{z['top1_pct']:.1f} %** | "
                    f"{z['top5_pct']:.1f} % | {z['mean_per_class_recall_pct']:.1f} % |")
    (a, ra), (b, rb) = list(runs.items())
    diff = round(ra["zeroshot"]["top1_pct"], 1) - round(rb["zeroshot"]["top1_pct"], 1)  # as the table shows them
    if abs(diff) < 0.05:
        winner = f"{a} and {b} are tied"
    else:
        winner = f"{a} is ahead by {diff:.1f} points" if diff > 0 else f"{b} is ahead by {-diff:.1f} points"
    lines = [
        "# msclip demo: MS-CLIP-S vs CLIP on Fashion-MNIST", "",
        f"Total wall time {wall / 60:.1f} min on {_cpu_name()}, "
        f"{threads} torch thread(s), precision {ra['result'].precision}. "
        "Pre-training pairs: the 60,000 training images with captions drawn from templates around the class "
        f"names; zero-shot: {_images_scored(ra['zeroshot'])}, classifier = per-class mean of the normalised text "
        f"embeddings of {ra['zeroshot']['templates']} prompt templates (the caption templates). Chance is 10 %. "
        "`msclip zeroshot --templates fashion_mnist` on the same checkpoint and images gives the same numbers.", "",
        *rows, "",
        f"Measured, single seed, short budget: {winner}. A run this short says little about the full-scale "
        "comparison in the paper; rerun with more steps (train.steps=...) to see where the curves go.", "",
        *[f"![{p}]({p})" for p in plots], "",
        "## Files", "",
        *[f"- {label}: run folder `{r['run_dir']}` (resolved recipe `recipe.yaml`, checkpoints in `checkpoints/`, "
          f"weights `model.safetensors`, metrics `metrics.jsonl` / `metrics-train.csv` / `metrics-zeroshot.csv`)"
          for label, r in runs.items()],
        "- resolved recipes, copied: " + ", ".join(f"`{r['recipe_copy']}`" for r in runs.values()),
        "- per-class zero-shot accuracy (recall): see `zeroshot.md`", "",
        "Load the weights: `msclip.create_model(\"<model>\", pretrained=\"<run folder>/model.safetensors\")`.",
    ]
    return mio.write_text(out / "report.md", "\n".join(lines) + "\n")


def _new_report_folder(root: Path, name: str) -> Path:
    """A folder of its own: a demo started in the same second as another gets ``name-2``, ``name-3``, ..."""
    mio.make_folder(root)
    for n in range(1, 1000):
        out = root / (name if n == 1 else f"{name}-{n}")
        try:
            out.mkdir()  # exclusive: two demos cannot both create it
            return out
        except FileExistsError:
            continue
    raise mio.WriteError(f"{root}: 999 report folders named {name}-*; remove some")


def run_demo(steps: int | None = None, out_root: str = "reports", recipes_dir: Path | None = None,
             budget_min: float = 8.5, spent_s: float = 0.0, test_images: int | None = None) -> Path:
    import msclip
    from msclip.train import train
    from msclip.train.recipe import load_recipe

    t0 = time.perf_counter()
    out = _new_report_folder(Path(out_root), f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    recipes_dir = Path(recipes_dir) if recipes_dir else RECIPES_DIR
    recipes = {label: load_recipe(recipes_dir / fname) for label, fname in RECIPES.items()}
    threads = None
    if steps is None:  # fit the budget on this machine; both models get the same number of steps
        threads, steps = plan_budget(recipes, budget_min * 60 - spent_s - (time.perf_counter() - t0))
    runs: dict[str, dict] = {}
    for label, fname in RECIPES.items():
        overrides = [f"output_dir={out / 'runs'}", f"train.steps={steps}"]
        if steps < recipes[label].train.steps:  # keep about four evaluations and checkpoints per run
            every = max(10, steps // 4 // 10 * 10)
            overrides += [f"zeroshot.every={every}", f"checkpoint.every={every}"]
            sched = recipes[label].optim
            if sched.unit == "steps" and sched.warmup + sched.cooldown > steps // 2:  # a short run keeps a schedule
                overrides += [f"optim.warmup={steps // 5}", "optim.cooldown=0"]
        if threads is not None:
            overrides.append(f"train.threads={threads}")
        recipe = load_recipe(recipes_dir / fname, overrides)
        print(f"[demo] training {label}: {recipe.model}, {recipe.train.steps} steps of {recipe.data.batch_size}",
              flush=True)
        res = train(recipe)
        model = msclip.create_model(recipe.model, pretrained=res.exported)
        # fp32, as `msclip zeroshot` runs by default: the same number
        zs = final_zeroshot(model, recipe, num_samples=test_images)
        print(f"[demo] {label}: zero-shot top-1 {zs['top1_pct']:.1f} % on {zs['images']} test images "
              f"({res.wall_s:.0f} s of training)", flush=True)
        copy = out / f"recipe-{Path(fname).stem}.yaml"
        mio.write_bytes(copy, (res.run_dir / "recipe.yaml").read_bytes())
        tail = res.losses[-10:] or [float("nan")]
        runs[label] = {"recipe": recipe, "result": res, "run_dir": res.run_dir, "zeroshot": zs,
                       "params": model.parameter_counts(), "batch": recipe.data.batch_size,
                       "sps": res.state.step * recipe.data.batch_size / max(res.wall_s, 1e-9),
                       "final_loss": sum(tail) / len(tail), "recipe_copy": copy.name}
    plots = _plot(runs, out)
    _per_class(runs, out)
    report = _report(runs, out, plots, time.perf_counter() - t0, threads or torch.get_num_threads())
    return report


def _per_class(runs: dict[str, dict], out: Path) -> None:
    names = next(iter(runs.values()))["zeroshot"]["display_names"]
    lines = ["| class | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for i, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(f"{r['zeroshot']['per_class'][i]['recall_pct']:.1f} %"
                                                  for r in runs.values()) + " |")
    n_images = next(iter(runs.values()))["zeroshot"]["images"]
    mio.write_text(out / "zeroshot.md", f"# Zero-shot recall per class ({n_images:,} test images)\n\n" + "\n".join(lines) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=None,
                        help="step budget for both models (default: the recipes', capped to fit --budget-min)")
    parser.add_argument("--budget-min", type=float, default=8.5,
                        help="wall-clock minutes the whole demo may take (default 8.5)")
    parser.add_argument("--started-at", type=float, default=None, metavar="UNIX_TIME",
                        help="count the budget from this moment (`make demo` passes its own start, so that "
                             "the set-up of a fresh machine is inside the budget)")
    parser.add_argument("--out", default="reports", help="parent folder of the report (default: reports)")
    parser.add_argument("--test-images", type=int, default=None, metavar="N",
                        help="score the final zero-shot on N test images, evenly spread (default: all 10,000)")
    parser.add_argument("--recipes", type=Path, default=None,
                        help="folder with the two demo recipes (default: the ones shipped in the package)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for flag, value in (("--test-images", args.test_images), ("--steps", args.steps)):
        if value is not None and value < 1:
            print(f"msclip demo: error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if not _check_data():
        return 1
    t0 = time.perf_counter()
    spent = max(0.0, time.time() - args.started_at) if args.started_at else 0.0
    if spent:
        print(f"[demo] set-up took {spent / 60:.1f} min of the {args.budget_min:.1f} min budget", flush=True)
    report = run_demo(args.steps, args.out, args.recipes, args.budget_min, spent, args.test_images)
    total = f", {(time.time() - args.started_at) / 60:.1f} min with set-up" if args.started_at else ""
    print(f"\n[demo] done in {(time.perf_counter() - t0) / 60:.1f} min{total}. Report: {report}")
    print(report.read_text().split("\n\n")[2])  # the results table
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msclip.demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
