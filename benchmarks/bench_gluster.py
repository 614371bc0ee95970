"""Through GlusterFS: the rows of ``bench_shared_fs`` on the mounts of ``tests/gluster/up``.

Every lock call, open, read and close through a FUSE mount of GlusterFS is
a round trip to the brick, so these figures are about round trips.
Skipped, with a row saying why, where the mounts are not there.
Run: ``python -m benchmarks.bench_gluster`` (part of ``python -m benchmarks``;
the same as ``python -m benchmarks.bench_shared_fs --fs glusterfs``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks import bench_shared_fs
from benchmarks.bench_shared_fs import GLUSTERFS, claim_rows, status_rows, workspace
from benchmarks.timing import Row

__all__ = ["DEFAULT_STATE_DIR", "SECTION", "claim_rows", "figures", "mounts", "status_rows",
           "workspace"]  # fmt: skip

DEFAULT_STATE_DIR = GLUSTERFS.default_state_dir
SECTION = GLUSTERFS.section


def mounts() -> tuple[Path, Path] | None:
    """Host A's and host B's mounts, if both are GlusterFS mounts."""
    return bench_shared_fs.mounts(GLUSTERFS)


def figures(quick: bool = False) -> list[Row]:
    return bench_shared_fs.figures(GLUSTERFS, quick=quick)


if __name__ == "__main__":
    sys.exit(bench_shared_fs.main(default=GLUSTERFS, prog="python -m benchmarks.bench_gluster"))
