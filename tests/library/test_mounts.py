"""Reading this process's mounts: what flock, lockspaces and ``doctor`` learn of a file's mount."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from imglock.lock.mounts import mount_of_device, parse_mountinfo

#: A mountinfo line whose mount point and source have a space in them (\040).
ESCAPED = (
    "36 35 0:52 / /mnt/vm\\040store rw,relatime shared:1 - nfs4 "
    "nas:/export/vm\\040store rw,vers=4.2,local_lock=none\n"
)


def test_a_line_is_read_with_its_escapes_undone_where_names_are_shown() -> None:
    (mount,) = parse_mountinfo([ESCAPED])
    assert mount.mount_point == "/mnt/vm store"
    assert mount.fstype == "nfs4"
    assert mount.source == "nas:/export/vm store"
    assert mount.device == (0, 52)
    assert mount.option("local_lock") == "none" and mount.option("relatime") == ""
    assert mount.option("nolock") is None


def test_the_source_is_also_kept_as_spelt_for_names_that_must_never_change() -> None:
    (mount,) = parse_mountinfo([ESCAPED])
    assert mount.raw_source == "nas:/export/vm\\040store"


def test_lines_that_do_not_parse_are_skipped() -> None:
    assert parse_mountinfo(["garbage\n", "1 2 x:y / / rw - ext4 /dev/sda1 rw\n", ""]) == []


def test_the_mount_of_a_file_agrees_with_findmnt(tmp_path: Path) -> None:
    mount = mount_of_device(os.stat(tmp_path).st_dev)
    assert mount is not None
    found = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE,MAJ:MIN", "--target", str(tmp_path)],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert [mount.fstype, f"{mount.device[0]}:{mount.device[1]}"] == found


def test_a_device_no_mount_has_is_none() -> None:
    assert mount_of_device(os.makedev(4095, 1048575)) is None
