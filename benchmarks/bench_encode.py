"""encode_image / encode_text throughput: msclip clip-b32 vs open_clip ViT-B-32-quickgelu (same weights,
same inputs, same run), fp32 and bf16 weights; msclip-s-b32 alongside. Units: items/s, higher is better."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (best_time, count_flops, device_from_env, gemm_peak_gflops, print_efficiency,  # noqa: E402
                    print_table)

import msclip  # noqa: E402

CAPTIONS = ["a photo of a dog", "a diagram of the solar system", "two people riding horses on a beach at sunset",
            "a red car"]


def main() -> None:
    import open_clip

    device = device_from_env()
    torch.manual_seed(0)
    n_img, n_txt = (8, 32) if device.type == "cpu" else (256, 1024)
    ref = open_clip.create_model("ViT-B-32-quickgelu").eval()
    ours = msclip.create_model("clip-b32")
    ours.load_state_dict(msclip.checkpoint.convert_state_dict(ref.state_dict(), ours))
    mss = msclip.create_model("msclip-s-b32")
    images = torch.randn(n_img, 3, 224, 224, device=device)
    captions = msclip.get_tokenizer("clip-b32")((CAPTIONS * n_txt)[:n_txt]).to(device)
    with torch.inference_mode():  # FLOPs per item (forward), the same in either precision
        flops = {"img clip": count_flops(lambda: ours.encode_image(images[:1])),
                 "img mss": count_flops(lambda: mss.encode_image(images[:1])),
                 "txt clip": count_flops(lambda: ours.encode_text(captions)) / n_txt,
                 "txt ref": count_flops(lambda: ours.encode_text(captions, trim=False)) / n_txt,
                 "txt mss": count_flops(lambda: mss.encode_text(captions)) / n_txt}
    rows, eff, peaks = [], [], {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peak = gemm_peak_gflops(device, dtype)
        r, o, s = (m.to(device=device, dtype=dtype) for m in (ref, ours, mss))
        x = images.to(dtype)
        with torch.inference_mode():
            t_ref = best_time(lambda: r.encode_image(x), device)
            t_our = best_time(lambda: o.encode_image(x), device)
            t_mss = best_time(lambda: s.encode_image(x), device)
            rows.append((f"encode_image clip-b32 {precision} (img/s)", n_img / t_our, n_img / t_ref))
            rows.append((f"encode_image msclip-s-b32 {precision} (img/s)", n_img / t_mss, n_img / t_ref))
            t_ref = best_time(lambda: r.encode_text(captions), device)
            t_our = best_time(lambda: o.encode_text(captions), device)
            t_full = best_time(lambda: o.encode_text(captions, trim=False), device)
            t_mss = best_time(lambda: s.encode_text(captions), device)
            rows.append((f"encode_text clip-b32 {precision} (txt/s)", n_txt / t_our, n_txt / t_ref))
            rows.append((f"encode_text clip-b32 untrimmed {precision} (txt/s)", n_txt / t_full, n_txt / t_ref))
            rows.append((f"encode_text msclip-s-b32 {precision} (txt/s)", n_txt / t_mss, n_txt / t_ref))
        img, txt = rows[-5], rows[-3]
        eff += [(f"encode_image clip-b32 {precision}", flops["img clip"], img[1], peak),
                (f"encode_image open_clip {precision}", flops["img clip"], img[2], peak),
                (f"encode_image msclip-s-b32 {precision}", flops["img mss"], rows[-4][1], peak),
                (f"encode_text clip-b32 {precision}", flops["txt clip"], txt[1], peak),
                (f"encode_text open_clip (77 tokens) {precision}", flops["txt ref"], txt[2], peak),
                (f"encode_text msclip-s-b32 {precision}", flops["txt mss"], rows[-1][1], peak)]
        peaks[precision] = peak
    print_table(f"encode throughput on {device} (reference = open_clip ViT-B-32-quickgelu, same run; "
                f"torch threads {torch.get_num_threads()})", rows)
    print_efficiency("achieved GFLOP/s against this machine's measured GEMM rate (same run, same threads: "
                     + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in peaks.items()) + ")", eff)


if __name__ == "__main__":
    main()
