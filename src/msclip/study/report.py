"""The study report: ``report.md`` (a table of every variant, mean +- std over seeds and the Welch 95 %
interval of its difference to the two-tower baseline; the paper's three claims, measured), ``study.json``
(every run's measurements and the summaries) and PNG plots (analysis/plots.py helpers, msclip/io.py writes).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from msclip import io as mio
from msclip.analysis.plots import pyplot, save_figure

from .stats import Interval, mean_std, welch_interval

if TYPE_CHECKING:
    from .spec import StudySpec

# (key in the summary, label, path into a run's measurements, digits); the first two get difference intervals
METRICS = [("zeroshot", "zero-shot top-1 %", ("zeroshot", "top1_pct"), 1),
           ("probe", "linear-probe top-1 %", ("linear_probe", "top1_pct"), 1),
           ("gap", "modality gap", ("modality", "gap"), 3),
           ("i2t_r1", "image->text R@1 %", ("retrieval", "image_to_text_R@1_pct"), 1),
           ("i2t_r5", "image->text R@5 %", ("retrieval", "image_to_text_R@5_pct"), 1),
           ("i2t_r10", "image->text R@10 %", ("retrieval", "image_to_text_R@10_pct"), 1),
           ("t2i_r1", "text->image R@1 %", ("retrieval", "text_to_image_R@1_pct"), 1),
           ("t2i_r5", "text->image R@5 %", ("retrieval", "text_to_image_R@5_pct"), 1),
           ("t2i_r10", "text->image R@10 %", ("retrieval", "text_to_image_R@10_pct"), 1),
           ("final_loss", "final loss", ("train", "final_loss"), 3),
           ("samples_per_s", "samples/s", ("train", "samples_per_s"), 0)]
INTERVAL_METRICS = {"zeroshot": "zero-shot", "probe": "probe", "gap": "gap"}  # (short names for the Δ columns)
INTERVAL_NAME = "Welch t-interval (95 %) of the difference of the means over seeds, variant - baseline"


def role(model: str) -> str:
    """The spectrum position of a model name: 'msclip-b32-es-tiny' -> 'msclip-b32-es'."""
    return Path(model).stem.removesuffix("-tiny") if model.endswith((".json", ".yaml")) else model.removesuffix("-tiny")


def _get(result: dict, path: tuple[str, str]) -> float | None:
    v = result.get(path[0], {}).get(path[1])
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def summarise(spec: "StudySpec", results: list[dict]) -> dict[str, dict]:
    """Per model: the values over seeds, mean, std and (against the baseline) the difference interval."""
    by_model = {m: [r for r in results if r["model"] == m] for m in spec.models}
    base = by_model.get(spec.baseline_model, [])
    out = {}
    for model, runs in by_model.items():
        s: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "params": runs[0]["params"] if runs else None,
                             "flops_per_pair": runs[0]["flops_per_pair"] if runs else None}
        for key, _, path, _ in METRICS:
            vals = [v for v in (_get(r, path) for r in runs) if v is not None]
            if not vals:
                continue
            m, sd = mean_std(vals)
            entry: dict[str, Any] = {"values": vals, "mean": m, "std": sd}
            ref = [v for v in (_get(r, path) for r in base) if v is not None]
            if key in INTERVAL_METRICS and ref and model != spec.baseline_model:
                iv = welch_interval(vals, ref)
                entry["diff_to_baseline"] = {"diff": iv.diff, "low": iv.low, "high": iv.high, "df": iv.df}
            s[key] = entry
        s["nmi_layers"] = _mean_layers(runs)
        s["loss_curve"] = _mean_curve(runs)
        out[model] = s
    return out


def _mean_layers(runs: list[dict]) -> list[dict]:
    per: dict[int, list[float]] = {}
    for r in runs:
        for row in r.get("modality", {}).get("layers", []):
            per.setdefault(row["layer"], []).append(row["nmi"])
    return [{"layer": k, "nmi": mean_std(v)[0], "std": mean_std(v)[1]} for k, v in sorted(per.items())]


def _mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    per: dict[int, list[float]] = {}
    for r in runs:
        for step, loss in r["train"]["loss_curve"]:
            per.setdefault(int(step), []).append(loss)
    return [(k, sum(v) / len(v)) for k, v in sorted(per.items()) if len(v) == len(runs)]


def _iv(entry: dict | None) -> Interval | None:
    if not entry or "diff_to_baseline" not in entry:
        return None
    d = entry["diff_to_baseline"]
    return Interval(d["diff"], d["low"], d["high"], d["df"])


def _cell(entry: dict | None, digits: int) -> str:
    if not entry:
        return "-"
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}" if len(entry["values"]) > 1 \
        else f"{entry['mean']:.{digits}f}"


def _table(spec: "StudySpec", summary: dict[str, dict]) -> list[str]:
    keys = [(k, label, d) for k, label, _, d in METRICS if any(k in s for s in summary.values())]
    head = ["variant", "seeds", "shared / image-only / text-only params", "fraction shared (all / trunk)",
            "GFLOPs per pair"]
    for k, label, _ in keys:
        head.append(label)
        if k in INTERVAL_METRICS:
            head.append(f"Δ {INTERVAL_METRICS[k]} vs baseline [95 % CI]")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, s in summary.items():
        p = s["params"]
        if p is None:
            lines.append(f"| `{model}` | 0 | (no finished run) |" + " |" * (len(head) - 3))
            continue
        row = [f"`{model}`" + (" (baseline)" if model == spec.baseline_model else ""), str(len(s["seeds"])),
               f"{p['shared'] / 1e6:.3f} M / {p['image_only'] / 1e6:.3f} M / {p['text_only'] / 1e6:.3f} M",
               f"{p['fraction_shared']:.3f} / {p['trunk_fraction_shared']:.3f}", f"{s['flops_per_pair'] / 1e9:.3f}"]
        for k, _, d in keys:
            row.append(_cell(s.get(k), d))
            if k in INTERVAL_METRICS:
                iv = _iv(s.get(k))
                row.append("—" if model == spec.baseline_model else (iv.text(d) if iv else "n/a"))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def claims(spec: "StudySpec", summary: dict[str, dict]) -> list[str]:
    """The paper's three claims, as measured here (each sentence says what the intervals show)."""
    roles = {role(m): m for m in summary}
    out = []
    for key, label in (("zeroshot", "zero-shot"), ("probe", "linear-probe")):
        ranked = sorted((s[key]["mean"], m) for m, s in summary.items() if key in s)
        if ranked:
            best, model = ranked[-1]
            iv = _iv(summary[model].get(key))
            vs = (f"; its difference to the baseline is {iv.text()} points"
                  + (" (interval excludes 0)" if iv.excludes_zero else " (interval includes 0)"
                     if iv.excludes_zero is not None else "")) if iv else ""
            out.append(f"**Ranking ({label})**: `{model}` ranks first with {best:.1f} %{vs}. Order: "
                       + ", ".join(f"`{m}` {v:.1f}" for v, m in reversed(ranked)) + ".")
    ref = roles.get("msclip-b32")
    for name, what in (("msclip-b32-es", "early specialization"), ("msclip-b32-pb", "the parallel branch"),
                       ("msclip-s-b32", "early specialization + the parallel branch")):
        if ref is None or name not in roles or "zeroshot" not in summary[roles[name]]:
            continue
        a, b = summary[roles[name]], summary[ref]
        parts = []
        for key, label in (("zeroshot", "zero-shot"), ("probe", "probe")):
            if key in a and key in b:
                iv = welch_interval(a[key]["values"], b[key]["values"])
                verdict = ("adds" if iv.diff > 0 else "costs") if iv.excludes_zero else "no clear difference"
                parts.append(f"{label} {iv.text()} points ({verdict})")
        out.append(f"**Does {what} add to the shared model?** `{roles[name]}` - `{ref}`: " + "; ".join(parts) + ".")
    base = summary.get(spec.baseline_model, {})
    if "gap" in base:
        lower, higher, unclear = [], [], []
        for m, s in summary.items():
            if m == spec.baseline_model or "gap" not in s or not s["params"] or not s["params"]["shared"]:
                continue
            iv = _iv(s["gap"])
            (unclear if iv is None or not iv.excludes_zero else lower if iv.diff < 0 else higher).append(f"`{m}`")
        def listed(names: list[str]) -> str:
            return f"{len(names)}" + (f" ({', '.join(names)})" if names else "")

        out.append(f"**Does sharing lower the modality gap?** Against `{spec.baseline_model}` "
                   f"(gap {base['gap']['mean']:.3f}), of the variants that share parameters the gap is lower in "
                   f"{listed(lower)}, higher in {listed(higher)}, and not clearly different (interval includes 0, "
                   f"or n/a) in {listed(unclear)}.")
    return out


