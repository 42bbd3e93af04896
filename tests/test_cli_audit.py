"""Audit of the `msclip` command-line layer (cli.py, commands/*): `--help` of every subcommand, one clear
`msclip <cmd>: error: ...` line naming the file, flag or value at fault (exit 2, no traceback), the exit codes
of cli.py / commands/train.py, `--model` as a registry name, a weights file, a model folder and a run folder,
complete JSON outputs, all unknown config keys at once, and Ctrl-C. Bugs are strict xfails."""
from __future__ import annotations

import json
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import msclip
from msclip import cli
from msclip.checkpoint import save_pretrained as save_weights_file

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "clip-b32-tiny"
CPU = ["--device", "cpu", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A weights file, a model folder, a run folder (only model.safetensors), images, captions."""
    root = tmp_path_factory.mktemp("cli")
    model = msclip.create_model(TINY)
    save_weights_file(model, root / "w.safetensors")
    msclip.save_pretrained(model, root / "folder")
    (root / "run").mkdir()
    save_weights_file(model, root / "run" / "model.safetensors")
    for c, rgb in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (root / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), tuple(min(255, v + 10 * i) for v in rgb)).save(root / "imgs" / c / f"{i}.png")
    (root / "caps.txt").write_text("a red square\na blue square\n")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00not utf-8\xff\n")
    return root


def _main(capsys, argv):
    """main(argv) in process -> (exit code, stdout, stderr); argparse's SystemExit becomes its code."""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _user_error(capsys, argv, *named):
    rc, out, err = _main(capsys, argv)
    assert rc == 2, (rc, err)
    assert "Traceback" not in err and out == ""
    lines = err.strip().splitlines()
    assert any(ln.startswith(f"msclip {argv[0]}: error: ") for ln in lines), err
    last = lines[-1]
    for thing in named:
        assert thing in err, (thing, err)
    return err, last


# ------------------------------------------------------------------------------------------------- --help
def _names():
    return [m.NAME for m in cli._command_modules()]


@pytest.mark.parametrize("name", _names())
def test_help_of_every_subcommand_exits_0_with_its_usage(name, capsys):
    rc, out, err = _main(capsys, [name, "--help"])
    assert rc == 0 and err == ""
    assert out.startswith(f"usage: msclip {name}") and len(out.splitlines()) > 3


def test_top_level_help_lists_every_subcommand_and_no_command_is_exit_2(capsys):
    rc, out, _ = _main(capsys, ["--help"])
    assert rc == 0 and all(n in out for n in _names())
    rc, out, _ = _main(capsys, [])
    assert rc == 2 and out.startswith("usage: msclip")  # help printed, but not a success
    rc, _, err = _main(capsys, ["nosuchcommand"])
    assert rc == 2 and "invalid choice: 'nosuchcommand'" in err


def test_a_wrongly_typed_flag_is_argparse_exit_2_naming_flag_and_value(capsys):
    rc, out, err = _main(capsys, ["zeroshot", "--model", TINY, "--data", "x", "--batch-size", "many"])
    assert rc == 2 and out == ""
    assert "msclip zeroshot: error: argument --batch-size: invalid int value: 'many'" in err
    rc, _, err = _main(capsys, ["embed", "--model", TINY, "--texts", "t", "--output", "o.npy", "--precision", "fp8"])
    assert rc == 2 and "argument --precision: invalid choice: 'fp8'" in err


# ------------------------------------------------------------------------------------- one clear error line
def _cases(w: Path):
    m = ["--model", str(w / "w.safetensors")]
    return {
        "zeroshot-data": (["zeroshot", *m, "--data", w / "nodir", *CPU], ["'" + str(w / "nodir") + "'"]),
        "zeroshot-pretrained": (["zeroshot", "--model", TINY, "--pretrained", w / "none.pt", "--data", w / "imgs",
                                 *CPU], ["--pretrained", "none.pt"]),
        "zeroshot-device": (["zeroshot", *m, "--data", w / "imgs", "--device", "gpu", "--workers", "0"], ["'gpu'"]),
        "zeroshot-batch": (["zeroshot", *m, "--data", w / "imgs", "--batch-size", "0", *CPU], ["--batch-size"]),
        "zeroshot-workers": (["zeroshot", *m, "--data", w / "imgs", "--device", "cpu", "--workers", "-1"],
                             ["--workers"]),
        "zeroshot-model": (["zeroshot", "--model", "no-such-model", "--data", w / "imgs", *CPU], ["'no-such-model'"]),
        "zeroshot-yaml": (["zeroshot", "--model", w / "none.yaml", "--data", w / "imgs", *CPU], ["none.yaml"]),
        "embed-texts": (["embed", *m, "--texts", w / "none.txt", "--output", w / "e.npy", *CPU], ["--texts", "none.txt"]),
        "embed-suffix": (["embed", *m, "--texts", w / "caps.txt", "--output", w / "e.csv", *CPU], ["--output", "e.csv"]),
        "search-index": (["search", w / "noidx", "query"], ["noidx"]),
        "search-k": (["search", w / "noidx", "query", "-k", "0"], ["-k"]),
        "retrieval-ann": (["retrieval", *m, "--annotations", w / "none.csv", *CPU], ["none.csv"]),
        "analyze-texts": (["analyze", *m, "--images", w / "imgs", "--texts", w / "none.txt", *CPU], ["none.txt"]),
        "linprobe-dataset": (["linprobe", *m, "--dataset", "colors", *CPU], ["--dataset", "'colors'"]),
        "index-random": (["index", "--model", TINY, "--images", w / "imgs", "--output", w / "idx", *CPU],
                         ["--pretrained"]),
        "index-captions": (["index", *m, "--images", w / "imgs", "--captions", w / "none.csv", "--output", w / "idx",
                            *CPU], ["none.csv"]),
        "index-nprobe": (["index", *m, "--images", w / "imgs", "--output", w / "idx", "--nprobe", "0", *CPU],
                         ["--nprobe"]),
        "compare-file": (["compare", w / "none.json", w / "none2.json"], ["none.json"]),
        "info-model": (["info", "no-such-model"], ["'no-such-model'"]),
        "export-opset": (["export", "--model", TINY, "--format", "folder", "--opset", "17", "--output", w / "x"],
                         ["--opset"]),
        "study-jobs": (["study", "--preset", "smoke", "--jobs", "0"], ["--jobs"]),
        "study-config": (["study", "--config", w / "none.yaml"], ["none.yaml"]),
        "train-config": (["train", "--config", w / "none.yaml"], ["none.yaml"]),
        "train-value": (["train", "--optim.lr", "abc"], ["optim.lr", "'abc'"]),
    }


_CASE_NAMES = list(_cases(Path("w")))


@pytest.mark.parametrize("case", _CASE_NAMES)
def test_user_errors_are_one_line_exit_2_naming_the_thing_at_fault(case, work, capsys):
    argv, named = _cases(work)[case]
    err, last = _user_error(capsys, argv, *named)
    assert last.startswith(f"msclip {argv[0]}: error: ")
    assert not (work / "e.npy").exists() and not (work / "idx").exists() and not (work / "x").exists()


def test_run_command_entry_is_guarded_like_main(work, capsys):
    rc = cli.run_command("embed", ["--model", TINY, "--texts", str(work / "none.txt"), "--output", "e.npy"])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"msclip embed: error: --texts {str(work / 'none.txt')!r} does not exist\n"


def test_a_wrapped_worker_error_keeps_only_its_own_last_line():
    from msclip.errors import MsclipError

    err = MsclipError("Caught MsclipError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                      "last):\n  File \"x.py\", line 1\nmsclip.errors.MsclipError: shard.tar: no usable sample\n")
    assert cli.user_message(err) == "shard.tar: no usable sample"
    assert cli.user_message(MsclipError("plain\nmulti-line")) == "plain\nmulti-line"


