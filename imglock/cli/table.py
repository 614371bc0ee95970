"""Plain-text tables for the CLI, aligned like lslocks(8) output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

#: Control characters (C0, DEL, C1) shown as escapes: cells carry names read
#: from images and /proc, and a newline or terminal escape in one must not
#: break the table or reach the terminal.
_VISIBLE: Final = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def cell(text: str | None, limit: int | None = None) -> str:
    """*text* as a table shows it: "-" for nothing, controls escaped, cut at *limit*."""
    if not text:
        return "-"
    text = text.translate(_VISIBLE)
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
