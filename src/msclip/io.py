"""Atomic, durable file writes: the one writer for every result, recipe, cache, embedding and checkpoint.

A write goes to a uniquely named temporary file in the destination folder, is flushed and fsynced,
renamed over the destination, and the folder is fsynced so the rename survives a power cut. On any
failure the temporary file is removed. The result gets the permissions an ordinary `open()` would give
(0666 minus the umask), not the 0600 of `tempfile.mkstemp`.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .errors import MissingFileError, MsclipError

TMP_PREFIX = ".msclip-tmp-"  # every temporary file this module creates starts with this


class WriteError(MsclipError):
    """A file could not be written; the message names it (and says so when the disk is full)."""


def read_user_text(path: str | os.PathLike, what: str, error: type[Exception] = MsclipError) -> str:
    """A text file the user named, as UTF-8 (a leading BOM dropped). Missing -> MissingFileError; a folder,
    an unreadable file or bytes that are not UTF-8 -> ``error``; each message names ``what`` and the file."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        raise error(f"{what} {str(path)!r} is a folder, not a file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise error(f"{what} {str(path)!r} cannot be read as UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise error(f"{what} {str(path)!r} cannot be read ({err.strerror or err})") from None


def parse_user_json(text: str, path: str | os.PathLike, what: str, error: type[Exception] = MsclipError) -> Any:
    """`text` (read from the user's file `path`) as JSON; malformed JSON -> ``error`` naming `what` and the file."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{what} {str(path)!r} is not valid JSON ({err})") from None


def read_user_json(path: str | os.PathLike, what: str, error: type[Exception] = MsclipError) -> Any:
    """A JSON file the user named (`read_user_text`'s checks, then `parse_user_json`)."""
    return parse_user_json(read_user_text(path, what, error), path, what, error)


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside `folder` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _describe(err: BaseException, path: Path) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, OSError) and err.errno == errno.ENOSPC or "No space left" in text:
        return f"cannot write {path}: the disk is full (no space left on {path.parent})"
    # a C++ writer given a bare file name reports a full disk as a stream error with no errno
    if "iostream error" in text or "PytorchStreamWriter" in text or "unexpected pos" in text:
        return f"cannot write {path}: {text} (is the disk full? free space on {path.parent})"
    return f"cannot write {path}: {text}"


def _is_write_failure(err: BaseException) -> bool:
    """An error of the writer itself (not a user error, not Ctrl-C): OS, C++ stream, or safetensors' own."""
    if isinstance(err, MsclipError):
        return False
    return isinstance(err, (OSError, RuntimeError)) or type(err).__name__ == "SafetensorError"


@contextlib.contextmanager
def reporting_writes(path: str | os.PathLike) -> Iterator[None]:
    """For the few writers that append in place (run logs): a failed write becomes a WriteError naming `path`."""
    try:
        yield
    except BaseException as err:
        if _is_write_failure(err):
            raise WriteError(_describe(err, Path(path))) from err
        raise


def make_folder(folder: str | os.PathLike) -> Path:
    """`mkdir -p folder`; a failure (a file in the way, no permission, a full disk) is a WriteError naming the
    folder and what stood in the way."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise WriteError(f"cannot create folder {folder}: the disk is full") from err
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise WriteError(f"cannot create folder {folder}: {blocker} is a file, not a folder") from err
        where = f" ({err.filename})" if err.filename and str(err.filename) != str(folder) else ""
        raise WriteError(f"cannot create folder {folder}: {err.strerror or err}{where}") from err
    return folder


def _filled_temporary(path: Path, write: Callable[[str], None]) -> str:
    """A temporary beside `path`, filled by `write(tmp)`, fsynced, with the umask's permissions; removed on failure."""
    make_folder(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # the writer may have used its own handle: flush it to disk here
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
    except BaseException as err:
        _discard(tmp)
        if _is_write_failure(err):
            raise WriteError(_describe(err, path)) from err
        raise
    return tmp


def _discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def _move_into_place(filled: list[tuple[str, Path]]) -> None:
    """Rename each temporary over its path, in order, then make the renames durable."""
    for i, (tmp, path) in enumerate(filled):
        try:
            os.replace(tmp, path)
        except BaseException as err:
            for rest, _ in filled[i:]:
                _discard(rest)
            if _is_write_failure(err):
                raise WriteError(_describe(err, path)) from err
            raise
    for folder in dict.fromkeys(path.parent for _, path in filled):
        fsync_dir(folder)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` to fill a temporary file, then move it durably over `path`."""
    path = Path(path)
    _move_into_place([(_filled_temporary(path, write), path)])
    return path


def atomic_write_many(writes: list[tuple[str | os.PathLike, Callable[[str], None]]]) -> list[Path]:
    """Files that belong together (embeddings and their names, a model folder): every temporary is filled and
    fsynced before any is renamed, so a failed write (a full disk, Ctrl-C) leaves all of them as they were.
    The renames, which need no space, follow in the order given: put the file that marks the set complete last."""
    filled: list[tuple[str, Path]] = []
    try:
        for path, write in writes:
            filled.append((_filled_temporary(Path(path), write), Path(path)))
    except BaseException:
        for tmp, _ in filled:
            _discard(tmp)
        raise
    _move_into_place(filled)
    return [path for _, path in filled]


def bytes_writer(data: bytes) -> Callable[[str], None]:
    """The `write(tmp)` of `data` for atomic_write / atomic_write_many (the other *_writer likewise)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    return write


def json_writer(obj: Any, indent: int | None = 2) -> Callable[[str], None]:
    return bytes_writer((json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode("utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, bytes_writer(data))


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return write_bytes(path, text.encode(encoding))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write(path, json_writer(obj, indent))


def _through_file(tmp: str, dump: Callable[[Any], None]) -> None:
    """`dump(file)` into `tmp` through a file object that keeps the first OSError of a write. torch's C++ writer
    turns a full disk into "unexpected pos N vs M" and numpy's into "N requested and M written", both without
    the errno; the kept OSError (ENOSPC, EFBIG, ...) is raised instead."""
    with open(tmp, "wb") as f:
        out = _ErrnoKeepingFile(f)
        try:
            dump(out)
        except Exception as err:
            if out.error is not None and err is not out.error:
                raise out.error from None
            raise


class _ErrnoKeepingFile:
    """The `write` / `flush` that torch's and numpy's writers need, remembering the first OSError raised."""

    def __init__(self, file: Any):
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.file.flush()


def torch_writer(obj: Any) -> Callable[[str], None]:
    import torch

    return lambda tmp: _through_file(tmp, lambda f: torch.save(obj, f))


def numpy_writer(array: Any) -> Callable[[str], None]:
    import numpy as np

    # a file object, not the name: np.save would append ".npy" to a bare name
    return lambda tmp: _through_file(tmp, lambda f: np.save(f, array))


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, torch_writer(obj))


def numpy_save(path: str | os.PathLike, array: Any) -> Path:
    return atomic_write(path, numpy_writer(array))


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Delete temporary files a killed process left in `folder` (only those of the files `names`, when given:
    a folder shared with other writers); returns what was removed."""
    folder = Path(folder)
    prefixes = tuple(f"{TMP_PREFIX}{n}." for n in names) if names is not None else (TMP_PREFIX,)
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(prefixes) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed
