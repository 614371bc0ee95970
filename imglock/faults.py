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

Without the variable nothing here runs and the seams cost one set lookup.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from typing import Any

_kill_points: dict[str, int] = {}


def point(name: str) -> None:
    """A named step where a test may crash or freeze this process."""
    if name in _kill_points:
        import signal
        import threading

        # At the calling thread, not the process: a signal sent to the whole
        # process is taken by whichever thread the kernel picks (the main
        # one, usually), and this thread may run on past the step before the
        # stop reaches it.  A thread's own SIGSTOP or SIGKILL still stops or
        # kills the whole process, starting with this thread.
        signal.pthread_kill(threading.get_ident(), _kill_points[name])


def _errno(name: str) -> int:
    value = getattr(errno, name.upper(), None)
    if not isinstance(value, int):
        raise ValueError(f"IMGLOCK_FAULTS: unknown errno {name!r}")
    return value


def _failing_fcntl(
    real: Callable[..., Any], err: int, first: int, count: int | None, after: float
) -> Callable[..., Any]:
    start = time.monotonic()
    calls = 0

    def fcntl(fd: int, cmd: int, arg: Any = 0) -> Any:
        nonlocal calls
        if time.monotonic() - start >= after:
            calls += 1
            if calls >= first and (count is None or calls < first + count):
                raise OSError(err, os.strerror(err))
        return real(fd, cmd, arg)

    return fcntl


def install(spec: str) -> None:
    """Install the faults described by *spec* (the IMGLOCK_FAULTS syntax)."""
    import signal  # the signal module is costly to load; only injected faults need it

    from imglock.lock import fcntl_locks, records

    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        kind, _, rest = entry.partition("=")
        value, *options = rest.split(",")
        opts = dict(opt.partition("=")[::2] for opt in options)
        if kind == "fcntl":
            fcntl_locks._fcntl = _failing_fcntl(
                fcntl_locks._fcntl,
                _errno(value),
                int(opts.get("first", 1)),
                int(opts["count"]) if "count" in opts else None,
                float(opts.get("after", 0)),
            )
        elif kind == "record":
            records._fail_writes_with = _errno(value)
        elif kind in ("crash", "stop"):
            _kill_points[value] = signal.SIGKILL if kind == "crash" else signal.SIGSTOP
        else:
            raise ValueError(f"IMGLOCK_FAULTS: unknown fault kind {kind!r}")


def install_from_environment() -> None:
    spec = os.environ.get("IMGLOCK_FAULTS")
    if spec:
        install(spec)
