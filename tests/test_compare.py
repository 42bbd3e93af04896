"""`msclip compare` on every report kind the toolkit writes: zero-shot, retrieval and analysis reports made
by the real commands from two different models (the linear-probe kind is in tests/test_eval_cli.py)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from image_folder_utils import make_photo_folder
from msclip.cli import main

MODELS = ("clip-b32-tiny", "msclip-b32-tiny")
COMMON = ["--device", "cpu", "--workers", "0", "--no-progress", "--batch-size", "16"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    make_photo_folder(root, size=48, corrupt=False)
    return root


def _row(table: str, metric: str) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == metric:
            return cells
    raise AssertionError(f"no row {metric!r} in\n{table}")


def _check(table: str, a: dict, b: dict, metric: str, value) -> None:
    """The row of `metric` shows both values and B - A, to two decimals."""
    va, vb = value(a), value(b)
    assert _row(table, metric)[1:] == [f"{va:.2f}", f"{vb:.2f}", f"{vb - va:+.2f}"]


def _compare(tmp_path: Path, a: Path, b: Path, capsys) -> str:
    capsys.readouterr()
    out = tmp_path / "cmp.md"
    assert main(["compare", str(a), str(b), "--output", str(out)]) == 0
    printed = capsys.readouterr().out.strip()
    assert out.read_text().strip() == printed
    return printed


def test_compare_zeroshot_reports(tmp_path, photos, capsys) -> None:
    paths = []
    for m in MODELS:
        paths.append(tmp_path / f"zs-{m}.json")
        assert main(["zeroshot", "--model", m, *COMMON, "--data", str(photos), "--templates", "generic",
                     "--output", str(paths[-1])]) == 0
    a, b = (json.loads(p.read_text()) for p in paths)
    table = _compare(tmp_path, *paths, capsys)
    assert MODELS[0] in table.splitlines()[0] and MODELS[1] in table.splitlines()[0]
    for key in ("top1_pct", "top5_pct", "mean_per_class_recall_pct"):
        _check(table, a, b, key, lambda r, key=key: r[key])


def test_compare_retrieval_reports(tmp_path, photos, capsys) -> None:
    rows = [["image", "caption"]]
    for img in sorted(photos.rglob("*.png")):
        rows += [[str(img.relative_to(photos)), f"a photo of a {img.parent.name.replace('_', ' ')}"],
                 [str(img.relative_to(photos)), f"{img.parent.name} number {img.stem[-1]}"]]
    with open(photos / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    paths = []
    for m in MODELS:
        paths.append(tmp_path / f"ret-{m}.json")
        assert main(["retrieval", "--model", m, *COMMON, "--annotations", str(photos / "pairs.csv"),
                     "--output", str(paths[-1])]) == 0
    a, b = (json.loads(p.read_text()) for p in paths)
    table = _compare(tmp_path, *paths, capsys)
    for direction in ("image_to_text", "text_to_image"):
        for k in (1, 5, 10):
            key = f"{direction}_R@{k}_pct"
            _check(table, a, b, f"metrics.{key}", lambda r, key=key: r["metrics"][key])


def test_compare_analysis_reports(tmp_path, photos, capsys) -> None:
    texts = tmp_path / "captions.txt"
    texts.write_text("\n".join(f"a photo of thing number {i}" for i in range(12)) + "\n")
    images = sorted(photos.rglob("*.png"))
    for i, img in enumerate(images[:2]):  # the folder has 10 photos; analyze wants more than its minimum
        (photos / img.parent.name / f"copy{i}.png").write_bytes(img.read_bytes())
    paths = []
    for m in MODELS:
        out = tmp_path / f"an-{m}"
        assert main(["analyze", "--model", m, *COMMON, "--images", str(photos), "--texts", str(texts),
                     "--output-dir", str(out)]) == 0
        paths.append(out / "analysis.json")
    a, b = (json.loads(p.read_text()) for p in paths)
    table = _compare(tmp_path, *paths, capsys)
    for key in ("modality_gap", "embedding_nmi"):
        _check(table, a, b, key, lambda r, key=key: r[key])