def _plots(spec: "StudySpec", summary: dict[str, dict], out: Path) -> list[str]:
    plt = pyplot()
    done = {m: s for m, s in summary.items() if s["params"]}
    files = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (key, label) in zip(axes, (("zeroshot", "zero-shot top-1 %"), ("probe", "linear-probe top-1 %"))):
        for m, s in done.items():
            if key in s:
                ax.errorbar([s["params"]["fraction_shared"]], [s[key]["mean"]], yerr=[s[key]["std"]], fmt="o",
                            capsize=3, label=m)
        ax.set_xlabel("fraction of parameters shared")
        ax.set_ylabel(label + " (mean ± std over seeds)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    files.append(save_figure(fig, out / "accuracy_vs_shared.png").name)
    fig, ax = plt.subplots(figsize=(7, 4))
    for m, s in done.items():
        if s["nmi_layers"]:
            ax.plot([r["layer"] for r in s["nmi_layers"]], [r["nmi"] for r in s["nmi_layers"]], marker="o", label=m)
    ax.set_xlabel("trunk layer")
    ax.set_ylabel("NMI of a 2-way k-means vs modality")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(save_figure(fig, out / "nmi_layers.png").name)
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [m for m, s in done.items() if "gap" in s]
    ax.bar(range(len(names)), [done[m]["gap"]["mean"] for m in names],
           yerr=[done[m]["gap"]["std"] for m in names], capsize=3)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("modality gap (mean ± std over seeds)")
    fig.tight_layout()
    files.append(save_figure(fig, out / "modality_gap.png").name)
    fig, ax = plt.subplots(figsize=(7, 4))
    for m, s in done.items():
        if s["loss_curve"]:
            ax.plot(*zip(*s["loss_curve"]), label=m)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(save_figure(fig, out / "loss_curves.png").name)
    return files


def build_report(spec: "StudySpec", results: list[dict], missing: list[dict]) -> dict[str, Any]:
    """Write report.md, study.json and the plots into the study folder; returns study.json's content."""
    out = spec.out_dir
    summary = summarise(spec, results)
    plots = _plots(spec, summary, out) if results else []
    said = claims(spec, summary) if results else []
    recipe = results[0] if results else {}
    steps = recipe.get("train", {}).get("steps", "?")
    lines = [f"# Sharing-spectrum study `{spec.name}`", "",
             f"{len(spec.models)} variants x {len(spec.seeds)} seed(s) {spec.seeds}, the same recipe for each "
             f"({steps} steps; the resolved recipe is `recipe.yaml`), evaluated on `{spec.eval.data}` held-out data "
             f"({spec.eval.test_samples} images for zero-shot and the probe test, {spec.eval.probe_train_samples} "
             f"train images for the probe fit, {spec.eval.modality_samples} image-caption pairs for the modality "
             f"statistics). Baseline: `{spec.baseline_model}`.", "",
             f"Intervals: {INTERVAL_NAME}, Welch-Satterthwaite degrees of freedom; \"n/a\" with fewer than 2 seeds. "
             "± is the sample standard deviation over seeds.", "",
             "## Results", "", *_table(spec, summary), ""]
    if not any("i2t_r1" in s for s in summary.values()):
        lines += ["Retrieval: n/a (no held-out captions configured: `eval.retrieval`).", ""]
    lines += ["## The paper's claims, measured", "", *[f"- {c}" for c in said], "",
              f"Caveat: this is a {steps}-step budget on small data; differences of a point or two are within "
              "seed noise unless the interval says otherwise, and nothing here tests the full-scale claims.", "",
              "## Plots", "", *[f"![{Path(p).stem}]({p})" for p in plots], ""]
    if missing:
        lines += ["## Missing runs", "", *[f"- `{m['name']}`: {m['status']}" for m in missing], ""]
    mio.write_text(out / "report.md", "\n".join(lines))
    data = {"study": spec.to_dict(), "interval": INTERVAL_NAME, "summary": summary, "claims": said,
            "runs": results, "missing": missing, "plots": plots}
    mio.write_json(out / "study.json", data)
    return data
