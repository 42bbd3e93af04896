"""Two result files side by side as a markdown table (what `msclip compare` prints).

Linear-probe results are compared per dataset (score in percent, chosen hyper-parameter, difference) with the mean
over the datasets both runs scored; other results (zero-shot, retrieval, analysis) by their numeric
metrics, whose keys carry their unit (`top1_pct`, `image_to_text_R@1_pct`, ...).
"""
from __future__ import annotations

from pathlib import Path

from msclip.errors import MsclipError
from msclip.io import read_user_json


def load_result(path: str) -> dict:
    data = read_user_json(path, "result file")
    if not isinstance(data, dict):
        raise MsclipError(f"{path}: not an msclip result file (a JSON object), got a {type(data).__name__}")
    return data


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def _delta(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None else f"{b - a:+.2f}"


def _hp(r: dict) -> str:
    hp = r.get("hparam") or {}
    return f"C={hp['C']:.3g}" if "C" in hp else (f"wd={hp['weight_decay']:.3g}" if "weight_decay" in hp else "")


def _numeric(d: dict, prefix: str = "") -> dict[str, float]:
    """Flatten the numeric leaves of a result (skips bookkeeping such as sizes of the model)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        if k in ("model", "versions", "timing", "checkpoint", "settings", "per_class", "search", "layers",
                 "preprocess", "skipped"):
            continue
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[prefix + k] = float(v)
        elif isinstance(v, dict):
            out.update(_numeric(v, f"{prefix}{k}."))
    return out


def result_title(r: dict, path: str) -> str:
    model = (r.get("model") or {}).get("spec", "?")
    ck = (r.get("checkpoint") or {}).get("path")
    return f"{model} ({Path(ck).name if ck else 'random'})" if model != "?" else Path(path).name


def compare(a: dict, b: dict, names: tuple[str, str]) -> str:
    na, nb = names
    if "datasets" in a and "datasets" in b:
        da, db = a["datasets"], b["datasets"]
        lines = [f"| dataset | metric | {na} | {nb} | Δ (B − A) | hp {na} | hp {nb} |",
                 "|---|---|---:|---:|---:|---|---|"]
        both = []
        for name in list(da) + [n for n in db if n not in da]:
            ra, rb = da.get(name, {}), db.get(name, {})
            sa = ra.get("score_pct") if ra.get("status") == "ok" else None
            sb = rb.get("score_pct") if rb.get("status") == "ok" else None
            if sa is not None and sb is not None:
                both.append((sa, sb))
            metric = ra.get("metric") or rb.get("metric") or ""
            cell_a = _fmt(sa) if sa is not None or not ra else ra.get("status", "—")
            cell_b = _fmt(sb) if sb is not None or not rb else rb.get("status", "—")
            lines.append(f"| {name} | {metric} | {cell_a} | {cell_b} | {_delta(sa, sb)} | {_hp(ra)} | {_hp(rb)} |")
        if both:
            ma, mb = (sum(x[0] for x in both) / len(both), sum(x[1] for x in both) / len(both))
            lines.append(f"| **mean over {len(both)} shared** | | {_fmt(ma)} | {_fmt(mb)} | {_delta(ma, mb)} | | |")
        return "\n".join(lines)
    fa, fb = _numeric(a), _numeric(b)
    keys = [k for k in fa if k in fb] + [k for k in fa if k not in fb] + [k for k in fb if k not in fa]
    lines = [f"| metric | {na} | {nb} | Δ (B − A) |", "|---|---:|---:|---:|"]
    for k in keys:
        lines.append(f"| {k} | {_fmt(fa.get(k))} | {_fmt(fb.get(k))} | {_delta(fa.get(k), fb.get(k))} |")
    return "\n".join(lines)
