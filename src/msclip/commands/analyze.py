"""``msclip analyze``: how a checkpoint mixes the modalities (the MS-CLIP paper's analysis).

Writes into --output-dir:
* ``pooled_hidden.pt``: per trunk layer, the pooled hidden states (image class token, caption end token);
* ``analysis.json``: the modality gap of the final embeddings, and per layer the NMI between a 2-way
  k-means of the pooled states and the modality labels (low = mixed) plus the layer's centroid gap;
* ``attention/*.png``: class-token attention per head over the image grid and token-to-token attention
  for captions, for the chosen layers and heads, taken from the same model's forward_intermediates.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from msclip.commands._common import (UsageError, add_model_arguments, eval_transform, load_model, model_report,
                                      pick_device, progress_flag, resolve_checkpoint)

NAME = "analyze"
HELP = "modality gap, per-layer modality NMI and attention maps for a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--images", required=True, metavar="DIR|LIST",
                        help="a folder of images (searched recursively) or a text file of image paths")
    parser.add_argument("--texts", required=True, metavar="FILE", help="captions, one per line")
    parser.add_argument("--output-dir", default="analysis", metavar="DIR")
    parser.add_argument("--max-samples", type=int, default=None, help="use at most N images and N captions")
    parser.add_argument("--attn-layers", type=int, nargs="*", default=None,
                        help="trunk layers to draw attention for (default: first, middle and last)")
    parser.add_argument("--attn-heads", type=int, nargs="*", default=None, help="heads to draw (default: all)")
    parser.add_argument("--attn-samples", type=int, default=2, help="images and captions to draw")
    parser.add_argument("--raw-pooled", action="store_true",
                        help="cluster raw pooled states (default: L2-normalised, so norms alone do not separate)")
    parser.add_argument("--seed", type=int, default=0)


def _image_list(spec: str) -> list[str]:
    from msclip.eval.suite_datasets import IMAGE_EXTS

    p = Path(spec)
    if p.is_dir():
        return sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
    if p.is_file():
        base = p.parent
        return [str(base / ln.strip()) for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    raise FileNotFoundError(f"--images {spec!r} does not exist")


def _token_strings(ids: list[int]) -> list[str]:
    try:  # readable labels when open_clip's BPE decoder is installed; ids otherwise
        from open_clip.tokenizer import SimpleTokenizer

        dec = SimpleTokenizer().decoder
        return [dec.get(i, str(i)).replace("</w>", "") for i in ids]
    except ImportError:
        return [str(i) for i in ids]


def _batches(n: int, size: int):
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def run(args: argparse.Namespace) -> int:
    import msclip
    from msclip.analysis.attention_maps import denormalize, save_image_attention, save_text_attention
    from msclip.analysis.modality import layerwise_nmi, modality_gap, modality_nmi
    from msclip.checkpoint import atomic_save
    from msclip.eval.features import SafeDataset, collate_safe
    from msclip.eval.retrieval import ImageSource
    from msclip.eval.zeroshot import write_json_atomic

    try:
        paths = _image_list(args.images)[: args.max_samples]
        texts = [ln.strip() for ln in Path(args.texts).read_text(encoding="utf-8").splitlines() if ln.strip()]
        texts = texts[: args.max_samples]
        if len(paths) < 2 or len(texts) < 2:
            raise UsageError(f"need at least 2 images and 2 captions (got {len(paths)} and {len(texts)})")
        device = pick_device(args.device)
        checkpoint = resolve_checkpoint(args.model, args.pretrained)
        model = load_model(args.model, checkpoint, device, args.precision)
    except (UsageError, FileNotFoundError) as e:
        print(f"msclip analyze: error: {e}", file=sys.stderr)
        return 2
    from tqdm.auto import tqdm

    out_dir = Path(args.output_dir)
    tok = msclip.get_tokenizer(model.cfg)
    n_layers = len(model.trunk.blocks) if hasattr(model, "trunk") else model.cfg.vision.layers
    attn_layers = sorted(set(args.attn_layers if args.attn_layers is not None
                             else [0, n_layers // 2, n_layers - 1]))
    loader = torch.utils.data.DataLoader(SafeDataset(ImageSource(paths), eval_transform(model)),
                                         batch_size=args.batch_size, num_workers=args.workers,
                                         collate_fn=collate_safe)
    img_pooled, img_emb, skipped, pngs = [], [], [], []
    img_layers: list[int] = []
    shown = 0
    prog = progress_flag(args)
    for images, _, idx, fail in tqdm(loader, desc="images", disable=None if prog is None else not prog):
        skipped += fail
        if images is None:
            continue
        images = images.to(device)
        out = model.forward_intermediates(images=images)
        img_layers = out["image_layers"]
        img_pooled.append(torch.stack([h.float().cpu() for h in out["image_pooled"]]))
        with torch.no_grad():
            img_emb.append(model.encode_image(images).float().cpu())
        if shown < args.attn_samples:  # attention only for the few drawn samples (it is [B, H, L, L])
            k = min(args.attn_samples - shown, len(images))
            att = model.forward_intermediates(images=images[:k], attn_layers=attn_layers)["image_attn"]
            for j in range(k):
                pic = denormalize(images[j], model.cfg.preprocess.mean, model.cfg.preprocess.std)
                for layer, a in att.items():
                    pngs.append(str(save_image_attention(
                        a[j], out_dir / "attention" / f"image{shown + j:03d}_layer{layer:02d}.png", args.attn_heads,
                        pic, title=f"{Path(paths[int(idx[j])]).name} | layer {layer} | class-token attention")))
            shown += k
    if not img_pooled:
        print(f"msclip analyze: error: no image could be read ({len(skipped)} failed)", file=sys.stderr)
        return 2
    txt_pooled, txt_emb = [], []
    txt_layers: list[int] = []
    for s, e in _batches(len(texts), args.batch_size):
        tokens = tok(texts[s:e]).to(device)
        out = model.forward_intermediates(tokens=tokens)
        txt_layers = out["text_layers"]
        txt_pooled.append(torch.stack([h.float().cpu() for h in out["text_pooled"]]))
        with torch.no_grad():
            txt_emb.append(model.encode_text(tokens).float().cpu())
        if s < args.attn_samples:
            k = min(args.attn_samples, e) - s
            att = model.forward_intermediates(tokens=tokens[:k], attn_layers=attn_layers)["text_attn"]
            for j in range(k):
                n = int(tokens[j].argmax()) + 1  # up to and including the end token
                labels = _token_strings(tokens[j, :n].tolist())
                for layer, a in att.items():
                    pngs.append(str(save_text_attention(
                        a[j], labels, out_dir / "attention" / f"text{s + j:03d}_layer{layer:02d}.png", args.attn_heads,
                        title=f"{texts[s + j][:60]!r} | layer {layer}")))
    for name, passed in (("image", img_layers), ("text", txt_layers)):
        absent = [la for la in attn_layers if la not in passed]
        if absent:  # e.g. MS-CLIP-S images enter the trunk after layer 0
            print(f"note: {name}s do not pass trunk layer(s) {absent}; no {name} attention drawn there",
                  file=sys.stderr)
    ip, tp = torch.cat(img_pooled, dim=1), torch.cat(txt_pooled, dim=1)  # [layers, N, D]
    ie, te = torch.cat(img_emb), torch.cat(txt_emb)
    norm = not args.raw_pooled
    bad = {i for i, _ in skipped}
    layers = layerwise_nmi(list(ip), list(tp), img_layers, txt_layers, normalize=norm, seed=args.seed)
    atomic_save({"image_pooled": ip, "text_pooled": tp, "image_layers": list(img_layers),
                 "text_layers": list(txt_layers), "image_embeddings": ie, "text_embeddings": te,
                 "image_paths": [p for i, p in enumerate(paths) if i not in bad],
                 "texts": texts}, out_dir / "pooled_hidden.pt")
    report = {"task": "analyze", **model_report(args.model, model, checkpoint, device, args.precision),
              "images": int(ie.shape[0]), "texts": len(texts), "skipped_images": len(skipped),
              "skipped_examples": [f"{paths[i]}: {err}" for i, err in skipped[:20]],
              "modality_gap": modality_gap(ie, te),
              "embedding_nmi": modality_nmi(ie, te, normalize=True, seed=args.seed),
              "pooled_normalised_before_clustering": norm, "layers": layers,
              "attention_layers": attn_layers, "attention_pngs": pngs}
    write_json_atomic(report, out_dir / "analysis.json")
    print(f"modality gap (final embeddings): {report['modality_gap']:.4f}; "
          f"NMI of final embeddings: {report['embedding_nmi']:.3f}")
    print("| layer | NMI | centroid gap |\n|---:|---:|---:|")
    for r in layers:
        print(f"| {r['layer']} | {r['nmi']:.3f} | {r['gap']:.4f} |")
    print(f"wrote {out_dir / 'analysis.json'}, {out_dir / 'pooled_hidden.pt'} and {len(pngs)} attention PNGs")
    return 0


if __name__ == "__main__":
    from msclip.cli import run_command

    raise SystemExit(run_command("analyze"))
