"""A self-contained HTML gallery of search results: one row per query, its k best images with their cosine
scores under them, thumbnails embedded as base64 JPEG (the file opens anywhere, offline).

Also the rows of `msclip retrieval --html`: the captions whose own image ranked worst and best."""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from PIL import Image

from msclip.transforms import to_rgb

THUMB = 128


@dataclass
class Cell:
    image: Callable[[], Image.Image] | None  # opened lazily; None or a failure -> a placeholder
    score: float
    title: str  # shown under the score (file name)
    tooltip: str = ""  # captions etc.
    mark: bool = False  # the right answer (retrieval galleries)


@dataclass
class Row:
    label: str  # the query text, or the query image's path
    cells: list[Cell]
    query_image: Callable[[], Image.Image] | None = None
    note: str = ""  # e.g. "own image at rank 7"
    extra: dict = field(default_factory=dict)


def thumbnail_uri(open_image: Callable[[], Image.Image] | None, size: int = THUMB) -> str | None:
    """`data:` URI of a JPEG thumbnail (longest side `size`), or None when the image cannot be read."""
    if open_image is None:
        return None
    try:
        img = to_rgb(open_image())
    except Exception:  # noqa: BLE001 - a file gone since indexing shows as a placeholder, not a crash
        return None
    img.thumbnail((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """body{font-family:sans-serif;margin:16px;color:#222}
h1{font-size:20px;margin:0 0 4px} p.sub{color:#666;margin:0 0 12px;font-size:13px}
.row{display:flex;align-items:flex-start;gap:8px;padding:8px 0;border-top:1px solid #ddd}
.query{width:180px;flex:none;font-weight:bold;font-size:14px;word-wrap:break-word}
.query small{display:block;font-weight:normal;color:#666;margin-top:4px}
.cell{width:%(w)dpx;flex:none;text-align:center;font-size:12px}
.cell img,.query img,.ph{width:%(t)dpx;height:%(t)dpx;object-fit:contain;background:#f4f4f4;border:3px solid transparent}
.cell.mark img{border-color:#2a2}
.ph{display:flex;align-items:center;justify-content:center;color:#999;margin:auto}
.score{font-weight:bold} .name{color:#555;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}"""


def _img(uri: str | None, alt: str, size: int) -> str:
    if uri is None:
        return f'<div class="ph" style="width:{size}px;height:{size}px">unreadable</div>'
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def render_gallery(rows: list[Row], title: str, subtitle: str = "", thumb: int = THUMB) -> str:
    """The whole HTML page."""
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
             f"<style>{_CSS % {'w': thumb + 10, 't': thumb}}</style></head><body>", f"<h1>{e(title)}</h1>"]
    if subtitle:
        parts.append(f'<p class="sub">{e(subtitle)}</p>')
    for row in rows:
        query = e(row.label)
        if row.query_image is not None:
            query = _img(thumbnail_uri(row.query_image, thumb), row.label, thumb) + f"<small>{query}</small>"
        note = f"<small>{e(row.note)}</small>" if row.note else ""
        cells = []
        for c in row.cells:
            cells.append(f'<div class="cell{" mark" if c.mark else ""}" title="{e(c.tooltip or c.title)}">'
                         f"{_img(thumbnail_uri(c.image, thumb), c.title, thumb)}"
                         f'<div class="score">{c.score:.3f}</div><div class="name">{e(c.title)}</div></div>')
        parts.append(f'<div class="row"><div class="query">{query}{note}</div>{"".join(cells)}</div>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def search_rows(results: list[Any], open_row: Callable[[int], Image.Image]) -> list[Row]:
    """Gallery rows of `search.search` results; `open_row(row)` opens an indexed image."""
    from msclip.eval.imagefolder import load_rgb

    rows = []
    for res in results:
        cells = [Cell(lambda r=h.row: open_row(r), h.score, h.id.rsplit("/", 1)[-1], "\n".join([h.id, *h.captions]))
                 for h in res.hits]
        qimg = (lambda p=res.query: load_rgb(p)) if res.kind == "image" else None
        rows.append(Row(res.query, cells, qimg))
    return rows


def retrieval_rows(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image: torch.Tensor,
                   captions: list[str], names: list[str], open_image: Callable[[int], Image.Image],
                   worst: int = 5, best: int = 5, k: int = 5, chunk: int = 1024) -> list[Row]:
    """Rows for the `worst` captions (own image ranked lowest) and the `best` ones (ranked first, largest margin),
    each with its k best images; the caption's own image is marked. Unit embeddings [I, E], [T, E]."""
    image_emb, text_emb, owner = image_emb.float(), text_emb.float(), caption_image.long().to(image_emb.device)
    rank = torch.empty(len(captions), dtype=torch.long)
    margin = torch.empty(len(captions))
    for s in range(0, len(captions), chunk):  # chunked like recall_at_k: never the full [T, I] matrix
        sims = text_emb[s:s + chunk] @ image_emb.T
        own = sims.gather(1, owner[s:s + chunk, None])
        rank[s:s + chunk] = ((sims >= own).sum(1) - 1).cpu()  # 0 = best; ties count against, as in recall_at_k
        others = sims.scatter(1, owner[s:s + chunk, None], float("-inf")).max(1).values
        margin[s:s + chunk] = (own[:, 0] - others).cpu()
    order_worst = sorted(range(len(captions)), key=lambda t: (-int(rank[t]), float(margin[t])))[:worst]
    picked = set(order_worst)
    order_best = [t for t in sorted(range(len(captions)), key=lambda t: (int(rank[t]), -float(margin[t])))
                  if t not in picked][:best]
    rows = []
    for group, order in (("worst", order_worst), ("best", order_best)):
        for t in order:
            top = (text_emb[t] @ image_emb.T).topk(min(k, image_emb.shape[0]))
            mine = int(owner[t])
            cells = [Cell(lambda i=int(i): open_image(i), float(v), names[int(i)].rsplit("/", 1)[-1], names[int(i)],
                          int(i) == mine) for v, i in zip(top.values, top.indices)]
            rows.append(Row(captions[t], cells, note=f"{group}: own image at rank {int(rank[t]) + 1}",
                            extra={"group": group, "rank": int(rank[t]) + 1}))
    return rows
