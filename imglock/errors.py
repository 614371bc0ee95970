"""The exception hierarchy of imglock.

Every error imglock raises on purpose is an :class:`ImglockError`.  Its
``str()`` is one line that names the file and what is wrong, so the CLI can
print it as it is, and its :attr:`exit_status` is the documented status of
the command that met it (see imglock(1), EXIT STATUS).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

from imglock.text import visible

# Exit statuses, from sysexits.h where one fits.
EX_OK = 0
EX_HELD = 1  # `status`: some image is held
EX_USAGE = 2  # click's status for a bad option
EX_DATAERR = 65  # a malformed image or an unusable backing chain
EX_NOINPUT = 66  # an image that cannot be opened, or is not a file one may open
EX_SOFTWARE = 70  # an internal error: a bug in imglock
EX_OSERR = 71  # the system refused something else (fork, a socket)
EX_IOERR = 74  # a lock, a read or the output failed with an I/O error (EIO, ENOLCK, ENOSPC)
EX_TEMPFAIL = 75  # a conflict, or a wait that ran out
EX_NOEXEC = 126  # `run`: COMMAND found but not executable
EX_NOTFOUND = 127  # `run`: COMMAND not found


class Holder(Protocol):
    """What an error says of a holder: :class:`imglock.lock.holder.Holder` is one.

    A protocol, so that the errors name holders without importing the lock layer.
    """

    @property
    def layer(self) -> str: ...

    @property
    def mode(self) -> str | None: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def host(self) -> str | None: ...

    @property
    def command(self) -> str | None: ...

    def describe(self) -> str: ...

    def to_json(self) -> dict[str, Any]: ...


class ImglockError(Exception):
    """Base class: a one-line message naming the file, and an exit status."""

    exit_status: ClassVar[int] = EX_SOFTWARE

    def __init__(self, filename: str | os.PathLike[str] | None, message: str) -> None:
        self.filename = os.fspath(filename) if filename is not None else None
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        text = " ".join(self.message.split())
        line = f"{self.filename}: {text}" if self.filename is not None else text
        # Names come from images too: a newline or a terminal escape in one
        # must not split the line or reach the terminal as it is.
        return visible(line)


class UsageError(ImglockError, ValueError):
    """A request that makes no sense (bad mode, no image to claim, a wait of NaN...).

    Also a ValueError, so that library callers may catch it as the bad
    argument it is.
    """

    exit_status = EX_USAGE


class ImageError(ImglockError):
    """The image cannot be opened: missing, unreadable, not a regular file or block device."""

    exit_status = EX_NOINPUT


class FormatError(ImageError):
    """The image's header is malformed or uses something imglock cannot read."""

    exit_status = EX_DATAERR


class UnreadableFormat(FormatError):
    """The image is in a format QEMU knows and imglock does not read (vmdk, vdi...).

    Its chain cannot be followed, so it cannot be claimed as an image; its
    locks can still be looked at (``imglock status``): :attr:`format` is
    QEMU's name for the format.
    """

    def __init__(self, filename: str | os.PathLike[str] | None, message: str, format: str) -> None:
        self.format = format
        super().__init__(filename, message)


class ChainError(ImageError):
    """The backing chain cannot be followed: a loop, too deep, or not a local file."""

    exit_status = EX_DATAERR


class LockError(ImglockError):
    """A lock operation failed for a reason other than a conflict (ENOLCK, EIO...)."""

    exit_status = EX_IOERR

    def __init__(
        self,
        filename: str | os.PathLike[str] | None,
        message: str,
        errno: int | None = None,
    ) -> None:
        self.errno = errno
        super().__init__(filename, message)


class LockConflict(LockError):
    """Someone else holds the image in a way that excludes the claim asked for.

    :attr:`holders` lists who was seen holding it (possibly empty when the
    rival vanished between the conflict and the look-up), and, separately,
    :attr:`waiting` those queued ahead of the claimer (never holders: they
    wait too, and would be served first).
    """

    exit_status = EX_TEMPFAIL

    def __init__(
        self,
        filename: str | os.PathLike[str] | None,
        message: str,
        holders: Sequence[Holder] = (),
        waiting: Sequence[Holder] = (),
    ) -> None:
        self.holders: tuple[Holder, ...] = tuple(holders)
        self.waiting: tuple[Holder, ...] = tuple(waiting)
        super().__init__(filename, message)


class LockLost(LockError):
    """A lock that was held is gone (NFS lease lost, EIO on re-check)."""
