"""Through a network filesystem: the GlusterFS mounts of ``tests/gluster/up``.

Every lock call, open, read and close through a FUSE mount of GlusterFS is
a round trip to the brick, so these figures are about round trips.  Each is
printed beside its floor measured through the same mount in the same run,
with the filesystem calls per operation through the mount (each at least
one round trip; counted with strace, the figure itself measured without):

* ``imglock status DIR`` of 1,000 images (5 held from host A), run through
  host B's mount, beside a serial open + F_OFD_GETLK + close of each file
  through the same mount;
* claim+release of a qcow2 with one backing file through host B's mount
  (without and with the holder record), beside the per-file floor (open +
  lock + pread + unlock + close) summed over its two files;
* live-migration downtime A→B under ``imglock run`` beside plain QEMU
  migrating A→B on the same mounts (``benchmarks/bench_migration.py``).

Skipped, with a row saying why, where the mounts are not there.
Run: ``python -m benchmarks.bench_gluster`` (part of ``python -m benchmarks``).
"""

from __future__ import annotations

import collections
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from benchmarks.bench_claim import floor as per_file_floor
from benchmarks.bench_cli import make_images
from benchmarks.timing import (
    Figure,
    Row,
    Unavailable,
    bytecode_env,
    median_of,
    median_per_call,
    print_table,
)
from imglock.api import Claim, ClaimSpec
from imglock.lock import fcntl_locks
from imglock.lock.protocol import Layer

PY = sys.executable
IMGLOCK = [PY, "-m", "imglock"]
DEFAULT_STATE_DIR = "/tmp/imglock-gluster"
IMAGES = 1000
HELD = 5
#: The filesystem calls counted as round trips (each is at least one).
FS_CALLS = (
    "openat", "newfstatat", "fstat", "statx", "pread64", "read", "write", "pwrite64",
    "fcntl", "flock", "close", "getdents64", "mkdirat", "renameat", "renameat2",
    "unlinkat", "fsync", "fdatasync", "ftruncate", "readlinkat",
)  # fmt: skip
SECTION = "GlusterFS (two mounts of one volume)"


def mounts() -> tuple[Path, Path] | None:
    """Host A's and host B's mounts, if both are GlusterFS mounts."""
    state = Path(os.environ.get("IMGLOCK_GLUSTER_DIR", DEFAULT_STATE_DIR), "mnt")
    found = [Path(os.environ.get(f"IMGLOCK_GLUSTER_{x}", state / x.lower())) for x in "AB"]
    try:
        with open("/proc/self/mountinfo") as f:
            glusterfs = {line.split()[4] for line in f if " - fuse.glusterfs " in line}
    except OSError:
        return None
    if all(str(m) in glusterfs for m in found):
        return found[0], found[1]
    return None


@contextmanager
def workspace(a: Path, b: Path) -> Iterator[tuple[Path, Path]]:
    """A fresh directory on the volume, as host A and host B see it."""
    name = f"imglock-bench-{uuid.uuid4().hex[:8]}"
    (a / name).mkdir()
    try:
        yield a / name, b / name
    finally:
        shutil.rmtree(a / name, ignore_errors=True)


def fs_calls(argv: Sequence[str], through: Path, per: int) -> str:
    """The filesystem calls *argv* makes through the mount at *through*, per operation.

    Each is at least one round trip to the brick.  Counted with ``strace
    -y`` (which names each descriptor's file), keeping the calls whose path
    or descriptor is under *through*.
    """
    if shutil.which("strace") is None:
        return "calls not counted: no strace"
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        subprocess.run(
            ["strace", "-f", "-qq", "-y", "-e", f"trace={','.join(FS_CALLS)}", "-o", out.name,
             *argv],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, timeout=600,
        )  # fmt: skip
        found: collections.Counter[str] = collections.Counter()
        for line in out:
            _pid, _, call = line.partition(" ")
            name = call.split("(", 1)[0].strip()
            if name in FS_CALLS and str(through) in call:
                found[name] += 1
    total = sum(found.values()) / per
    detail = ", ".join(f"{name} {n / per:.3g}" for name, n in found.most_common())
    return f"{total:.3g} calls/op through the mount: {detail}"


# -- status of a directory -------------------------------------------------


def once(fn: Callable[[], object]) -> float:
    """Wall time of one call: the three are interleaved, a round each, for a fair median."""
    return median_of(fn, 1, warmup=0)


