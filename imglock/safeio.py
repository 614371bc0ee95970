"""Opening and reading image files without ever blocking on a bad path.

A path handed to imglock may name anything: a FIFO nobody writes to, a
listening socket, a directory, ``/dev/zero``, a tape drive.  Opening a FIFO
for reading blocks until a writer appears, and opening some character
devices has side effects (a tape rewinds, a tty becomes the controlling
terminal).  So :func:`open_image_fd` looks at the file type with ``stat``
first, opens only regular files and block devices, and opens them with
``O_NONBLOCK | O_NOCTTY`` so that a file swapped for a FIFO between the
two steps still cannot block; ``fstat`` on the descriptor then confirms
the type that was checked.

Reads go through :func:`read_at`, a bounded ``pread`` loop: it never asks
for more than the caller wants, and a short result means end of file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import Final

from imglock.errors import EX_IOERR, FormatError, ImageError, UsageError

#: Flags every image is opened with: read only, never blocking on open,
#: never acquiring a controlling terminal, never leaking into children.
OPEN_FLAGS: Final = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

#: The unit st_blocks counts in, and the sector QEMU sizes disks in.
SECTOR_SIZE: Final = 512

#: The largest single read imglock ever needs (a qcow2 header cluster is
#: at most 2 MiB); a bigger request is a bug, not something to attempt.
MAX_READ: Final = 4 << 20

# File types that are never images, with the words used to refuse them.
_REFUSED_TYPES: Final = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
}


class ReadError(ImageError):
    """Reading an image that was opened failed (EIO and the like)."""

    exit_status = EX_IOERR


def _error_text(exc: OSError) -> str:
    """The system's words for *exc*, without Python's ``[Errno N]`` decoration."""
    if exc.errno is not None:
        return os.strerror(exc.errno)
    return str(exc)


def _type_complaint(mode: int) -> str | None:
    """Why a file of *mode* is not an image, or None for a regular file or block device."""
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return None
    what = _REFUSED_TYPES.get(stat.S_IFMT(mode))
    if what is not None:
        return f"is {what}, not an image"
    return "is not a regular file or block device"


def _refuse_type(filename: str, mode: int) -> None:
    """Raise ImageError unless *mode* is a regular file or a block device."""
    complaint = _type_complaint(mode)
    if complaint is not None:
        raise ImageError(filename, complaint)


def as_path(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """*path* as a str: str, bytes and path-like objects are all accepted."""
    try:
        return os.fsdecode(path)
    except TypeError:
        raise UsageError(None, f"not a path: {path!r}") from None


def open_image_fd(path: str | os.PathLike[str]) -> tuple[int, os.stat_result]:
    """Open *path* read-only for its header and locks; return ``(fd, fstat)``.

    Symbolic links are followed (the image is only read through this
    descriptor).  FIFOs, sockets, directories and character devices are
    refused before anything is opened; regular files and block devices are
    accepted.  Raises :class:`ImageError` with the system's reason
    ("No such file or directory", "Permission denied"...) otherwise.
    """
    filename = os.fspath(path)
    try:
        # stat, not lstat: the type that matters is the one of the file the
        # link leads to, and stat never blocks whatever that file is.
        before = os.stat(filename)
    except OSError as exc:
        raise ImageError(filename, _error_text(exc)) from None
    except ValueError:  # an embedded NUL byte
        raise ImageError(filename, "file name contains a NUL byte") from None
    _refuse_type(filename, before.st_mode)
    try:
        fd = os.open(filename, OPEN_FLAGS)
    except OSError as exc:
        raise ImageError(filename, _error_text(exc)) from None
    try:
        after = os.fstat(fd)
        if stat.S_IFMT(after.st_mode) != stat.S_IFMT(before.st_mode):
            # Replaced between stat and open; what we opened is what counts.
            _refuse_type(filename, after.st_mode)
            raise ImageError(filename, "changed type while being opened")
        # O_NONBLOCK only guarded the open; clear it so that the descriptor
        # behaves like any other for the lock code that keeps it.
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, after


def read_at(fd: int, offset: int, length: int, filename: str) -> bytes:
    """Read at most *length* bytes at *offset*; fewer only at end of file.

    ``pread`` may return less than asked (block devices, network
    filesystems, signals); this loops until *length* bytes are in or the
    file ends.  It never requests bytes beyond ``offset + length``.
    """
    if offset < 0 or length < 0:
        raise ValueError(f"negative offset or length ({offset}, {length})")
    if length > MAX_READ:
        raise ValueError(f"read of {length} bytes exceeds the {MAX_READ}-byte limit")
    chunks: list[bytes] = []
    done = 0
    while done < length:
        try:
            chunk = os.pread(fd, length - done, offset + done)
        except OSError as exc:
            if exc.errno == errno.EISDIR:
                raise ImageError(filename, "is a directory, not an image") from None
            raise ReadError(
                filename, f"read of {length} bytes at offset {offset} failed: {_error_text(exc)}"
            ) from None
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def pread_exact(fd: int, offset: int, length: int, filename: str) -> bytes:
    """Read exactly *length* bytes at *offset*, or raise FormatError naming the shortfall."""
    data = read_at(fd, offset, length, filename)
    if len(data) != length:
        raise FormatError(
            filename,
            f"file ends at offset {offset + len(data)}, "
            f"but {length} bytes are needed at offset {offset}",
        )
    return data


def image_size(fd: int, st: os.stat_result, filename: str) -> int:
    """The size in bytes of the regular file or block device open on *fd*."""
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        # st_size is 0 for block devices; their end is where SEEK_END lands.
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        except OSError as exc:
            raise ReadError(filename, f"cannot find the device size: {_error_text(exc)}") from None
    raise ImageError(filename, _type_complaint(st.st_mode) or "is not an image")


def allocated_bytes(st: os.stat_result) -> int:
    """Bytes the file occupies on disk (what qemu-img calls ``actual-size``)."""
    return st.st_blocks * SECTOR_SIZE


def close_quietly(fd: int) -> None:
    """Close *fd*, ignoring errors: used on paths that already report one."""
    with contextlib.suppress(OSError):
        os.close(fd)
