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
import syslog
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from imglock import faults
from imglock.lock import procfs
from imglock.run.adapters.base import Attachment, VmmRun
from imglock.run.reporter import Reporter
from imglock.run.session import ClaimSession, FileKey
from imglock.run.survivors import using

#: The watcher's exit status when something went wrong in it (EX_SOFTWARE).
WATCHER_FAILED: Final = 70


def heir(survivors: set[int]) -> int:
    """The survivor to name in the lock: the oldest (a daemon, before its workers)."""
    return min(survivors, key=lambda pid: (procfs.start_time(pid) or 0.0, pid))


def command_of(pid: int) -> list[str] | None:
    """The command line of *pid*, for the lock's holder records."""
    return procfs.argv(pid)


def pidfds_of(survivors: Iterable[int], files: set[FileKey]) -> dict[int, int]:
    """A pidfd on each of *survivors* that still uses one of *files*, by pid."""
    pidfds = {}
    for pid in survivors:
        with contextlib.suppress(OSError):  # gone meanwhile: nothing to keep for it
            pidfds[pid] = os.pidfd_open(pid)
    # A pid seen in /proc may have been reused before its pidfd was
    # opened: keep only the pidfds of processes that still use the files.
    for pid in set(pidfds) - using(pidfds, files):
        os.close(pidfds.pop(pid))
    return pidfds


def holding(files_and_bytes: Iterable[tuple[FileKey, int]], proc: str = "/proc") -> set[int]:
    """Every local process holding the lock on one of the (file, byte) pairs, through any fd.

    An OFD lock shows in the fdinfo of every descriptor of its open file
    description, so this finds each process that shares a claim's
    descriptors, wherever it came from (a descendant, or one that got the
    descriptor over a unix socket).
    """
    wanted = list(files_and_bytes)
    if not wanted:
        return set()
    locks = procfs.scan(proc)
    return {
        lock.pid
        for key, byte in wanted
        for lock in locks.get(key, ())
        if lock.covers(byte, byte + 1)
    }


@dataclass(eq=False)
class Watched:
    """What the wrapper hands to its watcher: the claim, the VMM, the processes that use it."""

    session: ClaimSession
    #: The VMM as the wrapper followed it; None when the watcher attaches
    #: to it itself (*attach_to*: the command was exec'd in the wrapper's place).
    attached: Attachment | None
    #: A pidfd on each process still using the claim, by pid.
    pidfds: dict[int, int]
    #: The process the lock names.
    named: int
    check_interval: float
    check_deadline: float
    attach_to: VmmRun | None = None
    #: Where the watcher's messages go (syslog, for one with no terminal).
    reporter: Reporter | None = None


def start(watched: Watched, mask: Iterable[int]) -> int:
    """Fork the watcher for *watched*; return its pid.

    Returns only in the wrapper: the watcher runs in the child and exits there.
    """
    with warnings.catch_warnings():
        # Python 3.12 warns about fork() in a process with threads (the QMP
        # monitor's, stopped just before): the watcher uses none of theirs.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid:
        return pid
    code = WATCHER_FAILED  # pragma: no cover - everything below runs in the watcher
    try:
        code = run_watcher(watched, mask)
    finally:
        os._exit(code)


def run_watcher(watched: Watched, mask: Iterable[int], keep_stderr: bool = False) -> int:
    """In a forked process: detach, then watch until the claim ends; the exit status.

    With *keep_stderr* the watcher keeps the command's standard error (a
    libvirt domain's log), where its messages go too.
    """
    try:  # pragma: no cover - runs in the watcher
        vmm = watched.attach_to.descriptors if watched.attach_to is not None else set()
        _detach({*watched.session.descriptors, *watched.pidfds.values(), *vmm}, keep_stderr)
        # Any signal that ends the watcher ends it at once: the survivors
        # hold the claim without it, and it must not clean up under them.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set(mask))
        return Watcher(watched).run()
    except BaseException as exc:  # the watcher has no one to raise to
        (watched.reporter or WATCHER_REPORTER).error(
            f"watcher stopped: {exc!r}; the processes using the images keep the claim"
        )
        return WATCHER_FAILED


def _detach(keep: set[int], keep_stderr: bool) -> None:  # pragma: no cover - in the watcher
    """A session of its own, /dev/null as stdin/stdout (and stderr), no descriptor but *keep*."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1) if keep_stderr else (0, 1, 2):
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
    syslog.openlog("imglock", syslog.LOG_PID, syslog.LOG_DAEMON)
    syslog.syslog(syslog.LOG_ERR, message)


def _no_note(message: str) -> None:
    """The watcher has no terminal to take notes."""


#: The watcher's messages: errors to syslog, notes nowhere.
WATCHER_REPORTER: Final = Reporter(error=_log, warn=_log, note=_no_note)


def helper_reporter() -> Reporter:
    """Messages of a watcher beside a command exec'd in place: its stderr, and syslog.

    The command's standard error is where its operator looks (a libvirt
    domain's log); syslog may not exist (no /dev/log), or be where a
    datacenter gathers alarms.
    """
    say = Reporter().error

    def both(message: str) -> None:
        say(message)
        _log(message)

    return Reporter(error=both, warn=both, note=_no_note)


@dataclass(eq=False)
class Watcher:
    """The watcher's loop: wait for the survivors, re-check the locks, end the claim."""

    watched: Watched
    session: ClaimSession = field(init=False)
    pidfds: dict[int, int] = field(init=False)
    named: int = field(init=False)

    attached: Attachment = field(init=False)

    def __post_init__(self) -> None:
        # The claim is the watcher's to end now, and it speaks to syslog.
        self.session = self.watched.session.detached(self.watched.reporter or WATCHER_REPORTER)
        self.pidfds = dict(self.watched.pidfds)
        self.named = self.watched.named

    def run(self) -> int:
        watched, session = self.watched, self.session
        if watched.attach_to is not None:
            session.command_started()
            self.attached = watched.attach_to.attach(session, self.named)
        else:
            assert watched.attached is not None, "a watcher that attaches to nothing"
            self.attached = watched.attached
            if self.attached.handover is not None:
                self.attached.handover.in_watcher(session, self.named)
        handover = self.attached.handover
        faults.point("watch:started")
        session.watch(self.attached.guest, watched.check_interval, watched.check_deadline)
        try:
            self._wait()
        finally:
            session.stop_watching()
        # Only once every process using the claim is gone: an error above
        # leaves the records and the private directory to them.
        session.end()
        if handover is not None:
            handover.finish()
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
        if self.named in self.pidfds or not self.pidfds:
            return
        heir = min(self.pidfds)
        self.session.relabel(heir, procfs.argv(heir), "the claim stays held, under the old name")
        self.named = heir

    def _guest_is_everyone(self) -> None:
        """A lost lock pauses every process still using the images (not QEMU: QMP stops it)."""
        self.attached.guest.retarget(self.named, sorted(self.pidfds))

    def _adopt_others(self) -> bool:
        """Processes that still share the claim's descriptors though none watched is left.

        A survivor may have passed them on (to a child it forked before it
        exited, or over a unix socket): those hold the lock too.
        """
        for pid in holding(self.session.own_bytes()) - {os.getpid()}:
            with contextlib.suppress(OSError):
                self.pidfds[pid] = os.pidfd_open(pid)
        if self.pidfds:
            self._relabel_if_gone()
            self._guest_is_everyone()
        return bool(self.pidfds)
