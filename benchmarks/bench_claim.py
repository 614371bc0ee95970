"""Claim+release of one raw image, one qcow2 and a depth-8 chain, beside the syscall floor.

The floor is what any lock needs at least: open, one lock, a 512-byte
header read, unlock, close.  Run: ``python -m benchmarks.bench_claim``
(part of ``python -m benchmarks``).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks.timing import Figure, median_per_call, print_table
from imglock.api import Claim, ClaimSpec
from imglock.lock import fcntl_locks
from imglock.lock.protocol import Layer

#: Seconds of back-to-back calls per round, and rounds per figure (the median is kept).
BATCH = 0.05
ROUNDS = 15


def floor(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl_locks.try_read_lock(fd, 1 << 62, 1, path)
        os.pread(fd, 512, 0)
        fcntl_locks.unlock(fd, 1 << 62, 1, path)
    finally:
        os.close(fd)


def make_images(root: Path) -> dict[str, str]:
    raw = root / "disk.raw"
    raw.write_bytes(b"\0" * 65536)
    create = ["qemu-img", "create", "-q", "-f", "qcow2"]
    subprocess.run([*create, root / "one.qcow2", "64M"], check=True)
    previous: Path | None = None
    for depth in range(8):
        image = root / f"chain{depth}.qcow2"
        backing: list[str] = ["-b", previous.name, "-F", "qcow2"] if previous else []
        subprocess.run([*create, *backing, image, "64M"], check=True)
        previous = image
    assert previous is not None
    return {"raw": str(raw), "qcow2": str(root / "one.qcow2"), "depth-8 chain": str(previous)}


def claim_release(path: str, layers: Layer, record: bool) -> None:
    claim = Claim([ClaimSpec(path)], layers=layers, record=record)
    claim.acquire()
    claim.release()


def figures(quick: bool = False) -> list[Figure]:
    rounds, batch = (5, BATCH / 5) if quick else (ROUNDS, BATCH)

    def per_call(fn: Callable[[], object]) -> float:
        return median_per_call(fn, rounds=rounds, batch=batch)

    with tempfile.TemporaryDirectory() as tmp:
        images = make_images(Path(tmp))
        floor_s = per_call(lambda: floor(images["raw"]))
        fd = os.open(images["raw"], os.O_RDONLY)
        try:
            getlk = per_call(lambda: fcntl_locks.conflicting(fd, 1 << 62, 1 << 57, images["raw"]))
        finally:
            os.close(fd)
        out = [Figure("one F_OFD_GETLK", getlk, "floor: open+lock+pread+unlock+close", floor_s)]
        for name, path in images.items():
            for layers, record, label in (
                (Layer.IMGLOCK, False, "imglock layer"),
                (Layer.IMGLOCK | Layer.QEMU, False, "+ QEMU layer"),
                (Layer.IMGLOCK | Layer.QEMU, True, "+ QEMU layer + record"),
            ):
                cycle = lambda p=path, lay=layers, r=record: claim_release(p, lay, r)  # noqa: E731
                t = per_call(cycle)
                target = "≤ 10x" if name != "depth-8 chain" and not record else ""
                out.append(Figure(f"claim+release {name}, {label}", t, "floor", floor_s, target))
        return out


def main() -> None:
    print_table(figures())


if __name__ == "__main__":
    main()
