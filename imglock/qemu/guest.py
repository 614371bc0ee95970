"""The name of the guest a QEMU runs, read from its command line as ``status`` shows it.

``-name guest=NAME,debug-threads=on`` (libvirt's form) or ``-name NAME``:
QEMU's option has ``guest`` as its implied first key, and ``,,`` stands for
a comma inside a value.  Command lines reach ``status`` as one string, its
arguments joined by spaces (holder records, /proc): a name is read up to
the next space.
"""

from __future__ import annotations

import itertools
from typing import Final

#: The option, as QEMU takes it with one dash or two.
NAME_OPTIONS: Final = frozenset({"-name", "--name"})


def guest_name(command: str | None) -> str | None:
    """The guest's name in a QEMU *command* line, or None when it names none."""
    if not command:
        return None
    words = command.split(" ")
    for option, value in itertools.pairwise(words):
        if option in NAME_OPTIONS:
            return _guest_of(value)
    return None


def _guest_of(value: str) -> str | None:
    """The ``guest`` of a ``-name`` value: its first element without a key, or ``guest=``."""
    # Split on single commas only: ",," is a comma inside a value.
    parts = value.replace(",,", "\0").split(",")
    for n, part in enumerate(parts):
        key, sep, rest = part.partition("=")
        if sep and key == "guest":
            return rest.replace("\0", ",") or None
        if not sep and n == 0:
            return part.replace("\0", ",") or None
    return None
