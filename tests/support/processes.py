"""Looking at real processes from a test: their state, and waiting (bounded) for a condition."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")

#: Seconds a test waits for a process to get somewhere, unless told otherwise.
TIMEOUT = 10.0


def state(pid: int) -> str | None:
    """The process state letter (R, S, T, Z...), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def alive(pid: int) -> bool:
    """Whether *pid* runs (a zombie does not: it has let go of everything)."""
    return state(pid) not in (None, "Z")


def wait_until(predicate: Callable[[], T], *, what: str, timeout: float = TIMEOUT) -> T:
    """Poll *predicate* until it is true, and return what it said.

    Fail the test, saying *what* was awaited, after *timeout* seconds.
    """
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.01)
    return value
