"""A full disk for tests, without root: msclip.io's writes go through a file object that runs out of space."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from msclip import io as mio

_real_open = open


class FillsUp:
    """A file object whose disk fills up after `left` bytes: the write that would pass it writes what fits and
    raises ENOSPC, as write(2) does."""

    def __init__(self, f, left: int):
        self.f, self.left = f, left

    def write(self, data):
        data = bytes(data)
        if len(data) > self.left:
            self.f.write(data[: self.left])
            self.left = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def disk_full(monkeypatch, name_part: str, left: int = 16) -> None:
    """The disk is full for every msclip.io write of a file whose name contains `name_part` (its temporary file
    is named after it); torch, numpy and the text writers all write through msclip.io's `open`. safetensors'
    Rust writer opens the file itself: it gets its real error text for ENOSPC."""
    def fake_open(file, mode="r", *a, **k):
        f = _real_open(file, mode, *a, **k)
        return FillsUp(f, left) if "w" in mode and name_part in os.path.basename(str(file)) else f

    monkeypatch.setattr(mio, "open", fake_open, raising=False)
    import safetensors.torch as st
    from safetensors import SafetensorError

    real_save = st.save_file

    def save_file(tensors, filename, metadata=None):
        if name_part in os.path.basename(str(filename)):
            Path(filename).write_bytes(b"\x00" * left)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", save_file)
