"""The layout is the architecture (docs/architecture.md): imports point one way, from the commands down to the
utilities, and the 0.1 import paths shown in earlier READMEs keep working."""
import ast
import re
import tokenize
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "parclip"

# lower layers never import higher ones; a module may import its own folder and anything in a lower layer
LAYERS = {
    "utils": 0,
    "data": 1, "models": 1, "objectives": 1,
    "attacks": 2, "defences": 2, "synth": 2,  # synth: generators of synthetic pairs (over data, models)
    "evaluation": 3, "config": 3,  # config fills a run's defaults from its defence's recipe
    "runs": 3,  # run directories: logs written by train, listed by the cli
    "train": 4,
    "scan": 4,  # trigger-agnostic backdoor scan: the trigger library and zero-shot evaluation, no training
    "protocol": 5,  # the benchmark's protocol: stages that train and measure
    "demo": 6,
    "cli": 7, "__main__": 8, "triggers": 7, "evaluate": 7,  # triggers.py / evaluate.py: re-exports of 0.1 paths
}


def _top(module_path: Path) -> str:
    rel = module_path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imported_tops(path: Path) -> set[str]:
    """First-level parclip names a file imports (absolute `parclip.x` or relative `..x` / `.x` at the top level)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    depth = len(path.relative_to(PKG).parts) - 1  # 0 for modules directly in parclip/
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("parclip.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.startswith("parclip."):
                out.add(node.module.split(".")[1])
            elif node.level == 0 and node.module == "parclip":
                out |= {a.name for a in node.names}
            elif node.level > depth:  # climbs to parclip/ itself
                climbed = node.level - depth - 1
                assert climbed == 0, f"{path}: relative import above the package"
                out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return out - {"__version__"}


MODULES = sorted(p for p in PKG.rglob("*.py") if p.name != "__init__.py" or p.parent != PKG)


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PKG)) for p in MODULES])
def test_imports_point_down(path):
    me = _top(path)
    assert me in LAYERS, f"{path.relative_to(PKG)}: new top-level module or folder; give it a layer in LAYERS"
    for other in _imported_tops(path) - {me}:
        assert other in LAYERS, f"{path.relative_to(PKG)} imports unknown parclip.{other}"
        assert LAYERS[other] < LAYERS[me], (f"{path.relative_to(PKG)} (layer {LAYERS[me]}) imports parclip.{other} "
                                            f"(layer {LAYERS[other]}): imports must point down")


def test_the_checker_sees_relative_and_absolute_imports():
    """Guard against a checker that passes because it reads nothing."""
    assert {"data", "utils", "objectives", "models"} <= _imported_tops(PKG / "attacks" / "patch_opt.py")
    assert {"attacks", "data", "models"} <= _imported_tops(PKG / "evaluation" / "zero_shot.py")


def test_top_level_names_resolve():
    from parclip import build_triggers, create_model, evaluate, get_trigger, par_loss
    from parclip.attacks import triggers
    from parclip.evaluation import evaluate as evaluate_fn

    assert get_trigger is triggers.get_trigger and build_triggers is triggers.build_triggers
    assert evaluate is evaluate_fn and callable(create_model) and callable(par_loss)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = ("parclip", *rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_imports(path: Path, known: set[str]) -> set[str]:
    """Full names of the parclip modules a file imports, anywhere in it (lazy imports inside functions count: a
    circle through them is still a circle)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("parclip")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if not base.startswith("parclip"):
                continue
            subs = {f"{base}.{a.name}" for a in node.names} & known  # `from pkg import module`
            out |= subs or {base}
    return {m for m in out if m in known and m != me}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_anywhere():
    """Between folders the layers forbid circles; inside a folder (data/folder.py <-> data/shards.py) only this
    catches them. A package's __init__ counts as a module: a submodule importing its own package is a circle."""
    files = sorted(PKG.rglob("*.py"))
    known = {_module_name(p) for p in files}
    graph = {_module_name(p): _module_imports(p, known) for p in files}
    assert _cycles(graph) == []


def test_the_circle_finder_finds_circles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    files = sorted(PKG.rglob("*.py"))
    known = {_module_name(p) for p in files}
    assert "parclip.data.captions" in _module_imports(PKG / "data" / "folder.py", known)  # relative, one level
    assert "parclip.utils.files" in _module_imports(PKG / "train.py", known)  # absolute


MAX_CLI_MODULE_LINES = 400


def test_each_command_module_of_cli_stands_on_common_alone():
    """cli/ is one module per command (catalogue.py: the listing commands) over cli/common.py, the arguments and
    helpers several commands share: a command's module imports no other command's module (nor the package), so that
    changing `parclip scan` means reading cli/scan.py and common.py; only cli/__init__.py gathers them into the parser,
    and every module stays short enough to read."""
    files = sorted(PKG.rglob("*.py"))
    known = {_module_name(p) for p in files}
    cli = PKG / "cli"
    modules = sorted(cli.glob("*.py"))
    assert {"__init__.py", "__main__.py", "common.py", "scan.py", "train.py"} <= {p.name for p in modules}
    for path in modules:
        inside = {m for m in _module_imports(path, known) if m == "parclip.cli" or m.startswith("parclip.cli.")}
        allowed = {"__init__.py": inside, "__main__.py": {"parclip.cli"}, "common.py": set()}
        assert inside <= allowed.get(path.name, {"parclip.cli.common"}), f"cli/{path.name} imports {sorted(inside)}"
        n = len(path.read_text(encoding="utf-8").splitlines())
        assert n <= MAX_CLI_MODULE_LINES, f"cli/{path.name}: {n} lines; split it"
    assert "parclip.cli.common" in _module_imports(cli / "scan.py", known)  # the check reads the imports


