"""The documentation: the MkDocs site (mkdocs.yml, docs/) builds with --strict, its command reference is every
command's --help from the parser, and the README stays a five-minute read that starts with the set-up commands CI
runs."""
import argparse
import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from parclip.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The README's first two commands, byte for byte: the second is what .ci/run runs.
DEMO_LINE = ("bash scripts/setup.sh && .venv/bin/parclip demo                  "
             "# set up, then run the demo (minutes on 2 CPU cores)")
TEST_LINE = ("bash scripts/setup.sh && .venv/bin/python -m pytest -q           "
             "# set up, then run every test (CI runs exactly this)")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: sub for a in parser._subparsers._group_actions for name, sub in a.choices.items()}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    had_site = (ROOT / "site").exists()
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (ROOT / "site").exists() == had_site, "the build wrote into the repository"
    return out


def _page(site: Path, md: str) -> str:
    """The built HTML of docs/<md> (MkDocs' directory URLs: x.md -> x/index.html, index.md -> index.html)."""
    stem = md.removesuffix(".md")
    return (site / ("index.html" if stem == "index" else f"{stem}/index.html")).read_text(encoding="utf-8")


def test_the_command_reference_is_every_commands_help(site):
    text = html.unescape(re.sub(r"<[^>]+>", "", _page(site, "commands.md")))
    assert "<!-- cli-reference -->" not in _page(site, "commands.md")
    parser = build_parser()
    commands = _subcommands(parser)
    assert {"demo", "train", "eval", "scan", "poison", "data"} <= set(commands)
    for name, sub in commands.items():
        assert f"usage: parclip {name}" in text, name
        for action in sub._subparsers._group_actions if sub._subparsers else ():
            for sub_name in action.choices:  # sub-actions: data convert, plot embeddings, ...
                assert f"usage: parclip {name} {sub_name}" in text, (name, sub_name)
    train_flags = {s for a in commands["train"]._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
    assert {"--tau", "--accum-freq", "--lr-decay-ratio", "--objective"} <= train_flags
    missing = sorted(f for f in train_flags if f not in text)
    assert not missing, f"train's --help on the site lacks {missing}"


def test_the_readme_is_short_and_starts_with_the_set_up_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines: move reference material to docs/"
    assert lines[:6] == ["# parclip", "", "```bash", DEMO_LINE, TEST_LINE, "```"]
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln and not ln.startswith(("#", "set ", "cd "))]
    assert TEST_LINE.split("#")[0].strip() == ci[-1].strip(), ".ci/run no longer runs the README's test command"


def test_the_readmes_links_into_docs_resolve(site):
    """Every relative link of the README names a file of the repository, and an anchor into a docs page exists on
    the built page (MkDocs and GitHub make the same ids from a heading)."""
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text(encoding="utf-8"))
    local = [ln for ln in links if not re.match(r"[a-z]+:", ln)]
    assert sum(ln.startswith("docs/") for ln in local) >= 20
    for link in local:
        path, _, anchor = link.partition("#")
        assert (ROOT / path).exists(), link
        if anchor:
            assert path.startswith("docs/") and path.endswith(".md"), link
            assert f'id="{anchor}"' in _page(site, path.removeprefix("docs/")), link
