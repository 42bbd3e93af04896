"""Tiny-model training throughput (the demo's models), samples/s, higher is better; and the demo's data path.

1. Training steps (forward + ClipLoss + backward + fused AdamW step + logit-scale clamp, fp32, batch 128,
   1 torch thread unless ``--threads``) of ``clip-b32-tiny`` and ``msclip-s-b32-tiny`` against open_clip
   ``CLIP`` models with the same width, depth, heads, patch grid, image size, context length and embed dim
   (built from the msclip configs, QuickGELU). Each side is fed as its trainer feeds it:
     msclip:    uint8 images -> ``data.device_batch.images_to_model_input`` (inside the timed step), tokens
                cut with ``model.trim_tokens``, ``msclip.loss.ClipLoss``;
     open_clip: images already normalised float (its loader workers do that), all ``context_length``
                tokens, ``open_clip.loss.ClipLoss``.
   Both use the same two AdamW groups (no weight decay on gains, biases and the temperature), fused.
   Neither side computes a gradient norm (msclip's trainer does, every step; open_clip's only when
   clipping), so the model, loss and optimiser are compared, not the loops. Goal: >= 1.5x.
2. The demo's Fashion-MNIST batches (``build_train_data`` with recipes/demo-fmnist-msclip-s.yaml and the
   model's training transform, as train/main.py builds them), batches/s: the batch path
   (``FashionMNISTBatches``, uint8) vs the per-image PIL path (the same transform hidden behind a wrapper,
   so ``batch_crop_spec`` does not recognise it). Both include ``images_to_model_input`` and the token cut
   on the CPU. Skipped when Fashion-MNIST is not installed.

Repetitions alternate between the two sides of a row after a warm-up; the median per side is reported.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_from_env, print_table, sync  # noqa: E402

import msclip  # noqa: E402
from msclip.data.device_batch import images_to_model_input  # noqa: E402
from msclip.loss import ClipLoss  # noqa: E402

MODELS = ("clip-b32-tiny", "msclip-s-b32-tiny")
GOAL = 1.5
DEMO_RECIPE = Path(msclip.__file__).parent / "recipes" / "demo-fmnist-msclip-s.yaml"


def interleaved(fns: dict[str, Callable[[], None]], device: torch.device, reps: int,
                warmup: int) -> dict[str, float]:
    """Median wall time per name; within each repetition every fn runs once, the order alternating."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):  # neither side always runs first
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    """Both trainers' split (no decay on 1-d tensors: gains, biases, the temperature), fused."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-4, fused=True)


def open_clip_twin(cfg: msclip.ModelCfg) -> torch.nn.Module:
    """open_clip CLIP with the shapes of an msclip config (its conv stem / sharing are msclip's own business)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    v, t = cfg.vision, cfg.text
    vision = CLIPVisionCfg(layers=v.layers, width=v.width, head_width=v.width // v.heads, mlp_ratio=v.mlp_ratio,
                           patch_size=v.patch_size, image_size=v.image_size)
    text = CLIPTextCfg(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                       layers=t.layers, mlp_ratio=t.mlp_ratio)
    return CLIP(cfg.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True,
                init_logit_scale=cfg.init_logit_scale)


def msclip_steps(model: msclip.MSCLIP, images_u8: torch.Tensor, tokens: torch.Tensor, device: torch.device,
                 steps: int) -> Callable[[], None]:
    model.train()
    opt, loss_fn, pre = adamw(model), ClipLoss(), model.cfg.preprocess

    def run() -> None:
        for _ in range(steps):
            tok = model.trim_tokens(tokens).to(device)  # the trainer cuts on the CPU, before the copy
            images = images_to_model_input(images_u8, device, pre.mean, pre.std)
            out = model(images, tok, trim=False)
            loss_fn(out["image_features"], out["text_features"], out["logit_scale"]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                model.logit_scale.clamp_(0.0, 4.6052)

    return run


def open_clip_steps(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, device: torch.device,
                    steps: int) -> Callable[[], None]:
    from open_clip.loss import ClipLoss as OpenClipLoss

    model.train()
    opt, loss_fn = adamw(model), OpenClipLoss()

    def run() -> None:
        for _ in range(steps):
            opt.zero_grad()
            img, tok = images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
            image_features, text_features, logit_scale = model(img, tok)
            loss_fn(image_features, text_features, logit_scale).backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)

    return run


def train_rows(device: torch.device, batch: int, steps: int, reps: int, warmup: int) -> list[tuple]:
    from msclip.data.fashion_mnist import DEFAULT_CAPTION_TEMPLATES, FASHION_MNIST_CAPTION_NAMES

    captions = [t.format(n) for t in DEFAULT_CAPTION_TEMPLATES for n in FASHION_MNIST_CAPTION_NAMES]
    rows = []
    for name in MODELS:
        torch.manual_seed(0)
        ours = msclip.create_model(name).to(device)
        cfg = ours.cfg
        ref = open_clip_twin(cfg).to(device)
        size, pre = cfg.vision.image_size, cfg.preprocess
        images_u8 = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
        images_f = images_to_model_input(images_u8, "cpu", pre.mean, pre.std)  # open_clip's loader output
        tokens = msclip.get_tokenizer(name)((captions * batch)[:batch])  # context_length positions
        t = interleaved({"msclip": msclip_steps(ours, images_u8, tokens, device, steps),
                         "open_clip": open_clip_steps(ref, images_f, tokens, device, steps)}, device, reps, warmup)
        trimmed = ours.trim_tokens(tokens).shape[1]
        rows.append((f"train {name} ({trimmed}/{tokens.shape[1]} tok)", batch * steps / t["msclip"],
                     batch * steps / t["open_clip"]))
        del ours, ref
    return rows


class _PerImage:
    """The training transform without its attributes: ``batch_crop_spec`` then keeps the per-image path."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, image):  # noqa: ANN001, ANN204 - a PIL image in, a float tensor out
        return self.transform(image)


def data_row(batches: int, reps: int) -> tuple | None:
    from msclip.data import build_train_data
    from msclip.data.fashion_mnist import INSTALL_HINT, fashion_mnist_available
    from msclip.train.recipe import load_recipe

    recipe = load_recipe(DEMO_RECIPE)
    if not fashion_mnist_available(recipe.data.fashion_mnist_root):
        print(f"\nFashion-MNIST data path: skipped, Fashion-MNIST is not installed ({INSTALL_HINT})")
        return None
    model, train_tf, _ = msclip.create_model_and_transforms(recipe.model)
    tokenizer = msclip.get_tokenizer(recipe.model)
    pre = model.cfg.preprocess
    fast = build_train_data(recipe.data, image_transform=train_tf, tokenizer=tokenizer, seed=recipe.seed)
    slow = build_train_data(recipe.data, image_transform=_PerImage(train_tf), tokenizer=tokenizer, seed=recipe.seed)
    if not fast.details.get("batch_path") or slow.details.get("batch_path"):
        print("\nFashion-MNIST data path: skipped, the batch and per-image paths are not both reachable")
        return None
    iters: dict[str, Iterator] = {"batch": iter(fast.loader), "per_image": iter(slow.loader)}

    def pull(it: Iterator) -> Callable[[], None]:
        def run() -> None:
            for _ in range(batches):
                images, tokens, *_ = next(it)
                images_to_model_input(images, "cpu", pre.mean, pre.std)
                model.trim_tokens(tokens)
        return run

    t = interleaved({k: pull(it) for k, it in iters.items()}, torch.device("cpu"), reps, warmup=1)
    bs = recipe.data.batch_size
    return (f"fmnist b{bs}: batch path vs per-image PIL", batches / t["batch"], batches / t["per_image"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per side (median reported)")
    parser.add_argument("--steps", type=int, default=4, help="training steps (data: batches) per repetition")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions per side first")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = device_from_env()
    t0 = time.perf_counter()
    rows = train_rows(device, args.batch, args.steps, args.reps, args.warmup)
    print_table(f"Tiny-model training, samples/s ({device.type}, fp32, batch {args.batch}, "
                f"{args.threads} thread(s), {args.reps} x {args.steps} steps, interleaved, median)", rows)
    for name, ours, ref in rows:
        ratio = ours / ref
        print(f"{name}: msclip/open_clip = {ratio:.2f}x (goal >= {GOAL}x: {'met' if ratio >= GOAL else 'MISSED'})")
    row = data_row(args.steps, args.reps)
    if row is not None:
        print_table("Fashion-MNIST demo data, batches/s (cpu, workers 0, incl. normalise + token cut)", [row])
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
