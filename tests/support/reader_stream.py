"""One of a stream of readers: claim an image shared, hold it a while, let go, again.

    python tests/support/reader_stream.py IMAGE LOG HOLD_SECONDS

Until its standard input closes.  Each claim appends one line to LOG (a
file opened with O_APPEND, shared by every reader): JSON with this pid, the
monotonic time its claim began (``asked``), when it held the image
(``held``), and when it let go (``left``).  CLOCK_MONOTONIC is the same
for every process on the machine, so the lines order the claims.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from imglock.api import Claim, ClaimSpec
from imglock.lock.protocol import Mode


def main() -> None:
    image, log, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
    done = threading.Event()

    def until_stdin_closes() -> None:
        sys.stdin.read()
        done.set()

    threading.Thread(target=until_stdin_closes, daemon=True).start()
    out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    print("ready", flush=True)
    while not done.is_set():
        asked = time.monotonic()
        claim = Claim([ClaimSpec(image, Mode.SHARED)], wait=120, record=False).acquire()
        held = time.monotonic()
        done.wait(hold)
        left = time.monotonic()
        claim.release()
        line = {"pid": os.getpid(), "asked": asked, "held": held, "left": left}
        os.write(out, (json.dumps(line) + "\n").encode())
    os.close(out)


if __name__ == "__main__":
    main()
