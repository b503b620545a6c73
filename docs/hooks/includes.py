"""mkdocs hook: pages whose text lives elsewhere in the repository, included at build time.

`<!-- include-file: PATH -->` puts a Markdown file of the repository in its place (the
benchmark results stay in benchmarks/RESULTS.md, beside the scripts that measure them);
`<!-- include-docstring: PATH -->` puts a Python module's docstring (the sandbox's list of
what it protects against is kept with its code). One source each, so they cannot drift.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

from mkdocs.exceptions import PluginError

_INCLUDE = re.compile(r"<!-- include-(file|docstring): (\S+) -->")
_RST_LITERAL = re.compile(r"``([^`]+)``")


def _docstring_markdown(path: Path) -> str:
    # Read without importing: a module's imports (here the sandbox's system-call bindings)
    # have no business running during a docs build.
    docstring = ast.get_docstring(ast.parse(path.read_text(), filename=str(path)))
    if not docstring:
        raise PluginError(f"{path}: has no module docstring to include")
    return _RST_LITERAL.sub(r"`\1`", docstring)


def _file_markdown(path: Path, page_dir: Path) -> str:
    """The file's text with its relative links re-pointed from its own folder to the page's."""
    text = path.read_text()
    source_dir = path.parent

    def repoint(match: re.Match) -> str:
        target = match.group(2)
        if re.match(r"[a-z]+:|#|/", target):
            return match.group(0)
        moved = os.path.relpath(os.path.normpath(source_dir / target), page_dir)
        return f"{match.group(1)}({Path(moved).as_posix()})"

    return re.sub(r"(!?\[[^\]]*\])\(([^)\s]+)\)", repoint, text)


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    root = Path(config.config_file_path).resolve().parent
    page_dir = (Path(config.docs_dir) / page.file.src_uri).resolve().parent

    def include(match: re.Match) -> str:
        kind, relative = match.groups()
        path = root / relative
        if not path.is_file():
            raise PluginError(f"docs/{page.file.src_uri}: includes {relative}, which does not exist")
        return _docstring_markdown(path) if kind == "docstring" else _file_markdown(path, page_dir)

    return _INCLUDE.sub(include, markdown)
