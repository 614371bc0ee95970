"""A rival on another host that keeps trying to write an image until it gets in.

    python tests/support/fault_rival.py PAUSE COMMAND...

Runs COMMAND (``qemu-io -c 'write ...'``, a plain ``qemu-system-x86_64``,
``imglock run ...``) again and again, PAUSE seconds apart, until one run
exits 0 (a write went through) or does not exit (a VM that started runs
until the rival is killed).  Prints one JSON line per finished attempt as
soon as it ends: ``{"started": T, "ended": T, "status": N, "said": LAST
STDERR LINE}``, times from ``time.monotonic()``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time


def main() -> int:
    pause, command = float(sys.argv[1]), sys.argv[2:]
    while True:
        started = time.monotonic()
        proc = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        said = (proc.stderr.strip().splitlines() or [""])[-1]
        attempt = {"started": started, "ended": time.monotonic(), "status": proc.returncode}
        print(json.dumps({**attempt, "said": said}), flush=True)
        if proc.returncode == 0:
            return 0
        time.sleep(pause)


if __name__ == "__main__":
    sys.exit(main())
