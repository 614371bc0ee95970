"""Sample an image's exclusive imglock holders as fast as possible, from outside.

    python tests/support/lock_sampler.py [--owners] IMAGE

Runs in a process of its own (so that nothing else competes for its
interpreter), reads the locks as any host would, with lock tests on the
exclusive region and each holder's pid decoded from its offset, and prints
one JSON list of [monotonic time, [pids]] samples when its stdin closes.
With --owners each holder is "HOSTTAG:PID" instead of a pid, for holders on
several hosts whose pids may be the same.  A sample costs a few microseconds
on a local filesystem, a network round trip or two on a shared one.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from imglock.lock import fcntl_locks
from imglock.lock.identity import Owner
from imglock.lock.protocol import HOLDER_BASE, SLOT_SIZE, Mode, read_holding


def owners(fd: int, image: str) -> list[Owner]:
    base = HOLDER_BASE[Mode.EXCLUSIVE]
    locks = fcntl_locks.all_conflicting(fd, base, SLOT_SIZE, image)
    return [
        holding.owner
        for lock in locks
        if (holding := read_holding(lock.start, lock.length)) is not None
    ]


def holders(fd: int, image: str) -> list[int]:
    return sorted(owner.pid for owner in owners(fd, image))


def owner_names(fd: int, image: str) -> list[str]:
    return sorted(f"{owner.host_tag:x}:{owner.pid}" for owner in owners(fd, image))


def main() -> None:
    by_owner = sys.argv[1] == "--owners"
    image = sys.argv[-1]
    sample = owner_names if by_owner else holders
    done = threading.Event()

    def until_stdin_closes() -> None:
        sys.stdin.read()
        done.set()

    threading.Thread(target=until_stdin_closes, daemon=True).start()
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    samples = []
    print("ready", flush=True)
    while not done.is_set():
        samples.append((time.monotonic(), sample(fd, image)))
        time.sleep(0.0002)
    json.dump(samples, sys.stdout)


if __name__ == "__main__":
    main()
