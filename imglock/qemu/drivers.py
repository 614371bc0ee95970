"""QEMU's block drivers as data: which members of a node open other nodes or files.

The child members come from QEMU's own QAPI schema (``qapi/block-core.json``,
the variants of ``BlockdevOptions``): a member whose type is
``BlockdevRef`` or ``BlockdevRefOrNull`` (or a list of them) holds a child
node, inline or by node-name.  :mod:`imglock.qemu.schema` derives the same
table from the ``query-qmp-schema`` answer of a running QEMU, and the test
suite checks this one against the installed QEMU: every driver it knows is
listed here, with the same child members.

The rest is what the schema cannot say: which drivers are image formats
(the nearest one above a file names its format), and whether a driver
without children opens a local file (``file``, libblkio's ``io_uring``) or
something else (a server, a device endpoint, nothing at all).

Drivers that a QEMU build leaves out (libblkio's, by ``CONFIG_BLKIO``)
are listed from the schema source of QEMU 7.2.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

#: Every driver that opens child nodes, with the members that hold them
#: (``BlockdevRef`` / ``BlockdevRefOrNull`` members in QEMU 7.2's schema).
CHILD_MEMBERS: Final[Mapping[str, tuple[str, ...]]] = {
    "blkdebug": ("image",),
    "blklogwrites": ("file", "log"),
    "blkreplay": ("image",),
    "blkverify": ("test", "raw"),
    "bochs": ("file",),
    "cloop": ("file",),
    "compress": ("file",),
    "copy-before-write": ("file", "target"),
    "copy-on-read": ("file",),
    "dmg": ("file",),
    "luks": ("file",),
    "parallels": ("file",),
    "preallocate": ("file",),
    "qcow": ("file", "backing"),
    "qcow2": ("file", "backing", "data-file"),
    "qed": ("file", "backing"),
    "quorum": ("children",),
    "raw": ("file",),
    "replication": ("file",),
    "snapshot-access": ("file",),
    "throttle": ("file",),
    "vdi": ("file",),
    "vhdx": ("file",),
    "vmdk": ("file", "backing"),
    "vpc": ("file",),
}

#: Children that QEMU's code opens but its schema does not declare: vmdk
#: opens its extents with ``bdrv_open_child(..., "extents.N", ...)``.
UNDECLARED_CHILD_MEMBERS: Final[Mapping[str, tuple[str, ...]]] = {
    "vmdk": ("extents",),
}

#: Drivers whose node is a local file or device, and the member naming it.
#: ``io_uring`` is libblkio's: it opens a local file or block device itself.
LOCAL_FILE_MEMBERS: Final[Mapping[str, str]] = {
    "file": "filename",
    "host_cdrom": "filename",
    "host_device": "filename",
    "io_uring": "filename",
}

#: libblkio drivers whose local path is a device endpoint (an NVMe
#: character device, a VFIO device, a vhost socket or character device),
#: not an image file: the device or the server behind it does the locking.
ENDPOINT_DRIVERS: Final = frozenset(
    {"nvme-io_uring", "virtio-blk-vfio-pci", "virtio-blk-vhost-user", "virtio-blk-vhost-vdpa"}
)

#: Drivers that open no local file: network protocols (their servers do the
#: locking), a userspace PCI driver, virtual and null devices.  Also the
#: protocol names of file name prefixes (``nbd:``...), some of them from
#: drivers since removed (``sheepdog``, ``vxhs``) or aliases (``iser``).
NONLOCAL_DRIVERS: Final = frozenset(
    {"ftp", "ftps", "gluster", "http", "https", "iscsi", "iser", "nbd", "nfs", "null-aio",
     "null-co", "nvme", "rbd", "sheepdog", "ssh", "vvfat", "vxhs"}
)  # fmt: skip

#: Image format drivers: the nearest one above a file names its format.
#: The others with children are filters (blkdebug, throttle, quorum...).
FORMAT_DRIVERS: Final = frozenset(
    {"bochs", "cloop", "dmg", "luks", "parallels", "qcow", "qcow2", "qed", "raw", "vdi",
     "vhdx", "vmdk", "vpc"}
)  # fmt: skip

#: What a driver missing from this table (one newer than it) may have as
#: children: the usual members of formats and filters.
GENERIC_CHILD_MEMBERS: Final = ("file", "backing", "data-file")


def child_members(driver: object) -> tuple[str, ...]:
    """The members of a node of *driver* that hold child nodes (none for a protocol)."""
    if not isinstance(driver, str) or driver in LOCAL_FILE_MEMBERS:
        return () if isinstance(driver, str) else GENERIC_CHILD_MEMBERS
    if driver in ENDPOINT_DRIVERS or driver in NONLOCAL_DRIVERS:
        return ()
    if driver in CHILD_MEMBERS:
        return CHILD_MEMBERS[driver] + UNDECLARED_CHILD_MEMBERS.get(driver, ())
    return GENERIC_CHILD_MEMBERS


def known(driver: str) -> bool:
    """Whether this table classifies *driver*."""
    return (
        driver in CHILD_MEMBERS
        or driver in LOCAL_FILE_MEMBERS
        or driver in ENDPOINT_DRIVERS
        or driver in NONLOCAL_DRIVERS
    )
