"""Sample an image's exclusive imglock holders as fast as possible, from outside.

    python tests/lock_sampler.py IMAGE

Runs in a process of its own (so that nothing else competes for its
interpreter), reads the locks as any host would, with lock tests on the
exclusive region and each holder's pid decoded from its offset, and prints
one JSON list of [monotonic time, [pids]] samples when its stdin closes.
A sample costs a few microseconds.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from imglock.lock import fcntl_locks
from imglock.lock.identity import Owner
from imglock.lock.protocol import IMGLOCK_EXCLUSIVE_BASE, IMGLOCK_REGION_SIZE


def holders(fd: int, image: str) -> list[int]:
    locks = fcntl_locks.all_conflicting(fd, IMGLOCK_EXCLUSIVE_BASE, IMGLOCK_REGION_SIZE, image)
    return sorted(
        Owner.from_id(byte - IMGLOCK_EXCLUSIVE_BASE).pid
        for lock in locks
        for byte in range(lock.start, lock.end)
    )


def main() -> None:
    image = sys.argv[1]
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    samples = []
    print("ready", flush=True)
    while not done.is_set():
        samples.append((time.monotonic(), holders(fd, image)))
        time.sleep(0.0002)
    json.dump(samples, sys.stdout)


if __name__ == "__main__":
    main()
