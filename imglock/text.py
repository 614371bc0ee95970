"""Text meant for a terminal, with nothing in it that a terminal would obey.

Names shown by imglock come from others: file names in a datastore,
backing file names in image headers, command lines from /proc and from
holder records.  A newline in one would forge a line of output, and a
control character would reach the terminal as a command (``ESC [ 2 J``
clears the screen, an OSC sets the window title, the single byte 0x9b is
an 8-bit CSI on terminals that take C1 codes).  So every line of text
output and every error line passes through :func:`visible`:

* C0 controls (0x00-0x1f), DEL (0x7f) and C1 controls (U+0080-U+009F) are
  shown as ``\\xNN``;
* a byte that is not part of a UTF-8 character (kept in a name by
  ``surrogateescape`` as U+DC80-U+DCFF) is shown as ``\\xNN`` too, and any
  other lone surrogate as ``\\uNNNN``;

so what is written is always valid UTF-8, one line per line.  JSON output
escapes C0 controls itself; written without ``ensure_ascii``, it still needs
DEL and C1 escaped (:func:`json_visible`).
"""

from __future__ import annotations

from typing import Final

#: The code points ``surrogateescape`` turns bytes 0x80-0xff into.
_ESCAPED_BYTES: Final = range(0xDC80, 0xDD00)


def _invisible(char: str) -> bool:
    """A C0 control, DEL, a C1 control, or a lone surrogate (never valid UTF-8)."""
    code = ord(char)
    return code < 0x20 or 0x7F <= code < 0xA0 or 0xD800 <= code < 0xE000


def _shown(char: str) -> str:
    code = ord(char)
    if code in _ESCAPED_BYTES:
        return f"\\x{code - 0xDC00:02x}"
    if code >= 0xD800:
        return f"\\u{code:04x}"
    return f"\\x{code:02x}"


def visible(text: str) -> str:
    """*text* with every control character and undecodable byte shown as an escape."""
    if text.isprintable():  # no control, no surrogate: the common case, at C speed
        return text
    return "".join(_shown(char) if _invisible(char) else char for char in text)


#: DEL and C1 controls as JSON string escapes (they can only occur inside strings).
_JSON_VISIBLE: Final = {code: f"\\u{code:04x}" for code in range(0x7F, 0xA0)}


def json_visible(text: str) -> str:
    """JSON text written with ``ensure_ascii=False``, DEL and C1 controls escaped as ``\\u00NN``."""
    return text.translate(_JSON_VISIBLE)


def visible_lines(lines: list[str]) -> str:
    """*lines* made :func:`visible` one by one, then joined: only their own newlines remain."""
    return "\n".join(map(visible, lines))
