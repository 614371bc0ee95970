"""What to claim, and the checks a caller's arguments go through."""

from __future__ import annotations

import math
from dataclasses import dataclass

from imglock.errors import UsageError
from imglock.lock.protocol import Mode


@dataclass(frozen=True)
class ClaimSpec:
    """One image to claim, and how."""

    path: str
    mode: Mode = Mode.EXCLUSIVE
    #: None probes the format; a name turns probing off.
    format: str | None = None
    #: Follow the backing file the image's header names (False when a QEMU
    #: command line names the backing node itself, or none).
    backing: bool = True
    #: Likewise for a qcow2 external data file.
    data_file: bool = True
    #: What the file is to the VM: "top", or "backing"/"data-file" for a node
    #: a QEMU command line names itself (see chain.ChainLink.role).
    role: str = "top"


def as_seconds(name: str, value: object) -> float:
    """*value* as a number of seconds for argument *name* (``inf``: forever).

    Raises UsageError (a ValueError) for anything else: a string, a bool,
    NaN, a negative number.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(None, f"{name} must be a number of seconds, not {value!r}")
    number = float(value)
    if math.isnan(number) or number < 0:
        raise UsageError(None, f"{name} must be a number of seconds >= 0, not {value!r}")
    return number


def as_mode(mode: Mode | str) -> Mode:
    """*mode* as a :class:`Mode`, from its name (``"exclusive"``...) or itself."""
    try:
        return Mode(mode)
    except ValueError:
        names = ", ".join(m.value for m in Mode)
        raise UsageError(None, f"unknown claim mode {mode!r} ({names})") from None
