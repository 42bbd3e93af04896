"""msclip.io, the one writer: atomic (a reader sees the old or the new file, never half), durable (file and
folder fsynced), tidy (no temporary file survives a failure), ordinary permissions, a full disk named."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from msclip import io as mio
from fault_utils import FillsUp


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)
    old = os.umask(0o022)
    os.umask(old)
    yield set_mask
    os.umask(old)


def test_round_trips_of_every_kind(tmp_path: Path) -> None:
    mio.write_bytes(tmp_path / "a.bin", b"\x00\x01")
    mio.write_text(tmp_path / "sub" / "b.txt", "héllo")  # the folder is created
    mio.write_json(tmp_path / "c.json", {"x": [1, 2], "name": "ü"})
    mio.torch_save({"w": torch.arange(3)}, tmp_path / "d.pt")
    mio.numpy_save(tmp_path / "e.npy", np.arange(4, dtype=np.float32))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub" / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "c.json").read_text(encoding="utf-8") == '{\n  "x": [\n    1,\n    2\n  ],\n  "name": "ü"\n}\n'
    assert torch.equal(torch.load(tmp_path / "d.pt", weights_only=True)["w"], torch.arange(3))
    assert np.array_equal(np.load(tmp_path / "e.npy"), np.arange(4, dtype=np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "c.json", "d.pt", "e.npy", "sub"]


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_umask_permissions(tmp_path: Path, umask, mask: int, mode: int) -> None:
    umask(mask)
    path = mio.write_text(tmp_path / "r.json", "{}")
    assert os.stat(path).st_mode & 0o777 == mode


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    mio.write_json(target, {"old": True})

    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_text('{"new": tr')
        raise KeyboardInterrupt  # even a Ctrl-C in the middle of a write

    with pytest.raises(KeyboardInterrupt):
        mio.atomic_write(target, half_then_fail)
    assert target.read_text() == '{\n  "old": true\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_full_disk_is_named_with_the_path(tmp_path: Path) -> None:
    target = tmp_path / "ckpt" / "step_10.pt"

    def no_space(tmp: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(mio.WriteError, match=r"step_10\.pt.*disk is full"):
        mio.atomic_write(target, no_space)
    # torch.save reports a full disk as a bare stream error: the message still names the file and the cause
    with pytest.raises(mio.WriteError, match=r"step_10\.pt.*disk full"):
        mio.atomic_write(target, lambda tmp: (_ for _ in ()).throw(RuntimeError("basic_ios::clear: iostream error")))
    assert list(target.parent.iterdir()) == []


def test_torch_save_on_a_full_disk_says_the_disk_is_full(tmp_path: Path, monkeypatch) -> None:
    """torch's C++ writer drops the errno of a failed write; torch_save must still report ENOSPC as a full disk."""
    real_open = open
    monkeypatch.setattr(mio, "open", lambda *a, **k: FillsUp(real_open(*a, **k), 5000), raising=False)
    target = tmp_path / "step_10.pt"
    with pytest.raises(mio.WriteError, match=r"step_10\.pt: the disk is full"):
        mio.torch_save({"w": torch.zeros(100_000)}, target)
    assert list(tmp_path.iterdir()) == []


_FILE_SIZE_LIMIT_CHILD = r"""
import json, resource, signal, sys
from pathlib import Path
import torch
from msclip import io as mio
from msclip.eval.embed import write_embeddings
from msclip.checkpoint import save_pretrained
from msclip.factory import create_model

root = Path(sys.argv[1])
model = create_model("clip-b32-tiny")
writers = {
    "state.pt": lambda p: mio.torch_save({"w": torch.zeros(200_000)}, p),
    "model.safetensors": lambda p: save_pretrained(model, p),
    "emb.safetensors": lambda p: write_embeddings(torch.zeros(200, 512), str(p), {}),
    "emb.npy": lambda p: write_embeddings(torch.zeros(200, 512), str(p), {}),
    "result.json": lambda p: mio.write_json(p, {"x": [0.5] * 50_000}),
}
for name in writers:
    (root / name).write_text("old")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
errors = {}
for name, write in writers.items():
    try:
        write(root / name)
        errors[name] = "no error"
    except mio.WriteError as err:
        errors[name] = str(err)
print(json.dumps(errors))
"""


def test_a_real_failed_write_is_a_write_error_naming_the_file_and_the_os_error(tmp_path: Path) -> None:
    """A real OS write failure (file size limit) in every writer: WriteError with the file and the errno's text,
    the old file untouched, no temporary file left; never torch's "unexpected pos" or a raw SafetensorError."""
    import json
    import sys

    from proc_utils import run_logged

    out = run_logged([sys.executable, "-c", _FILE_SIZE_LIMIT_CHILD, str(tmp_path)], timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    errors = json.loads(out.stdout.strip().splitlines()[-1])
    for name, message in errors.items():
        assert f"cannot write {tmp_path / name}:" in message, (name, message)
        assert "File too large" in message, (name, message)
        assert (tmp_path / name).read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(errors)


def test_file_and_folder_are_fsynced_before_and_after_the_rename(tmp_path: Path, monkeypatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        real_fsync(fd)

    def replace(a, b) -> None:
        events.append("rename")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    mio.write_text(tmp_path / "x.txt", "data")
    assert events == ["file", "rename", "dir"]


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / f"{mio.TMP_PREFIX}step_5.pt.abc123").write_bytes(b"half")
    (tmp_path / "step_5.pt").write_bytes(b"whole")
    (tmp_path / ".hidden").write_bytes(b"user file")
    removed = mio.remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [f"{mio.TMP_PREFIX}step_5.pt.abc123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "step_5.pt"]


def test_a_folder_that_cannot_be_made_is_a_write_error_naming_it(tmp_path: Path) -> None:
    """A file where a folder must go (an output under a file, a run folder's parent that is a file) is a
    WriteError naming the folder and the file in the way, from make_folder and from every writer."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(mio.WriteError, match=rf"cannot create folder {tmp_path}/afile/run: {tmp_path}/afile is a "
                                             "file, not a folder"):
        mio.make_folder(tmp_path / "afile" / "run")
    with pytest.raises(mio.WriteError, match=rf"cannot create folder {tmp_path}/afile: .*afile is a file"):
        mio.write_json(tmp_path / "afile" / "result.json", {})
    assert mio.make_folder(tmp_path / "a" / "b").is_dir()


@pytest.mark.parametrize("reader", ["list_file", "result_file", "annotations"])
def test_malformed_json_from_the_user_is_one_error_naming_the_file(tmp_path, reader):
    """Every reader of a user's JSON (class names / templates, compare's result files, retrieval annotations)
    turns malformed JSON into its MsclipError naming the file, never a JSONDecodeError."""
    from msclip.data.formats import read_list_file
    from msclip.errors import MsclipError
    from msclip.eval.compare import load_result
    from msclip.eval.retrieval import read_karpathy

    path = tmp_path / "broken.json"
    path.write_text('{"a": [1, 2')
    call = {"list_file": lambda: read_list_file(path, "class names"), "result_file": lambda: load_result(str(path)),
            "annotations": lambda: read_karpathy(path, tmp_path)}[reader]
    with pytest.raises(MsclipError, match=r"broken\.json.*not valid JSON") as info:
        call()
    assert not isinstance(info.value, json.JSONDecodeError)