# ---------------------------------------------------------------------------------- unknown keys at once
def test_unknown_keys_are_all_reported_in_one_error(work, capsys):
    (work / "bad_recipe.yaml").write_text("nosuchkey: 1\noptim:\n  lrr: 1\n")
    err, _ = _user_error(capsys, ["train", "--config", work / "bad_recipe.yaml"], "2 problems", "'nosuchkey'",
                         "'optim.lrr'", "did you mean 'lr'")
    (work / "bad_study.yaml").write_text("name: x\nnosuchkey: 1\nother: 2\n")
    _user_error(capsys, ["study", "--config", work / "bad_study.yaml"], "2 problems", "'nosuchkey'", "'other'")
    (work / "bad_cfg.json").write_text('{"name": "t", "foo": 1, "bar": 2}')
    _user_error(capsys, ["info", work / "bad_cfg.json"], "2 problems", "'foo'", "'bar'", "bad_cfg.json")
    _user_error(capsys, ["train", "nosuchkey=1", "other.key=2"], "2 problems", "'nosuchkey'", "'other'")


# --------------------------------------------------------------------------------------- --model kinds
@pytest.mark.parametrize("kind", ["name", "weights", "folder", "run"])
def test_model_accepts_name_weights_file_model_folder_and_run_folder(kind, work, tmp_path, capsys):
    spec = {"name": TINY, "weights": work / "w.safetensors", "folder": work / "folder", "run": work / "run"}[kind]
    out = tmp_path / "e.npy"
    rc, stdout, err = _main(capsys, ["embed", "--model", spec, "--texts", work / "caps.txt", "--output", out, *CPU])
    assert rc == 0, err
    meta = json.loads((tmp_path / "e.json").read_text())
    if kind == "name":
        assert meta["random_weights"] and meta["checkpoint"] is None
        return
    expect = {"weights": work / "w.safetensors", "folder": work / "folder" / "model.safetensors",
              "run": work / "run" / "model.safetensors"}[kind]
    assert meta["checkpoint"]["path"] == str(expect) and not meta["random_weights"]
    model = msclip.create_model(TINY, pretrained=work / "w.safetensors")
    tok = msclip.get_tokenizer(TINY)
    import torch

    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.encode_text(tok(["a red square", "a blue square"])), dim=-1)
    np.testing.assert_allclose(np.load(out), ref.numpy(), atol=1e-5)


