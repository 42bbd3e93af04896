"""Zero-shot evaluation throughput: msclip clip-b32 vs open_clip ViT-B-32-quickgelu (same weights,
same class names, same 80 templates, same images, same run), fp32 and bf16 weights.

Both sides run their own full zero-shot path: classifier from class names (tokenise + encode every
template, average, renormalise) and then score the images (encode_image + 100 * f @ W).
  open_clip: open_clip.build_zero_shot_classifier + encode_image
  msclip:    msclip.eval.zeroshot.build_classifier + score_images (what `msclip zeroshot` runs)
Unit: images/s including the class-embedding time (higher is better). Images are decoded and
preprocessed once beforehand (identical for both), so decoding does not dilute the comparison.
The workload keeps ImageNet's ratio of prompts to images (1000 x 80 / 50,000 = 1.6).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_from_env, print_table, sync  # noqa: E402

import msclip  # noqa: E402
from msclip.eval.features import SafeDataset  # noqa: E402
from msclip.eval.zeroshot import build_classifier, score_images  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "horse")


def photo_batch(n: int, model) -> torch.Tensor:
    """n preprocessed images: the scikit-image sample photos, with crops/flips for variety."""
    from PIL import Image
    from skimage import data

    from msclip.transforms import image_transform

    tf = image_transform(model.cfg.preprocess, model.cfg.vision.image_size, is_train=False)
    base = []
    for name in PHOTOS:
        arr = getattr(data, name)()
        base.append(Image.fromarray(arr if arr.dtype != bool else (arr * 255).astype("uint8")))
    out = []
    for i in range(n):
        img = base[i % len(base)]
        w, h = img.size
        k = (i // len(base)) % 4  # 4 views per photo: full, mirrored, two crops
        if k == 1:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        elif k >= 2:
            img = img.crop((0, 0, w * 3 // 4, h * 3 // 4)) if k == 2 else img.crop((w // 4, h // 4, w, h))
        out.append(tf(img))
    return torch.stack(out)


def run_open_clip(model, tokenizer, classnames, templates, images, batch, device, dtype) -> torch.Tensor:
    """-> the classifier W [E, C]."""
    import open_clip

    with torch.inference_mode():
        W = open_clip.build_zero_shot_classifier(model, tokenizer=tokenizer, classnames=classnames,
                                                 templates=templates, num_classes_per_batch=10, device=device,
                                                 use_tqdm=False)
        preds = []
        for s in range(0, len(images), batch):
            f = model.encode_image(images[s:s + batch].to(device=device, dtype=dtype), normalize=True)
            preds.append((100.0 * f @ W).argmax(-1))
    return W


def run_msclip(model, tokenizer, classnames, templates, images, batch, device) -> torch.Tensor:
    W = build_classifier(model, tokenizer, classnames, templates, device, text_batch_size=256)
    pairs = [(images[i], 0) for i in range(len(images))]  # already transformed: the identity transform
    score_images(model, W, SafeDataset(pairs, lambda x: x), device, batch_size=batch)
    return W


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def main() -> None:
    import open_clip
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    device = device_from_env()
    # ImageNet's mix: 1000 x 80 prompts for 50,000 images = 1.6 prompts per image; kept here. CPU sizes
    # keep the whole script near 2 minutes on 2 cores, where bf16 may lack native support (slower than fp32).
    n_cls, n_img, batch = (1, 50, 25) if device.type == "cpu" else (100, 5000, 250)
    classnames = list(IMAGENET_CLASSNAMES[:n_cls])
    templates = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-32-quickgelu").eval()
    ours = msclip.create_model("clip-b32")
    ours.load_state_dict(msclip.checkpoint.convert_state_dict(ref.state_dict(), ours))
    ref_tok, our_tok = open_clip.get_tokenizer("ViT-B-32-quickgelu"), msclip.get_tokenizer("clip-b32")
    images = photo_batch(n_img, ours)
    rows, agree = [], []
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        r, o = (m.to(device=device, dtype=dtype) for m in (ref, ours))
        # warm-up (kernels, allocator) on a small slice, then one timed full run each
        run_open_clip(r, ref_tok, classnames[:1], templates[:4], images[:4], batch, device, dtype)
        run_msclip(o, our_tok, classnames[:1], templates[:4], images[:4], batch, device)
        sync(device)
        t_ref, w_ref = timed(lambda: run_open_clip(r, ref_tok, classnames, templates, images, batch, device, dtype))
        sync(device)
        t_our, w_our = timed(lambda: run_msclip(o, our_tok, classnames, templates, images, batch, device))
        sync(device)
        rows.append((f"zero-shot clip-b32 {precision} (img/s incl. classifier)", n_img / t_our, n_img / t_ref))
        diff = (w_ref.float() - w_our.float()).abs().max().item()
        agree.append(f"{precision}: open_clip {t_ref:.1f} s, msclip {t_our:.1f} s, max |W diff| {diff:.1e}")
    print_table(f"zero-shot throughput on {device}: {n_cls} classes x {len(templates)} templates + {n_img} images "
                f"(reference = open_clip build_zero_shot_classifier + encode_image, same weights, same run; "
                f"torch threads {torch.get_num_threads()})", rows)
    print("wall time per full run: " + "; ".join(agree))


if __name__ == "__main__":
    main()
