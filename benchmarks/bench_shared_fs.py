"""Through a shared network filesystem: GlusterFS or CephFS, mounted as hosts A and B.

The rigs of ``tests/gluster/up`` and ``tests/cephfs/up`` mount one
filesystem several times on this machine; two of those mounts are hosts A
and B.  Each figure is printed beside its floor measured through the same
mount in the same run, with the filesystem calls per operation through the
mount (counted with strace, the figure itself measured without):

* ``imglock status DIR`` of 1,000 images (5 held from host A), run through
  host B's mount, beside a serial open + F_OFD_GETLK + close of each file
  through the same mount, and beside ``ls -l``;
* claim+release of a qcow2 with one backing file through host B's mount
  (without and with the holder record), beside the per-file floor (open +
  lock + pread + unlock + close) summed over its two files;
* live-migration downtime A→B under ``imglock run`` beside plain QEMU
  migrating A→B on the same mounts (``benchmarks/bench_migration.py``).

Through GlusterFS's FUSE client each of those calls is a round trip to the
brick; through ceph-fuse a lock call goes to the MDS, while opens, stats
and reads are often answered from the client's cache under the
capabilities the MDS granted it.  Skipped, with a row saying why, where
the mounts are not there.
Run: ``python -m benchmarks.bench_shared_fs --fs cephfs`` (or ``glusterfs``,
which ``python -m benchmarks.bench_gluster`` runs); both are part of
``python -m benchmarks``.
"""

from __future__ import annotations

import argparse
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
from dataclasses import dataclass
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
from imglock.errors import LockConflict
from imglock.lock import fcntl_locks
from imglock.lock.protocol import Layer


@dataclass(frozen=True)
class SharedFs:
    """A shared filesystem as its rig in tests/ mounts it for hosts A and B."""

    name: str  # as the rows name it
    option: str  # as --fs names it
    section: str  # the table's name for its rows as a whole
    fstypes: frozenset[str]  # /proc/self/mountinfo's type of its mounts
    variable: str  # the rig's environment prefix: PREFIX_DIR, PREFIX_A, PREFIX_B
    default_state_dir: str  # where the rig keeps its state (mounts in mnt/a, mnt/b)
    up: str  # the script that brings the rig up


GLUSTERFS = SharedFs(
    name="GlusterFS",
    option="glusterfs",
    section="GlusterFS (two mounts of one volume)",
    fstypes=frozenset({"fuse.glusterfs"}),
    variable="IMGLOCK_GLUSTER",
    default_state_dir="/tmp/imglock-gluster",
    up="tests/gluster/up",
)
CEPHFS = SharedFs(
    name="CephFS",
    option="cephfs",
    section="CephFS (two ceph-fuse clients of one filesystem)",
    fstypes=frozenset({"fuse.ceph-fuse", "ceph"}),
    variable="IMGLOCK_CEPHFS",
    default_state_dir="/tmp/imglock-cephfs",
    up="tests/cephfs/up",
)
FILESYSTEMS = {fs.option: fs for fs in (GLUSTERFS, CEPHFS)}

PY = sys.executable
IMGLOCK = [PY, "-m", "imglock"]
#: The checkout's root: commands counted run there, so that ``-c`` code imports benchmarks.
ROOT = Path(__file__).resolve().parent.parent
IMAGES = 1000
HELD = 5
#: The filesystem calls counted (on GlusterFS each is at least one round trip).
FS_CALLS = (
    "openat", "newfstatat", "fstat", "statx", "pread64", "read", "write", "pwrite64",
    "fcntl", "flock", "close", "getdents64", "mkdirat", "renameat", "renameat2",
    "unlinkat", "fsync", "fdatasync", "ftruncate", "readlinkat",
)  # fmt: skip


def mounts(fs: SharedFs) -> tuple[Path, Path] | None:
    """Host A's and host B's mounts of *fs*, if both are mounted as *fs*."""
    state = Path(os.environ.get(f"{fs.variable}_DIR", fs.default_state_dir), "mnt")
    found = [Path(os.environ.get(f"{fs.variable}_{x}", state / x.lower())) for x in "AB"]
    try:
        with open("/proc/self/mountinfo") as f:
            mounted = {
                fields[4]
                for fields in (line.split() for line in f)
                if fields[fields.index("-") + 1] in fs.fstypes
            }
    except OSError:
        return None
    if all(str(m) in mounted for m in found):
        return found[0], found[1]
    return None


@contextmanager
def workspace(a: Path, b: Path) -> Iterator[tuple[Path, Path]]:
    """A fresh directory on the filesystem, as host A and host B see it."""
    name = f"imglock-bench-{uuid.uuid4().hex[:8]}"
    (a / name).mkdir()
    try:
        yield a / name, b / name
    finally:
        shutil.rmtree(a / name, ignore_errors=True)