def test_model_folder_without_weights_and_non_msclip_weights_are_named(work, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    base = ["--texts", work / "caps.txt", "--output", tmp_path / "e.npy", *CPU]
    _user_error(capsys, ["embed", "--model", tmp_path / "empty", *base], str(tmp_path / "empty"), "model.safetensors")
    import torch

    torch.save({"x": torch.zeros(1)}, tmp_path / "plain.pt")  # weights with no embedded config
    _user_error(capsys, ["embed", "--model", tmp_path / "plain.pt", *base], "plain.pt", "no embedded model config")
    assert not (tmp_path / "e.npy").exists()


# ------------------------------------------------------------------------------------------ JSON outputs
def _strict_json(path: Path):
    def bad(c):
        raise AssertionError(f"{path}: non-standard JSON constant {c}")

    return json.loads(path.read_text(), parse_constant=bad)


def test_embed_json_sidecar_is_valid_and_complete(work, tmp_path, capsys):
    out = tmp_path / "img.npy"
    rc, stdout, _ = _main(capsys, ["embed", "--model", work / "w.safetensors", "--images", work / "imgs",
                                   "--output", out, *CPU])
    assert rc == 0
    meta = _strict_json(tmp_path / "img.json")
    emb = np.load(out)
    assert meta["task"] == "embed" and meta["kind"] == "images" and meta["count"] == emb.shape[0] == 4
    assert meta["names"] == ["blue/0.png", "blue/1.png", "red/0.png", "red/1.png"] and meta["dim"] == emb.shape[1]
    assert meta["skipped_count"] == 0 and meta["normalized"] == "L2" and meta["embeddings"] == str(out)
    assert meta["checkpoint"]["sha256"] and meta["model"]["name"] == TINY
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert f"embedded 4 images (0 skipped)" in stdout


def test_zeroshot_and_search_json_reports_are_valid_and_complete(work, tmp_path, capsys):
    m = ["--model", work / "w.safetensors"]
    rc, stdout, _ = _main(capsys, ["zeroshot", *m, "--data", work / "imgs", "--templates", "simple",
                                   "--output", tmp_path / "z.json", *CPU])
    assert rc == 0 and f"report: {tmp_path / 'z.json'}" in stdout
    z = _strict_json(tmp_path / "z.json")
    assert z["images_scored"] == 4 and not z["random_weights"] and len(z["per_class"]) == 2
    rc, _, err = _main(capsys, ["index", *m, "--images", work / "imgs", "--output", tmp_path / "idx", *CPU])
    assert rc == 0, err
    rc, stdout, _ = _main(capsys, ["search", tmp_path / "idx", "a red square", "--text", "blue", "-k", "3",
                                   "--output", tmp_path / "s.json"])
    assert rc == 0 and "text query: a red square" in stdout
    s = _strict_json(tmp_path / "s.json")
    assert s["task"] == "search" and s["k"] == 3 and [r["query"] for r in s["results"]] == ["a red square", "blue"]
    assert all(len(r["hits"]) == 3 for r in s["results"])
    assert {h["id"] for h in s["results"][0]["hits"]} <= {"red/0.png", "red/1.png", "blue/0.png", "blue/1.png"}


def test_zeroshot_output_that_is_a_folder_is_refused_and_the_folder_kept(work, tmp_path, capsys):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "f").write_text("mine")
    _user_error(capsys, ["zeroshot", "--model", work / "w.safetensors", "--data", work / "imgs",
                         "--output", tmp_path / "keep", *CPU], "--output", "is a folder")
    assert (tmp_path / "keep" / "f").read_text() == "mine"


