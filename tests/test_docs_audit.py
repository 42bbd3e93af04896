"""The documentation names only things that exist (README.md, docs/*.md, benchmarks/README.md).

Each test parses the docs (fenced code blocks and backticked spans only, so prose never gives a false
positive) and checks what they name against the code: paths, modules and their attributes, `msclip <cmd>
--flag` command lines (against msclip.cli.build_parser()), recipe / study keys (against the dataclasses),
model names (msclip.list_models()), Makefile targets, script flags and relative links. A rename or removal
in the code, or a typo in a doc, makes a test fail and names the doc line. Nothing here runs a command.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import pkgutil
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

import msclip
from msclip.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "src" / "msclip"
DOC_FILES = sorted([REPO / "README.md", REPO / "benchmarks" / "README.md", *(REPO / "docs").glob("*.md")])
ARCH = REPO / "docs" / "architecture.md"
RECIPE_SECTIONS = ("data", "optim", "train", "checkpoint", "log", "zeroshot")
TOP_DIRS = ("src", "tests", "tools", "scripts", "benchmarks", "docs", "recipes", "experiments")


# --- parsing -----------------------------------------------------------------------------------------------

@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    lines: list[str]


@dataclass
class Span:
    doc: Path
    line: int
    text: str


def rel(doc: Path) -> str:
    return str(doc.relative_to(REPO))


def code_blocks(doc: Path) -> list[Block]:
    blocks, cur = [], None
    for i, line in enumerate(doc.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            if cur is None:
                cur = Block(doc, i, line.strip()[3:].strip(), [])
            else:
                blocks.append(cur)
                cur = None
        elif cur is not None:
            cur.lines.append(line)
    assert cur is None, f"{rel(doc)}: unclosed code fence at line {blocks[-1].line if blocks else '?'}"
    return blocks


def prose(doc: Path) -> str:
    """The doc with every fenced block blanked out (line numbers kept)."""
    out, inside = [], False
    for line in doc.read_text().splitlines():
        fence = line.lstrip().startswith("```")
        out.append("" if inside or fence else line)
        if fence:
            inside = not inside
    return "\n".join(out)


def spans(doc: Path) -> list[Span]:
    """Backticked spans outside code blocks; a span may wrap onto the next line."""
    text = prose(doc)
    return [Span(doc, text.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split()))
            for m in re.finditer(r"`([^`\n]+(?:\n[^`\n]+)?)`", text)]


def shell_lines(block: Block) -> list[tuple[int, str]]:
    """Logical lines of a shell block: continuations joined, comments dropped (a python heredoc is skipped)."""
    out, buf, start, heredoc = [], "", 0, None
    for k, line in enumerate(block.lines):
        if heredoc:
            if line.strip() == heredoc:
                heredoc = None
            continue
        m = re.search(r"<<'?(\w+)'?", line)
        if m:
            heredoc = m.group(1)
            continue
        if not buf:
            start = block.line + 1 + k
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip() and not buf.lstrip().startswith("#"):
            out.append((start, buf))
        buf = ""
    return out


def all_shell_lines(docs=DOC_FILES) -> list[tuple[Path, int, str]]:
    return [(b.doc, n, line) for doc in docs for b in code_blocks(doc)
            if b.lang in ("", "bash", "sh") for n, line in shell_lines(b)]


# --- `msclip <cmd> ...` invocations --------------------------------------------------------------------------

@dataclass
class Invocation:
    where: str
    command: str
    args: list[str]
    synopsis: bool  # a usage line ([--opt X], A|B): flags are checked, the line is not parsed


_STOP = {"&&", "||", ";", ">", ">>", "2>", "2>&1"}


def _tokens(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in prose
        return text.split()


def invocations_in(text: str, where: str, inline: bool) -> list[Invocation]:
    toks = _tokens(text) if not inline else text.split()
    synopsis = "[-" in text or "(--" in text or (" | " in text and not inline)
    out = []
    for i, tok in enumerate(toks):
        if tok != "msclip" or i + 1 >= len(toks):
            continue
        cmd = toks[i + 1]
        if not re.fullmatch(r"[a-z]+", cmd):  # `msclip COMMAND`, `msclip <cmd>`: placeholders
            continue
        args = []
        for t in toks[i + 2:]:
            if t in _STOP or (t == "|" and not synopsis) or t == "msclip":
                break
            args.append(t)
        out.append(Invocation(where, cmd, args, synopsis or inline))  # a backticked span is a fragment
    return out


def all_invocations() -> list[Invocation]:
    inv = []
    for doc, n, line in all_shell_lines():
        inv += invocations_in(line, f"{rel(doc)}:{n}", inline=False)
    for doc in DOC_FILES:
        for s in spans(doc):
            if s.text.startswith(("msclip ", "python -m msclip ")):
                inv += invocations_in(s.text, f"{rel(doc)}:{s.line}", inline=True)
    return inv


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def flags_of(args: list[str]) -> list[str]:
    flags = []
    for t in args:
        m = re.match(r"^[\[(]*(--?[A-Za-z][\w.-]*)", t)
        if m:
            flags.append(m.group(1))
    return flags


def test_docs_show_msclip_commands():
    """The parsing itself finds the docs' command lines (guards every test below against finding nothing)."""
    inv = all_invocations()
    commands = {i.command for i in inv}
    assert len(inv) > 40
    assert {"train", "study", "zeroshot", "embed", "linprobe", "retrieval", "analyze", "export", "index",
            "search", "demo", "info", "compare"} <= commands


