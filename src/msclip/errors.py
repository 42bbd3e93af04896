"""The one base class for user errors.

Anything a user can cause and fix (a bad config value, a missing or corrupt file, an unusable dataset)
raises a subclass of `MsclipError` with a message naming the file, key or value at fault. The CLI
catches it and prints `msclip <cmd>: error: <message>` with exit code 2; a traceback means a bug.
"""
from __future__ import annotations


class MsclipError(ValueError):
    """A user error; the message says what is wrong and where."""


class MissingFileError(MsclipError, FileNotFoundError):
    """A file or folder the user named does not exist."""
