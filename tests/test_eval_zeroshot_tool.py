"""`python tools/eval_zeroshot.py --model experiments/model/<cfg>.yaml`, as the official README runs it,
on a miniature DATASET/imagenet/val and an official-layout checkpoint at MODEL.PRETRAINED_MODEL."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
import yaml

from image_folder_utils import make_photo_folder
from reference_utils import REF_DIR, recipe_state_dict

TOOL = Path(__file__).resolve().parents[1] / "tools" / "eval_zeroshot.py"
WNIDS = {"astronaut": "n09999901", "camera_man": "n09999902", "cat": "n02123045", "coffee_mug": "n03063599",
         "rocket": "n04099969"}


def _official_tree(root: Path, with_ckpt: bool = True) -> None:
    """root/ laid out like the official repo: experiments/model/tiny.yaml, OUTPUT_MODEL/, DATASET/."""
    cfg = yaml.safe_load((REF_DIR / "config.yaml").read_text())
    cfg["MODEL"]["PRETRAINED_MODEL"] = "OUTPUT_MODEL/tiny-msclips_ckpt.pth"
    (root / "experiments" / "model").mkdir(parents=True)
    (root / "experiments" / "model" / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    if with_ckpt:
        (root / "OUTPUT_MODEL").mkdir()
        torch.save(recipe_state_dict(REF_DIR / "manifest.tsv"), root / "OUTPUT_MODEL" / "tiny-msclips_ckpt.pth")
    photos = root / "photos"
    make_photo_folder(photos, size=64)
    val = root / "DATASET" / "imagenet" / "val"
    val.mkdir(parents=True)
    for cls, wnid in WNIDS.items():
        (photos / cls).rename(val / wnid)


def _run_tool(monkeypatch, cwd: Path, *args: str) -> int:
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [str(TOOL), *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(TOOL), run_name="__main__")
    return exit_info.value.code


def test_tool_runs_like_the_official_command(tmp_path, monkeypatch, capsys):
    _official_tree(tmp_path)
    rc = _run_tool(monkeypatch, tmp_path, "--model", "experiments/model/tiny.yaml", "--workers", "0")
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "accuracy@1" in captured.out and "Error@1" in captured.out
    report = json.loads((tmp_path / "OUTPUT" / "tiny" / "zeroshot_imagenet.json").read_text())
    assert report["checkpoint"]["path"] == "OUTPUT_MODEL/tiny-msclips_ckpt.pth" and not report["random_weights"]
    assert report["templates"]["name"] == "imagenet80" and report["templates"]["count"] == 80
    assert report["data"]["root"] == "DATASET/imagenet/val" and report["data"]["classes"] == 5
    assert report["images_scored"] == 11 and report["skipped_count"] == 1  # the corrupt PNG
    # The official eval transform: ImageNet mean/std, bicubic shorter-side resize + centre crop.
    assert report["preprocess"]["mean"] == [0.485, 0.456, 0.406] and report["preprocess"]["image_size"] == 128
    assert report["preprocess"]["interpolation"] == "bicubic" and report["preprocess"]["resize_mode"] == "shortest"
    assert report["device"].startswith("cuda" if torch.cuda.is_available() else "cpu")
    assert "not a 1000-class ImageNet folder" in captured.err  # 5 wnids: names fall back to the folders


def test_tool_dataset_yaml_and_missing_checkpoint(tmp_path, monkeypatch, capsys):
    _official_tree(tmp_path, with_ckpt=False)
    (tmp_path / "DATASET" / "imagenet").rename(tmp_path / "DATASET" / "mini")
    ds = tmp_path / "mini.yaml"
    ds.write_text("DATASET:\n  DATASET: 'mini'\n  ROOT: 'DATASET/mini'\n  TEST_SET: 'val'\n")
    rc = _run_tool(monkeypatch, tmp_path, "--model", "experiments/model/tiny.yaml", "--ds", str(ds))
    assert rc == 2
    err = capsys.readouterr().err
    assert "MODEL.PRETRAINED_MODEL" in err and "OUTPUT_MODEL/tiny-msclips_ckpt.pth" in err
    assert not (tmp_path / "OUTPUT").exists()  # nothing ran