# ---------------------------------------------------------------------------------- exit codes of train
def test_train_ctrl_c_before_the_first_step_is_130_without_traceback(monkeypatch, capsys):
    import msclip.train as T

    monkeypatch.setattr(T, "train", lambda recipe, **kw: (_ for _ in ()).throw(KeyboardInterrupt()))
    rc, _, err = _main(capsys, ["train", f"model={TINY}", "train.steps=2"])
    assert rc == 130 == 128 + signal.SIGINT
    assert "msclip train: interrupted before the first step; nothing was saved" in err and "Traceback" not in err


def test_train_stopped_by_a_signal_exits_128_plus_it_with_a_resume_line(monkeypatch, tmp_path, capsys):
    import msclip.train as T

    res = SimpleNamespace(run_dir=tmp_path / "runs" / "r", state=SimpleNamespace(step=7), total_steps=10,
                          steps_run=7, wall_s=1.0, exported=None, stopped_by=int(signal.SIGTERM),
                          last_checkpoint=tmp_path / "runs" / "r" / "checkpoints" / "step-7.pt")
    monkeypatch.setattr(T, "train", lambda recipe, **kw: res)
    rc, out, err = _main(capsys, ["train", f"model={TINY}", "train.steps=10"])
    assert rc == 143 and out == ""
    assert err.startswith("msclip train: stopped by SIGTERM at step 7; checkpoint ")
    assert err.rstrip().endswith(f"resume with: msclip train model={TINY} train.steps=10 "
                                 f"output_dir={tmp_path / 'runs'} name=r resume=latest")


