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
        peaks[precision] = gemm_peak_gflops(device, dtype)
        r, o, s = (m.to(device=device, dtype=dtype) for m in (ref, ours, mss))
        x = images.to(dtype)
        with torch.inference_mode():  # items/s of each workload
            rate = {"img ref": n_img / best_time(lambda: r.encode_image(x), device),
                    "img clip": n_img / best_time(lambda: o.encode_image(x), device),
                    "img mss": n_img / best_time(lambda: s.encode_image(x), device),
                    "txt ref": n_txt / best_time(lambda: r.encode_text(captions), device),
                    "txt clip": n_txt / best_time(lambda: o.encode_text(captions), device),
                    "txt full": n_txt / best_time(lambda: o.encode_text(captions, trim=False), device),
                    "txt mss": n_txt / best_time(lambda: s.encode_text(captions), device)}
        rows += [(f"encode_image clip-b32 {precision} (img/s)", rate["img clip"], rate["img ref"]),
                 (f"encode_image msclip-s-b32 {precision} (img/s)", rate["img mss"], rate["img ref"]),
                 (f"encode_text clip-b32 {precision} (txt/s)", rate["txt clip"], rate["txt ref"]),
                 (f"encode_text clip-b32 untrimmed {precision} (txt/s)", rate["txt full"], rate["txt ref"]),
                 (f"encode_text msclip-s-b32 {precision} (txt/s)", rate["txt mss"], rate["txt ref"])]
        # open_clip does clip-b32's work, with all 77 text positions
        for label, key, flop_key in (("encode_image clip-b32", "img clip", "img clip"),
                                     ("encode_image open_clip", "img ref", "img clip"),
                                     ("encode_image msclip-s-b32", "img mss", "img mss"),
                                     ("encode_text clip-b32", "txt clip", "txt clip"),
                                     ("encode_text open_clip (77 tokens)", "txt ref", "txt ref"),
                                     ("encode_text msclip-s-b32", "txt mss", "txt mss")):
            eff.append((f"{label} {precision}", flops[flop_key], rate[key], peaks[precision]))
    print_table(f"encode throughput on {device} (reference = open_clip ViT-B-32-quickgelu, same run; "
                f"torch threads {torch.get_num_threads()})", rows)
    print_efficiency("achieved GFLOP/s against this machine's measured GEMM rate (same run, same threads: "
                     + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in peaks.items()) + ")", eff)


if __name__ == "__main__":
    main()
