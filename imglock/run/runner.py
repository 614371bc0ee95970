"""Running a command with its images claimed, like flock(1) for VM images.

The order of events is what makes the lock trustworthy:

1. open every image (and its chain) — bad images fail here, before anything runs;
2. fork the child, which waits at a gate before it execs COMMAND, so the
   descriptors exist in both processes while the claim is taken;
3. claim on those descriptors, naming the *child's* pid as the owner, so
   ``imglock status`` names the VM, not the wrapper;
4. open the gate: the child execs COMMAND holding the OFD locks through
   its inherited descriptors.  If the wrapper dies (even by SIGKILL), the
   locks live on with the VM and vanish with it;
5. wait for the child, forwarding signals, re-checking the locks now and
   then and pausing the guest if they are lost;
6. once the child has exited, look for processes it left behind that still
   use the claim's descriptors (a daemon, a background job; the wrapper is
   their child subreaper, so they are its descendants).  If there are
   none, end the claim.  Otherwise name the survivor in the lock and the
   holder records, hand the claim to a detached watcher
   (:mod:`imglock.run.watcher`) and return the child's status: the claim
   lives as long as the survivors.

A conflict closes the gate unopened: the child exits without running
anything, and the wrapper exits with the conflict status.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from imglock import faults
from imglock.errors import (
    EX_NOEXEC,
    EX_NOTFOUND,
    EX_TEMPFAIL,
    ImglockError,
    LockConflict,
)
from imglock.run.adapters.base import Attachment, VmmRun
from imglock.run.guest import signal_name
from imglock.run.session import ClaimSession
from imglock.run.survivors import become_subreaper, descendants, using

#: Signals the wrapper passes on to COMMAND (imglock(1), SIGNALS).
FORWARDED: Final = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
#: si_code of a signal the kernel sent.  A terminal's ^C (SIGINT, SIGQUIT)
#: goes to the whole foreground process group: COMMAND, in the same group,
#: got it already and must not get it twice.  A terminal hangup, though,
#: sends SIGHUP to the session leader alone (drivers/tty/tty_jobctrl.c,
#: tty_signal_session_leader): when the wrapper leads its session, COMMAND
#: hears of the hangup only through it.
SI_KERNEL: Final = 0x80
#: Signals that end a wait for busy images (imglock(1), SIGNALS): the wait
#: is left, the queue place given up, and COMMAND never started.
INTERRUPTING: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_GATE_GO: Final = b"g"


@dataclass(eq=False)
class Launcher:
    """What runs a command under a claim: :class:`Runner`, or one that execs in place."""

    session: ClaimSession
    #: The command to run, as its adapter prepared it.
    vmm: VmmRun
    #: Seconds between lock re-checks while COMMAND runs (0 or inf: never).
    check_interval: float = 5.0
    #: Seconds a lock check may take before the guest is suspended (inf: no limit).
    check_deadline: float = math.inf

    @property
    def argv(self) -> list[str]:
        return list(self.vmm.argv)

    def run(self) -> int:
        """Run the command; its exit status (or the wrapper's, if it never ran)."""
        raise NotImplementedError


@dataclass(eq=False)
class Runner(Launcher):
    """Runs one command as a child under a claim session; :meth:`run` returns its exit status."""

    child: int = -1
    #: The pid of the watcher the claim was handed to, once it was.
    watcher: int = 0
    #: Whether the command's orphans become our children (PR_SET_CHILD_SUBREAPER).
    subreaper: bool = False

    def run(self) -> int:
        session = self.session
        session.open()
        # Orphans of COMMAND (a daemon's launcher exits at once) become our
        # children, so that step 6 finds them among our descendants.
        self.subreaper = become_subreaper()
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, *FORWARDED})
        try:
            return self._run(old_mask)
        finally:
            try:
                if self.watcher:
                    session.leave()  # the watcher and the survivors hold the claim
                else:
                    session.end()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _run(self, old_mask: set[int | signal.Signals]) -> int:
        session = self.session
        say = session.reporter.error
        gate_r, gate_w = os.pipe()
        err_r, err_w = os.pipe()  # both O_CLOEXEC: EOF on err_r means exec succeeded
        self.child = os.fork()
        if self.child == 0:  # pragma: no cover - the child execs or exits
            os.close(gate_w)
            os.close(err_r)
            _child(self.argv, session.fds, gate_r, err_w, old_mask)
        os.close(gate_r)
        os.close(err_w)
        try:
            faults.point("run:forked")
            session.name_owner(self.child, self.argv)
            if self.vmm.claim_at_start:
                with interruptible(old_mask):
                    session.take()
            else:
                session.prepare_arrival()
            faults.point("run:claimed")
            os.write(gate_w, _GATE_GO)
        except BaseException:
            os.close(gate_w)
            os.close(err_r)
            _reap(self.child)
            raise
        os.close(gate_w)
        failed = _read_exec_error(err_r)
        if failed is not None:
            _reap(self.child)
            say(f"{self.argv[0]}: {os.strerror(failed)}")
            return EX_NOTFOUND if failed == errno.ENOENT else EX_NOEXEC
        faults.point("run:started")
        session.command_started()
        attached = self.vmm.attach(session, self.child)
        session.watch(attached.guest, self.check_interval, self.check_deadline)
        try:
            status = self._wait()
        finally:
            session.stop_watching()
        self._hand_over_to_survivors(old_mask, attached)
        return status

    def _hand_over_to_survivors(
        self, mask: set[int | signal.Signals], attached: Attachment
    ) -> None:
        """Step 6: if processes COMMAND left behind still use the claim, let them keep it."""
        if self.subreaper and not _has_children():
            return  # every descendant would be our child by now: there is none
        files = self.session.file_keys()
        survivors = using(descendants(os.getpid()), files)
        if not survivors:
            _reap_orphans()
            return
        # Deliberately lazy: only a command that leaves processes behind needs
        # the watcher, and /proc's lock table with it (start-up of every run).
        from imglock.run import watcher

        faults.point("run:survivors")
        heir = watcher.heir(survivors)
        command = watcher.command_of(heir)
        self.session.relabel(heir, command,
                             f"the claim stays with pid {heir} under the old name")  # fmt: skip
        pidfds = watcher.pidfds_of(survivors, files)
        # Only now, with a pidfd on each survivor, may their zombies be reaped
        # (a reaped pid may be reused at once).
        _reap_orphans()
        if not pidfds:
            return
        self.child = heir if heir in pidfds else min(pidfds)
        attached.guest.retarget(self.child, sorted(pidfds))
        if attached.handover is not None:
            attached.handover.before_fork()
        watched = watcher.Watched(
            self.session, attached, pidfds, self.child, self.check_interval, self.check_deadline
        )
        self.watcher = watcher.start(watched, mask)
        for fd in pidfds.values():
            os.close(fd)
        faults.point("run:handed-over")
        self.session.reporter.note(
            f"{len(pidfds)} process(es) left by the command still use the images: "
            f"the claim stays with pid {self.child} ({' '.join(command or ['?'])}), "
            f"watched by pid {self.watcher}"
        )

    def _wait(self) -> int:
        watched = {signal.SIGCHLD, *FORWARDED}
        session_leader = os.getsid(0) == os.getpid()
        while True:
            info = signal.sigwaitinfo(watched)
            if info.si_signo == signal.SIGCHLD:
                pid, status = os.waitpid(self.child, os.WNOHANG)
                if pid == self.child:
                    code = os.waitstatus_to_exitcode(status)
                    return code if code >= 0 else 128 - code  # 128+N for signal N
                continue
            if forwarded(info, session_leader):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.child, info.si_signo)


