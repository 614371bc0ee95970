"""The watcher: keeps a claim for the processes a command left behind, until the last is gone.

When the command of ``imglock run`` exits but processes it started still
use the images through the claim's descriptors (QEMU's ``-daemonize``, a
shell's background job), the wrapper returns to the shell with the
command's status and hands the claim to a small detached process, forked
from itself, which:

* keeps only the claim's descriptors and a pidfd (pidfd_open(2)) for each
  survivor, in a session of its own, with /dev/null as its standard
  streams (so that ``$(imglock run ...)`` and pipes do not wait for it);
* goes on re-checking the locks every ``--check-interval`` seconds, and
  for QEMU goes on watching its QMP monitor for a live migration (the
  private socket's directory lives as long as the watcher);
* once every process using the claim has exited, ends the claim (closes
  the descriptors, removes the holder records and the private directory)
  and exits.

The survivors hold the descriptors too, so killing the watcher at any
moment leaves the image held by a live process (they) or free: the lock
goes with the last of them.  The watcher's messages go to syslog.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from imglock import faults

if TYPE_CHECKING:
    from imglock.api import Claim
    from imglock.run.runner import Runner

#: The watcher's exit status when something went wrong in it (EX_SOFTWARE).
WATCHER_FAILED: Final = 70


def start(runner: Runner, pidfds: dict[int, int], mask: Iterable[int]) -> int:
    """Fork the watcher for *runner*'s claim and the processes of *pidfds*; return its pid.

    Returns only in the wrapper: the watcher runs in the child and exits there.
    """
    import warnings

    with warnings.catch_warnings():
        # Python 3.12 warns about fork() in a process with threads (the QMP
        # monitor's, stopped just before): the watcher uses none of theirs.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid:
        return pid
    code = WATCHER_FAILED  # pragma: no cover - everything below runs in the watcher
    try:
        _detach(keep={*runner.config.claim.descriptors, *pidfds.values()})
        # Any signal that ends the watcher ends it at once: the survivors
        # hold the claim without it, and it must not clean up under them.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set(mask))
        code = Watcher(runner, pidfds).run()
    except BaseException as exc:  # the watcher has no one to raise to
        _log(f"watcher stopped: {exc!r}; the processes using the images keep the claim")
    finally:
        os._exit(code)


def _detach(keep: set[int]) -> None:  # pragma: no cover - runs in the watcher
    """A session of its own, /dev/null as stdin/stdout/stderr, no descriptor but *keep*."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    low = 3
    for fd in sorted(keep | {null}):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))
    if null > 2 and null not in keep:
        with contextlib.suppress(OSError):
            os.close(null)


def _log(message: str) -> None:
    import syslog

    syslog.openlog("imglock", syslog.LOG_PID, syslog.LOG_DAEMON)
    syslog.syslog(syslog.LOG_ERR, message)


class Watcher:
    """The watcher's loop: wait for the survivors, re-check the locks, end the claim."""

    def __init__(self, runner: Runner, pidfds: dict[int, int]) -> None:
        self.runner = runner
        self.pidfds = dict(pidfds)

    def run(self) -> int:
        runner = self.runner
        claim = runner.config.claim
        claim.process = os.getpid()  # the claim is the watcher's to end now
        runner.config.say = _log
        runner.config.note = _no_note
        if runner.handover is not None:
            runner.handover.in_watcher(runner)
        faults.point("watch:started")
        runner.start_checks()
        try:
            self._wait()
        finally:
            runner.stop_checks()
        # Only once every process using the claim is gone: an error above
        # leaves the records and the private directory to them.
        claim.release()
        if runner.handover is not None:
            runner.handover.finish()
        return 0

    def _wait(self) -> None:
        while self.pidfds or self._adopt_others():
            poller = select.poll()
            by_fd = {fd: pid for pid, fd in self.pidfds.items()}
            for fd in by_fd:
                poller.register(fd, select.POLLIN)
            for fd, _event in poller.poll():
                os.close(fd)
                del self.pidfds[by_fd[fd]]
            self._relabel_if_gone()
            self._guest_is_everyone()

    def _relabel_if_gone(self) -> None:
        """When the process the lock names has exited, name one that still uses it."""
        runner = self.runner
        if runner.child in self.pidfds or not self.pidfds:
            return
        from imglock.errors import LockError
        from imglock.lock import procfs

        heir = min(self.pidfds)
        with runner.claim_lock:
            try:
                runner.config.claim.relabel(heir, procfs.argv(heir))
            except LockError as exc:
                _log(f"{exc} (the claim stays held, under the old name)")
        runner.child = heir

    def _guest_is_everyone(self) -> None:
        """A lost lock pauses every process still using the images (not QEMU: QMP stops it)."""
        from imglock.run.runner import SignalGuest

        if isinstance(self.runner.guest, SignalGuest):
            self.runner.guest.pids = sorted(self.pidfds)

    def _adopt_others(self) -> bool:
        """Processes that still share the claim's descriptors though none watched is left.

        A survivor may have passed them on (to a child it forked before it
        exited, or over a unix socket): those hold the lock too.
        """
        from imglock.run.survivors import holding

        claim = self.runner.config.claim
        if not claim.held:
            return False
        for pid in holding(own_bytes(claim)) - {os.getpid()}:
            with contextlib.suppress(OSError):
                self.pidfds[pid] = os.pidfd_open(pid)
        if self.pidfds:
            self._relabel_if_gone()
            self._guest_is_everyone()
        return bool(self.pidfds)


def own_bytes(claim: Claim) -> list[tuple[tuple[int, int], int]]:
    """((st_dev, st_ino) of the lock file, the claim's own imglock byte) for every held file."""
    from imglock.lock.protocol import Layer, imglock_byte

    out = []
    for member in claim.members:
        held = member.image.held
        if held is None or Layer.IMGLOCK not in held.layers:
            continue
        fd, _name = member.image.lock_target
        try:
            st = os.fstat(fd)
        except OSError:
            continue  # a mount gone away: no process can be found holding it
        out.append(((st.st_dev, st.st_ino), imglock_byte(held.mode, held.owner)))
    return out


def _no_note(message: str) -> None:
    """The watcher has no terminal to take notes."""