def fs_calls(argv: Sequence[str], through: Path, per: int) -> str:
    """The filesystem calls *argv* makes through the mount at *through*, per operation.

    Counted with ``strace -y`` (which names each descriptor's file),
    keeping the calls whose path or descriptor is under *through*.
    """
    if shutil.which("strace") is None:
        return "calls not counted: no strace"
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        subprocess.run(
            ["strace", "-f", "-qq", "-y", "-e", f"trace={','.join(FS_CALLS)}", "-o", out.name,
             *argv],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, timeout=600,
            cwd=ROOT,
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


def status_rows(
    on_a: Path, on_b: Path, runs: int, env: dict[str, str], via: str = GLUSTERFS.name
) -> list[Row]:
    """``status`` of a directory from host B, its images made and some held on host A."""
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
    what = f"status DIR via {via} from host B, {IMAGES} images, {HELD} held on A ({calls})"
    s = statistics.median(t_status)
    return [
        Figure(what, s, "serial open+GETLK+close", statistics.median(t_floor), "< 1 s"),
        Figure(f"status DIR via {via} from host B (same run)", s, "ls -l DIR",
               statistics.median(t_ls)),
    ]  # fmt: skip


# -- claim+release ---------------------------------------------------------


#: Seconds a claim from B waits when it finds the image held: through
#: ceph-fuse the locks of a release are sometimes still seen by the next
#: claim from the same client, for about 10-30 ms.
WAIT = 5.0
#: Runs *cycles* claim+release from a process of its own, for strace to count.
CYCLE = """
import sys
from benchmarks.bench_shared_fs import claim_and_release
path, cycles, record = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
for _ in range(cycles):
    claim_and_release(path, record)
"""


def claim_and_release(path: str, record: bool) -> bool:
    """Claim *path* with QEMU's bytes and release it; True if the claim had to wait."""

    def claim(wait: float) -> Claim:
        layers = Layer.IMGLOCK | Layer.QEMU
        return Claim([ClaimSpec(path)], layers=layers, record=record, wait=wait).acquire()

    try:
        held, waited = claim(0.0), False
    except LockConflict:  # the last release not yet seen: wait, and say so
        held, waited = claim(WAIT), True
    held.release()
    return waited


@dataclass
class Cycles:
    """Claim+release cycles run, and how many of them had to wait."""

    run: int = 0
    waited: int = 0

    def __str__(self) -> str:
        return f"{self.waited:,} of {self.run:,} claims waited for the last release"


def claim_rows(on_a: Path, on_b: Path, rounds: int, via: str = GLUSTERFS.name) -> list[Row]:
    """Claim+release from host B of a qcow2 and its backing file made on host A."""
    create = ["qemu-img", "create", "-q", "-f", "qcow2"]
    subprocess.run([*create, on_a / "base.qcow2", "64M"], check=True)
    subprocess.run([*create, "-b", "base.qcow2", "-F", "qcow2", on_a / "top.qcow2"], check=True)
    top, base = str(on_b / "top.qcow2"), str(on_b / "base.qcow2")

    def per_call(fn: Callable[[], object]) -> float:
        return median_per_call(fn, rounds=rounds, batch=0.2)

    floor = per_call(lambda: per_file_floor(top)) + per_call(lambda: per_file_floor(base))
    rows: list[Row] = []
    for record, label in ((False, "without record"), (True, "with holder record")):
        cycles = Cycles()

        def cycle(r: bool = record, counted: Cycles = cycles) -> None:
            counted.run += 1
            counted.waited += claim_and_release(top, r)

        t = per_call(cycle)
        flag = "1" if record else "0"
        calls = fs_calls([PY, "-c", CYCLE, top, "20", flag], on_b, 20)
        waits = f"; {cycles}" if cycles.waited else ""
        what = f"claim+release qcow2 + backing file via {via} from host B, {label} ({calls}{waits})"
        peer = "floor: open+lock+pread+unlock+close, both files"
        rows.append(Figure(what, t, peer, floor, "" if record else "≤ 3x"))
    return rows


# -- the section -------------------------------------------------------------


def figures(fs: SharedFs, quick: bool = False) -> list[Row]:
    """Every row through *fs*, or one row saying why there are none."""
    found = mounts(fs)
    if found is None:
        return [Unavailable(fs.section, f"not measured: no {fs.name} mounts ({fs.up})")]
    if shutil.which("qemu-img") is None:
        return [Unavailable(fs.section, "not measured: qemu-img is not installed")]
    runs, rounds = (3, 5) if quick else (7, 11)
    rows: list[Row] = []
    try:
        with workspace(*found) as (on_a, on_b), tempfile.TemporaryDirectory() as cache:
            env = bytecode_env(cache)
            rows += status_rows(on_a, on_b, runs, env, via=fs.name)
            rows += claim_rows(on_a, on_b, rounds, via=fs.name)
            from benchmarks import bench_migration

            rows += bench_migration.across_hosts(on_a, on_b, quick=quick, via=fs.name)
    except (OSError, subprocess.SubprocessError) as exc:
        # A mount gone away mid-run (its rig brought down) ends these rows, not the table.
        rows.append(Unavailable(fs.section, f"stopped: {exc}"))
    return rows


def main(
    argv: Sequence[str] | None = None,
    default: SharedFs | None = None,
    prog: str = "python -m benchmarks.bench_shared_fs",
) -> int:
    """The table of the filesystems asked for with --fs; else *default*'s, else all of them."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    fallback = default.option if default else "all of them"
    parser.add_argument("--quick", action="store_true", help="fewer samples, rough figures")
    parser.add_argument(
        "--fs",
        choices=sorted(FILESYSTEMS),
        action="append",
        help=f"a filesystem to measure through, repeated for several (default: {fallback})",
    )
    args = parser.parse_args(argv)
    chosen = args.fs or ([default.option] if default else list(FILESYSTEMS))
    rows: list[Row] = []
    for option in chosen:
        rows += figures(FILESYSTEMS[option], quick=args.quick)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
