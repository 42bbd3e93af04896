"""GPU checks in one go: bf16 training throughput and MFU, fp32-vs-bf16 agreement, clip-b16 parity, a 2-GPU
NCCL step, GPU JPEG decoding. Each section is guarded: one that fails reports its error and the rest run.

    python benchmarks/gpu_check.py              # on a CUDA machine (benchmarks/gpu_check.sh runs it)
    python benchmarks/gpu_check.py --cpu-smoke  # every non-CUDA part on CPU with tiny configs (a test runs it)

Needs torch and msclip only (open_clip, torchvision, scikit-image are used when importable); installs nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

SRC = Path(__file__).resolve().parents[1] / "src"
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name();
# the first match wins, so the more specific names come first.
PEAKS_BF16 = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))


def peak_bf16_tflops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAKS_BF16 if key in device_name), None)


@dataclass
class Check:
    """What a run may use: the device, tiny configs (smoke) or full ones, and the collected results."""
    device: torch.device
    smoke: bool
    batch: int
    steps: int
    budget_s: float
    started: float = field(default_factory=time.perf_counter)
    results: dict[str, Any] = field(default_factory=dict)

    def name(self, model: str) -> str:
        return f"{model}-tiny" if self.smoke else model

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """A true fp32 reference (TF32 matmuls keep ~10 mantissa bits); the previous setting comes back."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def synthetic_tokens(cfg: Any, batch: int, seed: int = 0) -> torch.Tensor:
    """Caption-like token rows without a tokenizer: SOT, 4..28 random ids, EOT (the largest id, so that
    argmax pooling finds it), zero padding. Real caption lengths, so the text trimming is realistic."""
    g = torch.Generator().manual_seed(seed)
    vocab, ctx = cfg.text.vocab_size, cfg.text.context_length
    out = torch.zeros(batch, ctx, dtype=torch.long)
    lengths = torch.randint(4, min(29, ctx - 1), (batch,), generator=g)
    for row, n in enumerate(lengths.tolist()):
        out[row, 0] = vocab - 2
        out[row, 1:n + 1] = torch.randint(1, vocab - 2, (n,), generator=g)
        out[row, n + 1] = vocab - 1
    return out


def model_inputs(name: str, batch: int, device: torch.device) -> tuple[Any, torch.Tensor, torch.Tensor]:
    import msclip

    torch.manual_seed(0)
    model = msclip.create_model(name, device=str(device))
    size = model.cfg.vision.image_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    tokens = model.trim_tokens(synthetic_tokens(model.cfg, batch)).to(device)  # trimmed once, as the trainer does
    return model, images, tokens


# --- 2: bf16 training throughput and MFU ------------------------------------------------------------

