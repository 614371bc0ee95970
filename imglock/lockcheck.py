"""Checking a held claim in the background: a lost lock is seen, a hung check is noticed.

A network filesystem can take a claim's locks away without telling the
holder: a GlusterFS brick restart or an NFS server reboot erases them, and
the holder's descriptors go on working.  So a claim is checked every
*interval* seconds (:meth:`imglock.api.Claim.verify`, which looks at the
claim's bytes from a second open file description and never takes one).

A check that does not come back is the other danger: the server hangs,
every call through the mount blocks, and once the client gives up (past
GlusterFS's ``network.ping-timeout``, an NFS lease, a CephFS session
timeout) the server drops the locks and may hand them to another host.
So each check runs on a thread of its own, watched with a *deadline*:
past it the holder hears of the stall (``imglock run`` pauses the guest)
before the server could let go; when a later check completes with the
claim intact it hears that too (and resumes the guest); if it completes
with the claim lost, it hears of the loss.  After a loss the watch ends:
nothing here ever takes a lock again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Self

from imglock.errors import LockLost

#: A check's result: one line for each lock held in the way outside imglock's
#: protocol (reported, not a loss).
Check = Callable[[], list[str]]

#: The default deadline of a check when the filesystem says nothing better,
#: in seconds: far above what a check costs on a healthy network filesystem
#: (a few lock round trips), far below the time after which servers hand a
#: silent client's locks to others (GlusterFS network.ping-timeout: 42 s;
#: an NFSv4 lease: 90 s; a CephFS session: 60 s).
DEFAULT_DEADLINE: Final = 2.0


def _nothing(*_args: object) -> None:
    """A hook nobody asked for."""


@dataclass(eq=False)
class LockWatch:
    """A background thread that checks a claim every :attr:`interval` seconds.

    ``on_loss`` is called once, with the :class:`~imglock.errors.LockLost`,
    and the watch ends.  ``on_stall`` is called with the deadline when a
    check has not completed within it, ``on_intact`` when a check that
    stalled has completed with the claim intact, ``on_notice`` with each
    line a check reports.  Hooks run on the watch's thread.
    """

    check: Check
    interval: float
    on_loss: Callable[[LockLost], None]
    #: Seconds a check may take before ``on_stall``; None: no limit.
    deadline: float | None = DEFAULT_DEADLINE
    on_stall: Callable[[float], None] = _nothing
    on_intact: Callable[[], None] = _nothing
    on_notice: Callable[[str], None] = _nothing
    _stopped: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    def start(self) -> Self:
        """Start checking, in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="imglock-lock-check", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop checking; a check under way is left to finish on its own thread."""
        self._stopped.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(1.0)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            if not self.check_now():
                return

    def check_now(self) -> bool:
        """Run one check with the deadline; False once the claim is lost (or the watch stopped)."""
        outcome: list[list[str] | BaseException] = []
        done = threading.Event()

        def work() -> None:
            try:
                outcome.append(self.check())
            except BaseException as exc:  # handed to the watching thread
                outcome.append(exc)
            finally:
                done.set()

        threading.Thread(target=work, name="imglock-lock-check-call", daemon=True).start()
        stalled = not done.wait(self.deadline)
        if stalled:
            assert self.deadline is not None
            self.on_stall(self.deadline)
            while not done.wait(0.2):
                if self._stopped.is_set():
                    return False
        result = outcome[0]
        if isinstance(result, LockLost):
            self.on_loss(result)
            return False
        if isinstance(result, BaseException):
            # A check that failed for another reason proves nothing either
            # way: say so, and check again at the next interval.
            self.on_notice(f"lock check failed: {result}")
            return not self._stopped.is_set()
        for line in result:
            self.on_notice(line)
        if stalled:
            self.on_intact()
        return not self._stopped.is_set()
