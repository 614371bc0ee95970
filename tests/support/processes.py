"""Real processes seen from a test: their state and children, a bounded wait for a
condition, a hold of one."""

from __future__ import annotations

import os
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


def poll_until(
    predicate: Callable[[], T | None], *, timeout: float, interval: float = 0.01
) -> T | None:
    """Poll *predicate* until it is true: what it said, or None after *timeout* seconds.

    For a wait that may end either way (a process given a moment to exit
    before it is killed); a test that needs the condition uses :func:`wait_until`.
    """
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)
    return value


def wait_until(
    predicate: Callable[[], T | None],
    *,
    what: str,
    timeout: float = TIMEOUT,
    interval: float = 0.01,
) -> T:
    """Poll *predicate* until it is true, and return what it said.

    Fail the test, saying *what* was awaited, after *timeout* seconds.  A
    predicate may itself fail the test at once (an assert that the process
    awaited is still alive), rather than leave it to wait out the timeout.
    """
    value = poll_until(predicate, timeout=timeout, interval=interval)
    if value is None:
        pytest.fail(f"not within {timeout} s: {what}")
    return value


def holds_for(
    predicate: Callable[[], object], seconds: float, *, what: str, interval: float = 0.01
) -> None:
    """Poll *predicate* for *seconds*: "nothing happens for that long", observed.

    Fail the test, saying *what* should have stayed true, as soon as it is
    not; the predicate is asked once more at the end, so it has held over
    the whole of *seconds*.
    """
    deadline = time.monotonic() + seconds
    while True:
        if not predicate():
            pytest.fail(f"no longer after {seconds - (deadline - time.monotonic()):.2f} s: {what}")
        if time.monotonic() >= deadline:
            return
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def children(pid: int) -> list[int]:
    """The child processes of *pid* (none once it is gone)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return []


def process_tree(pid: int) -> list[int]:
    """*pid* and all its descendants, parents first."""
    return [pid, *[q for child in children(pid) for q in process_tree(child)]]


def describe_processes(pid: int) -> str:
    """Each process under *pid* with its state and what it waits in: why a QEMU is silent."""

    def read(path: str) -> str:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return "?"

    seen = []
    for each in process_tree(pid):
        threads = sorted(os.listdir(f"/proc/{each}/task")) if alive(each) else []
        waits = ", ".join(
            f"{tid} {state(int(tid))} {read(f'/proc/{each}/task/{tid}/wchan') or '-'}"
            for tid in threads
        )
        seen.append(f"{each} {read(f'/proc/{each}/comm')} [{waits}]")
    return "; ".join(seen)