def train_step_fn(model: torch.nn.Module, forward: Callable, images: torch.Tensor, tokens: torch.Tensor
                  ) -> Callable[[], float]:
    from msclip.loss import ClipLoss

    dev = images.device
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=dev.type == "cuda")
    loss_fn = ClipLoss()

    def step() -> float:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out = forward(images, tokens, trim=False)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def count_train_flops(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> int:
    """Forward + loss + backward FLOPs of one step (matmuls, convs, attention), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    from msclip.loss import ClipLoss

    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(images.device.type, dtype=torch.bfloat16):
        out = model(images, tokens, trim=False)
        ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def section_train(ck: Check) -> list[str]:
    lines, peak = [], None
    if ck.device.type == "cuda":
        peak = peak_bf16_tflops(torch.cuda.get_device_name(ck.device))
    modes = ("eager", "compiled") if ck.device.type == "cuda" else ("eager",)  # compile on CPU: not a GPU check
    for base in ("msclip-s-b16", "msclip-s-b32"):
        name = ck.name(base)
        model, images, tokens = model_inputs(name, ck.batch, ck.device)
        model.train()
        flops = count_train_flops(model, images, tokens)
        for mode in modes:
            if mode == "compiled" and ck.elapsed() > 0.6 * ck.budget_s:
                lines.append(f"{name} {mode}: skipped, {ck.elapsed():.0f} s of the {ck.budget_s:.0f} s budget used")
                continue
            fwd = torch.compile(model) if mode == "compiled" else model
            step = train_step_fn(model, fwd, images, tokens)
            t0 = time.perf_counter()
            step()  # the first call compiles
            sync(ck.device)
            first = time.perf_counter() - t0
            for _ in range(2):
                step()
            sync(ck.device)
            t0 = time.perf_counter()
            for _ in range(ck.steps):
                loss = step()
            sync(ck.device)
            dt = (time.perf_counter() - t0) / ck.steps
            tflops = flops / dt / 1e12
            mfu = f"MFU {100 * tflops / peak:.1f} % of {peak:.0f}" if peak else "peak unknown"
            lines.append(f"{name} {mode}: batch {ck.batch}, {dt * 1e3:.1f} ms/step, {ck.batch / dt:.0f} samples/s, "
                         f"{flops / 1e9:.1f} GFLOP/step, {tflops:.2f} TFLOP/s, {mfu} (first step {first:.1f} s, "
                         f"loss {loss:.3f})")
            ck.results[f"train/{name}/{mode}"] = {"ms_per_step": dt * 1e3, "samples_per_s": ck.batch / dt,
                                                  "tflops": tflops, "mfu": tflops / peak if peak else None}
        del model
        if ck.device.type == "cuda":
            torch.cuda.empty_cache()
    return lines


# --- 3: fp32 vs bf16 features -------------------------------------------------------------------------

def section_bf16_agreement(ck: Check, threshold: float = 0.999) -> list[str]:
    with no_tf32():
        return _bf16_agreement(ck, threshold)


def _bf16_agreement(ck: Check, threshold: float) -> list[str]:
    lines, failed = [], []
    for base in ("msclip-s-b16", "clip-b16"):
        name = ck.name(base)
        model, images, tokens = model_inputs(name, 16, ck.device)
        model.eval()
        with torch.no_grad():
            ref = model(images, tokens, trim=False)
            with torch.autocast(ck.device.type, dtype=torch.bfloat16):
                amp = model(images, tokens, trim=False)
        for key in ("image_features", "text_features"):
            cos = F.cosine_similarity(amp[key].float(), ref[key].float(), dim=-1).min().item()
            ck.results[f"bf16/{name}/{key}"] = cos
            lines.append(f"{name} {key}: min cosine fp32 vs bf16 autocast {cos:.5f} (>= {threshold})")
            if cos < threshold:
                failed.append(f"{name} {key}")
    if failed:
        raise AssertionError(f"bf16 features disagree with fp32: {', '.join(failed)}\n" + "\n".join(lines))
    return lines


# --- 4: clip-b16 against open_clip (or msclip's own CPU eager path) -----------------------------------

def section_clip_b16(ck: Check) -> list[str]:
    with no_tf32():
        return _clip_b16(ck)


def _clip_b16(ck: Check) -> list[str]:
    import msclip
    from msclip.checkpoint import convert_state_dict

    name = ck.name("clip-b16")
    ours, images, _ = model_inputs(name, 8, ck.device)
    tokens = synthetic_tokens(ours.cfg, 8).to(ck.device)  # all context positions: open_clip runs them all
    ours.eval()
    try:
        if ck.smoke:
            raise ImportError("no tiny open_clip twin")  # smoke: the fallback reference
        import open_clip

        ref = open_clip.create_model("ViT-B-16-quickgelu").to(ck.device).eval()
        ours.load_state_dict(convert_state_dict(ref.state_dict(), ours))
        label = "open_clip ViT-B-16-quickgelu (same weights, same device)"
    except ImportError as exc:
        ref = msclip.create_model(name).eval()
        ref.load_state_dict(ours.state_dict())
        label = f"msclip eager fp32 on the CPU (open_clip not used: {exc})"

    ref_dev = next(ref.parameters()).device
    with torch.no_grad():
        want_i = F.normalize(ref.encode_image(images.to(ref_dev)).float(), dim=-1).cpu()
        want_t = F.normalize(ref.encode_text(tokens.to(ref_dev)).float(), dim=-1).cpu()
        candidates: dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]] = {
            "eager fp32": lambda: (ours.encode_image(images, normalize=True), ours.encode_text(tokens, normalize=True))}
        if ck.device.type == "cuda" and ck.elapsed() < 0.8 * ck.budget_s:  # compiling takes ~a minute
            comp_i, comp_t = torch.compile(ours.encode_image), torch.compile(ours.encode_text)
            candidates["compiled fp32"] = lambda: (comp_i(images, normalize=True), comp_t(tokens, normalize=True))
        lines, worst = [f"reference: {label}"], 0.0
        for cand, fn in candidates.items():
            got_i, got_t = (t.float().cpu() for t in fn())
            diff = max((got_i - want_i).abs().max().item(), (got_t - want_t).abs().max().item())
            worst = max(worst, diff)
            ck.results[f"clip-b16/{cand}"] = diff
            lines.append(f"{name} {cand} on {ck.device.type}: max |feature difference| {diff:.2e} (< 1e-3)")
    if worst >= 1e-3:
        raise AssertionError("\n".join(lines))
    return lines


# --- 5: data-parallel step on 2 ranks (NCCL on 2 GPUs; gloo in the smoke run) -------------------------

def dist_worker(out: Path, device: str, model_name: str) -> None:
    """One rank: a DDP bf16 step of ClipLoss with all-gathered features; then every rank's weights must
    equal rank 0's (DDP averaged the gradients although each rank had its own batch)."""
    import torch.distributed as dist

    from msclip.loss import ClipLoss
    from msclip.train import distributed as D

    env = D.init_distributed(device)
    torch.manual_seed(0)  # the same initial weights on every rank
    model, images, tokens = model_inputs(model_name, 8, env.device)
    images = images + env.rank  # each rank its own batch
    ddp = D.wrap_ddp(model.train(), env.device)
    loss_fn = ClipLoss(rank=env.rank, world_size=env.world_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with torch.autocast(env.device.type, dtype=torch.bfloat16):
        o = ddp(images, tokens, trim=False)
        loss = loss_fn(o["image_features"], o["text_features"], o["logit_scale"])
    loss.backward()
    opt.step()
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if env.is_master:
        out.write_text(json.dumps({"world_size": env.world_size, "backend": dist.get_backend(),
                                   "max_weight_diff": diff.item(), "loss": loss.item()}))
    dist.barrier()
    D.cleanup(env)


def section_dist(ck: Check) -> list[str]:
    if ck.device.type == "cuda" and torch.cuda.device_count() < 2:
        return [f"skipped: {torch.cuda.device_count()} GPU visible (needs 2)"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"msclip-gpu-check-dist-{os.getpid()}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    if ck.device.type != "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(Path(__file__).resolve()), "--dist-worker", str(out),
           "--device", ck.device.type, "--model", ck.name("clip-b32")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    res = json.loads(out.read_text())
    out.unlink()
    ck.results["dist"] = res
    line = (f"{res['backend']} x{res['world_size']}: DDP bf16 step, loss {res['loss']:.4f}, "
            f"max weight difference between ranks {res['max_weight_diff']:.1e} (== 0)")
    if res["max_weight_diff"] != 0:
        raise AssertionError(line)
    return [line]


# --- 6: JPEG decoding on the GPU ----------------------------------------------------------------------

def sample_jpegs(n: int) -> tuple[list[torch.Tensor], str]:
    from torchvision.io import encode_jpeg

    try:
        import skimage.data as sd

        photos = [torch.from_numpy(getattr(sd, k)().copy()).permute(2, 0, 1).contiguous()
                  for k in ("astronaut", "coffee", "chelsea", "rocket")]
        source = "scikit-image photos"
    except Exception:  # noqa: BLE001 - any failure: synthetic pictures instead
        g = torch.Generator().manual_seed(0)
        photos = [(torch.rand(3, 48, 64, generator=g) * 255).to(torch.uint8).repeat_interleave(8, 1)
                  .repeat_interleave(8, 2) for _ in range(4)]
        source = "synthetic 384x512 pictures"
    return [encode_jpeg(photos[i % len(photos)], quality=90) for i in range(n)], source


def section_jpeg(ck: Check) -> list[str]:
    import warnings

    with warnings.catch_warnings():  # torchvision 0.29+ announces its move to torchcodec on every call
        warnings.filterwarnings("ignore", message=".*TorchVision are deprecated", category=DeprecationWarning)
        return _jpeg(ck)


def _jpeg(ck: Check) -> list[str]:
    from torchvision.io import decode_jpeg

    n = 16 if ck.smoke else 512
    data, source = sample_jpegs(n)
    mb = sum(d.numel() for d in data) / 1e6

    def cpu() -> None:
        for d in data:
            decode_jpeg(d)

    timings = {"cpu (one thread per call)": cpu}
    if ck.device.type == "cuda":
        timings["cuda (batched)"] = lambda: decode_jpeg(data, device="cuda")
    lines, rates = [f"{n} JPEGs from {source}, {mb:.1f} MB"], {}
    for label, fn in timings.items():
        fn()  # warm-up (CUDA: nvjpeg handles)
        sync(ck.device)
        t0 = time.perf_counter()
        fn()
        sync(ck.device)
        rates[label] = n / (time.perf_counter() - t0)
        lines.append(f"decode_jpeg {label}: {rates[label]:.0f} images/s")
    ck.results["jpeg"] = rates
    if len(rates) == 2:
        lines.append(f"GPU / CPU decode rate: {rates['cuda (batched)'] / rates['cpu (one thread per call)']:.1f}x (same run)")
    return lines


SECTIONS: dict[str, Callable[[Check], list[str]]] = {
    "train": section_train, "bf16": section_bf16_agreement, "clip-b16": section_clip_b16,
    "dist": section_dist, "jpeg": section_jpeg,
}


def run_sections(ck: Check, names: list[str]) -> dict[str, str]:
    """Each section in turn; a failure is reported and the next section still runs."""
    status = {}
    for name in names:
        print(f"\n== {name} ==", flush=True)
        t0 = time.perf_counter()
        try:
            for line in SECTIONS[name](ck):
                print(f"  {line}", flush=True)
            status[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - report and go on
            status[name] = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"  {status[name]}\n" + "".join(traceback.format_exc(limit=-4)), flush=True)
        print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny configs on the CPU (tests the script)")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), help="sections to run")
    parser.add_argument("--skip", nargs="+", choices=list(SECTIONS), default=[], help="sections to leave out")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default 256; smoke 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 10; smoke 1)")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="seconds; compiled training is skipped past 60 %%, compiled clip-b16 past 80 %%")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    parser.add_argument("--dist-worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="clip-b32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dist_worker:
        dist_worker(args.dist_worker, args.device, args.model)
        return 0
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available (use --cpu-smoke to test the script on the CPU)")
        return 2
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    ck = Check(device=device, smoke=args.cpu_smoke, batch=args.batch or (4 if args.cpu_smoke else 256),
               steps=args.steps or (1 if args.cpu_smoke else 10), budget_s=args.budget_s)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke: tiny configs)"
    print(f"gpu_check on {where}; torch {torch.__version__}, Python {sys.version.split()[0]}")
    status = run_sections(ck, [s for s in args.only if s not in args.skip])
    print(f"\n== summary ({ck.elapsed():.1f} s in total) ==")
    for name, st in status.items():
        print(f"  {name:<10} {st}")
    if args.json:
        args.json.write_text(json.dumps({"device": where, "torch": torch.__version__, "status": status,
                                         "results": ck.results, "seconds": ck.elapsed()}, indent=1))
    return 0 if all(st == "ok" for st in status.values()) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(SRC))  # run from a checkout without installing
    sys.exit(main())