def test_every_documented_command_exists():
    subs = subparsers()
    bad = [f"{i.where}: msclip {i.command}" for i in all_invocations() if i.command not in subs]
    assert not bad, "docs name msclip commands that do not exist:\n" + "\n".join(bad)


def test_every_documented_flag_is_accepted_by_its_command():
    subs = subparsers()
    bad = []
    for i in all_invocations():
        if i.command not in subs:
            continue
        known = subs[i.command]._option_string_actions
        bad += [f"{i.where}: msclip {i.command} {f}" for f in flags_of(i.args) if f not in known]
    assert not bad, "docs show flags the parser does not accept:\n" + "\n".join(bad)


def test_every_concrete_documented_command_line_parses():
    """A full example line (not a usage synopsis) parses with no unrecognised argument, and its values pass
    the parser's types and choices (nothing is run)."""
    subs = subparsers()
    bad, n = [], 0
    for i in all_invocations():
        if i.synopsis or i.command not in subs or any("..." in a or "<" in a for a in i.args):
            continue
        n += 1
        try:
            _, unknown = subs[i.command].parse_known_args(i.args)
        except SystemExit:
            bad.append(f"{i.where}: msclip {i.command} {' '.join(i.args)} (argparse error)")
            continue
        if unknown:
            bad.append(f"{i.where}: msclip {i.command}: unrecognised {unknown}")
    assert n > 25
    assert not bad, "\n".join(bad)


def test_per_command_pages_name_only_that_commands_flags():
    """On a command's own page every backticked `--flag` is one of that command's options."""
    subs = subparsers()
    pages = {"analysis.md": ["analyze"], "linear-probe.md": ["linprobe"], "retrieval.md": ["retrieval"],
             "search.md": ["index", "search"], "export.md": ["export"], "study.md": ["study"]}
    bad = []
    for page, cmds in pages.items():
        known = set().union(*(subs[c]._option_string_actions for c in cmds))
        for s in spans(REPO / "docs" / page):
            if s.text.startswith("msclip "):
                continue  # a full command line: checked against its own command above
            for f in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", s.text):
                if f not in known:
                    bad.append(f"docs/{page}:{s.line}: {f} (not an option of msclip {'/'.join(cmds)})")
    assert not bad, "\n".join(bad)


# --- recipe and study keys -----------------------------------------------------------------------------------

# Deliberately wrong examples (error messages the doc quotes): (doc, key).
INTENDED_WRONG = {("docs/training.md", "train.lr"), ("docs/training.md", "optim.lrr")}
_KEY = re.compile(r"(?<![\w./$<-])(?:recipe\.)?((?:%s)\.[a-z_]+)(?![\w/(-])" % "|".join(RECIPE_SECTIONS))


