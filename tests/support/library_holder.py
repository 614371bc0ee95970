"""A program that holds an image through the library and is told when it loses it.

    python tests/support/library_holder.py [--stop-on-loss] INTERVAL DEADLINE IMAGE

Claims IMAGE exclusive with :func:`imglock.claim` (QEMU's bytes too) and
watches the claim with :meth:`imglock.Claim.watch` every INTERVAL seconds
(DEADLINE: how long one check may take).  Prints JSON lines: ``{"held":
PID}`` once it holds the claim, ``{"lost": MESSAGE, "at": T}`` each time
the watch calls back (T from ``time.monotonic()``), and ``{"verify":
null|MESSAGE}`` for each ``verify`` line read from standard input (null:
:meth:`~imglock.Claim.verify` passed).  With --stop-on-loss it stops
itself after the loss, as ``imglock run`` stops a command that is not
QEMU (``--lock-lost-signal STOP``): from then on it writes nothing.  When
its standard input closes it stops the watch, releases and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

import imglock

_print_lock = threading.Lock()


def say(message: dict[str, object]) -> None:
    with _print_lock:
        print(json.dumps(message), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stop-on-loss", action="store_true")
    parser.add_argument("interval", type=float)
    parser.add_argument("deadline", type=float)
    parser.add_argument("image")
    args = parser.parse_args()
    claim = imglock.claim(args.image)
    say({"held": os.getpid()})

    def on_loss(exc: BaseException) -> None:
        say({"lost": str(exc), "at": time.monotonic(), "type": type(exc).__name__})
        if args.stop_on_loss:
            os.kill(os.getpid(), signal.SIGSTOP)

    watch = claim.watch(on_loss, interval=args.interval, deadline=args.deadline)
    for line in sys.stdin:
        if line.strip() == "verify":
            try:
                claim.verify()
            except imglock.LockLost as exc:
                say({"verify": str(exc)})
            else:
                say({"verify": None})
    watch.stop()
    claim.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
