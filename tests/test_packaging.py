"""Packaging: every package parclip's code imports is declared in pyproject.toml, so `pip install parclip` (or one
of its extras) brings it, not the accident of another package depending on it."""

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "parclip"


def _norm(name: str) -> str:
    """A distribution name in PEP 503's normal form (case, '-', '_' and '.' folded)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def third_party_imports(root: Path) -> dict[str, str]:
    """{top-level module: first file importing it} for every absolute import that is neither the standard library
    nor parclip itself, in the Python files under `root` (imports inside functions and try blocks included)."""
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("parclip", "__future__"):
                    found.setdefault(top, path.name)
    return found


def declared_distributions() -> set[str]:
    """Normalised names of pyproject.toml's dependencies and of every optional extra's."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = list(project["dependencies"]) + [s for extra in project.get("optional-dependencies", {}).values()
                                              for s in extra]
    return {_norm(re.split(r"[\s<>=!~;\[]", s, maxsplit=1)[0]) for s in specs}


def test_every_imported_package_is_declared():
    owners = importlib.metadata.packages_distributions()
    declared = declared_distributions()
    missing = {}
    for module, where in third_party_imports(SRC).items():
        dists = {_norm(d) for d in owners.get(module, [module])}
        if not dists & declared:
            missing[module] = f"{'/'.join(sorted(dists))} (imported in {where})"
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_the_checker_sees_undeclared_imports(tmp_path):
    (tmp_path / "m.py").write_text("import os\nimport braceexpand\nfrom huggingface_hub import constants\n"
                                   "def f():\n    try:\n        import nltk.data\n    except ImportError:\n        pass\n")
    assert set(third_party_imports(tmp_path)) == {"braceexpand", "huggingface_hub", "nltk"}