def serial_floor(directory: Path) -> None:
    """open + F_OFD_GETLK + close of every file, one after another."""
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl_locks.conflicting(fd, 0, 0, entry.path)
        finally:
            os.close(fd)


def status_rows(on_a: Path, on_b: Path, runs: int, env: dict[str, str]) -> list[Row]:
    paths = make_images(on_a, IMAGES)
    held = [Claim([ClaimSpec(str(p))]).acquire() for p in paths[:HELD]]
    try:
        directory = on_b / "images"
        status = [*IMGLOCK, "status", str(directory)]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
        subprocess.run(status, **quiet)  # type: ignore[call-overload]  # warm
        t_status, t_floor, t_ls = [], [], []
        for _ in range(runs):  # in turns, so that the load falls on each alike
            t_status.append(once(lambda: subprocess.run(status, **quiet)))  # type: ignore[call-overload]
            t_floor.append(once(lambda: serial_floor(directory)))
            t_ls.append(once(lambda: subprocess.run(["ls", "-l", directory], **quiet)))  # type: ignore[call-overload]
        calls = fs_calls(status, on_b, IMAGES)
    finally:
        for claim in held:
            claim.release()
    what = f"status DIR from host B, {IMAGES} images, {HELD} held on A ({calls})"
    s = statistics.median(t_status)
    return [
        Figure(what, s, "serial open+GETLK+close", statistics.median(t_floor), "< 1 s"),
        Figure("status DIR from host B (same run)", s, "ls -l DIR", statistics.median(t_ls)),
    ]


# -- claim+release ---------------------------------------------------------


CYCLE = """
import sys
from imglock.api import Claim, ClaimSpec
from imglock.lock.protocol import Layer
path, cycles, record = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
for _ in range(cycles):
    claim = Claim([ClaimSpec(path)], layers=Layer.IMGLOCK | Layer.QEMU, record=record)
    claim.acquire()
    claim.release()
"""


def claim_rows(on_a: Path, on_b: Path, rounds: int) -> list[Row]:
    create = ["qemu-img", "create", "-q", "-f", "qcow2"]
    subprocess.run([*create, on_a / "base.qcow2", "64M"], check=True)
    subprocess.run([*create, "-b", "base.qcow2", "-F", "qcow2", on_a / "top.qcow2"], check=True)
    top, base = str(on_b / "top.qcow2"), str(on_b / "base.qcow2")

    def per_call(fn: Callable[[], object]) -> float:
        return median_per_call(fn, rounds=rounds, batch=0.2)

    floor = per_call(lambda: per_file_floor(top)) + per_call(lambda: per_file_floor(base))
    rows: list[Row] = []
    for record, label in ((False, "without record"), (True, "with holder record")):

        def cycle(r: bool = record) -> None:
            claim = Claim([ClaimSpec(top)], layers=Layer.IMGLOCK | Layer.QEMU, record=r)
            claim.acquire()
            claim.release()

        t = per_call(cycle)
        flag = "1" if record else "0"
        calls = fs_calls([PY, "-c", CYCLE, top, "20", flag], on_b, 20)
        what = f"claim+release qcow2 + backing file from host B, {label} ({calls})"
        peer = "floor: open+lock+pread+unlock+close, both files"
        rows.append(Figure(what, t, peer, floor, "" if record else "≤ 3x"))
    return rows


# -- the section -------------------------------------------------------------


def figures(quick: bool = False) -> list[Row]:
    found = mounts()
    if found is None:
        return [Unavailable(SECTION, "not measured: no GlusterFS mounts (tests/gluster/up)")]
    if shutil.which("qemu-img") is None:
        return [Unavailable(SECTION, "not measured: qemu-img is not installed")]
    runs, rounds = (3, 5) if quick else (7, 11)
    rows: list[Row] = []
    with workspace(*found) as (on_a, on_b), tempfile.TemporaryDirectory() as cache:
        env = bytecode_env(cache)
        rows += status_rows(on_a, on_b, runs, env)
        rows += claim_rows(on_a, on_b, rounds)
        from benchmarks import bench_migration

        rows += bench_migration.across_hosts(on_a, on_b, quick=quick)
    return rows


def main() -> None:
    print_table(figures(quick="--quick" in sys.argv[1:]))


if __name__ == "__main__":
    main()
