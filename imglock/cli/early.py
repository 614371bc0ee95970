"""Work the ``imglock`` command starts before it imports anything else.

``imglock status`` reads /proc/locks, and the first read in a process waits
about 10 ms in the kernel for an RCU grace period (see
:mod:`imglock.lock.proclocks`).  Started here, before click is imported,
that wait overlaps start-up instead of adding to it.
"""

from __future__ import annotations

import sys

from imglock.lock.proclocks import FlockTable


def _subcommand(argv: list[str]) -> str | None:
    return next((arg for arg in argv[1:] if not arg.startswith("-")), None)


_flocks: FlockTable | None = (
    FlockTable(background=True) if _subcommand(sys.argv) == "status" else None
)


def take_flocks() -> FlockTable:
    """The /proc/locks read started at start-up, once; later callers get a fresh one."""
    global _flocks
    flocks, _flocks = _flocks, None
    return flocks or FlockTable(background=True)
