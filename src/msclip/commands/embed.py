"""``msclip embed``: L2-normalised image or text embeddings for downstream use.

Writes OUT (`.npy`: float32 [N, E]; `.safetensors`: tensor "embeddings", bf16 when --precision bf16)
and, next to it, OUT's stem + `.json` with the row names (image paths relative to ROOT, or the text
lines), the skipped images and the exact model / checkpoint used. Row i of OUT is names[i].
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from msclip.commands._common import (UsageError, add_model_arguments, eval_transform, load_model, model_report,
                                      pick_device, progress_flag, resolve_checkpoint)

NAME = "embed"
HELP = "export L2-normalised image or text embeddings (.npy / .safetensors) with their names"
SUFFIXES = (".npy", ".safetensors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="ROOT", help="embed every image under ROOT (recursively, sorted)")
    src.add_argument("--texts", metavar="FILE", help="embed every line of a UTF-8 text file")
    parser.add_argument("--output", required=True, metavar="OUT.npy|OUT.safetensors")


def sidecar_path(output: str) -> str:
    return str(Path(output).with_suffix(".json"))


def _prepare(args: argparse.Namespace) -> tuple[torch.device, str | None, list[str]]:
    from msclip.eval.imagefolder import scan_images

    if Path(args.output).suffix not in SUFFIXES:
        raise UsageError(f"--output {args.output!r} must end in {' or '.join(SUFFIXES)}")
    if args.batch_size < 1 or args.workers < 0:
        raise UsageError("--batch-size must be >= 1 and --workers >= 0")
    device = pick_device(args.device)
    checkpoint = resolve_checkpoint(args.model, args.pretrained)
    if args.images is not None:
        items = scan_images(args.images)
    else:
        if not Path(args.texts).is_file():
            raise UsageError(f"--texts {args.texts!r} does not exist")
        items = Path(args.texts).read_text(encoding="utf-8").splitlines()
        if not items:
            raise UsageError(f"--texts {args.texts!r} has no lines")
    return device, checkpoint, items


@torch.inference_mode()
def embed_images(model, paths: list[str], device: torch.device, batch_size: int, workers: int,
                 progress: bool | None) -> tuple[torch.Tensor, list[int], list[dict]]:
    """-> (embeddings of the loadable images, their indices into `paths`, skipped [{path, error}])."""
    from msclip.eval.imagefolder import SafeImageDataset, make_loader
    from msclip.eval.zeroshot import _progress

    loader = make_loader(SafeImageDataset(paths, None, eval_transform(model)), batch_size, workers,
                         pin_memory=device.type == "cuda")
    chunks, kept, skipped = [], [], []
    with _progress(len(paths), "embed images", "img", progress) as bar:
        for batch in loader:
            skipped += [{"path": paths[i], "error": err} for i, err in batch.failures]
            if batch.images is not None:
                f = model.encode_image(batch.images.to(device, non_blocking=True), normalize=True)
                chunks.append(f.cpu())
                kept += batch.indices.tolist()
            bar.update(len(batch.labels) + len(batch.failures))
    emb = torch.cat(chunks) if chunks else torch.empty(0, model.cfg.embed_dim, dtype=_dtype(model))
    return emb, kept, skipped


@torch.inference_mode()
def embed_texts(model, texts: list[str], device: torch.device, batch_size: int,
                progress: bool | None, chunk: int = 8192) -> torch.Tensor:
    """Embeddings in input order; tokenised a chunk at a time, encoded in length-sorted batches."""
    import msclip
    from msclip.eval.zeroshot import _progress

    tokenizer = msclip.get_tokenizer(model.cfg)
    out = []
    with _progress(len(texts), "embed texts", "text", progress) as bar:
        for start in range(0, len(texts), chunk):
            tokens = tokenizer(texts[start:start + chunk])
            order = torch.argsort(tokens.argmax(dim=-1), stable=True)  # similar lengths share a batch
            feats = torch.empty(len(order), model.cfg.embed_dim, dtype=_dtype(model))
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                feats[idx] = model.encode_text(tokens[idx].to(device), normalize=True).cpu()
                bar.update(len(idx))
            out.append(feats)
    return torch.cat(out)


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def write_embeddings(emb: torch.Tensor, path: str, metadata: dict[str, str]) -> None:
    """Atomic write: temp file in the same folder, then os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=Path(path).suffix, dir=folder)
    os.close(fd)
    try:
        if path.endswith(".npy"):
            import numpy as np

            with open(tmp, "wb") as f:  # numpy has no bfloat16: .npy is always float32
                np.save(f, emb.float().numpy())
        else:
            from safetensors.torch import save_file

            save_file({"embeddings": emb.contiguous()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run(args: argparse.Namespace) -> int:
    from msclip.eval.imagefolder import DataError
    from msclip.eval.zeroshot import write_json_atomic

    try:
        device, checkpoint, items = _prepare(args)
        model = load_model(args.model, checkpoint, device, args.precision)
    except (UsageError, DataError) as e:
        print(f"msclip embed: error: {e}", file=sys.stderr)
        return 2
    progress = progress_flag(args)
    t0 = time.perf_counter()
    skipped: list[dict] = []
    if args.images is not None:
        emb, kept, skipped = embed_images(model, items, device, args.batch_size, args.workers, progress)
        names = [os.path.relpath(items[i], args.images) for i in kept]
        kind = "images"
    else:
        emb = embed_texts(model, items, device, args.batch_size, progress)
        names, kind = items, "texts"
    seconds = time.perf_counter() - t0
    info = model_report(args.model, model, checkpoint, device, args.precision)
    sidecar = sidecar_path(args.output)
    meta = {"task": "embed", "kind": kind, "source": args.images or args.texts, "embeddings": args.output,
            "count": emb.shape[0], "dim": emb.shape[1] if emb.ndim == 2 else None,
            "dtype": "float32" if args.output.endswith(".npy") else str(emb.dtype).replace("torch.", ""),
            "normalized": "L2", **info, "seconds": seconds,
            "per_second": emb.shape[0] / seconds if seconds > 0 else None,
            "skipped_count": len(skipped), "skipped": skipped, "names": names}
    write_embeddings(emb, args.output, {"kind": kind, "model": args.model, "count": str(emb.shape[0]),
                                        "names_file": os.path.basename(sidecar)})
    write_json_atomic(meta, sidecar)
    print(f"embedded {emb.shape[0]} {kind} ({len(skipped)} skipped) with {args.model} in {seconds:.1f} s "
          f"-> {args.output} (+ names in {sidecar})")
    for s in skipped[:5]:
        print(f"skipped {s['path']}: {s['error']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="msclip embed", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    from msclip.cli import run_command

    raise SystemExit(run_command("embed"))