def recipe_key_refs() -> list[tuple[str, str]]:
    refs = []
    for doc in DOC_FILES:
        if doc == ARCH:
            continue
        for s in spans(doc):
            if s.text.startswith(("msclip.", "python ", "torchrun ", "srun ")):
                continue
            for m in _KEY.finditer(s.text):
                key = m.group(1)
                if key.split(".")[1] in ("py", "md", "json", "yaml", "yml", "sh", "txt", "csv"):
                    continue
                if (rel(doc), key) not in INTENDED_WRONG:
                    refs.append((f"{rel(doc)}:{s.line}", key))
    return refs


def test_every_backticked_recipe_key_is_a_recipe_field():
    from msclip.train.recipe import field_paths

    paths = set(field_paths())
    refs = recipe_key_refs()
    assert len(refs) > 60 and {"train.steps", "optim.warmup", "data.kind"} <= {k for _, k in refs}
    bad = [f"{where}: {key}" for where, key in refs if key not in paths]
    assert not bad, "docs name recipe fields that do not exist:\n" + "\n".join(bad)


def test_intended_wrong_examples_are_still_wrong():
    """The quoted mistakes ('train.lr' -> 'optim.lr') stay mistakes, else the doc's example is moot."""
    from msclip.train.recipe import field_paths

    assert not {k for _, k in INTENDED_WRONG} & set(field_paths())
    doc = (REPO / "docs" / "training.md").read_text()
    assert "`train.lr` -> `optim.lr`" in doc


def test_train_overrides_in_command_lines_are_typed_recipe_fields():
    """`msclip train ... key=value` and `--key value` in the docs set real fields with values of their type;
    the packaged recipe the README names loads with its override."""
    from msclip.train.recipe import Recipe, field_paths, load_recipe, set_field

    paths = set(field_paths())
    bad, n = [], 0
    for i in all_invocations():
        if i.command != "train" or i.synopsis:
            continue
        ns, _ = subparsers()["train"].parse_known_args(i.args)
        from msclip.commands.train import collect_overrides

        for item in collect_overrides(ns):
            key, value = item.split("=", 1)
            n += 1
            if key not in paths:
                bad.append(f"{i.where}: {key}")
                continue
            if "..." in value or "<" in value or "$" in value:
                continue
            try:
                set_field(Recipe(), key, value)
            except Exception as err:  # noqa: BLE001 - reported with the doc line
                bad.append(f"{i.where}: {key}={value}: {err}")
        if ns.config and (REPO / ns.config).is_file():
            load_recipe(REPO / ns.config, [o for o in collect_overrides(ns)])
    assert n >= 3
    assert not bad, "\n".join(bad)


def test_study_overrides_and_fields_exist():
    """study.md's field table and every `msclip study ... key=value` override name real study fields
    (recipe.<field> reaching a real recipe field), and the overrides load on the smoke preset."""
    from msclip.study.spec import EvalSpec, StudySpec, load_study
    from msclip.train.recipe import field_paths
    from msclip.typed_config import field_names

    study_paths = {f for f in field_names(StudySpec) if not f.startswith("_")}
    study_paths |= {f"eval.{f}" for f in field_names(EvalSpec)}
    doc = REPO / "docs" / "study.md"
    bad = []
    for n, line in enumerate(doc.read_text().splitlines(), 1):
        m = re.match(r"\| (`[^|]+`) \|", line)
        if m:
            for key in re.findall(r"`([^`]+)`", m.group(1)):
                if key not in study_paths:
                    bad.append(f"docs/study.md:{n}: table field {key}")
    for s in spans(doc):
        for key in re.findall(r"(?<![\w.-])(eval\.[a-z_]+)(?![\w.])", s.text):
            if key not in study_paths:
                bad.append(f"docs/study.md:{s.line}: {key}")
    overrides = []
    for i in all_invocations():
        if i.command == "study" and not i.synopsis:
            ns, _ = subparsers()["study"].parse_known_args(i.args)
            for o in ns.overrides:
                key = o.split("=", 1)[0]
                ok = key[len("recipe."):] in field_paths() if key.startswith("recipe.") else key in study_paths
                if not ok:
                    bad.append(f"{i.where}: override {o}")
                overrides.append(o)
    assert len(overrides) >= 4
    assert not bad, "\n".join(bad)
    load_study(None, [o for o in overrides if "..." not in o], preset="smoke")


# --- model names, Makefile targets ---------------------------------------------------------------------------

