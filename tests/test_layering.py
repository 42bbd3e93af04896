"""The import layering of docs/architecture.md, checked on the source (every import, including the ones
inside functions): commands/ sits on top, train/ eval/ analysis/ below it, data/ below them, the model
library at the bottom; and no module imports a `_private` name from another package."""
from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest

from proc_utils import run_logged

SRC = Path(__file__).resolve().parents[1] / "src" / "msclip"
# package -> packages it must never import ("core" = the top-level modules: model library, io, errors, ...)
FORBIDDEN = {
    "core": {"data", "train", "eval", "analysis", "commands", "demo", "study", "export", "index", "interop"},
    "data": {"train", "eval", "analysis", "commands", "demo", "study", "export", "index", "interop"},
    "eval": {"train", "commands", "demo", "study", "export", "index", "interop"},
    "analysis": {"train", "commands", "demo", "study", "export", "index", "interop"},
    "train": {"commands", "demo", "study", "export", "index", "interop"},
    # feature packages above the libraries: the study drives train/ + eval/ + analysis/; export works on
    # the model alone; index and interop use eval/'s feature loops
    "study": {"commands", "demo"},
    "export": {"data", "train", "eval", "analysis", "commands", "demo", "study", "index", "interop"},
    "index": {"train", "commands", "demo", "study", "interop"},
    "interop": {"train", "commands", "demo", "study", "index"},
}
SUBPACKAGES = {"data", "train", "eval", "analysis", "commands", "study", "export", "index", "interop"}


def package_of(module: str) -> str:
    """'msclip.eval.zeroshot' -> 'eval'; 'msclip.demo' -> 'demo'; 'msclip.model' -> 'core'."""
    parts = module.split(".")
    if len(parts) < 2:
        return "core"
    if parts[1] in SUBPACKAGES or parts[1] == "demo":
        return parts[1]
    if parts[1] in ("cli", "__main__"):  # the console entry points sit with the commands they dispatch to
        return "commands"
    return "core"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes under `if TYPE_CHECKING:` (imports for annotations only do not create a dependency)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) for every import statement of a source file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skip = _type_checking_nodes(tree)
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target, [alias.name for alias in node.names]))
    return out


def sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_the_checker_sees_the_tree() -> None:
    # guards against a vacuous pass (a wrong SRC would check nothing)
    files = sources()
    assert len(files) > 30
    assert any(target == "msclip.model" or target.endswith(".model")
               for target in (t for p in files for _, t, _ in imports_of(p)))


def layering_violations(files: list[Path]) -> list[str]:
    bad = []
    for path in files:
        mine = package_of(module_name(path))
        for line, target, names in imports_of(path):
            if not target.startswith("msclip"):
                continue
            targets = [target] + [f"{target}.{n}" for n in names]
            for t in targets:
                theirs = package_of(t)
                if theirs in FORBIDDEN.get(mine, set()) and theirs != mine:
                    bad.append(f"{path.relative_to(SRC)}:{line} ({mine}) imports {t} ({theirs})")
                    break
    return bad


def _package_of_module(module: str) -> str:
    """The package a module belongs to ('msclip.eval' for 'msclip.eval.zeroshot' and for 'msclip.eval')."""
    return module if (SRC.parent / Path(*module.split("."))).is_dir() else module.rpartition(".")[0]


def private_import_violations(files: list[Path]) -> list[str]:
    bad = []
    for path in files:
        mine = module_name(path)
        my_package = mine if path.name == "__init__.py" else mine.rpartition(".")[0]
        for line, target, names in imports_of(path):
            if not target.startswith("msclip"):
                continue
            for name in names:  # from X import _name: only from X's own package
                if name.startswith("_") and not name.startswith("__") and _package_of_module(target) != my_package:
                    bad.append(f"{path.relative_to(SRC)}:{line} imports private {target}.{name}")
            parts = target.split(".")
            for i, part in enumerate(parts):  # import of a private module: only from its own package
                if part.startswith("_") and not part.startswith("__") and ".".join(parts[:i]) != my_package:
                    bad.append(f"{path.relative_to(SRC)}:{line} imports private module {target}")
                    break
    return bad


def test_layers_point_down_only() -> None:
    bad = layering_violations(sources())
    assert not bad, "imports against the layering (see docs/architecture.md):\n" + "\n".join(bad)


def test_no_private_names_across_packages() -> None:
    bad = private_import_violations(sources())
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("code, kind", [
    ("from msclip.commands import zeroshot\n", "layer"),
    ("from ..commands._common import pick_device\n", "layer"),
    ("from msclip.eval.zeroshot import _inference\n", "private"),
])
def test_the_checker_catches_violations(tmp_path, monkeypatch, code, kind) -> None:
    # a fake module placed in train/ must be flagged: proves both checks can fail
    fake = SRC / "train" / "_layering_probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self, **kw: code if self == fake else Path.read_bytes(self).decode())
    checker = layering_violations if kind == "layer" else private_import_violations
    assert checker([fake]), f"{code!r} in train/ was not flagged"


def test_one_logger_naming_scheme() -> None:
    # every module logs under its own import path, so `logging.getLogger("msclip.eval")` configures a package
    bad = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("getLogger"):
                if [ast.unparse(a) for a in node.args] != ["__name__"]:
                    bad.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, "loggers must be logging.getLogger(__name__):\n" + "\n".join(bad)


_STARTUP = """
import sys
import msclip.cli, msclip.train.main, msclip.commands.info, msclip.study.runner
from msclip.tokenizer import Tokenizer
from msclip.eval.templates import imagenet_classnames
assert Tokenizer()("a photo of a cat.")[0, :3].tolist() == [49406, 320, 1125]
assert len(imagenet_classnames()) == 1000
print(sorted(m for m in ("torchvision", "open_clip", "torch._dynamo") if m in sys.modules))
"""


def test_start_up_imports_neither_torchvision_nor_open_clips_package() -> None:
    # torchvision imports torch._dynamo (nearly as slow as torch); open_clip's package imports torchvision.
    # A process that only tokenizes, reads files or prints (`msclip --help`, a study's parent) never needs them.
    env = {**os.environ, "PYTHONPATH": str(SRC.parent), "OMP_NUM_THREADS": "1"}
    proc = run_logged([sys.executable, "-c", _STARTUP], env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["[]"], f"imported at start-up: {proc.stdout.strip()}"
