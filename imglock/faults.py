"""Fault injection for tests, at the syscall boundary and at named steps.

Faults a test cannot cause for real (EIO from an NFS lock manager, ENOSPC
while writing a record, a crash between two steps of a claim) are injected
through the environment variable ``IMGLOCK_FAULTS``, read once when the CLI
starts.  Entries are separated by ``;``; each is ``KIND=VALUE[,KEY=VALUE...]``:

``fcntl=ERRNO[,first=N][,count=M][,after=SECONDS]``
    lock calls number N (1-based) and on raise OSError(ERRNO), M of them
    (default: all), once SECONDS have passed since start-up (default 0).
``record=ERRNO``
    writing a holder record fails with ERRNO.
``crash=POINT`` / ``stop=POINT``
    SIGKILL (or SIGSTOP) this process when it reaches the step POINT (see
    :func:`point` calls; imglock(7) lists them).

The seams ask this module (:func:`point`, :func:`fcntl_failure`,
:func:`record_failure`); it imports nothing of imglock.  Without the
variable nothing is installed and each seam costs a lookup.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from types import ModuleType

_kill_points: dict[str, int] = {}


#: The errno a lock call fails with, or None: one function per ``fcntl=`` entry.
FcntlFault = Callable[[], int | None]

#: Each entry as if it wrapped the lock call of those before it: the last
#: one installed counts a call first, and a call it fails reaches no other.
_fcntl_faults: list[FcntlFault] = []
_record_errno: int | None = None


def point(name: str) -> None:
    """A named step where a test may crash or freeze this process."""
    if name in _kill_points:
        # At the calling thread, not the process: a signal sent to the whole
        # process is taken by whichever thread the kernel picks (the main
        # one, usually), and this thread may run on past the step before the
        # stop reaches it.  A thread's own SIGSTOP or SIGKILL still stops or
        # kills the whole process, starting with this thread.
        _signal().pthread_kill(threading.get_ident(), _kill_points[name])


def _signal() -> ModuleType:
    """The signal module, loaded once a kill point is installed.

    Deliberately lazy: it costs start-up time that no command pays unless
    a test injects a fault.
    """
    import signal

    return signal


def fcntl_failure() -> OSError | None:
    """The error this lock call is to fail with, if an injected fault says so."""
    for fault in reversed(_fcntl_faults):
        err = fault()
        if err is not None:
            return OSError(err, os.strerror(err))
    return None


def record_failure() -> OSError | None:
    """The error a holder record write is to fail with, if an injected fault says so."""
    if _record_errno is None:
        return None
    return OSError(_record_errno, os.strerror(_record_errno))


def _errno(name: str) -> int:
    value = getattr(errno, name.upper(), None)
    if not isinstance(value, int):
        raise ValueError(f"IMGLOCK_FAULTS: unknown errno {name!r}")
    return value


def _failing_fcntl(err: int, first: int, count: int | None, after: float) -> FcntlFault:
    """Lock calls number *first* and on fail with *err*, *count* of them (None: all),
    counted once *after* seconds have passed."""
    start = time.monotonic()
    calls = 0

    def strikes() -> int | None:
        nonlocal calls
        if time.monotonic() - start < after:
            return None
        calls += 1
        if calls >= first and (count is None or calls < first + count):
            return err
        return None

    return strikes


def install(spec: str) -> None:
    """Install the faults described by *spec* (the IMGLOCK_FAULTS syntax)."""
    global _record_errno
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        kind, _, rest = entry.partition("=")
        value, *options = rest.split(",")
        opts = dict(opt.partition("=")[::2] for opt in options)
        if kind == "fcntl":
            fault = _failing_fcntl(
                _errno(value),
                int(opts.get("first", 1)),
                int(opts["count"]) if "count" in opts else None,
                float(opts.get("after", 0)),
            )
            _fcntl_faults.append(fault)
        elif kind == "record":
            _record_errno = _errno(value)
        elif kind in ("crash", "stop"):
            signal = _signal()
            _kill_points[value] = signal.SIGKILL if kind == "crash" else signal.SIGSTOP
        else:
            raise ValueError(f"IMGLOCK_FAULTS: unknown fault kind {kind!r}")


def reset() -> None:
    """Remove every installed fault."""
    global _record_errno
    _record_errno = None
    _fcntl_faults.clear()
    _kill_points.clear()


def install_from_environment() -> None:
    spec = os.environ.get("IMGLOCK_FAULTS")
    if spec:
        install(spec)