_MODEL = re.compile(r"(?<![\w.-])((?:ms)?clip-[a-z0-9]+(?:-[a-z0-9*]+)*\*?)(?![\w*-]|\.md|\.py)")


def model_refs() -> list[tuple[str, str]]:
    refs = []
    for doc in DOC_FILES:
        texts = [(s.line, s.text) for s in spans(doc)]
        texts += [(n, line) for d, n, line in all_shell_lines([doc])]
        texts += [(b.line, "\n".join(b.lines)) for b in code_blocks(doc) if b.lang == "python"]
        for line, text in texts:
            refs += [(f"{rel(doc)}:{line}", m.group(1)) for m in _MODEL.finditer(text)]
    return refs


def test_every_documented_model_name_is_registered():
    names = msclip.list_models()
    refs = model_refs()
    assert len(refs) > 50 and {"msclip-s-b32", "clip-b16"} <= {m for _, m in refs}
    bad = []
    for where, name in refs:
        if "*" in name:
            pattern = re.compile(name.replace("*", ".*"))
            if not any(pattern.fullmatch(n) for n in names):
                bad.append(f"{where}: {name} (matches no model)")
        elif name not in names:
            bad.append(f"{where}: {name}")
    assert not bad, "docs name models that msclip.list_models() does not have:\n" + "\n".join(bad)


def test_readme_model_table_lists_every_full_size_config():
    """README's family table names every registered config that is not a -tiny twin, and each has its twin."""
    text = (REPO / "README.md").read_text()
    table = "\n".join(line for line in text.splitlines() if line.startswith("| `"))
    listed = set(re.findall(r"`([a-z0-9-]+)`", table))
    names = set(msclip.list_models())
    full = {n for n in names if not n.endswith("-tiny")}
    assert full <= listed, f"README's model table misses {sorted(full - listed)}"
    assert all(f"{n}-tiny" in names for n in full)


def makefile_targets() -> set[str]:
    return {m.group(1) for m in re.finditer(r"^([\w.-]+):(?!=)", (REPO / "Makefile").read_text(), re.M)}


def test_every_documented_make_target_exists():
    targets = makefile_targets()
    refs = []
    for doc in DOC_FILES:
        texts = [(s.line, s.text) for s in spans(doc)] + [(n, line) for _, n, line in all_shell_lines([doc])]
        for line, text in texts:
            refs += [(f"{rel(doc)}:{line}", t) for t in re.findall(r"(?:^|(?<=[\s(]))make ([a-z][\w-]*)", text)]
    assert {"demo", "test", "bench", "gpu-check"} <= {t for _, t in refs}
    bad = [f"{where}: make {t}" for where, t in refs if t not in targets]
    assert not bad, "\n".join(bad)


# --- paths, scripts, links ---------------------------------------------------------------------------------

def _expand(token: str) -> list[str]:
    m = re.search(r"\{([^{}]*,[^{}]*)\}", token)
    if not m:
        return [token]
    return [x for alt in m.group(1).split(",") for x in _expand(token[:m.start()] + alt + token[m.end():])]


def _exists(token: str, bases: list[Path]) -> bool:
    for variant in _expand(token.rstrip("/")):
        for base in bases:
            if any(base.glob(variant)) if "*" in variant else (base / variant).exists():
                return True
    return False


_PATHLIKE = re.compile(r"^(?:%s|msclip)/[\w./{},*-]*$" % "|".join(TOP_DIRS))


def test_every_backticked_repository_path_exists():
    bad, n = [], 0
    for doc in DOC_FILES:
        for s in spans(doc):
            for tok in s.text.split():
                tok = tok.strip("(),;:")
                if not _PATHLIKE.match(tok) or "..." in tok:
                    continue
                n += 1
                if not _exists(tok, [REPO, REPO / "src"]):
                    bad.append(f"{rel(doc)}:{s.line}: {tok}")
    assert n > 40
    assert not bad, "docs name paths that do not exist:\n" + "\n".join(bad)


def _literal_flags(script: Path) -> set[str]:
    return {n.value for n in ast.walk(ast.parse(script.read_text()))
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith("-")}


