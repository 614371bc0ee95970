"""Where an image's locks live: on the image itself, or on a file in a lockspace.

Some images cannot carry locks that other hosts see: a block device on a SAN
(each host has its own device node), or a filesystem whose locks stay local.
For them the operator names a *lockspace*, a directory on a filesystem whose
locks are shared (NFS, CephFS...), and the locks move to a file there named
from the identity of the image: the file itself, never the name it was
reached by, so that a symlink, a hard link or a bind mount of one image
finds the same lock file.  See imglock(7), LOCKSPACES:

* a block device: its WWID (or device-mapper UUID, or serial), which every
  host reads the same from sysfs;
* a file: its filesystem and its inode number.  A filesystem on a block
  device is named by its UUID (``/dev/disk/by-uuid``) or the device's WWID,
  which a shared-disk filesystem (GFS2, OCFS2) has the same on every host;
  any other (NFS, CephFS, GlusterFS) by its type and mount source
  (``server:/export``), which every host must therefore spell the same;
  their inode numbers are the server's, the same on every client;
* a file on a filesystem that only this host has (tmpfs, overlay, a local
  disk without a UUID): its source ("tmpfs", "overlay") names every such
  mount alike, so it is named by this kernel's device number for it (the
  same through every bind mount of it) and this kernel's boot id, which no
  other host shares;
* a file whose filesystem cannot be named (not in /proc/self/mountinfo,
  such as a btrfs subvolume): its real path, as before.
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from imglock.errors import ImageError
from imglock.lock import ownership
from imglock.lock.mounts import LOCAL_FILESYSTEMS, mount_of_device
from imglock.safeio import open_image_fd

LOCK_SUFFIX: Final = ".lock"
#: Files in /sys/dev/block/MAJ:MIN that name a device the same on every host.
_SYSFS_IDENTITIES: Final = ("device/wwid", "wwid", "dm/uuid", "device/serial")
#: udev's links from filesystem UUIDs to block devices.
_BY_UUID: Final = "/dev/disk/by-uuid"
#: The kernel's random id of this boot: one per host (containers share their host's).
_BOOT_ID: Final = "/proc/sys/kernel/random/boot_id"


@dataclass(eq=False)
class LockTarget:
    """An open file whose bytes carry an image's locks, and where its records go."""

    fd: int
    filename: str
    st: os.stat_result
    record_dir: str
    record_name: str
    #: Whether *fd* is a lock file of a lockspace, opened for this target
    #: (and closed with it), rather than the image's own descriptor.
    lock_file: bool = False

    def close(self) -> None:
        """Close the lock file, if the target opened one (the image's descriptor is not its own)."""
        fd, self.fd = self.fd, -1
        if self.lock_file and fd >= 0:
            os.close(fd)


def _sysfs_identity(dev: int) -> str | None:
    """The WWID (or dm UUID, or serial) of block device *dev*, as sysfs gives it."""
    base = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    for name in _SYSFS_IDENTITIES:
        try:
            with open(f"{base}/{name}", encoding="utf-8", errors="replace") as f:
                value = f.read().strip()
        except OSError:
            continue
        if value:
            return value
    return None


def _filesystem_uuid(dev: int) -> str | None:
    """The UUID of the filesystem on block device *dev* (from udev's /dev/disk/by-uuid)."""
    try:
        names = os.listdir(_BY_UUID)
    except OSError:
        return None
    for name in names:
        try:
            if os.stat(os.path.join(_BY_UUID, name)).st_rdev == dev:
                return name
        except OSError:
            continue
    return None


