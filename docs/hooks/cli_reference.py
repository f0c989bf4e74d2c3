"""MkDocs hook: fills the marker in docs/commands.md with every command's ``--help``, generated at build time from
``parclip.cli.build_parser()``, so the command reference is written once, in the parser.

It walks the parser's sub-commands recursively (``data convert``, ``plot embeddings``, ...) through argparse's
``_SubParsersAction.choices`` only, and formats each help at a fixed width so the page does not depend on the
terminal that builds it.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

MARKER = "<!-- cli-reference -->"
PAGE = "commands.md"
WIDTH = "100"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(name, parser) of each sub-command, in the order they were added; an alias is listed once, under its name."""
    seen: set[int] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    yield name, sub


def walk(parser: argparse.ArgumentParser,
         path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """The parser itself, then every sub-command depth first:
    ((), parclip), (('data',), ...), (('data', 'check'), ...), ..."""
    yield path, parser
    for name, sub in _subcommands(parser):
        yield from walk(sub, (*path, name))


def _help(parser: argparse.ArgumentParser) -> str:
    saved = {k: os.environ.get(k) for k in ("COLUMNS", "NO_COLOR")}
    os.environ.update(COLUMNS=WIDTH, NO_COLOR="1")  # argparse reads the width when it makes a formatter
    try:
        return ANSI.sub("", parser.format_help()).rstrip() + "\n"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def reference_markdown(parser: argparse.ArgumentParser) -> str:
    """One heading and one code block per command: `### parclip data`, `#### parclip data convert`, ..."""
    parts = []
    for path, sub in walk(parser):
        level = "#" * min(3 + max(len(path) - 1, 0), 6)
        parts.append(f"{level} `{' '.join(('parclip', *path))}`\n\n```text\n{_help(sub)}```\n")
    return "\n".join(parts)


def _build_parser(repo: Path) -> argparse.ArgumentParser:
    src = str(repo / "src")
    if src not in sys.path:
        sys.path.insert(0, src)  # document this checkout's CLI, not another installed copy
    from parclip.cli import build_parser

    return build_parser()


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"docs/{PAGE} lost its marker {MARKER}: the command reference has nowhere to go")
    repo = Path(config["config_file_path"]).resolve().parent
    return markdown.replace(MARKER, reference_markdown(_build_parser(repo)))
