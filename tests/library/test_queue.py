"""The queue: order whatever the clocks say, crashed waiters gone with their descriptors.

Queue places are read locks whose offsets pack an arrival ticket; these
tests take them through real descriptors (several open file descriptions
of one image in this process are as good as several processes for the
lock manager) and with real waiting processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ENV, SpawnRival
from processes import wait_until

import imglock
from imglock.lock import fcntl_locks, protocol
from imglock.lock.identity import Owner
from imglock.lock.protocol import TICKET_MAX, Mode


@pytest.fixture
def descriptors() -> Iterator[list[int]]:
    """Open file descriptions a test makes (with _fd), closed afterwards."""
    opened: list[int] = []
    yield opened
    for fd in opened:
        os.close(fd)


def _fd(raw_image: Path, opened: list[int]) -> int:
    fd = os.open(raw_image, os.O_RDONLY | os.O_CLOEXEC)
    opened.append(fd)
    return fd


def test_a_waiter_whose_clock_is_ahead_keeps_later_arrivals_behind_it(
    raw_image: Path, descriptors: list[int]
) -> None:
    """A host whose clock runs a day ahead takes a late ticket; those after it queue after it."""
    ahead_fd = _fd(raw_image, descriptors)
    future = (protocol.ticket_now() + 86_400) & TICKET_MAX
    offset = protocol.queue_byte(future, Mode.EXCLUSIVE, Owner.current(7))
    assert fcntl_locks.try_read_lock(ahead_fd, offset, 1, str(raw_image))
    later = protocol.enqueue(_fd(raw_image, descriptors), str(raw_image), Mode.SHARED)
    assert later.offset > offset
    (first, second) = protocol.waiters(_fd(raw_image, descriptors), str(raw_image))
    assert (first.offset, second.offset) == (offset, later.offset)
    assert second.ticket == future + 1


def test_tickets_never_pass_the_last_one_whatever_the_wrap(
    raw_image: Path, descriptors: list[int]
) -> None:
    top = protocol.queue_byte(TICKET_MAX, Mode.SHARED, Owner.current(7))
    assert fcntl_locks.try_read_lock(_fd(raw_image, descriptors), top, 1, str(raw_image))
    place = protocol.enqueue(_fd(raw_image, descriptors), str(raw_image), Mode.EXCLUSIVE)
    waiting = protocol.read_waiting(place.offset)
    assert waiting is not None and waiting.ticket == TICKET_MAX  # a tie, broken by mode and owner
    assert protocol.QUEUE_BASE <= place.offset < protocol.QUEUE_BASE + protocol.QUEUE_SIZE


def test_a_killed_waiter_leaves_the_queue_and_the_next_one_is_served(
    raw_image: Path, rival: SpawnRival, started: list[subprocess.Popen[str]]
) -> None:
    holder = rival(raw_image)
    waiters = []
    for _ in range(2):
        waiters.append(
            subprocess.Popen(
                [sys.executable, "-m", "imglock", "run", "-w", "300", "--image", str(raw_image),
                 "--", "true"],
                env=ENV,
                text=True,
            )
        )  # fmt: skip
        started.append(waiters[-1])
        wait_until(
            lambda: len(imglock.inspect(raw_image).waiting) >= len(waiters),
            what=f"{len(waiters)} waiters queued",
            timeout=30,
        )
    first = imglock.inspect(raw_image).waiting[0]
    assert first.pid is not None
    # The queue names the pid the claim is for (the wrapper's child, which
    # holds the descriptors too); killing the wrapper ends both.
    victim = next(w for w in waiters if w.pid in (first.pid, _parent(first.pid)))
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    wait_until(
        lambda: len(imglock.inspect(raw_image).waiting) == 1,
        what="the killed waiter to leave the queue",
        timeout=30,
    )
    holder.stop()
    survivor = next(w for w in waiters if w is not victim)
    assert survivor.wait(30) == 0
    assert imglock.inspect(raw_image).waiting == []


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return None
