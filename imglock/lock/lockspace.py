"""Where an image's locks live: on the image itself, or on a file in a lockspace.

Some images cannot carry locks that other hosts see: a block device on a SAN
(each host has its own device node), or a filesystem whose locks stay local.
For them the operator names a *lockspace*, a directory on a filesystem whose
locks are shared (NFS, CephFS...), and the locks move to a file there named
from a stable identity of the image: the WWID or device-mapper UUID of a
block device, else the image's real path (so every host must mount the
datastore at the same path, as with libvirt's path-based lockspaces).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from imglock.errors import ImageError
from imglock.safeio import open_image_fd

if TYPE_CHECKING:
    from imglock.formats.base import OpenImage

LOCK_SUFFIX: Final = ".lock"
#: Files in /sys/dev/block/MAJ:MIN that name a device the same on every host.
_SYSFS_IDENTITIES: Final = ("device/wwid", "wwid", "dm/uuid", "device/serial")


# A plain class, not a dataclass or NamedTuple: those cost far more to define,
# and every command that takes or looks at a lock loads this module.
class LockTarget:
    """An open file whose bytes carry an image's locks, and where its records go."""

    __slots__ = ("fd", "filename", "record_dir", "record_name", "st")

    def __init__(
        self, fd: int, filename: str, st: os.stat_result, record_dir: str, record_name: str
    ) -> None:
        self.fd = fd
        self.filename = filename
        self.st = st
        self.record_dir = record_dir
        self.record_name = record_name


def identity(path: str, st: os.stat_result) -> str:
    """A name for the image that is the same on every host."""
    if stat.S_ISBLK(st.st_mode):
        base = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        for name in _SYSFS_IDENTITIES:
            try:
                with open(f"{base}/{name}", encoding="utf-8", errors="replace") as f:
                    value = f.read().strip()
            except OSError:
                continue
            if value:
                return f"block:{value}"
    return "path:" + os.path.realpath(path)


def lock_file_name(path: str, st: os.stat_result) -> str:
    """The lock file's name in the lockspace: readable prefix, hashed identity."""
    import hashlib  # loads OpenSSL: only lockspace users pay for it

    digest = hashlib.sha256(identity(path, st).encode("utf-8", "surrogateescape")).hexdigest()
    readable = os.path.basename(path).replace(os.sep, "_")[:64] or "image"
    return f"{readable}-{digest[:24]}{LOCK_SUFFIX}"


def _why(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


def open_lockspace_file(lockspace: str, name: str) -> tuple[int, os.stat_result]:
    """Open (creating if needed) a lock file, never through a symlink, never for writing."""
    path = os.path.join(lockspace, name)
    try:
        dfd = os.open(lockspace, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(lockspace, f"cannot open lockspace: {_why(exc)}") from None
    try:
        fd = os.open(
            name,
            os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
            0o644,
            dir_fd=dfd,
        )
    except OSError as exc:
        raise ImageError(path, f"cannot open lock file: {_why(exc)}") from None
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ImageError(path, "lock file is not a regular file")
    return fd, st


def attach(image: OpenImage, lockspace: str | None) -> tuple[str, str]:
    """Point *image*'s locks at its lockspace file, if any; return (record dir, record name)."""
    if lockspace is None:
        return os.path.dirname(image.filename) or ".", os.path.basename(image.filename)
    name = lock_file_name(image.filename, image.st)
    image.lock_fd, _st = open_lockspace_file(lockspace, name)
    image.lock_filename = os.path.join(lockspace, name)
    return lockspace, name


@contextlib.contextmanager
def open_lock_target(path: str, lockspace: str | None) -> Iterator[LockTarget]:
    """Open the file that carries *path*'s locks, for reading; close it afterwards."""
    fd, st = open_image_fd(path)
    try:
        if lockspace is None:
            yield LockTarget(fd, path, st, os.path.dirname(path) or ".", os.path.basename(path))
            return
        name = lock_file_name(path, st)
        lock_fd, lock_st = open_lockspace_file(lockspace, name)
        try:
            yield LockTarget(lock_fd, os.path.join(lockspace, name), lock_st, lockspace, name)
        finally:
            os.close(lock_fd)
    finally:
        os.close(fd)