# Calls that write a file; each must write the temporary path of utils.files (replacing / atomic_write), whose
# name is `tmp` throughout the package, or carry `# not-atomic: <reason>` on its line.
_WRITERS = {"write_text", "write_bytes", "savefig", "save", "save_file", "copyfile", "copy2", "TarWriter"}


def _unsafe_writes(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    found = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        mode = next((a.value for a in node.args[1:2] if isinstance(a, ast.Constant)), None)
        mode = next((k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)),
                    mode)
        if name in {"write_text", "write_bytes"} and not isinstance(f, ast.Attribute):
            continue  # utils.files.write_text: the atomic writer itself
        writes = name in _WRITERS or (name == "open" and isinstance(mode, str) and any(c in mode for c in "wx+"))
        if writes and "tmp" not in ast.unparse(node) and "# not-atomic:" not in lines[node.lineno - 1]:
            found.append(f"{path.relative_to(PKG)}:{node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_every_write_goes_through_the_atomic_writer():
    """A file written straight to its final name is torn when the process dies mid-write; parclip writes a
    temporary file and renames it (utils/files.py). Append-only logs (mode "a") are allowed."""
    offenders = [w for p in sorted(PKG.rglob("*.py")) if p != PKG / "utils" / "files.py" for w in _unsafe_writes(p)]
    assert offenders == []


def test_the_write_checker_sees_writes(tmp_path):
    probe = PKG / "_probe_writes.py"
    try:
        probe.write_text("import shutil\nopen(p, 'w')\nP.write_text('x')\nfig.savefig(p)\n"
                         "atomic_write(p, lambda tmp: fig.savefig(tmp))\nopen(p, 'a')\nopen(p)\n"
                         "img.save(p)  # not-atomic: a scratch folder\n")
        assert [w.split(": ", 1)[0] for w in _unsafe_writes(probe)] == ["_probe_writes.py:2", "_probe_writes.py:3",
                                                                        "_probe_writes.py:4"]
    finally:
        probe.unlink()


def test_one_atomic_writer():
    """Temp-file-then-rename lives in utils/files.py only; every other writer calls it."""
    offenders = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
                 if p != PKG / "utils" / "files.py" and any(s in p.read_text(encoding="utf-8")
                                                            for s in ("os.replace(", "os.rename(", "mkstemp("))]
    assert offenders == []


def test_one_bool_is_not_an_int_check():
    """Number checks go through utils/checks.py instead of repeating the idiom."""
    offenders = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
                 if p != PKG / "utils" / "checks.py" and "isinstance(" in (t := p.read_text(encoding="utf-8"))
                 and ", bool) or not isinstance(" in t]
    assert offenders == []


PRIVATE_NOTES = re.compile(r"\b(?:par|baselines|ecosystem|data)\.md\b|\bD\d{1,2}\b")
def test_comments_cite_only_what_a_user_can_open():
    """Comments and strings (docstrings included) cite a paper or a docs/ page, never the project's private notes
    (par.md, baselines.md, ecosystem.md, data.md) or their decision ids (D15, D21, ...)."""
    assert all(PRIVATE_NOTES.search(s) for s in ("par.md §3.4", "baselines.md", "rewritten per D21"))
    assert not any(PRIVATE_NOTES.search(s) for s in ("2D", "a 3D grid", "D_img", "metadata.md", "D123"))
    root = PKG.parents[1]
    text_tokens = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
    found = []
    for path in sorted([*PKG.rglob("*.py"), *(root / "benchmarks").rglob("*.py")]):
        rel = path.relative_to(root).as_posix()
        with path.open("rb") as f:
            found += [f"{rel}:{tok.start[0] + tok.string.count(chr(10), 0, m.start())}: {m.group()}"
                      for tok in tokenize.tokenize(f.readline)
                      if tok.type in text_tokens and (m := PRIVATE_NOTES.search(tok.string))]
    assert found == [], "cite a paper (arXiv id) or a docs/ page instead:\n" + "\n".join(found)


MAX_FUNCTION_LINES = 100


def _long_functions(source: str, where: str, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``where:line: name (n lines)`` for every function or method in ``source`` longer than ``limit`` lines
    (``end_lineno - lineno + 1``: decorators not counted; docstring and nested functions counted)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > limit:
                found.append(f"{where}:{node.lineno}: {node.name} ({n} lines)")
    return found


def test_no_function_over_100_lines():
    """A function longer than a screenful does several things; split it into named steps read top to bottom."""
    offenders = [f for p in sorted(PKG.rglob("*.py"))
                 for f in _long_functions(p.read_text(encoding="utf-8"), str(p.relative_to(PKG)))]
    assert offenders == [], f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(offenders)


def test_the_length_checker_sees_long_functions():
    body = [f"x{i} = {i}" for i in range(99)]
    short = "\n".join(["def short():", *("    " + b for b in body)])                      # lines 1-100: allowed
    long = "\n".join(["class C:", "    async def long(self):", "        pass", *("        " + b for b in body)])
    assert _long_functions(short, "m.py") == []
    assert _long_functions(short + "\n" + long, "m.py") == ["m.py:102: long (101 lines)"]  # a method, 101 lines
