"""One place that writes a benchmark's section into docs/benchmarks.md, between its markers."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(mark: str, lines: list[str]) -> str:
    """Replace the text between the two `mark` lines (or append it); returns the section."""
    section = "\n".join([mark, *lines, mark]) + "\n"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
    if mark in text:
        start, end = text.index(mark), text.rindex(mark) + len(mark) + 1
        text = text[:start] + section + text[end:]
    else:
        text += "\n" + section
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    return section