def forwarded(info: signal.struct_siginfo, session_leader: bool) -> bool:
    """Whether a signal the wrapper received must be passed on to COMMAND.

    Everything sent by a process (kill(1), systemd, a supervisor) is; of what
    the kernel sent, only a hangup that reached the wrapper as the leader of
    its session, which COMMAND did not get.
    """
    if info.si_code != SI_KERNEL:
        return True
    return info.si_signo == signal.SIGHUP and session_leader


def _child(
    argv: Sequence[str], fds: list[int], gate: int, err: int, mask: set[int | signal.Signals]
) -> None:  # pragma: no cover - runs in the forked child
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        # Python ignores SIGPIPE; COMMAND should get the default, as from a shell.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        for fd in fds:
            os.set_inheritable(fd, True)
        go = os.read(gate, 1)
        if go != _GATE_GO:
            os._exit(EX_TEMPFAIL)
        os.close(gate)
        os.execvp(argv[0], list(argv))
    except OSError as exc:
        os.write(err, str(exc.errno or errno.EIO).encode())
    finally:
        os._exit(EX_NOTFOUND)


def _read_exec_error(fd: int) -> int | None:
    try:
        data = b""
        while chunk := os.read(fd, 16):
            data += chunk
    finally:
        os.close(fd)
    return int(data) if data else None


def _has_children() -> bool:
    """Whether this process has any child left, live or zombie (none is reaped)."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def _reap_orphans() -> None:
    """Reap the orphans that exited under us (a daemon's intermediate process)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


class Interrupted(BaseException):
    """A signal ended the claim before COMMAND started (a BaseException, as KeyboardInterrupt)."""

    def __init__(self, signo: int) -> None:
        super().__init__(signo)
        self.signo = signo


def _interrupt(signo: int, _frame: object) -> None:
    raise Interrupted(signo)


@contextlib.contextmanager
def interruptible(mask: set[int | signal.Signals]) -> Iterator[None]:
    """Let INTERRUPTING signals end the block, unless the caller blocks (*mask*) or ignores them.

    Everything else the wrapper forwards stays blocked, and so does SIGCHLD.
    A signal sent before the block (while they were all blocked) ends it
    at once; one sent after it stays pending, and reaches COMMAND.  Only the
    main thread can run a handler: elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # One the caller ignores (nohup's SIGHUP) stays ignored: it never arrives.
    wanted = [
        signo
        for signo in INTERRUPTING
        if signo not in mask and signal.getsignal(signo) is not signal.SIG_IGN
    ]
    old = {signo: signal.signal(signo, _interrupt) for signo in wanted}
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, wanted)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    finally:
        for signo, handler in old.items():
            signal.signal(signo, handler)


def run_command(runner: Launcher, conflict_exit: int = EX_TEMPFAIL) -> int:
    """Run *runner*; return the exit status for the wrapper (flock(1)'s conventions)."""
    say = runner.session.reporter.error
    try:
        return runner.run()
    except Interrupted as exc:
        name = signal_name(exc.signo)
        say(f"{name} while claiming the images: {runner.argv[0]} not started")
        return 128 + exc.signo
    except LockConflict as exc:
        say(str(exc))
        return conflict_exit
    except ImglockError as exc:
        say(str(exc))
        return exc.exit_status
