"""A real process that claims images and holds them: the rival in lock tests.

    python tests/support/claimer.py [--mode shared] [--wait S] [--no-qemu] [--fork-child]
                            [--lockspace DIR] [--no-chain] IMAGE...

Prints one JSON line, {"ok": true, "pid": N} once it holds the claim or
{"ok": false, "error": "...", "status": N, "holders": [...]} if it could not
(the holders a conflict named, as ``status --json`` shows them), then (when it
holds it) waits until its standard input closes or it is killed.  With
--fork-child it forks a child that inherits the descriptors, prints the
child's pid, and the parent exits at once, leaving the child as the holder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import imglock
from imglock import faults
from imglock.api import Claim, ClaimSpec, as_mode
from imglock.lock.protocol import Layer, flock_layer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("images", nargs="+")
    parser.add_argument("--mode", default="exclusive")
    parser.add_argument("--wait", type=float, default=0.0)
    parser.add_argument("--no-qemu", action="store_true")
    parser.add_argument("--fork-child", action="store_true")
    parser.add_argument("--lockspace")
    parser.add_argument("--no-chain", action="store_true", help="claim no backing or data file")
    parser.add_argument("--flock", choices=["auto", "on", "off"], default="off")
    args = parser.parse_args()
    faults.install_from_environment()
    layers = Layer.IMGLOCK if args.no_qemu else Layer.IMGLOCK | Layer.QEMU
    layers |= flock_layer(args.flock)
    follow = not args.no_chain
    specs = [
        ClaimSpec(path, as_mode(args.mode), backing=follow, data_file=follow)
        for path in args.images
    ]
    claim = Claim(specs, wait=args.wait, layers=layers, lockspace=args.lockspace)
    try:
        claim.acquire()
    except imglock.ImglockError as exc:
        holders = [h.to_json() for h in getattr(exc, "holders", ())]
        reply = {"ok": False, "error": str(exc), "status": exc.exit_status, "holders": holders}
        print(json.dumps(reply), flush=True)
        return exc.exit_status
    if args.fork_child:
        pid = os.fork()
        if pid:
            print(json.dumps({"ok": True, "pid": pid, "parent": os.getpid()}), flush=True)
            os._exit(0)  # leave the child (and the inherited descriptors) behind
        sys.stdin.close()
        os.setsid()
        import time

        time.sleep(3600)
        return 0
    print(json.dumps({"ok": True, "pid": os.getpid()}), flush=True)
    sys.stdin.read()
    claim.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
