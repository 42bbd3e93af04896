"""Audit of behaviour under real faults (the msclip.io promise: atomic, durable writes; a full disk named as such;
nothing lost; re-runs safe; bad files are one `msclip <cmd>: error: ...` line with exit 2):

* a full disk (ENOSPC, injected at the writer's file object or the safetensors call) while `train` saves a
  checkpoint / its weights, while `embed`, `index`, `export --format folder` and `study --collect` write;
* truncated / garbage weights given to every command that takes weights, a damaged index folder given to `search`
  and to an incremental `index`, garbage recipe / study files and a damaged study-eval.json;
* SIGKILL of `index` and `embed` at chosen points of their writes (a forked child kills itself there), then
  the same command again: same result as an uninterrupted run, no duplicates, no temporaries;
* running `embed`, `index` and `export` twice into the same output.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import msclip
from msclip import io as mio
from msclip.cli import main as cli
from msclip.index.store import load_index
from msclip.train.state import checkpoint_dir, list_checkpoints, load_train_state
from fault_utils import FillsUp, disk_full
from train_utils import tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = "clip-b32-tiny"
CPU = ["--device", "cpu", "--workers", "0", "--no-progress", "--batch-size", "4"]
_real_open = open


# ------------------------------------------------------------------------- fixtures and fault injection
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    torch.manual_seed(0)
    ckpt = root / "tiny.safetensors"
    msclip.save_pretrained(msclip.create_model(MODEL), ckpt)
    imgs = root / "imgs"
    imgs.mkdir()
    for i in range(6):
        Image.new("RGB", (36, 36), (40 * i, 200 - 30 * i, (90 * i) % 256)).save(imgs / f"{i}.png")
    return {"root": root, "ckpt": ckpt, "imgs": imgs}


def _images(tmp_path: Path, assets, names: list[int], sub: str = "src") -> Path:
    d = tmp_path / sub
    d.mkdir(exist_ok=True)
    for i in names:
        shutil.copy2(assets["imgs"] / f"{i}.png", d / f"{i}.png")
    return d


def run_cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli([str(a) for a in argv])
    return rc, capsys.readouterr().err


def temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(f"{mio.TMP_PREFIX}*"))


def killed_at(fn) -> None:
    """Run `fn` in a forked child that SIGKILLs itself at the injected point; assert that it died so."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            fn()
        finally:
            os._exit(17)  # reached only when the kill point was not
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def kill_point(where: str, name_part: str) -> None:
    """In the child: SIGKILL when the write of a file named like `name_part` is half-way ("mid"), when its
    temporary is complete but not renamed ("before_rename"), or just after the rename ("after_rename")."""
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    if where == "mid":
        class Dies(FillsUp):
            def write(self, data):
                data = bytes(data)
                self.f.write(data[: max(1, len(data) // 2)])
                self.f.flush()
                die()

        mio.open = lambda file, mode="r", *a, **k: (  # type: ignore[attr-defined]
            Dies(_real_open(file, mode, *a, **k), 0) if "w" in mode and name_part in os.path.basename(str(file))
            else _real_open(file, mode, *a, **k))
        return
    real_replace = os.replace

    def replace(src, dst):
        hit = name_part in os.path.basename(str(dst))
        if hit and where == "before_rename":
            die()
        real_replace(src, dst)
        if hit and where == "after_rename":
            die()

    os.replace = replace


# ------------------------------------------------------------------------- 1. a full disk
def test_train_checkpoint_on_a_full_disk_stops_naming_it_and_resume_continues(tmp_path, monkeypatch, capsys):
    """ENOSPC at the step-2 checkpoint: exit 2 with "the disk is full" and the file; the step-1 checkpoint still
    loads (keep_last=1 prunes it only after its successor is written), no temporary is left, and resume=latest
    (after space is freed) finishes the run from it."""
    recipe = tiny_recipe(tmp_path, "full", train__steps=2, checkpoint__every=1, checkpoint__keep_last=1)
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(recipe.to_dict()))
    with monkeypatch.context() as m:
        disk_full(m, "step_00000002")
        rc, err = run_cli(capsys, "train", "--config", cfg)
    run = tmp_path / "full"
    assert rc == 2 and err.count("\n") == 1, err
    assert f"{checkpoint_dir(run) / 'step_00000002.pt'}: the disk is full" in err, err
    assert [s for s, _ in list_checkpoints(checkpoint_dir(run))] == [1]
    assert load_train_state(checkpoint_dir(run) / "step_00000001.pt")["step"] == 1
    assert temporaries(run) == [] and not (run / "model.safetensors").exists()
    assert run_cli(capsys, "train", "--config", cfg, "resume=latest")[0] == 0
    assert [s for s, _ in list_checkpoints(checkpoint_dir(run))] == [2]
    assert load_train_state(checkpoint_dir(run) / "step_00000002.pt")["step"] == 2
    msclip.create_model(MODEL, pretrained=str(run / "model.safetensors"))


def _embed(capsys, assets, images: Path, out: Path) -> tuple[int, str]:
    return run_cli(capsys, "embed", "--model", MODEL, "--pretrained", assets["ckpt"], "--images", images,
                   "--output", out, *CPU)


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_embed_output_on_a_full_disk_keeps_the_previous_files(tmp_path, assets, monkeypatch, capsys, suffix):
    out = tmp_path / "out" / f"emb{suffix}"
    assert _embed(capsys, assets, assets["imgs"], out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    with monkeypatch.context() as m:
        disk_full(m, out.name)
        rc, err = _embed(capsys, assets, _images(tmp_path, assets, [0, 1, 2]), out)
    assert rc == 2 and f"cannot write {out}: the disk is full" in err, err
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before


def test_embed_names_file_on_a_full_disk_keeps_rows_and_names_together(tmp_path, assets, monkeypatch, capsys):
    out = tmp_path / "out" / "emb.npy"
    assert _embed(capsys, assets, assets["imgs"], out)[0] == 0
    with monkeypatch.context() as m:
        disk_full(m, "emb.json")
        rc, err = _embed(capsys, assets, _images(tmp_path, assets, [3, 4]), out)
    assert rc == 2 and "emb.json: the disk is full" in err, err
    names = json.loads(out.with_suffix(".json").read_text())["names"]
    assert np.load(out).shape[0] == len(names)  # row i is names[i]


def _index(capsys, assets, images: Path, out: Path, *extra) -> tuple[int, str]:
    return run_cli(capsys, "index", "--model", MODEL, "--pretrained", assets["ckpt"], "--images", images,
                   "--output", out, *CPU, *extra)


def _snapshot(index: Path) -> tuple[list[str], np.ndarray]:
    store = load_index(index)
    return [it.id for it in store.items], store.features.copy()


@pytest.mark.parametrize("target", ["features-", "meta.json"])  # the first (numpy) and the last (JSON) write
def test_index_update_on_a_full_disk_leaves_the_previous_index_and_a_rerun_completes(
        tmp_path, assets, monkeypatch, capsys, target):
    src = _images(tmp_path, assets, [0, 1, 2, 3])
    out = tmp_path / "ix"
    assert _index(capsys, assets, src, out)[0] == 0
    ids, feats = _snapshot(out)
    _images(tmp_path, assets, [4, 5])
    with monkeypatch.context() as m:
        disk_full(m, target)
        rc, err = _index(capsys, assets, src, out)
    assert rc == 2 and err.count("\n") == 1 and "the disk is full" in err and str(out) in err, err
    again = _snapshot(out)
    assert again[0] == ids and np.array_equal(again[1], feats)
    assert temporaries(out) == []
    rc, err = run_cli(capsys, "search", out, "a photo", "-k", "2", "--device", "cpu")
    assert rc == 0, err
    assert _index(capsys, assets, src, out)[0] == 0
    ids, _ = _snapshot(out)
    assert sorted(ids) == [f"{i}.png" for i in range(6)]
    meta = json.loads((out / "meta.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted([*meta["files"].values(), "meta.json"])


def test_export_folder_on_a_full_disk_names_the_file_and_leaves_nothing_half_written(tmp_path, assets, monkeypatch,
                                                                                    capsys):
    """A first export that fails writes none of the folder's four files (they are written together) and leaves
    no temporaries: no folder that looks like a model and is not one."""
    out = tmp_path / "exp"
    with monkeypatch.context() as m:
        disk_full(m, "README.md")
        rc, err = run_cli(capsys, "export", "--model", MODEL, "--pretrained", assets["ckpt"], "--format", "folder",
                          "--output", out)
    assert rc == 2 and f"cannot write {out / 'README.md'}: the disk is full" in err, err
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []


def test_export_folder_over_an_earlier_one_on_a_full_disk_keeps_a_loadable_model(tmp_path, monkeypatch, capsys):
    out = tmp_path / "exp"
    assert run_cli(capsys, "export", "--model", MODEL, "--format", "folder", "--output", out)[0] == 0
    with monkeypatch.context() as m:
        disk_full(m, "config.json")
        rc, err = run_cli(capsys, "export", "--model", "msclip-b32-tiny", "--format", "folder", "--output", out)
    assert rc == 2 and "config.json: the disk is full" in err, err
    model = msclip.create_model(str(out))  # the earlier export, whole
    assert model.cfg.name == MODEL and temporaries(out) == []


def _smoke_study(tmp_path: Path):
    from msclip.study.spec import load_study

    args = ["--preset", "smoke", f"output_dir={tmp_path}", "models=[clip-b32-tiny]"]
    return load_study(preset="smoke", overrides=args[2:]), args


@pytest.mark.parametrize("target", ["report.md", "study.json"])
def test_study_collect_on_a_full_disk_keeps_the_previous_report(tmp_path, monkeypatch, capsys, target):
    spec, args = _smoke_study(tmp_path)
    rc, err = run_cli(capsys, "study", *args, "--collect")
    assert rc == 1, err  # the run is missing: a report that lists it
    before = {p: (spec.out_dir / p).read_bytes() for p in ("report.md", "study.json")}
    with monkeypatch.context() as m:
        disk_full(m, target)
        rc, err = run_cli(capsys, "study", *args, "--collect")
    assert rc == 2 and f"cannot write {spec.out_dir / target}: the disk is full" in err, err
    assert {p: (spec.out_dir / p).read_bytes() for p in before} == before
    assert temporaries(spec.out_dir) == []


# ------------------------------------------------------------------------- 2. truncated and garbage files
@pytest.fixture(scope="module")
def damaged_weights(assets):
    good_pt = assets["root"] / "tiny.pt"
    msclip.save_pretrained(msclip.create_model(MODEL), good_pt)
    st, pt = assets["ckpt"].read_bytes(), good_pt.read_bytes()
    files = {"cut.safetensors": st[: len(st) // 2], "junk.safetensors": random.Random(1).randbytes(600),
             "huge-header.safetensors": (10 ** 12).to_bytes(8, "little") + b"{}",
             "cut.pt": pt[: len(pt) // 2], "junk.pt": random.Random(1).randbytes(600), "empty.pt": b""}
    out = {}
    for name, data in files.items():
        (assets["root"] / name).write_bytes(data)
        out[name] = assets["root"] / name
    return out


WEIGHT_COMMANDS = {
    "embed --pretrained": lambda w, a, t: ["embed", "--model", MODEL, "--pretrained", w, "--images", a["imgs"],
                                           "--output", t / "e.npy", *CPU],
    "embed --model FILE": lambda w, a, t: ["embed", "--model", w, "--texts", a["root"] / "texts.txt",
                                           "--output", t / "e.npy", *CPU],
    "index --pretrained": lambda w, a, t: ["index", "--model", MODEL, "--pretrained", w, "--images", a["imgs"],
                                           "--output", t / "ix", *CPU],
    "export --pretrained": lambda w, a, t: ["export", "--model", MODEL, "--pretrained", w, "--format", "folder",
                                            "--output", t / "exp"],
    "export --model FILE": lambda w, a, t: ["export", "--model", w, "--format", "folder", "--output", t / "exp"],
    "train pretrained=": lambda w, a, t: ["train", "--config", a["root"] / "recipe.yaml", f"pretrained={w}",
                                          f"output_dir={t}"],
    "train resume=": lambda w, a, t: ["train", "--config", a["root"] / "recipe.yaml", f"resume={w}",
                                      f"output_dir={t}"],
}


@pytest.mark.parametrize("command", list(WEIGHT_COMMANDS))
def test_damaged_weights_are_one_error_line_naming_the_file(tmp_path, assets, damaged_weights, capsys, command):
    """(zeroshot, retrieval, linprobe and analyze load weights as embed does: eval/loading.load_model)"""
    (assets["root"] / "texts.txt").write_text("a cat\na dog\n")
    (assets["root"] / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe(tmp_path, "dmg").to_dict()))
    for name, path in damaged_weights.items():
        if command != "embed --pretrained" and name not in (("cut.pt",) if command.startswith("train") else
                                                            ("cut.safetensors", "junk.pt")):
            continue  # every kind of damage once; the other commands share checkpoint.py's reader
        rc, err = run_cli(capsys, *WEIGHT_COMMANDS[command](path, assets, tmp_path))
        assert rc == 2 and err.startswith(f"msclip {command.split()[0]}: error: "), (name, err)
        assert str(path) in err and err.count("\n") == 1, (name, err)
    assert not list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob("*.npy"))


def _on_assets(command: str, assets, out: Path) -> Path:
    """`msclip index|embed` of the module's images with its checkpoint into `out` (for module-scoped references)."""
    assert cli([command, "--model", MODEL, "--pretrained", str(assets["ckpt"]), "--images", str(assets["imgs"]),
                "--output", str(out), *CPU]) == 0
    return out


@pytest.fixture(scope="module")
def good_index(assets, tmp_path_factory):
    return _on_assets("index", assets, tmp_path_factory.mktemp("goodindex") / "ix")


def _damage(good: Path, tmp_path: Path, role: str, how: str) -> tuple[Path, Path]:
    ix = tmp_path / "ix"
    shutil.copytree(good, ix)
    meta = json.loads((good / "meta.json").read_text())
    p = ix / ("meta.json" if role == "meta" else meta["files"][role])
    data = p.read_bytes()
    new = {"half": data[: len(data) // 2], "junk": random.Random(2).randbytes(max(len(data), 64)), "empty": b"",
           "last-line-cut": data[:-5], "list": b"[1, 2]\n",
           "rows-without-source": b"".join(b'{"id": "%d.png"}\n' % i for i in range(meta["count"]))}[how]
    p.write_bytes(new)
    return ix, p


@pytest.mark.parametrize("role, how", [("meta", "half"), ("items", "half")])
def test_damaged_index_files_are_one_error_naming_the_index(tmp_path, assets, good_index, capsys, role, how):
    ix, _ = _damage(good_index, tmp_path, role, how)
    for argv in (["search", ix, "a photo", "--device", "cpu"],
                 ["index", "--model", MODEL, "--pretrained", assets["ckpt"], "--images", assets["imgs"],
                  "--output", ix, *CPU]):
        rc, err = run_cli(capsys, *argv)
        assert rc == 2 and str(ix) in err and "--rebuild" in err, err


@pytest.mark.parametrize("role, how", [("features", "half"), ("features", "junk"), ("index", "half"),
                                       ("index", "empty"), ("items", "junk"), ("items", "last-line-cut"),
                                       ("items", "rows-without-source"), ("meta", "list")])
def test_damaged_index_data_files_are_one_error_naming_the_file(tmp_path, assets, good_index, capsys, role, how):
    ix, damaged = _damage(good_index, tmp_path, role, how)
    for argv in (["search", ix, "a photo", "--device", "cpu"],
                 ["index", "--model", MODEL, "--pretrained", assets["ckpt"], "--images", assets["imgs"],
                  "--output", ix, *CPU]):
        try:
            rc, err = run_cli(capsys, *argv)
        except Exception as exc:  # a traceback: the bug
            pytest.fail(f"{argv[0]}: {type(exc).__name__}: {exc}")
        assert rc == 2 and (str(damaged) in err or str(ix) in err), err


def test_rebuild_recovers_a_damaged_index(tmp_path, assets, good_index, capsys):
    ix, _ = _damage(good_index, tmp_path, "features", "junk")
    assert _index(capsys, assets, assets["imgs"], ix, "--rebuild")[0] == 0
    ids, feats = _snapshot(ix)
    assert ids == [it for it in _snapshot(good_index)[0]] and np.allclose(feats, _snapshot(good_index)[1])


@pytest.mark.parametrize("text", ["[]\n", "0\n", "false\n", "''\n"])
def test_a_recipe_file_whose_top_level_is_not_a_mapping_is_refused(tmp_path, text):
    from msclip.train.recipe import RecipeError, load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=r"r\.yaml: a recipe file is a mapping of fields"):
        load_recipe(path, ["train.steps=1"])


@pytest.mark.parametrize("data", [random.Random(0).randbytes(64) + b"\xff", b"- a\n- b\n", b"just text\n", b"a: [1\n",
                                  b"model: x\x00\n"])
def test_garbage_recipe_and_study_files_are_one_error_naming_them(tmp_path, capsys, data):
    path = tmp_path / "f.yaml"
    path.write_bytes(data)
    for cmd in ("train", "study"):
        rc, err = run_cli(capsys, cmd, "--config", path, f"output_dir={tmp_path / 'out'}")
        assert rc == 2 and err.startswith(f"msclip {cmd}: error: ") and str(path) in err, err
        assert err.count("\n") == 1, err  # one line, a YAML parser's multi-line message included
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("data", [b'{"model": "clip', b"\xff\xfe\x00garbage", b"[1, 2]"])
def test_a_damaged_study_eval_file_is_an_error_naming_it(tmp_path, capsys, data):
    spec, args = _smoke_study(tmp_path)
    from msclip.study.spec import plan_runs

    run_dir = plan_runs(spec)[0].run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "study-eval.json").write_bytes(data)
    try:
        rc, err = run_cli(capsys, "study", *args, "--collect")
    except Exception as exc:
        pytest.fail(f"{type(exc).__name__}: {exc}")
    assert rc == 2 and "study-eval.json" in err, err


# ------------------------------------------------------------------------- 3. kill -9, then the same command
@pytest.fixture(scope="module")
def updated_reference(assets, tmp_path_factory):
    """The uninterrupted run: an index of images 0-3, then updated with 4 and 5."""
    tmp = tmp_path_factory.mktemp("refindex")
    src, out = _images(tmp, assets, [0, 1, 2, 3]), tmp / "ix"
    args = ["index", "--model", MODEL, "--pretrained", str(assets["ckpt"]), "--images", str(src), "--output",
            str(out), *CPU]
    assert cli(args) == 0
    _images(tmp, assets, [4, 5])
    assert cli(args) == 0
    return _snapshot(out)


@pytest.mark.parametrize("where, target", [("mid", "features-"), ("before_rename", "index-0"),
                                           ("after_rename", "meta.json")])
def test_index_killed_while_writing_then_rerun_gives_the_uninterrupted_index(
        tmp_path, assets, capsys, updated_reference, where, target):
    src = _images(tmp_path, assets, [0, 1, 2, 3])
    out = tmp_path / "ix"
    assert _index(capsys, assets, src, out)[0] == 0
    before = _snapshot(out)
    _images(tmp_path, assets, [4, 5])

    def child():
        kill_point(where, target)
        cli(["index", "--model", MODEL, "--pretrained", str(assets["ckpt"]), "--images", str(src),
             "--output", str(out), *CPU])

    killed_at(child)
    after_kill = _snapshot(out)  # the index is usable right after the kill: the old one or the new one
    assert after_kill[0] in (before[0], [f"{i}.png" for i in range(6)])
    assert _index(capsys, assets, src, out)[0] == 0
    (ids, feats), (ref_ids, ref_feats) = _snapshot(out), updated_reference
    assert ids == ref_ids and len(set(ids)) == len(ids) == 6
    assert np.allclose(feats, ref_feats, atol=1e-6)
    assert temporaries(out) == []
    meta = json.loads((out / "meta.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted([*meta["files"].values(), "meta.json"])


@pytest.fixture(scope="module")
def embed_reference(assets, tmp_path_factory):
    return _on_assets("embed", assets, tmp_path_factory.mktemp("refembed") / "emb.npy")


@pytest.mark.parametrize("where, target", [("mid", "emb.npy"), ("before_rename", "emb.json")])
def test_embed_killed_while_writing_then_rerun_gives_the_uninterrupted_output(tmp_path, assets, capsys,
                                                                              embed_reference, where, target):
    out = tmp_path / "out" / "emb.npy"

    def child():
        kill_point(where, target)
        cli(["embed", "--model", MODEL, "--pretrained", str(assets["ckpt"]), "--images", str(assets["imgs"]),
             "--output", str(out), *CPU])

    killed_at(child)
    assert _embed(capsys, assets, assets["imgs"], out)[0] == 0
    ref = embed_reference
    assert np.array_equal(np.load(out), np.load(ref))
    assert json.loads(out.with_suffix(".json").read_text())["names"] == \
        json.loads(ref.with_suffix(".json").read_text())["names"]


def test_embed_rerun_removes_the_temporary_of_a_killed_run(tmp_path, assets, capsys):
    out = tmp_path / "out" / "emb.npy"

    def child():
        kill_point("mid", "emb.npy")
        cli(["embed", "--model", MODEL, "--pretrained", str(assets["ckpt"]), "--images", str(assets["imgs"]),
             "--output", str(out), *CPU])

    killed_at(child)
    assert temporaries(out.parent)  # the killed write's temporary
    assert _embed(capsys, assets, assets["imgs"], out)[0] == 0
    assert temporaries(out.parent) == []


# ------------------------------------------------------------------------- 4. the same command twice
def test_embed_twice_overwrites_both_files_together(tmp_path, assets, capsys):
    out = tmp_path / "emb.safetensors"
    assert _embed(capsys, assets, assets["imgs"], out)[0] == 0
    assert _embed(capsys, assets, _images(tmp_path, assets, [5, 2]), out)[0] == 0
    from safetensors.torch import load_file

    names = json.loads(out.with_suffix(".json").read_text())["names"]
    assert names == ["2.png", "5.png"] and load_file(out)["embeddings"].shape[0] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.json", "emb.safetensors", "src"]


def test_index_twice_reuses_every_row_and_changes_nothing(tmp_path, assets, capsys):
    out = tmp_path / "ix"
    assert _index(capsys, assets, assets["imgs"], out)[0] == 0
    first = _snapshot(out)
    capsys.readouterr()
    assert cli(["index", "--model", MODEL, "--pretrained", str(assets["ckpt"]), "--images", str(assets["imgs"]),
                "--output", str(out), *CPU]) == 0
    assert "(0 embedded now, 6 reused, 0 dropped)" in capsys.readouterr().out
    again = _snapshot(out)
    assert again[0] == first[0] and np.array_equal(again[1], first[1])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["generation"] == 2 and len(list(out.iterdir())) == 4


def test_export_folder_twice_overwrites_with_the_second_model(tmp_path, assets, capsys):
    out = tmp_path / "exp"
    assert run_cli(capsys, "export", "--model", "msclip-b32-tiny", "--format", "folder", "--output", out)[0] == 0
    assert run_cli(capsys, "export", "--model", MODEL, "--pretrained", assets["ckpt"], "--format", "folder",
                   "--output", out)[0] == 0
    got = msclip.create_model(str(out)).state_dict()
    want = msclip.create_model(MODEL, pretrained=str(assets["ckpt"])).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert temporaries(out) == []
