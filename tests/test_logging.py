"""What a run reports: the global loss under DDP, plain periodic lines without a terminal, zero-shot results
on the console, the skip counts per category, metrics files that name themselves, and a resumed run's
metrics with each step once and a closing line that tells this run's steps from the run's total.
CPU, fp32, one thread."""
from __future__ import annotations

import csv
import json
import logging
import re
import sys
from pathlib import Path

import pytest
from PIL import Image

from msclip.train.logger import read_metrics
from msclip.train.main import train
from train_utils import tiny_recipe


class _Stderr(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")  # the stderr of the moment (pytest swaps it per phase)


@pytest.fixture
def console(capfd: pytest.CaptureFixture[str]):
    """msclip's log records on the (captured, not a terminal) stderr, as ``msclip train`` prints them."""
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("msclip")
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield capfd
    root.removeHandler(handler)
    root.setLevel(old_level)


def _jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _csv_steps(path: Path) -> list[int]:
    with open(path, newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


@pytest.mark.parametrize("progress", [True, False])
def test_without_a_terminal_plain_lines_every_n_steps_and_zeroshot_on_the_console(
        tmp_path: Path, console: pytest.CaptureFixture[str], progress: bool) -> None:
    from image_folder_utils import make_photo_folder

    folder = tmp_path / "photos"
    make_photo_folder(folder, size=32, corrupt=False)
    # 20 samples / batch 8: 2 steps per epoch, 4 samples per epoch left out of the last full batch
    res = train(tiny_recipe(tmp_path, "tty", train__steps=4, data__num_samples=20,
                            log={"every": 2, "progress": progress, "tensorboard": False},
                            zeroshot={"kind": "folder", "path": str(folder), "every": 4, "batch_size": 16}))
    out, err = console.readouterr()
    text = out + err
    assert "\r" not in text  # no progress-bar redraws in a redirected log
    lines = re.findall(r"step (\d+)/4 \| loss [\d.]+ \| lr \S+ \| \d+ samples/s \| data [\d.]+ s/step \| "
                       r"ETA [\d:?]+ \| skipped: (.*)", text)
    assert [int(s) for s, _ in lines] == [2, 4]  # every log.every steps, not every step
    # only the non-zero categories, the run's running totals
    assert [skips for _, skips in lines] == ["dropped_partial 4", "dropped_partial 8"]
    zs = read_metrics(res.run_dir, "zeroshot")[-1]
    assert f"zero-shot at step 4: top-1 {zs['top1_pct']:.2f} %, top-5 {zs['top5_pct']:.2f} % (10 images)" in text
    assert re.search(r"finished: steps 1\.\.4 of 4 \(4 in this run, 4 done in total\).*skipped: dropped_partial 8",
                     text)
    # the files are named for what they hold, and every periodic record has every skip category
    assert not (res.run_dir / "train.csv").exists() and (res.run_dir / "metrics-zeroshot.csv").is_file()
    with open(res.run_dir / "metrics-train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["dropped_partial"], r["skipped_decode"]) for r in rows] == [("2", "4", "0"),
                                                                                     ("4", "8", "0")]
    summary = read_metrics(res.run_dir, "summary")
    assert len(summary) == 1 and summary[0]["dropped_partial"] == 8 and summary[0]["steps_this_run"] == 4
    assert res.skips["dropped_partial"] == 8 and res.steps_run == 4


def _csv_with_missing_images(root: Path, rows: int, missing: set[int]) -> Path:
    root.mkdir()
    lines = ["filepath,title"]
    for i in range(rows):
        name = f"{i}.png"
        if i not in missing:
            Image.new("RGB", (32, 32), (40 * (i % 6), 120, 200)).save(root / name)
        lines.append(f"{name},a photo of colour {i % 6}")
    path = root / "pairs.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_resumed_run_has_each_step_once_and_reports_its_own_and_the_total_steps(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # 24 rows, 6 of them without an image file: each epoch (3 steps of 8) skips 6 and substitutes 6
    pairs = _csv_with_missing_images(tmp_path / "data", 24, missing={1, 5, 9, 13, 17, 21})
    common = dict(train__steps=6, data={"kind": "csv", "path": str(pairs), "batch_size": 8, "workers": 0},
                  checkpoint={"every": 2, "keep_last": 5})
    # the interrupted run logs step 3 after its step-2 checkpoint; the resumed run redoes step 3
    first = train(tiny_recipe(tmp_path, "cut", **common), stop_after=3)
    assert first.state.step == 3 and _csv_steps(first.run_dir / "metrics-train.csv") == [1, 2, 3]
    (first.run_dir / "checkpoints" / "step_00000003.pt").unlink(missing_ok=True)  # (none at step 3 anyway)
    with caplog.at_level(logging.INFO, logger="msclip"):
        resumed = train(tiny_recipe(tmp_path, "cut", resume="latest", **common))
    assert resumed.start_step == 2 and resumed.steps_run == 4
    records = _jsonl(resumed.run_dir)
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]  # the file itself, not read_metrics' de-duplication
    assert _csv_steps(resumed.run_dir / "metrics-train.csv") == [1, 2, 3, 4, 5, 6]
    # the interrupted run's closing record (at step 3, past the checkpoint) is gone too; the last one is ours
    summaries = [r for r in records if r["kind"] == "summary"]
    assert [s["step"] for s in summaries] == [6] and records[-1] is summaries[-1]
    assert _csv_steps(resumed.run_dir / "metrics-summary.csv") == [6]
    last = summaries[-1]
    assert (last["start_step"], last["steps_this_run"], last["steps_total"]) == (2, 4, 6)
    # two epochs: 12 rows skipped and substituted in all, each counted once over the interruption (the
    # resumed run replays the head of epoch 0 to find its place; those were counted by the first run)
    assert (last["skipped_decode"], last["shortfall"]) == (12, 12)
    assert resumed.skips["skipped_decode"] == 12
    closing = [r.getMessage() for r in caplog.records if r.getMessage().startswith("finished:")]
    assert closing and "steps 3..6 of 6 (4 in this run, resumed at step 2, 6 done in total)" in closing[-1]
    assert "skipped_decode 12" in closing[-1] and "shortfall 12" in closing[-1]


def test_a_full_disk_under_the_run_logs_is_a_write_error_naming_the_file(tmp_path: Path, monkeypatch) -> None:
    """A metrics write that fails (ENOSPC) stops with a WriteError naming the file and the full disk, for the
    JSONL, the per-kind CSV and TensorBoard alike, instead of a raw OSError traceback."""
    import errno

    from msclip import io as mio
    from msclip.train import logger as run_logger

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    lg = run_logger.RunLogger(tmp_path, tensorboard=False)
    lg.log("train", 1, {"loss": 1.0})
    monkeypatch.setattr(lg.jsonl, "write", no_space)
    with pytest.raises(mio.WriteError, match=r"metrics\.jsonl: the disk is full"):
        lg.log("train", 2, {"loss": 1.0})
    monkeypatch.undo()

    monkeypatch.setattr(run_logger, "open", no_space, raising=False)  # the CSV's appends
    with pytest.raises(mio.WriteError, match=r"metrics-train\.csv: the disk is full"):
        lg.log("train", 3, {"loss": 1.0})
    monkeypatch.undo()

    class FailingBoard:
        def add_scalar(self, *args):
            no_space()

    lg.tb = FailingBoard()
    with pytest.raises(mio.WriteError, match=r"tensorboard: the disk is full"):
        lg.log("train", 4, {"loss": 1.0})
    lg.tb = None
    lg.close()
