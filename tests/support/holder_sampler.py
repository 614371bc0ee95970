"""Look at an image's holders and waiters over and over, as a user would.

    python tests/support/holder_sampler.py holders|status COUNT IMAGE

``holders`` calls :func:`imglock.holders` and :func:`imglock.inspect`
(each call one sample);
``status`` runs the ``imglock status --json IMAGE`` command (its real
code, in this process, so that a sample costs microseconds, not the
start-up of a new interpreter) and parses what it prints.  Prints one
JSON object: how many samples were taken, and how often each
(holders, waiting) pair of pid lists was seen.
"""

from __future__ import annotations

import io
import json
import sys
from collections import Counter
from contextlib import redirect_stdout

import imglock
from imglock.cli import main

Sample = tuple[list[int], list[int] | None]


def by_library(image: str) -> list[Sample]:
    """Two samples: holders() (which lists no waiters), and inspect()."""
    listed = sorted(h.pid or -1 for h in imglock.holders(image) if h.layer == "imglock")
    report = imglock.inspect(image)
    inspected = sorted(h.pid or -1 for h in report.holders if h.layer == "imglock")
    return [(listed, None), (inspected, [w.pid or -1 for w in report.waiting])]


def by_status(image: str) -> list[Sample]:
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    with redirect_stdout(out):
        try:
            main(["status", "--json", image])
        except SystemExit as exc:
            if exc.code not in (0, 1):
                raise
    out.seek(0)
    (report,) = json.loads(out.read())
    holders = sorted(h["pid"] for h in report["holders"] if h["layer"] == "imglock")
    return [(holders, [w["pid"] for w in report["waiting"]])]


def main_() -> None:
    kind, count, image = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sample = by_library if kind == "holders" else by_status
    seen: Counter[str] = Counter()
    taken = 0
    while taken < count:
        for holders, waiting in sample(image):
            seen[json.dumps([holders, waiting])] += 1
            taken += 1
    out = sys.__stdout__
    assert out is not None
    json.dump({"samples": taken, "seen": dict(seen)}, out)


if __name__ == "__main__":
    main_()
