"""Plain-text tables for the CLI, aligned like lslocks(8) output."""

from __future__ import annotations

from collections.abc import Sequence

from imglock.text import visible


def cell(text: str | None, limit: int | None = None) -> str:
    """*text* as a table shows it: "-" for nothing, controls escaped, cut at *limit*.

    Cells carry names read from images, records and /proc: a newline or a
    terminal escape in one must neither break the table nor reach the terminal.
    """
    if not text:
        return "-"
    text = visible(text)
    if limit is not None and len(text) > limit:
        return text[: limit - 3] + "..."
    return text


def render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    table = [list(header), *map(list, rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for row in table:
        cells = [text.ljust(width) for text, width in zip(row[:-1], widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)
