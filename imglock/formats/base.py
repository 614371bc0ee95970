"""The small interface every format driver implements.

A driver knows one image format: how to recognise it (:meth:`probe`), how
to read its header (:meth:`open`), which other files the image depends on
(:meth:`children`), what ``imglock info`` reports about it (:meth:`info`),
and which byte ranges to lock when the image is claimed (:meth:`claim` and
:meth:`release`, the hooks of QEMU's old ``bdrv_claim``/``bdrv_release``
proposal).  Adding a format is one new module with one subclass, listed
with its magic in the registry of :mod:`imglock.formats`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:  # imported when used: reading a header (`imglock info`) takes no lock
    from imglock.lock import protocol
    from imglock.lock.identity import Owner

ChildRole = Literal["backing", "data-file"]


# A plain class, not a dataclass or NamedTuple: those cost far more to define,
# and every command that reads an image loads this module.
class Child:
    """A file an image depends on, as the image names it."""

    __slots__ = ("filename", "format", "name", "role")

    def __init__(
        self, role: ChildRole, name: str, filename: str | None, format: str | None = None
    ) -> None:
        self.role = role
        #: The name as stored in the image (decoded with surrogateescape).
        self.name = name
        #: The local path it resolves to, or None when it is not a local file
        #: (``json:``, ``nbd://`` and other protocol names).
        self.filename = filename
        #: The format the image records for it (backing format extension), if any.
        self.format = format


class OpenImage:
    """An image opened read-only for its header, and later for its locks.

    The descriptor stays open for as long as a claim on the image is held:
    the OFD locks belong to it.
    """

    __slots__ = (
        "driver",
        "fd",
        "filename",
        "header",
        "held",
        "lock_fd",
        "lock_filename",
        "read_as",
        "st",
    )

    def __init__(
        self, filename: str, fd: int, st: os.stat_result, driver: FormatDriver, header: Any = None
    ) -> None:
        self.filename = filename
        self.fd = fd
        self.st = st
        self.driver = driver
        #: The driver's parsed header (for qcow2 a ``Qcow2Header``); None for raw.
        self.header = header
        #: The lock state on this descriptor (protocol.Held), set while claimed.
        self.held: protocol.Held | None = None
        #: With a lockspace, the descriptor and name of the lock file that stands
        #: for the image; otherwise -1 and the image itself carries the locks.
        self.lock_fd = -1
        self.lock_filename: str | None = None
        #: For a file in a format imglock cannot read (a vmdk, a vdi), opened
        #: as plain data to look at its locks: that format's name.
        self.read_as: str | None = None

    def __repr__(self) -> str:
        return (
            f"OpenImage(filename={self.filename!r}, fd={self.fd!r}, st={self.st!r}, "
            f"driver={self.driver!r}, header={self.header!r})"
        )

    @property
    def lock_target(self) -> tuple[int, str]:
        """(descriptor, name) of the file whose bytes are locked for this image."""
        if self.lock_fd >= 0 and self.lock_filename is not None:
            return self.lock_fd, self.lock_filename
        return self.fd, self.filename

    @property
    def format(self) -> str:
        return self.read_as or self.driver.name

    def children(self) -> list[Child]:
        return self.driver.children(self)

    def close(self) -> None:
        """Close the descriptor, which also drops every lock taken on it."""
        self.held = None
        for attr in ("lock_fd", "fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                os.close(fd)


class FormatDriver(ABC):
    """One image format."""

    #: The format's name as qemu-img spells it ("qcow2", "raw").
    name: ClassVar[str]

    @abstractmethod
    def probe(self, head: bytes, filename: str) -> int:
        """Score how likely *head* (the file's first bytes) is this format.

        0 means "not this format"; the highest score wins.  The fallback
        format (raw) answers 1 for anything.
        """

    @abstractmethod
    def open(self, filename: str, fd: int, st: os.stat_result, head: bytes = b"") -> OpenImage:
        """Read and validate the header on *fd*; raise FormatError if it is bad.

        *head*, when given, holds the file's first bytes as already read for
        probing (all of them if the file is shorter): a driver uses it rather
        than reading those bytes again.
        """

    @abstractmethod
    def children(self, image: OpenImage) -> list[Child]:
        """The files *image* depends on: its backing file, its data file."""

    @abstractmethod
    def info(self, image: OpenImage) -> dict[str, Any]:
        """What ``imglock info --json`` reports, with qemu-img's key names."""

    def claim(
        self,
        image: OpenImage,
        mode: protocol.Mode,
        layers: protocol.Layer,
        owner: Owner | None = None,
        place: protocol.Place | None = None,
    ) -> None:
        """Lock the byte ranges that stand for *image* being claimed in *mode*.

        Every format locks the same ranges today (the imglock layer past
        any data, and QEMU's permission bytes when asked); a format whose
        lock lives elsewhere overrides this.  *place* is the claimer's
        place in the image's queue, if it waits there.  Raises LockConflict
        or LockError, with nothing held on failure.
        """
        from imglock.lock import protocol

        fd, filename = image.lock_target
        image.held = protocol.acquire(fd, filename, mode, layers, owner, place)

    def release(self, image: OpenImage) -> None:
        """Drop what :meth:`claim` took.  Idempotent."""
        from imglock.lock import protocol

        fd, filename = image.lock_target
        if image.held is not None and fd >= 0:
            protocol.release(fd, filename, image.held)
        image.held = None