# ============================================================================================ bugs (xfail)
def test_ctrl_c_in_any_command_is_130_without_traceback(monkeypatch, capsys):
    from msclip.commands import zeroshot

    monkeypatch.setattr(zeroshot, "run", lambda args: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        rc, _, err = _main(capsys, ["zeroshot", "--model", TINY, "--data", "x"])
    except KeyboardInterrupt:  # pytest would stop the whole session on it
        pytest.fail("KeyboardInterrupt escaped cli.main")
    assert rc == 130 and "Traceback" not in err


def test_compare_a_json_that_is_not_an_object_is_a_user_error(tmp_path, capsys):
    (tmp_path / "list.json").write_text("[1, 2]")
    rc, _, err = _main(capsys, ["compare", tmp_path / "list.json", tmp_path / "list.json"])
    assert rc == 2 and "list.json" in err and "Traceback" not in err


@pytest.mark.parametrize("cmd", ["compare", "index-captions"])
def test_a_folder_given_as_an_input_file_is_a_user_error(cmd, work, tmp_path, capsys):
    argv = {"compare": ["compare", work / "imgs", work / "imgs"],
            "index-captions": ["index", "--model", work / "w.safetensors", "--images", work / "imgs",
                               "--captions", work / "imgs", "--output", tmp_path / "idx", *CPU]}[cmd]
    rc, _, err = _main(capsys, argv)
    assert rc == 2 and str(work / "imgs") in err


@pytest.mark.parametrize("cmd", ["train", "study", "embed", "search", "analyze", "retrieval", "compare"])
def test_a_non_utf8_input_file_is_a_user_error_naming_it(cmd, work, tmp_path, capsys):
    b, m = work / "binary.txt", ["--model", work / "w.safetensors"]
    argv = {"train": ["train", "--config", b], "study": ["study", "--config", b],
            "embed": ["embed", *m, "--texts", b, "--output", tmp_path / "e.npy", *CPU],
            "search": ["search", work / "noidx", "--queries", b],
            "analyze": ["analyze", *m, "--images", work / "imgs", "--texts", b, *CPU],
            "retrieval": ["retrieval", *m, "--annotations", work / "binary.csv", *CPU],
            "compare": ["compare", b, b]}[cmd]
    if cmd == "retrieval":
        (work / "binary.csv").write_bytes(b"image,caption\n\xff\xfe,x\n")
        b = work / "binary.csv"
    rc, _, err = _main(capsys, argv)
    assert rc == 2 and "binary" in err and "Traceback" not in err


def test_embed_never_overwrites_its_own_input_with_the_sidecar(work, tmp_path, capsys):
    texts = tmp_path / "caps.json"
    texts.write_text("a red square\na blue square\n")
    rc, _, _ = _main(capsys, ["embed", "--model", work / "w.safetensors", "--texts", texts,
                              "--output", tmp_path / "caps.npy", *CPU])
    assert texts.read_text() == "a red square\na blue square\n"
    assert rc == 2 or rc == 0


def test_linprobe_output_md_keeps_the_json_results(work, tmp_path, capsys):
    out = tmp_path / "r.md"
    rc, _, _ = _main(capsys, ["linprobe", "--model", work / "w.safetensors", "--dataset", f"x:{tmp_path / 'none'}",
                              "--no-cache", "--output", out, *CPU])
    assert rc == 2 or json.loads(out.read_text())["task"] == "linprobe"


@pytest.mark.parametrize("flag,value", [("--limit", "-3"), ("--val-fraction", "-0.5"), ("--val-fraction", "2")])
def test_linprobe_refuses_out_of_range_values_before_any_work(flag, value, work, tmp_path, capsys):
    rc, _, err = _main(capsys, ["linprobe", "--model", work / "w.safetensors", "--dataset", f"x:{tmp_path / 'no'}",
                                "--no-cache", "--output", tmp_path / "r.json", flag, value, *CPU])
    assert rc == 2 and flag in err and not (tmp_path / "r.json").exists()


def test_linprobe_refuses_an_unknown_probe_device_before_any_work(work, tmp_path, capsys):
    rc, _, err = _main(capsys, ["linprobe", "--model", work / "w.safetensors", "--dataset", f"x:{tmp_path / 'no'}",
                                "--no-cache", "--output", tmp_path / "r.json", "--probe-device", "gpu", *CPU])
    assert rc == 2 and "gpu" in err and "Traceback" not in err and not (tmp_path / "r.json").exists()
