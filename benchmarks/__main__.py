"""``python -m benchmarks [--quick] [--rtt]``: every figure in one Markdown table.

Each figure is a median printed beside the peer or floor it is compared
with, measured in the same run on the same machine: claim+release beside
the syscall floor, each command beside its counterpart (qemu-img, lslocks,
flock) and its start-up beside ``python -c pass`` (and, installed into a
fresh venv, beside ``import click``), and the downtime a
migration handoff adds (from ``benchmarks/bench_migration.py``, when
present), and the same through a network filesystem when the GlusterFS
mounts of ``tests/gluster/up`` are there (``benchmarks/bench_gluster.py``),
and through CephFS when the ``ceph-fuse`` mounts of ``tests/cephfs/up``
are (``benchmarks/bench_shared_fs.py``, the same rows).
``--quick`` takes fewer samples: a rough look, not figures to quote.
``--rtt`` adds the GlusterFS figures again through a relay that adds a
network round-trip time (``benchmarks/bench_rtt.py``, as root): with the
relay's 10 ms round trips, a serial pass over 1,000 files takes minutes,
so these are left out unless asked for.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import inspect
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence

from benchmarks import (
    bench_claim,
    bench_cli,
    bench_gluster,
    bench_qmp_relay,
    bench_rtt,
    bench_shared_fs,
    bench_startup,
)
from benchmarks.timing import Row, Unavailable, print_table

MIGRATION = "migration downtime added by the handoff"


def migration_rows(quick: bool) -> list[Row]:
    """The handoff's figures, or one row saying why there are none."""
    if importlib.util.find_spec("benchmarks.bench_migration") is None:
        return [Unavailable(MIGRATION, "not available: no benchmarks/bench_migration.py")]
    try:
        from benchmarks import bench_migration
    except ImportError as exc:
        return [Unavailable(MIGRATION, f"not available: {exc}")]
    return _guarded(MIGRATION, bench_migration.figures, quick)


def _guarded(what: str, figures: Callable[..., Sequence[Row]], quick: bool) -> list[Row]:
    """*figures()* (told about --quick if it takes it), or a row naming its failure."""
    kwargs = {"quick": quick} if "quick" in inspect.signature(figures).parameters else {}
    try:
        return list(figures(**kwargs))
    except Exception as exc:  # one failed benchmark must not cost the whole table
        return [Unavailable(what, f"failed: {type(exc).__name__}: {exc}")]


def describe_machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}, "
        f"{os.cpu_count()} CPUs, load average {load}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples, rough figures")
    parser.add_argument(
        "--rtt", action="store_true", help="also through a relay adding round-trip time (slow)"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    rows: list[Row] = []
    rows += _guarded("claim+release", bench_claim.figures, args.quick)
    rows += _guarded("imglock commands", bench_cli.figures, args.quick)
    rows += _guarded("start-up in a fresh venv", bench_startup.figures, args.quick)
    rows += migration_rows(args.quick)
    rows += _guarded(bench_qmp_relay.SECTION, bench_qmp_relay.figures, args.quick)
    rows += _guarded(bench_gluster.SECTION, bench_gluster.figures, args.quick)
    cephfs = bench_shared_fs.CEPHFS
    rows += _guarded(cephfs.section, functools.partial(bench_shared_fs.figures, cephfs), args.quick)
    if args.rtt:
        rows += _guarded(bench_rtt.SECTION, bench_rtt.figures, args.quick)
    print(f"imglock benchmarks ({'quick' if args.quick else 'full'}): {describe_machine()}")
    print()
    print_table(rows, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