def test_documented_scripts_exist_and_take_their_flags():
    """`python tools/x.py --flag` / `bash benchmarks/x.sh`: the file exists, a python script defines each
    flag the doc passes it, and `python -m <module>` names an importable module."""
    bad, n = [], 0
    lines = [(f"{rel(d)}:{ln}", t) for d, ln, t in all_shell_lines()]
    lines += [(f"{rel(d)}:{s.line}", s.text) for d in DOC_FILES for s in spans(d)
              if s.text.startswith(("python ", "bash "))]
    for where, text in lines:
        toks = text.split()
        for i, tok in enumerate(toks[:-1]):
            if tok == "-m" and toks[i - 1] == "python":
                n += 1
                if importlib.util.find_spec(toks[i + 1]) is None:
                    bad.append(f"{where}: python -m {toks[i + 1]}")
            if tok in ("python", "bash") and re.match(r"[\w/-]+\.(py|sh)$", toks[i + 1]):
                n += 1
                script = REPO / toks[i + 1]
                if not script.is_file():
                    bad.append(f"{where}: {toks[i + 1]} does not exist")
                    continue
                if script.suffix == ".py":
                    flags = _literal_flags(script)
                    rest = []
                    for t in toks[i + 2:]:
                        if t in _STOP or t == "|":
                            break
                        rest.append(t)
                    bad += [f"{where}: {toks[i + 1]} {f}" for f in flags_of(rest) if f not in flags]
    # tools/eval_zeroshot.py's options listed in prose
    zs = (REPO / "docs" / "zeroshot.md").read_text()
    listed = re.search(r"Options `([^`]+)` are also accepted", zs).group(1).split()
    bad += [f"docs/zeroshot.md: tools/eval_zeroshot.py {f}" for f in listed
            if f not in _literal_flags(REPO / "tools" / "eval_zeroshot.py")]
    assert n >= 8
    assert not bad, "\n".join(bad)


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_and_anchors_resolve():
    bad, n = [], 0
    for doc in DOC_FILES:
        for m in re.finditer(r"\]\(([^)\s]+)\)", prose(doc)):
            target = m.group(1)
            if re.match(r"\w+://", target):
                continue
            n += 1
            path, _, anchor = target.partition("#")
            file = (doc.parent / path) if path else doc
            if not file.exists():
                bad.append(f"{rel(doc)}: link {target}")
            elif anchor:
                slugs = {_slug(h) for h in re.findall(r"^#+ (.*)$", file.read_text(), re.M)}
                if anchor not in slugs:
                    bad.append(f"{rel(doc)}: link {target} (no such heading)")
    assert n >= 4
    assert not bad, "\n".join(bad)


# --- python names: msclip.a.b, python blocks -------------------------------------------------------------

