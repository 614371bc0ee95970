"""The flock(2) layer: whole-file locks as crosvm, hyperkit and alioth take them.

Those VMMs lock a disk image with ``flock(2)``: shared for a read-only
disk, exclusive for a writable one.  On a local filesystem, and on cluster
filesystems whose flock locks are their own (GFS2, OCFS2, CephFS), flock
and fcntl locks never meet, so a claim also takes a flock: shared for a
shared (or shared-write) claim, exclusive for an exclusive one, never
waiting.  Where the kernel or the filesystem turns flock into a whole-file
fcntl lock (NFS, GlusterFS's FUSE client, SMB), the VMM's flock already
collides with imglock's byte locks, and a flock of imglock's own would
collide with every other holder's: there ``auto`` takes none.

The locking itself goes through portalocker (whole-file, non-blocking),
imported only by a claim that takes this layer.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Final

from imglock.errors import LockError
from imglock.lock.mounts import mount_of_device

#: Filesystem types (as /proc/self/mountinfo names them) on which Linux
#: carries out flock(2) as a whole-file fcntl lock, or only emulates it.
FLOCK_AS_FCNTL: Final = frozenset(
    {"nfs", "nfs4", "fuse.glusterfs", "glusterfs", "cifs", "smb3", "9p", "fuse.sshfs"}
)

#: The --flock choices: take it where it is a lock of its own, always, never.
POLICIES: Final = ("auto", "on", "off")


@functools.cache
def filesystem_type(st_dev: int) -> str | None:
    """The type of the filesystem mounted as device *st_dev*, from mountinfo."""
    mount = mount_of_device(st_dev)
    return mount.fstype if mount is not None else None


def separate_from_fcntl(fstype: str | None) -> bool:
    """Whether flock locks on a filesystem of *fstype* are a kind of their own.

    An unknown type counts as not: taking an exclusive flock where it turns
    into a whole-file write lock would lock every other holder out.
    """
    return fstype is not None and fstype not in FLOCK_AS_FCNTL


def applies(fd: int, everywhere: bool) -> bool:
    """Whether a claim on *fd* takes a flock (``--flock on`` is *everywhere*)."""
    return everywhere or separate_from_fcntl(filesystem_type(os.fstat(fd).st_dev))


def load() -> ModuleType:
    """portalocker, imported on first use.

    Deliberately lazy: it costs some 20 ms to load, and only a claim that
    takes this layer needs it (a migration destination loads it ahead of
    the switch-over, see Claim.prepare).
    """
    import portalocker

    return portalocker


def take(fd: int, filename: str, exclusive: bool) -> bool:
    """Take a whole-file flock on *fd*, never waiting; False if another holds one in the way.

    Raises LockError when the system refuses the lock itself.
    """
    portalocker = load()
    flags = portalocker.LockFlags.EXCLUSIVE if exclusive else portalocker.LockFlags.SHARED
    try:
        portalocker.lock(fd, flags | portalocker.LockFlags.NON_BLOCKING)
    except portalocker.AlreadyLocked:
        return False
    except portalocker.LockException as exc:
        raise LockError(filename, f"cannot flock: {exc}") from None
    return True


def release(fd: int) -> None:
    load().unlock(fd)