@functools.cache
def boot_id() -> str:
    """This boot of this host's kernel, as the kernel names it ("" where it cannot be read)."""
    try:
        with open(_BOOT_ID, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def filesystem_identity(dev: int) -> str | None:
    """A name for the filesystem on *dev*: every host that mounts it shares it, if any does,
    and no other filesystem has it."""
    if os.major(dev) != 0:  # a real block device, not an anonymous one (NFS, FUSE, overlay)
        uuid = _filesystem_uuid(dev)
        if uuid:
            return f"uuid:{uuid}"
        wwid = _sysfs_identity(dev)
        if wwid:
            return f"block:{wwid}"
    mount = mount_of_device(dev)  # any of its mounts: bind mounts agree
    if mount is None:
        return None
    if mount.fstype in LOCAL_FILESYSTEMS:
        # Two tmpfs (or overlay) mounts have the same type and source: only
        # the device number tells them apart, and only on this boot of this host.
        return f"local:{mount.fstype}:{boot_id()}:{os.major(dev)}:{os.minor(dev)}"
    return f"mount:{mount.fstype}:{mount.raw_source}"


def identity(path: str, st: os.stat_result) -> str:
    """A name for the image that is the same on every host, and for every name of it."""
    if stat.S_ISBLK(st.st_mode):
        wwid = _sysfs_identity(st.st_rdev)
        if wwid:
            return f"block:{wwid}"
    else:
        filesystem = filesystem_identity(st.st_dev)
        if filesystem:
            return f"file:{filesystem}:{st.st_ino}"
    return "path:" + os.path.realpath(path)


def lock_file_name(path: str, st: os.stat_result) -> str:
    """The lock file's name in the lockspace: the kind of identity, and its hash.

    Nothing of the name the image was reached by goes into it: a hard link
    or a bind mount must find the same file.
    """
    # Loads OpenSSL (a few ms): only a claim or a look through a lockspace pays for it.
    import hashlib

    ident = identity(path, st)
    digest = hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{ident.partition(':')[0]}-{digest[:24]}{LOCK_SUFFIX}"


def _why(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


#: How a lock file is opened: read only, never through a symlink, never blocking.
_LOCK_FILE_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _open_or_create(dfd: int, name: str) -> tuple[int, bool]:
    """Open lock file *name* in directory *dfd*, creating it if there is none: (fd, created).

    A file is created with O_EXCL, readable by its creator alone until
    :func:`ownership.adopt` gives it the image's owner and mode; one that is
    there already (made meanwhile by another claimer, or planted) is opened
    as it is, for the caller to judge.
    """
    while True:
        try:
            return os.open(name, _LOCK_FILE_FLAGS, dir_fd=dfd), False
        except FileNotFoundError:
            pass
        try:
            return os.open(name, _LOCK_FILE_FLAGS | os.O_CREAT | os.O_EXCL, 0o400, dir_fd=dfd), True
        except FileExistsError:  # created meanwhile: open that one
            continue


def _our_uid_here(dfd: int) -> int | None:
    """The owner a file this process creates in directory *dfd* gets (None: it may not create).

    Not always our uid: an NFS export with root_squash gives root's files to
    its anonymous user, and then the lock files root made are its own.
    """
    probe = f".imglock-owner-{os.urandom(6).hex()}"
    flags = os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(probe, flags, 0o400, dir_fd=dfd)
    except OSError:
        return None  # then no lock file here is one it made
    try:
        return os.fstat(fd).st_uid
    finally:
        os.close(fd)
        os.unlink(probe, dir_fd=dfd)


def _judged(dfd: int, fd: int, created: bool, path: str, image: os.stat_result) -> os.stat_result:
    """The status of lock file *fd*, once it lets in no one whom the image keeps out."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(path, "lock file is not a regular file")
    if created:
        return ownership.adopt(fd, image, owner=True)
    problem = ownership.excess(st, image)
    if problem is None:
        return st
    # Only a mode gone stale (an older imglock's 0644, an image chmod-ed
    # since) is set right, by whoever may: never a file of someone the image
    # keeps out, who may have opened it already.
    if ownership.may_use(st.st_uid, image) or st.st_uid == _our_uid_here(dfd):
        with contextlib.suppress(PermissionError):
            return ownership.adopt(fd, image, owner=True)
    raise ImageError(path, f"lock file {problem}: it would let others lock the image; remove it")


def open_lockspace_file(
    lockspace: str, name: str, image: os.stat_result
) -> tuple[int, os.stat_result]:
    """Open (creating if needed) *image*'s lock file: never through a symlink, never for writing.

    The lock file lets no one lock it who may not open the image
    (:mod:`imglock.lock.ownership`): a new one takes the image's owner and
    mode, one whose mode has gone stale is set right, and one of a user who
    may not open the image, or that would let in more than it, is refused.
    """
    path = os.path.join(lockspace, name)
    try:
        dfd = os.open(lockspace, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(lockspace, f"cannot open lockspace: {_why(exc)}") from None
    try:
        try:
            fd, created = _open_or_create(dfd, name)
        except OSError as exc:
            raise ImageError(path, f"cannot open lock file: {_why(exc)}") from None
        try:
            return fd, _judged(dfd, fd, created, path, image)
        except OSError as exc:
            os.close(fd)
            raise ImageError(
                path, f"cannot set the lock file's owner and mode: {_why(exc)}"
            ) from None
        except BaseException:
            os.close(fd)
            raise
    finally:
        os.close(dfd)


def open_target(fd: int, filename: str, st: os.stat_result, lockspace: str | None) -> LockTarget:
    """The file that carries the locks of the image open as *fd*: the image, or its lock file.

    Records go beside the image, or into the lockspace.  The caller closes
    the target (which closes a lock file it opened) before the image.
    """
    if lockspace is None:
        record_dir = os.path.dirname(filename) or "."
        return LockTarget(fd, filename, st, record_dir, os.path.basename(filename))
    name = lock_file_name(filename, st)
    lock_fd, lock_st = open_lockspace_file(lockspace, name, st)
    return LockTarget(lock_fd, os.path.join(lockspace, name), lock_st, lockspace, name, True)


@contextlib.contextmanager
def open_lock_target(path: str, lockspace: str | None) -> Iterator[LockTarget]:
    """Open the file that carries *path*'s locks, for reading; close it afterwards."""
    fd, st = open_image_fd(path)
    try:
        target = open_target(fd, path, st, lockspace)
        try:
            yield target
        finally:
            target.close()
    finally:
        os.close(fd)