def resolve(dotted: str):
    """Import the longest module prefix of `dotted` and get the rest as attributes; raises when missing."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        name = ".".join(parts[:k])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and not name.startswith(err.name) and err.name != name:
                raise
            continue
        for attr in parts[k:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def dotted_msclip_refs() -> list[tuple[str, str]]:
    refs = []
    pat = re.compile(r"(?<![\w.])(msclip(?:\.[A-Za-z_]\w*)+)")
    for doc in DOC_FILES:
        for s in spans(doc):
            refs += [(f"{rel(doc)}:{s.line}", m.group(1)) for m in pat.finditer(s.text)]
            # "Library: `msclip.index.store.update_index`, `load_index`; ...": bare names after a dotted one
        for b in code_blocks(doc):
            if b.lang == "python":
                refs += [(f"{rel(doc)}:{b.line}", m.group(1)) for m in pat.finditer("\n".join(b.lines))]
    return refs


def test_every_dotted_msclip_name_resolves():
    refs = dotted_msclip_refs()
    assert len(refs) > 25
    bad = []
    for where, dotted in refs:
        try:
            resolve(dotted)
        except (ImportError, AttributeError) as err:
            bad.append(f"{where}: {dotted} ({err})")
    assert not bad, "docs name msclip objects that do not exist:\n" + "\n".join(bad)


def test_search_library_line_names_real_functions():
    text = (REPO / "docs" / "search.md").read_text()
    line = next(p for p in text.split("\n\n") if p.startswith("Library:"))
    module, names = None, []
    for tok in re.findall(r"`([\w.]+)`", line):
        if tok.startswith("msclip."):
            module, name = tok.rsplit(".", 1)
        else:
            name = tok
        names.append(f"{module}.{name}")
    assert len(names) == 8
    bad = [n for n in names if not hasattr(importlib.import_module(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1])]
    assert not bad


def test_python_blocks_compile_and_import():
    """Every python example is valid syntax and its `from msclip... import x` / `import msclip` lines work."""
    n = 0
    for doc in DOC_FILES:
        for b in code_blocks(doc):
            if b.lang != "python":
                continue
            n += 1
            tree = ast.parse("\n".join(b.lines), filename=f"{rel(doc)}:{b.line}")
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module.startswith("msclip"):
                    mod = importlib.import_module(node.module)
                    for alias in node.names:
                        assert hasattr(mod, alias.name), f"{rel(doc)}:{b.line}: {node.module}.{alias.name}"
    assert n >= 5


# --- docs/architecture.md ------------------------------------------------------------------------------------

def _all_modules() -> dict[str, object]:
    mods = {"msclip": msclip}
    for info in pkgutil.walk_packages([str(PKG)], "msclip."):
        if info.name.endswith("__main__"):  # runs the CLI
            continue
        mods[info.name] = importlib.import_module(info.name)
    return mods


def _names_in(mods) -> set[str]:
    """Module attributes, plus the attributes of classes those modules define."""
    names = set()
    for mod in mods:
        for name, obj in vars(mod).items():
            names.add(name)
            if inspect.isclass(obj) and obj.__module__ == mod.__name__:
                names |= set(vars(obj))
    return names


# Backticked words in architecture.md's module table that are values, keys or foreign names, not msclip code.
NOT_CODE = {"auto", "cpu", "cuda", "cuda:N", "shared", "image", "text", "ln_1", "attn_in", "attn_out", "ln_2",
            "mlp", "weights_only", "no_sync", "_pct", "ModuleDict", "str.format", "LR_SHARE", "WD_SHARE",
            "data", "msclip", "report.md", "study.json"}
# A name documented in one row but defined in another module: (row module, name) -> where it lives.
CROSS_ROW = {("msclip.typed_config", "ModelCfg"): "msclip.config"}


@dataclass
class Row:
    line: int
    modules: list[str]  # dotted module / package names of the first cell
    tokens: list[str]


def architecture_rows() -> list[Row]:
    rows = []
    for n, line in enumerate(ARCH.read_text().splitlines(), 1):
        cells = line.split(" | ")
        if not line.startswith("| `") or len(cells) != 2:
            continue
        first = re.findall(r"`([^`]+)`", cells[0])
        modules = []
        for f in first:
            if f.endswith(".py"):
                modules.append("msclip." + f[:-3].replace("/", "."))
            elif f.endswith("/") and (PKG / f / "__init__.py").exists():
                modules.append("msclip." + f.rstrip("/"))
        rows.append(Row(n, modules, re.findall(r"`([^`]+)`", cells[1])))
    return rows


def test_architecture_table_covers_every_module():
    """Every module and package of src/msclip has its row (a new module needs its line in the table)."""
    documented = {m for r in architecture_rows() for m in r.modules}
    documented |= {m.rsplit(".", 1)[0] for m in documented}
    documented |= {"msclip." + t[:-3] for r in architecture_rows() for t in r.tokens if re.fullmatch(r"\w+\.py", t)}
    missing = []
    for info in pkgutil.iter_modules([str(PKG)], "msclip."):
        if info.name not in documented and info.name not in ("msclip.__main__", "msclip.version"):
            missing.append(info.name)
    assert len(architecture_rows()) >= 25
    assert not missing, f"docs/architecture.md has no row for {missing}"


def test_architecture_first_column_modules_exist():
    bad = []
    for n, line in enumerate(ARCH.read_text().splitlines(), 1):
        if line.startswith("| `"):
            for f in re.findall(r"`([^`]+)`", line.split(" | ")[0]):
                if not _exists(f, [PKG]):
                    bad.append(f"docs/architecture.md:{n}: {f}")
    assert not bad, "\n".join(bad)


def test_architecture_table_names_exist_in_their_modules():
    """Each row's backticked names: a file path exists (in the row's package or the package root), a
    `module.attr` resolves, a bare identifier is an attribute of the row's module (or of a class there; for a
    package row: of one of its modules)."""
    mods = _all_modules()
    bad, checked = [], 0
    for row in architecture_rows():
        row_mods = [m for name, m in mods.items() for r in row.modules if name == r or name.startswith(r + ".")]
        pkg_dirs = [PKG / r[len("msclip."):].replace(".", "/") for r in row.modules]
        pkg_dirs = [d for d in pkg_dirs if d.is_dir()]
        local = _names_in(row_mods)
        for tok in row.tokens:
            tok = tok.removesuffix("()")
            where = f"docs/architecture.md:{row.line}: {tok}"
            if tok in NOT_CODE or tok.startswith(("msclip ", "python ", "make ", "--")) or " " in tok:
                continue
            checked += 1
            if tok.endswith((".py", "/", ".md", ".sh", ".yaml")) or "/" in tok:
                bases = pkg_dirs + [PKG, REPO]
                if not _exists(tok, bases):
                    bad.append(where + " (no such file)")
            elif "." in tok:
                head, attr = tok.split(".", 1)
                cands = [f"{r}.{head}" for r in row.modules] + [f"msclip.{head}"]
                found = any(c in mods and hasattr(mods[c], attr.split(".")[0]) for c in cands)
                found |= head in local and any(hasattr(getattr(m, head, None), attr) for m in row_mods)
                if not found:
                    bad.append(where + " (does not resolve)")
            elif re.fullmatch(r"[A-Za-z_]\w*", tok):
                home = CROSS_ROW.get((row.modules[0] if row.modules else "", tok))
                if not (tok in local or (home and hasattr(mods[home], tok))):
                    bad.append(where + f" (not in {', '.join(row.modules) or 'the row'})")
            else:
                checked -= 1
    assert checked > 60
    assert not bad, "docs/architecture.md names things that do not exist:\n" + "\n".join(bad)


def test_architecture_prose_names_exist():
    """Outside the table: repository paths (relative to the last folder named before them in the same
    paragraph), `Class.method`, the data-flow diagram's classes and the share rule's component names."""
    text = prose(ARCH)
    mods = _all_modules()
    everything = _names_in(mods.values())
    bad = []
    body = "\n".join(ln for ln in text.splitlines() if not ln.startswith("|"))
    for para in body.split("\n\n"):
        last_dir = None
        for tok in re.findall(r"`([^`]+)`", para):
            if re.fullmatch(r"[\w./*-]+", tok) and ("/" in tok or tok.endswith((".py", ".sh", ".yaml"))):
                bases = ([REPO / last_dir] if last_dir else []) + [REPO, PKG]
                if not _exists(tok, bases):
                    bad.append(f"path {tok}")
                if tok.endswith("/"):
                    last_dir = tok if (REPO / tok).is_dir() else last_dir
            elif re.fullmatch(r"[A-Za-z_]\w*\.[A-Za-z_]\w*", tok) and tok[0].isupper():
                cls, attr = tok.split(".")
                if not any(hasattr(getattr(m, cls, None), attr) for m in mods.values()):
                    bad.append(tok)
            elif re.fullmatch(r"[a-z]+_[a-z_]+", tok) and tok not in ("__name__",):
                if tok not in everything:
                    bad.append(tok)
    # the data-flow diagram
    flow = next(b for b in code_blocks(ARCH) if "ImageTower" in "\n".join(b.lines))
    for name in re.findall(r"\b([A-Z][a-z]+[A-Z]\w*(?:\.\w+)?|Trunk)\b", "\n".join(flow.lines)):
        cls, _, attr = name.partition(".")
        if not any(getattr(m, cls, None) is not None and (not attr or hasattr(getattr(m, cls), attr))
                   for m in mods.values()):
            bad.append(f"data flow: {name}")
    # share components and aliases
    from msclip.config import COMPONENT_ALIASES, COMPONENTS

    m = re.search(r"`components` from `([^`]+)` or the aliases `([^`]+)`", ARCH.read_text())
    assert m, "the share-rule sentence moved"
    if tuple(m.group(1).split()) != tuple(COMPONENTS):
        bad.append(f"components {m.group(1)} != {COMPONENTS}")
    if not set(m.group(2).split()) <= set(COMPONENT_ALIASES) | {"all"}:
        bad.append(f"aliases {m.group(2)}")
    assert not bad, "docs/architecture.md:\n" + "\n".join(bad)


# Backticked code names in the docs that belong to other libraries or are keys / file fields, not msclip code.
FOREIGN = {"IndexFlatIP", "IndexIVFFlat", "ImageFolder", "DataParallel"}  # faiss, torchvision, torch


def code_name_refs() -> list[tuple[str, str]]:
    """Backticked identifiers that look like code: CamelCase classes, `Class.attr`, and calls `name(...)`."""
    refs = []
    pat = re.compile(r"^([A-Z][a-z0-9]+[A-Z]\w*|[A-Z]{2,}[a-z]\w*|[A-Z]+[a-z]\w*\.[a-z_]\w*|[a-z_]\w*_\w*\(.*\)(?:\.\w+)*)$")
    for doc in DOC_FILES:
        if doc == ARCH:
            continue
        for s in spans(doc):
            if pat.match(s.text):
                name = re.sub(r"\(.*", "", s.text)  # a call: its callee
                refs.append((f"{rel(doc)}:{s.line}", name))
    return refs


def test_every_backticked_code_name_exists_in_msclip():
    mods = _all_modules()
    everything = _names_in(mods.values())
    refs = code_name_refs()
    bad = []
    for where, name in refs:
        head, *rest = name.split(".")
        if name in FOREIGN or head in FOREIGN:
            continue
        if head not in everything:
            bad.append(f"{where}: {name}")
        elif rest and not any(hasattr(getattr(m, head, None), rest[0]) for m in mods.values()):
            bad.append(f"{where}: {name}")
    assert len(refs) >= 15
    assert not bad, "docs name code that msclip does not have:\n" + "\n".join(bad)


def test_slurm_rank_table_variables_are_read_by_world_info():
    """docs/slurm.md's launcher table: every environment variable it names is one world_info() reads."""
    source = (PKG / "train" / "distributed.py").read_text()
    rows = [ln for ln in (REPO / "docs" / "slurm.md").read_text().splitlines()
            if ln.startswith("| torchrun") or ln.startswith("| plain `srun`")]
    assert len(rows) == 2
    names = {v for row in rows for v in re.findall(r"`([A-Z][A-Z0-9_]+)`", row)}
    assert {"RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"} <= names
    missing = sorted(v for v in names if f'"{v}"' not in source and f"'{v}'" not in source)
    assert not missing, f"docs/slurm.md names variables msclip.train.distributed does not read: {missing}"


