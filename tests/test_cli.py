"""The `msclip` entry point: user errors of every command print `msclip <cmd>: error: ...` and exit 2,
bugs keep their traceback, `msclip train` is self-sufficient (exit 3 on non-finite losses), `msclip info`
counts, and `python -m msclip` is the same program."""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

import msclip
from msclip import cli
from msclip.errors import MsclipError
from msclip.train.failures import DataWorkerDied, NonFiniteLossError
from proc_utils import run_logged


def test_user_errors_exit_2_with_one_line(capsys):
    assert cli.run_guarded("x", lambda a: (_ for _ in ()).throw(MsclipError("bad value")), None) == 2
    assert capsys.readouterr().err == "msclip x: error: bad value\n"
    assert cli.run_guarded("x", lambda a: (_ for _ in ()).throw(FileNotFoundError("no such file: f")), None) == 2
    with pytest.raises(RuntimeError):  # not a user error: a bug, with its traceback
        cli.run_guarded("x", lambda a: (_ for _ in ()).throw(RuntimeError("bug")), None)


def test_every_command_is_guarded(monkeypatch, capsys):
    names = [m.NAME for m in cli._command_modules()]
    assert {"train", "demo", "zeroshot", "info"} <= set(names)
    for mod in cli._command_modules():
        monkeypatch.setattr(mod, "run", lambda args: (_ for _ in ()).throw(MsclipError("broken input")))
    parser = cli.build_parser()
    for name in names:
        sub = parser._subparsers._group_actions[0].choices[name]
        args = SimpleNamespace(command=name, _run=sub.get_default("_run"))
        assert cli.run_guarded(name, args._run, args) == 2
        assert capsys.readouterr().err == f"msclip {name}: error: broken input\n"


def test_train_bad_recipe_exits_2_before_any_folder(tmp_path, capsys):
    rc = cli.main(["train", "train.steps=0", "log.every=0", f"output_dir={tmp_path / 'runs'}", "name=r"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("msclip train: error: recipe: 2 problems:")
    assert "train.steps=0" in err and "log.every=0" in err
    assert not (tmp_path / "runs").exists()
    assert cli.main(["train", "optim.lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err


def test_train_prints_the_run_and_maps_nonfinite_to_3(monkeypatch, tmp_path, capsys):
    import msclip.train as T

    seen = {}

    def fake_train(recipe, **kw):
        seen["recipe"] = recipe
        # a resumed run: 3 steps in this process, 5 of 5 done
        return SimpleNamespace(run_dir=tmp_path / "r", state=SimpleNamespace(step=5), total_steps=5, steps_run=3,
                               wall_s=1.0, exported=str(tmp_path / "r" / "model.safetensors"), stopped_by=None)

    monkeypatch.setattr(T, "train", fake_train)
    assert cli.main(["train", "model=clip-b32-tiny", "train.steps=5", "--data.shuffle_buffer", "3"]) == 0
    out = capsys.readouterr().out
    assert f"run folder: {tmp_path / 'r'} (3 steps in this run, 5 of 5 done" in out and "model.safetensors" in out
    assert seen["recipe"].data.shuffle_buffer == 3 and seen["recipe"].train.steps == 5

    monkeypatch.setattr(T, "train", lambda recipe, **kw: (_ for _ in ()).throw(NonFiniteLossError("5 in a row")))
    assert cli.main(["train", "model=clip-b32-tiny", "train.steps=5"]) == 3
    assert "msclip train: stopped: 5 in a row" in capsys.readouterr().err

    def worker_died(recipe, **kw):
        err = DataWorkerDied("a data loader worker died at step 7 (...); step 7 was checkpointed to X", "X")
        err.run_dir = tmp_path / "runs" / "r"
        raise err

    monkeypatch.setattr(T, "train", worker_died)
    assert cli.main(["train", "model=clip-b32-tiny", "train.steps=5"]) == 4
    err = capsys.readouterr().err
    assert err.startswith("msclip train: stopped: a data loader worker died at step 7") and "Traceback" not in err
    assert f"resume with: msclip train model=clip-b32-tiny train.steps=5 output_dir={tmp_path / 'runs'} name=r " \
           "resume=latest" in err


def test_info_counts(capsys):
    assert cli.main(["info", "msclip-s-b32-tiny", "clip-b32-tiny", "--json"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    s, c = rows["msclip-s-b32-tiny"], rows["clip-b32-tiny"]
    model = msclip.create_model("msclip-s-b32-tiny")
    assert s["total"] == sum(p.numel() for p in model.parameters())
    assert s["shared"] > 0 and c["shared"] == 0
    assert s["total"] == s["shared"] + s["image"] + s["text"] + s.get("other", 0)
    assert cli.main(["info", "no-such-model"]) == 2
    assert "msclip info: error: unknown model 'no-such-model'" in capsys.readouterr().err


def test_python_dash_m_msclip(tmp_path):
    out = run_logged([sys.executable, "-m", "msclip", "--version"], cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"msclip {msclip.__version__}"
    bad = run_logged([sys.executable, "-m", "msclip", "train", "train.steps=-1"], cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and "msclip train: error: recipe: train.steps=-1" in bad.stderr
