"""The one way tests write WebDataset shards: a plain tar of (member name, bytes)."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Iterable


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
