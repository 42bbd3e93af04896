"""Strict dataclass-from-dict loading, driven by the field annotations.

Used by the model config (`ModelCfg.from_dict`), the training recipe (YAML files) and command-line
overrides (`optim.lr=1e-3`). A mapping is checked against the dataclass fields: every unknown key and
every value of the wrong type is collected, and one error lists them all, each with its dotted path and,
for unknown keys, the closest known name ("did you mean 'lr'?").

Supported annotations: bool, int, float, str, Any, None, `X | None` and other unions, `list[T]`,
`tuple[T, ...]` / `tuple[T1, T2]`, bare `list` / `dict` (any such value), and nested dataclasses (also
inside lists and unions). Values from files keep their type, except that a float field also accepts a
string that parses as a number (PyYAML reads `1e-3` as a string). Values from the command line are
strings and are parsed by the field's type (`parse_strings=True`).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from msclip.errors import MsclipError
from msclip.io import read_user_text

T = typing.TypeVar("T")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NULL = {"null", "none", "~", ""}


class TypedConfigError(MsclipError):
    """One or more keys or values do not fit the dataclass; the message lists every problem."""


class _Mismatch(Exception):
    """Internal: a value does not fit a type (the text says what was expected)."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def field_paths(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted field name below `cls`, e.g. `optim.lr` (nested dataclasses expanded)."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += field_paths(tp, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def describe_type(tp: Any) -> str:
    """A short human name for an annotation: `int`, `float|null`, `list[int]`, `str|list[str]|null`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return "|".join(describe_type(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        args = typing.get_args(tp)
        inner = ",".join("..." if a is Ellipsis else describe_type(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


class _Loader:
    def __init__(self, parse_strings: bool, noun: str, source: str, root: type | None) -> None:
        self.parse_strings, self.noun, self.source, self.root = parse_strings, noun, source, root
        self.problems: list[str] = []

    # ------------------------------------------------------------------ problems
    def unknown(self, path: str, known: list[str]) -> None:
        leaf = path.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(leaf, known, n=1)
        if close:
            hint = f" (did you mean '{close[0]}'?)"
        else:
            elsewhere = [p for p in (field_paths(self.root) if self.root else []) if p.rsplit(".", 1)[-1] == leaf]
            hint = f" (did you mean '{elsewhere[0]}'?)" if elsewhere else f"; known: {', '.join(known)}"
        self.problems.append(f"unknown {self.noun} '{path}' in {self.source}{hint}")

    def bad(self, path: str, message: str) -> None:
        self.problems.append(f"{self.source}: {path}: {message}")

    # ------------------------------------------------------------------ building
    def build(self, cls: type, data: Any, path: str) -> Any:
        """A new `cls` from mapping `data` (defaults for the missing keys), or None after a problem."""
        obj = cls()
        return obj if self.update(obj, data, path) else None

    def update(self, obj: Any, data: Any, path: str) -> bool:
        """Set the keys of `data` on dataclass instance `obj` (nested sections updated in place)."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.bad(path or "(top level)", f"expected a mapping of {type(obj).__name__} fields, got {data!r}")
            return False
        hints = _hints(type(obj))
        known = field_names(type(obj))
        ok = True
        for key, value in data.items():
            full = f"{path}.{key}" if path else str(key)
            if key not in hints:
                self.unknown(full, known)
                ok = False
                continue
            current = getattr(obj, key)
            if dataclasses.is_dataclass(hints[key]) and dataclasses.is_dataclass(current) and isinstance(value, dict):
                ok = self.update(current, value, full) and ok  # a section given in part keeps its other fields
                continue
            before = len(self.problems)
            try:
                converted = self.convert(value, hints[key], full)
            except _Mismatch as err:
                self.bad(full, str(err))
                ok = False
                continue
            if len(self.problems) == before:
                setattr(obj, key, converted)
            else:
                ok = False
        return ok

    def convert(self, value: Any, tp: Any, path: str) -> Any:
        """`value` as annotation `tp`; raises _Mismatch, or records problems of nested dataclasses."""
        if tp is Any:
            return value
        origin = typing.get_origin(tp)
        if origin in (Union, types.UnionType):
            return self._union(value, typing.get_args(tp), path)
        if tp is type(None):
            if value is None or (self.parse_strings and isinstance(value, str) and value.lower() in _NULL):
                return None
            raise _Mismatch(f"expected null, got {value!r}")
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise _Mismatch(f"expected a mapping of {tp.__name__} fields, got {value!r}")
            return self.build(tp, value, path)
        if origin in (list, tuple) or tp in (list, tuple, dict):
            return self._container(value, tp, path)
        return _scalar(value, tp, self.parse_strings)

    def _union(self, value: Any, args: tuple, path: str) -> Any:
        if type(None) in args and (value is None or (self.parse_strings and isinstance(value, str)
                                                      and value.lower() in _NULL)):
            return None
        if isinstance(value, str) and str in args and not (self.parse_strings and value.lstrip().startswith("[")):
            return value  # a string field wins over a list parsed from "a,b"
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # `X | None`: X's own message (and nested problems) say more
            return self.convert(value, options[0], path)
        if isinstance(value, str):  # here "[...]" from the command line: a list before the plain string
            options = [a for a in options if a is not str] + [a for a in options if a is str]
        for arg in options:  # the first alternative that takes the value without a problem
            probe = _Loader(self.parse_strings, self.noun, self.source, self.root)
            try:
                converted = probe.convert(value, arg, path)
            except _Mismatch:
                continue
            if not probe.problems:
                return converted
        raise _Mismatch(f"expected {describe_type(Union[args])}, got {value!r}")

    def _container(self, value: Any, tp: Any, path: str) -> Any:
        origin = typing.get_origin(tp) or tp
        if self.parse_strings and isinstance(value, str):
            text = value.strip()
            if text.startswith(("[", "{")):
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError as err:
                    raise _Mismatch(f"cannot parse {value!r} ({err})") from None
            elif origin in (list, tuple):
                value = [v.strip() for v in text.split(",")] if text else []
        if origin is dict:
            if not isinstance(value, dict):
                raise _Mismatch(f"expected a mapping, got {value!r}")
            return value
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(f"expected a list, got {value!r}")
        args = typing.get_args(tp)
        if not args:
            return list(value) if origin is list else tuple(value)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Mismatch(f"expected {len(args)} values, got {len(value)} ({value!r})")
            item_types = list(args)
        else:
            item_types = [args[0]] * len(value)
        items = []
        for i, (item, item_tp) in enumerate(zip(value, item_types)):
            try:
                items.append(self.convert(item, item_tp, f"{path}[{i}]"))
            except _Mismatch as err:
                raise _Mismatch(f"item {i}: {err}") from None
        return items if origin is list else tuple(items)


def _scalar(value: Any, tp: Any, parse_strings: bool) -> Any:
    text = value.strip() if isinstance(value, str) else None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if parse_strings and text is not None and text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise _Mismatch(f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if parse_strings and text is not None:
            try:
                return int(text.replace("_", ""))
            except ValueError:
                pass
        raise _Mismatch(f"expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif text is not None:  # PyYAML reads "1e-3" (no dot) as a string: accept it from files too
            try:
                number = float(text)
            except ValueError:
                pass
        # NaN passes every range check (NaN <= 0 is False), and no field here means anything by inf.
        if number is not None and math.isfinite(number):
            return number
        raise _Mismatch(f"expected a finite number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `name: 2024` in YAML
        raise _Mismatch(f"expected a string, got {value!r}")
    raise _Mismatch(f"unsupported field type {tp!r}")


def _raise(loader: _Loader, error: type[Exception]) -> None:
    if not loader.problems:
        return
    if len(loader.problems) == 1:
        raise error(loader.problems[0])
    lines = "\n".join(f"  - {p}" for p in loader.problems)
    raise error(f"{len(loader.problems)} problems in {loader.source}:\n{lines}")


def from_dict(cls: type[T], data: Any, *, source: str = "config", noun: str = "key",
              error: type[Exception] = TypedConfigError, parse_strings: bool = False) -> T:
    """A new `cls` from `data`; every unknown key and mistyped value is reported in one `error`."""
    loader = _Loader(parse_strings, noun, source, cls)
    obj = loader.build(cls, data, "")
    _raise(loader, error)
    return obj


def update_from_dict(obj: Any, data: Any, *, source: str = "config", noun: str = "key",
                     error: type[Exception] = TypedConfigError, parse_strings: bool = False) -> None:
    """Apply `data` onto the dataclass instance `obj` (sections merged); all problems in one `error`.

    Nothing is changed when there is a problem in `data`.
    """
    loader = _Loader(parse_strings, noun, source, type(obj))
    loader.update(copy.deepcopy(obj), data, "")  # a trial run: `obj` stays untouched on failure
    _raise(loader, error)
    loader.update(obj, data, "")


def set_dotted(obj: Any, items: list[tuple[str, Any]], *, source: str = "command line", noun: str = "key",
               error: type[Exception] = TypedConfigError, parse_strings: bool = True) -> None:
    """Apply `[("optim.lr", "1e-3"), ...]` to `obj`; strings are parsed by the field's type."""
    nested: dict[str, Any] = {}
    loader = _Loader(parse_strings, noun, source, type(obj))
    for dotted, value in items:
        parts = dotted.replace("-", "_").split(".")
        node, cls, ok = nested, type(obj), True
        for i, part in enumerate(parts):
            hints = _hints(cls) if cls is not None and dataclasses.is_dataclass(cls) else None
            here = ".".join(parts[: i + 1])
            if hints is None:
                loader.bad(".".join(parts[:i]), "has no sub-fields")
                ok = False
                break
            if part not in hints:
                loader.unknown(here, field_names(cls))
                ok = False
                break
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(hints[part]):
                    loader.bad(here, "is a section; set one of its fields")
                    ok = False
                break
            cls = hints[part]
            node = node.setdefault(part, {})
        if ok:
            node[parts[-1]] = value
    loader.update(copy.deepcopy(obj), nested, "")  # type problems join the path problems above
    _raise(loader, error)
    loader.update(obj, nested, "")


def field_type(cls: type, dotted: str) -> Any:
    """The annotation of the dotted field `dotted` below dataclass `cls` (e.g. `optim.lr` -> float)."""
    tp: Any = cls
    for part in dotted.split("."):
        tp = _hints(tp)[part]
    return tp


def read_yaml_mapping(path: str | Path, what: str, error: type[Exception] = MsclipError) -> dict:
    """A YAML file whose top level is a mapping (an empty file is ``{}``). A missing file, invalid YAML or
    another top level raises ``error`` naming the file; ``what`` says what the file was meant to be."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} not found: {path}")
    text = read_user_text(path, what, error)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None  # one line, as every error
    if data is None:  # empty, or only comments; `[]`, `0`, `false` or `''` are not mappings
        data = {}
    if not isinstance(data, dict):
        raise error(f"{path}: a {what} is a mapping of fields, got {type(data).__name__}")
    return data
