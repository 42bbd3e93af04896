"""Audit of the demo (budget planning, its table against the runs' own metrics, re-runs), the in-training
zero-shot (leaves training bit-identical, restores the mode it found), and the run logger (NaN/inf lines,
metrics files across a resume, files closed on error). CPU, fp32, one thread, tiny models, fake
Fashion-MNIST (tests/test_demo.py's writer) so that nothing depends on the Debian package."""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch
import yaml
from torch import nn

from msclip import demo
from msclip.data.fashion_mnist import ROOT_ENV
from msclip.eval import in_training
from msclip.train import main as train_main
from msclip.train.logger import RunLogger, read_metrics
from msclip.train.main import train
from msclip.train.recipe import load_recipe
from msclip.train.state import checkpoint_path, load_train_state

from test_demo import _fake_fashion_mnist
from train_utils import tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

TEST_IMAGES = 200


# --- budget planning ----------------------------------------------------------------------------------------

@pytest.fixture()
def recipes():
    return {label: load_recipe(demo.RECIPES_DIR / fname) for label, fname in demo.RECIPES.items()}


def test_plan_budget_charges_each_model_its_own_step_time(monkeypatch, recipes):
    """One model much slower than the other: the budget is the sum of both models' step times."""
    monkeypatch.setattr(demo.torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    first, second = recipes.values()
    monkeypatch.setattr(demo, "_step_time", lambda r, threads: 0.1 if r is first else 1.0)
    monkeypatch.setattr(demo, "_batch_time", lambda r: 0.05)
    threads, steps = demo.plan_budget(recipes, budget_s=300.0, overhead_s=75.0)
    per_step = 0.1 + 1.0 + 2 * 0.05
    assert threads == 1
    assert steps == int(225 / (1.2 * per_step)) // 10 * 10 == 150
    assert steps * per_step * 1.2 <= 225


@pytest.mark.parametrize("budget_s", [80.0, 10.0, -120.0])  # less than the overhead; set-up overran the budget
def test_plan_budget_without_time_left_runs_ten_steps_and_says_so(monkeypatch, recipes, capsys, budget_s):
    monkeypatch.setattr(demo, "_step_time", lambda r, threads: 0.5)
    monkeypatch.setattr(demo, "_batch_time", lambda r: 0.0)
    _, steps = demo.plan_budget(recipes, budget_s=budget_s)
    assert steps == 10  # the floor: a run still happens (and trains), it is never 0 or negative
    assert "CUTTING both runs to 10 steps" in capsys.readouterr().err


# --- the demo end to end ------------------------------------------------------------------------------------

def _demo_setup(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """Fake Fashion-MNIST (the default root via the environment) and the shipped recipes shrunk: batch 4,
    one thread, a training record every step, in-training zero-shot on the same images as the final one."""
    fm = tmp_path / "fmnist"
    _fake_fashion_mnist(fm, n=TEST_IMAGES)
    monkeypatch.setenv(ROOT_ENV, str(fm))
    rd = tmp_path / "recipes"
    rd.mkdir()
    for fname in demo.RECIPES.values():
        r = yaml.safe_load((demo.RECIPES_DIR / fname).read_text())
        r["data"]["batch_size"] = 4
        r["zeroshot"].update(num_samples=TEST_IMAGES, batch_size=TEST_IMAGES)
        r["train"]["threads"] = 1
        r["log"] = {"every": 1, "progress": False, "tensorboard": False}
        (rd / fname).write_text(yaml.safe_dump(r))
    return fm, rd


def _table(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| (MS-CLIP-S|CLIP) \(`", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in line.strip().strip("|").split("|")]
    return rows


def _num(cell: str) -> float:
    return float(re.search(r"-?[\d.]+", cell).group())


def test_demo_table_is_the_runs_saved_metrics_and_a_rerun_leaves_an_old_demo_alone(tmp_path, monkeypatch,
                                                                                  capsys):
    _, rd = _demo_setup(tmp_path, monkeypatch)
    out = tmp_path / "reports"
    # a previous demo's folder, with a run that looks finished: the new demo must neither reuse nor touch it
    old = out / "demo-20000101-000000" / "runs" / "demo-clip"
    old.mkdir(parents=True)
    stale = json.dumps({"kind": "zeroshot", "step": 2, "top1_pct": 99.0, "top5_pct": 99.0,
                        "mean_per_class_recall_pct": 99.0, "images": TEST_IMAGES}) + "\n"
    (old / "metrics.jsonl").write_text(stale)
    (old / "model.safetensors").write_bytes(b"stale")

    assert demo.main(["--steps", "2", "--out", str(out), "--recipes", str(rd),
                      "--test-images", str(TEST_IMAGES)]) == 0
    printed = capsys.readouterr().out
    report = next(p for p in out.glob("demo-*/report.md") if "20000101" not in str(p))
    assert (old / "metrics.jsonl").read_text() == stale and (old / "model.safetensors").read_bytes() == b"stale"
    assert "20000101" not in report.read_text()

    table, printed_table = _table(report.read_text()), _table(printed)
    assert printed_table == table and set(table) == {"MS-CLIP-S", "CLIP"}  # the printed table is the report's
    for label, fname in demo.RECIPES.items():
        run_dir = report.parent / "runs" / load_recipe(rd / fname).name
        cells = table[label]
        summary = read_metrics(run_dir, "summary")[-1]
        assert cells[2] == f"{summary['steps_total']} x 4"
        losses = [r["loss"] for r in read_metrics(run_dir, "train")]
        assert len(losses) == 2 and cells[5] == f"{sum(losses[-10:]) / len(losses[-10:]):.3f}"
        # the final zero-shot scores the exported weights on the images the last in-training one scored
        zs = read_metrics(run_dir, "zeroshot")[-1]
        assert zs["step"] == 2 and zs["images"] == TEST_IMAGES
        assert [_num(c) for c in cells[6:9]] == [round(zs[k], 1) for k in
                                                 ("top1_pct", "top5_pct", "mean_per_class_recall_pct")]
        # a cut run (2 < the recipe's 400 steps) keeps a schedule: the resolved recipe says what ran
        ran = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        assert (ran["train"]["steps"], ran["optim"]["warmup"], ran["optim"]["cooldown"]) == (2, 0, 0)
        assert (ran["zeroshot"]["every"], ran["checkpoint"]["every"]) == (10, 10)
    # the two models trained differently: a table that repeated one run twice would not pass
    assert table["MS-CLIP-S"][5:9] != table["CLIP"][5:9]


def _fake_runs(top1: tuple[float, float], images: int = 10_000) -> dict[str, dict]:
    runs = {}
    for label, t1 in zip(demo.RECIPES, top1):
        res = NS(state=NS(step=10), wall_s=5.0, precision="fp32")
        runs[label] = {"recipe": NS(model="m"), "result": res, "run_dir": Path("r") / label, "batch": 4,
                       "params": {"total": 1e6, "shared": 0.0}, "sps": 8.0, "final_loss": 1.0,
                       "recipe_copy": f"{label}.yaml",
                       "zeroshot": {"top1_pct": t1, "top5_pct": 50.0, "mean_per_class_recall_pct": t1,
                                    "templates": 12, "images": images}}
    return runs


def test_report_names_the_model_ahead(tmp_path):
    text = demo._report(_fake_runs((31.0, 25.5)), tmp_path, [], 60.0, 1).read_text()
    assert "MS-CLIP-S is ahead by 5.5 points" in text
    text = demo._report(_fake_runs((20.0, 22.0)), tmp_path, [], 60.0, 1).read_text()
    assert "CLIP is ahead by 2.0 points" in text


def test_report_says_a_tie_is_a_tie(tmp_path):
    text = demo._report(_fake_runs((10.0, 10.0)), tmp_path, [], 60.0, 1).read_text()
    assert not re.search(r"ahead by -?0\.0 points", text)


def test_report_states_the_number_of_images_scored(tmp_path):
    text = demo._report(_fake_runs((30.0, 20.0), images=TEST_IMAGES), tmp_path, [], 60.0, 1).read_text()
    assert "10,000" not in text and f"{TEST_IMAGES}" in text


def test_a_demo_started_in_the_same_second_gets_its_own_folder(tmp_path, monkeypatch):
    _, rd = _demo_setup(tmp_path, monkeypatch)
    monkeypatch.setattr(demo.time, "strftime", lambda fmt: "20300101-000000")
    first = tmp_path / "reports" / "demo-20300101-000000" / "runs" / "demo-msclip-s"
    first.mkdir(parents=True)
    (first / "model.safetensors").write_bytes(b"the first demo's weights")  # the first demo, one second ago
    assert demo.main(["--steps", "1", "--out", str(tmp_path / "reports"), "--recipes", str(rd),
                      "--test-images", "20"]) == 0
    assert (first / "model.safetensors").read_bytes() == b"the first demo's weights"


def test_demo_refuses_a_non_positive_step_count_up_front(tmp_path, monkeypatch, capsys):
    _demo_setup(tmp_path, monkeypatch)
    assert demo.main(["--steps", "0", "--out", str(tmp_path / "reports")]) == 2
    assert "--steps" in capsys.readouterr().err and not list((tmp_path / "reports").glob("demo-*"))


def test_demo_loss_plot_gets_numbers_when_a_loss_was_nan(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    runs = {}
    for label in demo.RECIPES:
        lg = RunLogger(tmp_path / label, tensorboard=False)
        for step, loss in ((1, 2.0), (2, float("nan")), (3, 1.0)):
            lg.log("train", step, {"loss": loss})
        lg.log("zeroshot", 3, {"top1_pct": 12.0})
        lg.close()
        runs[label] = {"run_dir": tmp_path / label}
    seen, real = [], Axes.plot

    def plot(self, x, y, *args, **kwargs):
        seen.append(list(y))
        return real(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", plot)
    demo._plot(runs, tmp_path)
    assert seen and all(isinstance(v, float) for ys in seen for v in ys)


# --- in-training zero-shot ----------------------------------------------------------------------------------

def test_zeroshot_every_step_leaves_weights_batchnorm_stats_and_rng_unchanged(tmp_path):
    """MS-CLIP-S (its conv stem has BatchNorm): a run evaluating after every step and one that never evaluates
    hold the same weights, buffers and saved RNG state at every checkpoint."""
    from image_folder_utils import make_photo_folder

    folder = tmp_path / "photos"
    make_photo_folder(folder, size=32, corrupt=False)
    common = dict(model="msclip-s-b32-tiny", train__steps=3, data__num_samples=16,
                  checkpoint={"every": 1, "keep_last": 5})
    torch.manual_seed(0)
    plain = train(tiny_recipe(tmp_path, "plain", **common))
    torch.manual_seed(0)
    zs = train(tiny_recipe(tmp_path, "zs", zeroshot={"kind": "folder", "path": str(folder), "every": 1,
                                                     "batch_size": 4}, **common))
    assert [r["step"] for r in read_metrics(zs.run_dir, "zeroshot")] == [1, 2, 3]
    for step in (1, 2, 3):
        a, b = (load_train_state(checkpoint_path(r.run_dir, step)) for r in (plain, zs))
        assert any("running_mean" in k for k in a["model"])
        assert a["model"].keys() == b["model"].keys()
        differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
        assert not differ, (step, differ[:4])
        ra, rb = a["rng"][0]["rng"], b["rng"][0]["rng"]
        assert torch.equal(ra["torch"], rb["torch"]) and ra["python"] == rb["python"]
        assert torch.equal(ra["numpy"]["key"], rb["numpy"]["key"]) and ra["numpy"]["pos"] == rb["numpy"]["pos"]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)


def _evaluator() -> in_training.ZeroShotEvaluator:
    task = in_training.ZeroShotTask(dataset=None, classnames=["a", "b"],
                                    templates=NS(templates=("a {}.",)), names_source="test")
    return in_training.ZeroShotEvaluator(task, tokenizer=None, device=torch.device("cpu"), autocast=None)


def test_evaluator_evaluates_in_eval_mode_and_gives_back_the_mode_it_found(monkeypatch):
    modes = []

    def fake(model, *args, **kwargs):
        modes.append(model.training or model.bn.training)
        return {"top1_pct": 1.0, "top5_pct": 2.0, "mean_per_class_recall_pct": 3.0, "images": 4, "extra": 0}

    monkeypatch.setattr(in_training, "evaluate_zeroshot", fake)
    ev, net = _evaluator(), _Net()
    assert ev(net.train()) == {"top1_pct": 1.0, "top5_pct": 2.0, "mean_per_class_recall_pct": 3.0, "images": 4}
    assert net.training and net.bn.training
    ev(net.eval())  # an eval-mode model (e.g. the demo's final evaluation) stays in eval mode
    assert not net.training and not net.bn.training
    assert modes == [False, False]


def test_evaluator_restores_train_mode_when_the_evaluation_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unreadable image batch")

    monkeypatch.setattr(in_training, "evaluate_zeroshot", broken)
    net = _Net().train()
    with pytest.raises(RuntimeError, match="unreadable"):
        _evaluator()(net)
    assert net.training and net.bn.training


# --- the run logger -----------------------------------------------------------------------------------------

def _strict_json(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(line, parse_constant=refuse)


def test_nan_and_inf_values_keep_every_metrics_file_valid(tmp_path):
    class Board:
        def __init__(self) -> None:
            self.scalars: list[tuple[str, float, int]] = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def close(self):
            pass

    lg = RunLogger(tmp_path, tensorboard=False)
    lg.tb = board = Board()
    lg.log("train", 1, {"loss": float("nan"), "grad_norm": float("inf"), "lr": float("-inf"), "samples": 8})
    lg.log("train", 2, {"loss": 0.5, "grad_norm": 1.0, "lr": 1e-3, "samples": 16})
    lg.close()
    recs = [_strict_json(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]  # strict JSON
    assert [r["step"] for r in recs] == [1, 2]
    assert math.isnan(float(recs[0]["loss"])) and float(recs[0]["grad_norm"]) == math.inf
    assert float(recs[0]["lr"]) == -math.inf and recs[0]["samples"] == 8
    with open(tmp_path / "metrics-train.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["kind", "step", "loss", "grad_norm", "lr", "samples"] and len(rows) == 3
    assert math.isnan(float(rows[1][2])) and float(rows[1][3]) == math.inf and rows[2][2] == "0.5"
    # TensorBoard gets the finite values only (a NaN point would wreck the chart's scale)
    assert board.scalars == [("train/samples", 8, 1), ("train/loss", 0.5, 2), ("train/grad_norm", 1.0, 2),
                             ("train/lr", 1e-3, 2), ("train/samples", 16, 2)]


def test_resume_drops_records_cut_by_a_kill_and_the_files_stay_valid(tmp_path):
    """Killed while logging the zero-shot of its step-3 checkpoint: the resumed run (from step 3) drops the
    cut JSONL record and the cut CSV row (too few fields), and every file stays one record per line."""
    lg = RunLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        lg.log("train", step, {"loss": 1.0 / step, "lr": 0.1})
    lg.log("zeroshot", 2, {"top1_pct": 10.0, "images": 20})
    lg.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "zeroshot", "step": 3, "top1')  # the kill cut this record
    with open(tmp_path / "metrics-zeroshot.csv", "a", newline="") as f:
        f.write("zeroshot,3")  # and this row
    lg = RunLogger(tmp_path, tensorboard=False, start_step=3)  # resumed from the step-3 checkpoint
    lg.log("train", 4, {"loss": 0.25, "lr": 0.1})
    lg.log("zeroshot", 4, {"top1_pct": 20.0, "images": 20})
    lg.close()
    recs = [_strict_json(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in recs] == [("train", 1), ("train", 2), ("train", 3), ("zeroshot", 2),
                                                      ("train", 4), ("zeroshot", 4)]
    with open(tmp_path / "metrics-zeroshot.csv", newline="") as f:
        assert list(csv.reader(f)) == [["kind", "step", "top1_pct", "images"], ["zeroshot", "2", "10.0", "20"],
                                       ["zeroshot", "4", "20.0", "20"]]
    with open(tmp_path / "metrics-train.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["kind", "step", "loss", "lr"] and [r[1] for r in rows[1:]] == ["1", "2", "3", "4"]


def test_resume_onto_a_file_without_a_final_newline_keeps_one_record_per_line(tmp_path):
    lg = RunLogger(tmp_path, tensorboard=False)
    lg.log("train", 1, {"loss": 1.0})
    lg.log("train", 2, {"loss": 0.5})
    lg.close()
    for name in ("metrics.jsonl", "metrics-train.csv"):
        p = tmp_path / name
        p.write_text(p.read_text().rstrip("\r\n"))
    lg = RunLogger(tmp_path, tensorboard=False, start_step=2)
    lg.log("train", 3, {"loss": 0.25})
    lg.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [_strict_json(ln)["step"] for ln in lines] == [1, 2, 3]
    # the CSV row without its newline may be cut inside its last field (0.5 of 0.5123): dropped, not trusted
    with open(tmp_path / "metrics-train.csv", newline="") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "3"]


def test_read_metrics_skips_a_record_cut_by_a_kill(tmp_path):
    lg = RunLogger(tmp_path, tensorboard=False)
    lg.log("train", 1, {"loss": 1.0})
    lg.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')
    assert [r["step"] for r in read_metrics(tmp_path, "train")] == [1]


def _record_loggers(monkeypatch) -> list[RunLogger]:
    made: list[RunLogger] = []

    class Recorded(RunLogger):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(train_main, "RunLogger", Recorded)
    return made


def _closed(lg: RunLogger) -> bool:
    return lg.jsonl.closed and (lg.tb is None or lg.tb.all_writers is None)


def test_an_error_inside_the_training_loop_closes_the_metrics_files(tmp_path, monkeypatch):
    made = _record_loggers(monkeypatch)
    real = train_main.TrainLoop.train_step

    def step(self, micro):
        if self.state.step == 1:
            raise RuntimeError("the loss crashed")
        return real(self, micro)

    monkeypatch.setattr(train_main.TrainLoop, "train_step", step)
    with pytest.raises(RuntimeError, match="loss crashed"):
        train(tiny_recipe(tmp_path, "err", train__steps=3, log__tensorboard=True))
    assert len(made) == 1 and made[0].tb is not None and _closed(made[0])
    assert [r["step"] for r in read_metrics(tmp_path / "err", "train")] == [1]  # what was logged is on disk


def test_an_error_before_the_loop_starts_closes_the_metrics_files(tmp_path, monkeypatch):
    made = _record_loggers(monkeypatch)

    def broken(*args, **kwargs):
        raise RuntimeError("compiler missing")

    monkeypatch.setattr(train_main, "compile_for_training", broken)
    with pytest.raises(RuntimeError, match="compiler missing"):
        train(tiny_recipe(tmp_path, "early", train__steps=2, log__tensorboard=True))
    assert len(made) == 1 and _closed(made[0])
