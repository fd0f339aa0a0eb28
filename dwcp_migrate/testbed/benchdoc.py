"""docs/BENCHMARKS.md is shared by several benchmarks: each owns one section between its
markers (``<!-- NAME:start -->`` ... ``<!-- NAME:end -->``) and rewrites only that."""

from __future__ import annotations

from pathlib import Path

from dwcp_migrate.paths import REPO_ROOT

BENCHMARKS_DOC = REPO_ROOT / "docs" / "BENCHMARKS.md"


def write_section(name: str, section: str, doc: Path = BENCHMARKS_DOC) -> None:
    """Replace the section ``name`` (or append it) with ``section``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{start}\n{section.rstrip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