def test_synopsis_choices_are_the_parsers_choices():
    """A usage line's `[--opt a|b]` lists only values the option accepts (its argparse choices), and
    zeroshot.md's `--templates` sets are msclip's builtin template sets."""
    from msclip.eval.templates import BUILTIN_TEMPLATE_SETS

    subs = subparsers()
    bad, n = [], 0
    for i in all_invocations():
        if not i.synopsis or i.command not in subs:
            continue
        actions = subs[i.command]._option_string_actions
        for flag, value in zip(i.args, i.args[1:]):
            flag, value = flag.lstrip("[("), value.rstrip("])")
            if flag not in actions or "|" not in value:
                continue
            values = [v for v in value.split("|") if v and not v.isupper() and v != "..."]
            if flag == "--templates" and i.command == "zeroshot":
                n += 1
                bad += [f"{i.where}: --templates {v}" for v in values if v not in BUILTIN_TEMPLATE_SETS]
            elif actions[flag].choices is not None:
                n += 1
                bad += [f"{i.where}: {flag} {v}" for v in values if v not in actions[flag].choices]
    assert n >= 8
    assert not bad, "usage lines show values the options refuse:\n" + "\n".join(bad)


def test_zeroshot_page_flags_exist():
    """docs/zeroshot.md's backticked flags belong to msclip zeroshot / embed or to tools/eval_zeroshot.py."""
    subs = subparsers()
    known = set(subs["zeroshot"]._option_string_actions) | set(subs["embed"]._option_string_actions)
    known |= _literal_flags(REPO / "tools" / "eval_zeroshot.py")
    bad = [f"docs/zeroshot.md:{s.line}: {f}" for s in spans(REPO / "docs" / "zeroshot.md")
           for f in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", s.text) if f not in known]
    assert not bad, "\n".join(bad)
