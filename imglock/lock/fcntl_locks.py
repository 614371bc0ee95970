"""fcntl byte-range lock primitives: the only module that calls fcntl for locks.

On Linux the open-file-description (OFD) commands are used: an OFD lock
belongs to the open file description, so it survives fork/exec in a child
that inherited the descriptor, is not dropped when another descriptor of the
same file closes, and two opens in one process conflict.  Where the kernel
lacks them, classic POSIX record locks are the fallback, with their known
hazard: closing *any* descriptor of the file drops all of the process's
locks on it.

All imglock locks are read locks (F_RDLCK) so that a descriptor opened
read-only can hold them; conflicts are found by testing with F_WRLCK, which
reports any lock held through another open file description.
"""

import errno
import fcntl
import os
import struct
import warnings
from typing import Final, NamedTuple

from imglock import faults
from imglock.errors import LockError

# <fcntl.h> on Linux; the values are the same on every architecture.
F_OFD_GETLK: Final = 36
F_OFD_SETLK: Final = 37
F_RDLCK: Final = fcntl.F_RDLCK
F_WRLCK: Final = fcntl.F_WRLCK
F_UNLCK: Final = fcntl.F_UNLCK

#: struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid.
FLOCK: Final = struct.Struct("hhqqi4x")

#: The largest file offset (off_t is signed 64-bit).
OFFSET_MAX: Final = (1 << 63) - 1

#: Lock/unlock errors that mean "someone else holds a conflicting lock".
_CONFLICT_ERRNOS: Final = frozenset({errno.EAGAIN, errno.EACCES})

#: The fcntl call every primitive goes through (tests wrap it to watch the calls).
_fcntl = fcntl.fcntl


class PosixFallbackWarning(RuntimeWarning):
    """OFD locks are missing; POSIX locks are used, and any close() drops them."""


class RangeLock(NamedTuple):
    """A lock seen by a conflict test: its type and range, as the kernel reports it."""

    type: int
    start: int
    #: 0 means "to the end of any file", as in struct flock.
    length: int
    #: -1 for OFD locks; the owner's pid (on the server's view) for POSIX locks.
    pid: int

    @property
    def end(self) -> int:
        """One past the last byte covered."""
        return OFFSET_MAX if self.length == 0 else self.start + self.length


class _Commands:
    """Which fcntl commands this kernel answers: OFD, or POSIX as a fallback."""

    getlk: int = F_OFD_GETLK
    setlk: int = F_OFD_SETLK
    ofd: bool = True
    probed: bool = False


_commands = _Commands()


def _call(fd: int, cmd: int, ltype: int, start: int, length: int, filename: str) -> bytes:
    """One fcntl lock call, retried on EINTR, turning OSError into LockError.

    Conflicts (EAGAIN/EACCES) are re-raised as BlockingIOError/PermissionError
    for the caller to interpret.
    """
    arg = FLOCK.pack(ltype, os.SEEK_SET, start, length, 0)
    while True:
        try:
            failure = faults.fcntl_failure()
            if failure is not None:
                raise failure
            return _fcntl(fd, cmd, arg)
        except InterruptedError:
            continue
        except OSError as exc:
            if exc.errno in _CONFLICT_ERRNOS:
                raise
            if exc.errno == errno.EINVAL and cmd in (F_OFD_GETLK, F_OFD_SETLK):
                raise
            raise LockError(filename, _describe(exc), exc.errno) from None


#: What an errno says of a network filesystem's client, beside its own words.
_CLIENT_STATES: Final = {
    errno.ENOLCK: "is a lock manager running for this filesystem?",
    errno.EBADF: "descriptor closed or not open for reading",
    errno.ENOTCONN: "the client has lost its server",
    errno.ESHUTDOWN: "the client was shut out by its server: evicted or blocklisted",
    errno.EBADFD: "the client refused to reopen it after a reconnect (strict locks)",
}


def reason(err: int | None) -> str:
    """*err* in words, with what it means for a network filesystem's client."""
    words = os.strerror(err) if err else "unknown error"
    state = _CLIENT_STATES.get(err or 0)
    return f"{words} ({state})" if state else words


def _describe(exc: OSError) -> str:
    return f"cannot lock: {reason(exc.errno) if exc.errno else str(exc)}"


def ensure_commands(fd: int, filename: str) -> None:
    """Find out once whether the kernel has OFD locks; fall back to POSIX if not.

    The first lock call of a process does it (one lock test on *fd*); a
    caller whose first lock call must be quick calls this ahead of it.
    """
    if _commands.probed:
        return
    try:
        _call(fd, F_OFD_GETLK, F_WRLCK, 0, 1, filename)
    except OSError as exc:  # EINVAL: the kernel predates OFD locks (Linux < 3.15)
        if exc.errno != errno.EINVAL:
            raise LockError(filename, _describe(exc), exc.errno) from None
        _commands.getlk, _commands.setlk, _commands.ofd = fcntl.F_GETLK, fcntl.F_SETLK, False
        warnings.warn(
            "OFD locks are not available; using POSIX locks, which are lost when "
            "any descriptor of the locked file is closed",
            PosixFallbackWarning,
            stacklevel=3,
        )
    _commands.probed = True


def uses_ofd() -> bool:
    """True when OFD locks are in use (after the first lock call)."""
    return _commands.ofd


def try_read_lock(fd: int, start: int, length: int, filename: str) -> bool:
    """Take a read lock on [start, start+length); False if a write lock is in the way."""
    ensure_commands(fd, filename)
    try:
        _call(fd, _commands.setlk, F_RDLCK, start, length, filename)
    except (BlockingIOError, PermissionError):
        return False
    return True


def unlock(fd: int, start: int, length: int, filename: str) -> None:
    """Drop whatever this descriptor holds on [start, start+length)."""
    ensure_commands(fd, filename)
    try:
        _call(fd, _commands.setlk, F_UNLCK, start, length, filename)
    except OSError as exc:
        raise LockError(filename, _describe(exc), exc.errno) from None


def conflicting(fd: int, start: int, length: int, filename: str) -> RangeLock | None:
    """Test [start, start+length) for a lock held through another open file description.

    Returns one such lock (the kernel picks which), or None when the range
    is free of others' locks.  The caller's own locks on *fd* never count.
    """
    ensure_commands(fd, filename)
    try:
        reply = _call(fd, _commands.getlk, F_WRLCK, start, length, filename)
    except OSError as exc:
        raise LockError(filename, _describe(exc), exc.errno) from None
    ltype, _whence, lstart, llen, lpid = FLOCK.unpack(reply)
    if ltype == F_UNLCK:
        return None
    return RangeLock(ltype, lstart, llen, lpid)


def all_conflicting(fd: int, start: int, length: int, filename: str) -> list[RangeLock]:
    """Every distinct lock range others hold within [start, start+length), in order.

    Found by testing, then testing again either side of each lock found, so
    the cost is about two calls per lock.  Several descriptors holding the
    very same range show up once: the kernel reports only one of them.
    """
    found: list[RangeLock] = []
    pending = [(start, start + length)]
    while pending:
        lo, hi = pending.pop()
        if lo >= hi:
            continue
        lock = conflicting(fd, lo, hi - lo, filename)
        if lock is None:
            continue
        found.append(lock)
        # A lock reaching outside [lo, hi) still splits only what is inside.
        pending.append((lo, max(lo, min(hi, lock.start))))
        pending.append((max(lo, min(hi, lock.end)), hi))
    found.sort(key=lambda lock: (lock.start, lock.length))
    return found
