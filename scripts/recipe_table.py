"""Print (or check, or write into docs/training.md) the table of every training-recipe field.

The table comes from the recipe dataclasses (src/msclip/train/recipe.py, src/msclip/data/common.py): the
dotted name, the type, the default and the field's trailing source comment (its allowed values). Run
`python scripts/recipe_table.py --write` after changing a field; tests/test_docs.py fails when the page
and the dataclasses disagree.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import typing
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"
BEGIN, END = "<!-- recipe-fields:begin -->", "<!-- recipe-fields:end -->"


def _comments(cls: type) -> dict[str, str]:
    """Field name -> its comment: the `# ...` lines right above the field, then its trailing `# ...`."""
    out: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        above = re.match(r"\s+# (.*)$", line)
        if above:
            pending.append(above.group(1).strip())
            continue
        field = re.match(r"\s+(\w+): [^#]*?(?:\s+# (.*))?$", line)
        if field and "(" not in line.split(":")[0]:
            out[field.group(1)] = " ".join(pending + ([field.group(2).strip()] if field.group(2) else []))
        pending = []
    return out


def rows(cls: type | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    from msclip.train.recipe import Recipe
    from msclip.typed_config import describe_type

    cls = cls or Recipe
    hints = typing.get_type_hints(cls)
    notes = _comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += rows(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else repr(default)
        out.append((f"{prefix}{f.name}", describe_type(tp), shown, notes.get(f.name, "")))
    return out


def table() -> str:
    lines = ["| field | type | default | values and meaning |", "|---|---|---|---|"]
    for name, tp, default, note in rows():
        note = note.replace("|", "\\|")
        lines.append(f"| `{name}` | {tp.replace('|', ' or ')} | `{default}` | {note} |")
    return "\n".join(lines)


def current_block(text: str) -> str:
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"replace the table in {DOC}")
    args = parser.parse_args()
    if not args.write:
        print(table())
        return 0
    text = DOC.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    from msclip.io import write_text

    write_text(DOC, text[:start] + "\n" + table() + "\n" + text[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
