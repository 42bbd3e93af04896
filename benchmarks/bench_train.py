"""Training-step throughput (forward + ClipLoss + backward + AdamW step), samples/s, higher is better.

1. msclip ``clip-b32`` vs open_clip ``ViT-B-32-quickgelu`` with the same weights, batch and AdamW, in fp32 and
   bf16 autocast, measured in the same run. Goal: >= 1.0x.
2. ``msclip-s-b32`` vs ``clip-b32``, with the FLOP ratio (``torch.utils.flop_counter``, forward + backward)
   beside it. Goal: the step-time ratio is no worse than the FLOP ratio (about 1.6x).

msclip cuts each text batch to its longest caption as part of its forward; open_clip
always runs all 77 positions. Both get the same 77-token batch here, so that saving is part of the result.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (best_time, count_flops, device_from_env, gemm_peak_gflops, print_efficiency,  # noqa: E402
                    print_table)

import msclip  # noqa: E402
from msclip.loss import ClipLoss  # noqa: E402

CAPTIONS = ["a photo of a dog", "a diagram of the solar system", "two people riding horses on a beach at sunset",
            "a red car on a wet road next to a tall building", "an ankle boot, product photo"]


def _features(out: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[0], out[1], out[2]  # open_clip tuple output


def make_step(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, dtype: torch.dtype | None):
    """A closure doing one full optimiser step (AdamW, fused on CUDA)."""
    model.train()
    dev = images.device
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=dev.type == "cuda")
    loss_fn = ClipLoss()

    def step() -> None:
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(*_features(model(images, tokens)))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def train_flops(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, trim: bool = True) -> int:
    """FLOPs of forward + loss + backward; ``trim=False`` runs every text position (the 77-token convention)."""
    def step() -> None:
        if trim:
            feats = _features(model(images, tokens))
        else:
            feats = (model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True, trim=False),
                     model.logit_scale.exp())
        ClipLoss()(*feats).backward()

    model.train()
    flops = count_flops(step)
    model.zero_grad(set_to_none=True)
    return flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 128 on GPU")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per workload (default 2 CPU, 5 GPU)")
    args = parser.parse_args()
    import open_clip

    device = device_from_env()
    batch = args.batch or (8 if device.type == "cpu" else 128)
    reps = args.reps or (2 if device.type == "cpu" else 5)
    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-32-quickgelu")
    ours = msclip.create_model("clip-b32")
    ours.load_state_dict(msclip.checkpoint.convert_state_dict(ref.state_dict(), ours))
    mss = msclip.create_model("msclip-s-b32")
    for m in (ref, ours, mss):
        m.to(device)
    images = torch.randn(batch, 3, 224, 224, device=device)
    tokens = msclip.get_tokenizer("clip-b32")((CAPTIONS * batch)[:batch]).to(device)
    tokens_mss = msclip.get_tokenizer("msclip-s-b32")((CAPTIONS * batch)[:batch]).to(device)

    rows, times = [], {}
    for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        for name, model, tok in (("open_clip", ref, tokens), ("clip-b32", ours, tokens), ("msclip-s", mss, tokens_mss)):
            times[name, precision] = best_time(make_step(model, images, tok, dtype), device, reps=reps)
        rows.append((f"train step clip-b32 vs open_clip {precision}", batch / times["clip-b32", precision],
                     batch / times["open_clip", precision]))
        rows.append((f"train step msclip-s-b32 vs clip-b32 {precision}", batch / times["msclip-s", precision],
                     batch / times["clip-b32", precision]))
    print_table(f"Training throughput, samples/s ({device.type}, batch {batch}, AdamW, same run)", rows)

    small = max(1, min(batch, 2))  # the FLOP ratio does not depend on the batch size
    f_clip = train_flops(ours, images[:small], tokens[:small])
    f_mss = train_flops(mss, images[:small], tokens_mss[:small])
    flop_ratio = f_mss / f_clip
    full_ratio = (train_flops(mss, images[:small], tokens_mss[:small], trim=False)
                  / train_flops(ours, images[:small], tokens[:small], trim=False))
    print(f"\nFLOPs per sample (forward + backward, text as trimmed by msclip): clip-b32 {f_clip / small / 1e9:.1f} G, "
          f"msclip-s-b32 {f_mss / small / 1e9:.1f} G, ratio {flop_ratio:.2f}x (with all 77 text tokens: {full_ratio:.2f}x)")
    f_ref = train_flops(ours, images[:small], tokens[:small], trim=False)  # open_clip's work: all 77 positions
    per_sample = {"open_clip": f_ref / small, "clip-b32": f_clip / small, "msclip-s": f_mss / small}
    eff, peaks = [], {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peaks[precision] = gemm_peak_gflops(device, dtype)
        eff += [(f"train step {name} {precision}", per_sample[name], batch / times[name, precision], peaks[precision])
                for name in ("open_clip", "clip-b32", "msclip-s")]
    print_efficiency("achieved GFLOP/s against this machine's measured GEMM rate (same run, same threads: "
                     + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in peaks.items()) + ")", eff)
    for precision in ("fp32", "bf16"):
        vs_ref = times["open_clip", precision] / times["clip-b32", precision]
        time_ratio = times["msclip-s", precision] / times["clip-b32", precision]
        print(f"{precision}: clip-b32 = {vs_ref:.2f}x open_clip (goal >= 1.0: {'met' if vs_ref >= 1.0 else 'MISSED'}); "
              f"msclip-s-b32 step time = {time_ratio:.2f}x clip-b32 vs FLOP ratio {flop_ratio:.2f}x "
              f"({'met' if time_ratio <= flop_ratio else 'MISSED'})")


if __name__ == "__main__":
    main()
