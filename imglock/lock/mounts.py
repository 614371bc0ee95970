"""This process's mounts, as /proc/self/mountinfo lists them (proc(5)).

Three questions are asked of a file's mount: which filesystem type it is
(whether flock is a lock of its own there), which source it is mounted
from (a name every host shares, for a lockspace), and with which options
(whether its locks reach other hosts at all).  The answers come from here.
"""

import os
from collections.abc import Iterable
from typing import Final, NamedTuple

MOUNTINFO: Final = "/proc/self/mountinfo"
#: Filesystems whose fcntl locks live in this kernel only.
LOCAL_FILESYSTEMS: Final = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "jfs", "reiserfs", "bcachefs",
    "tmpfs", "ramfs", "overlay", "vfat", "exfat", "ntfs", "ntfs3", "squashfs", "iso9660",
})  # fmt: skip


class Mount(NamedTuple):
    """One line of mountinfo, the parts that matter here."""

    mount_point: str
    fstype: str
    #: As mountinfo spells it: spaces, tabs, newlines and backslashes as
    #: \\ooo (a lockspace names files from it, so it must not change).
    raw_source: str
    #: Per-mount and superblock options together.
    options: tuple[str, ...]
    device: tuple[int, int]

    @property
    def source(self) -> str:
        return _unescape(self.raw_source)

    def option(self, name: str) -> str | None:
        """The value of option *name* ("" for a flag), or None if absent."""
        for option in self.options:
            key, _, value = option.partition("=")
            if key == name:
                return value
        return None


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(lines: Iterable[str]) -> list[Mount]:
    """The mounts of a mountinfo text; lines that do not parse are skipped."""
    mounts = []
    for line in lines:
        # ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [TAGS...] - TYPE SOURCE SUPEROPTIONS
        fields = line.split()
        try:
            dash = fields.index("-", 6)
            major, minor = fields[2].split(":")
            mounts.append(
                Mount(
                    mount_point=_unescape(fields[4]),
                    fstype=fields[dash + 1],
                    raw_source=fields[dash + 2],
                    options=(*fields[5].split(","), *fields[dash + 3].split(",")),
                    device=(int(major), int(minor)),
                )
            )
        except (ValueError, IndexError):
            continue
    return mounts


def read_mounts() -> list[Mount]:
    """Every mount of this process's mount namespace; OSError if /proc cannot be read."""
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f)


def mount_of_device(st_dev: int) -> Mount | None:
    """A mount of the filesystem on device *st_dev* (bind mounts of it agree on type and
    source); None when there is none, or no /proc to ask."""
    wanted = (os.major(st_dev), os.minor(st_dev))
    try:
        return next((m for m in read_mounts() if m.device == wanted), None)
    except OSError:
        return None
