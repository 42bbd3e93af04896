"""``msclip search``: text -> image and image -> image nearest neighbours in an index built by `msclip index`.

Queries: texts as positional arguments right after INDEX, --text (repeatable) and/or one per line of --queries
FILE; images with --image (repeatable).
Prints the k best images with their cosine scores per query; --html writes a gallery (one row per query).
--recall scores the index's own captions (text -> image R@k, as `msclip retrieval` defines it).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from msclip.commands._common import UsageError, pick_device, run_main
from msclip.io import read_user_text

NAME = "search"
HELP = "text->image / image->image search in an `msclip index` (console, JSON, HTML gallery)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", metavar="INDEX", help="index folder written by `msclip index`")
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="text queries (right after INDEX)")
    parser.add_argument("--text", action="append", default=[], metavar="TEXT",
                        help="a text query anywhere on the line (repeatable)")
    parser.add_argument("--queries", default=None, metavar="FILE", help="more text queries, one per line")
    parser.add_argument("--image", action="append", default=[], metavar="PATH", help="image query (repeatable)")
    parser.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    parser.add_argument("--html", default=None, metavar="FILE.html", help="write a gallery of the results")
    parser.add_argument("--thumb", type=int, default=128, help="gallery thumbnail size in pixels (default 128)")
    parser.add_argument("--output", default=None, metavar="FILE.json", help="write the results as JSON")
    parser.add_argument("--recall", action="store_true",
                        help="text->image R@1/5/10 of the index's own captions against their images")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists searched (default: the index's)")
    parser.add_argument("--pretrained", default=None, metavar="PATH",
                        help="the index's weights at a new location (checked by sha256)")
    parser.add_argument("--device", default=None, metavar="auto|cpu|cuda|cuda:N")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="default: the precision the index was built with")


def _texts(args: argparse.Namespace) -> list[str]:
    texts = [t for t in [*args.texts, *args.text] if t.strip()]
    if args.queries is not None:
        texts += [ln.strip() for ln in read_user_text(args.queries, "--queries", UsageError).splitlines() if ln.strip()]
    return texts


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from msclip import io as mio
    from msclip.index.gallery import render_gallery, search_rows
    from msclip.index.search import (caption_recall, embed_image_queries, embed_text_queries, index_model,
                                     search)
    from msclip.index.store import load_index, open_item

    if args.k < 1 or args.thumb < 16 or (args.nprobe is not None and args.nprobe < 1):
        raise UsageError("-k and --nprobe must be >= 1, --thumb >= 16")
    texts = _texts(args)
    if not texts and not args.image and not args.recall:
        raise UsageError("no query: give TEXT arguments, --queries FILE, --image PATH or --recall")
    store = load_index(args.index)
    device = pick_device(args.device)
    model = index_model(store, device, args.pretrained, args.precision)
    report: dict = {"task": "search", "index": args.index, "k": args.k, "model": store.meta["model"]}
    if texts or args.image:
        parts, labels = [], []
        if texts:
            parts.append(embed_text_queries(model, texts, device))
            labels += [(t, "text") for t in texts]
        if args.image:
            parts.append(embed_image_queries(model, args.image, device))
            labels += [(p, "image") for p in args.image]
        results = search(store, np.concatenate(parts), labels, args.k, args.nprobe)
        for res in results:
            print(f"{res.kind} query: {res.query}")
            for rank, h in enumerate(res.hits, 1):
                caption = f"  {h.captions[0]!r}" if h.captions else ""
                print(f"  {rank:>3}  {h.score:.4f}  {h.id}{caption}")
        report["results"] = [{"query": r.query, "kind": r.kind, "hits": [h.__dict__ for h in r.hits]}
                             for r in results]
        if args.html:
            rows = search_rows(results, lambda row: open_item(store.base, store.items[row].source))
            m = store.meta["model"]
            mio.write_text(args.html, render_gallery(
                rows, f"msclip search: {args.index}", f"{store.meta['count']} images; model {m['name']} "
                f"({Path(m['checkpoint']).name}); cosine similarity under each image", args.thumb))
            print(f"gallery: {args.html} ({len(rows)} rows)")
    if args.recall:
        rec = caption_recall(store, model, device, nprobe=args.nprobe)
        report["recall"] = rec
        print(f"captions of {args.index}: {rec['captions']} captions, {rec['images']} images; text->image "
              + ", ".join(f"R@{k} {rec[f'text_to_image_R@{k}_pct']:.2f} % (chance {rec[f'chance_R@{k}_pct']:.2f})"
                          for k in (1, 5, 10)))
    if args.output:
        mio.write_json(args.output, report)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(NAME, argv)


if __name__ == "__main__":
    from msclip.cli import run_command

    raise SystemExit(run_command("search"))
