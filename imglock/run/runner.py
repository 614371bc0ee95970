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
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Final, Protocol

from imglock import faults
from imglock.api import Claim
from imglock.errors import (
    EX_NOEXEC,
    EX_NOTFOUND,
    EX_TEMPFAIL,
    ImglockError,
    LockConflict,
    LockError,
    LockLost,
)
from imglock.lock.protocol import Layer
from imglock.lockcheck import DEFAULT_DEADLINE, LockWatch

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

Say = Callable[[str], None]


def _say(message: str) -> None:
    print(f"imglock: {message}", file=sys.stderr, flush=True)


def _no_note(message: str) -> None:
    """Notes (what is claimed, why no record was written) are shown only when asked for."""


_LAYER_WORDS: Final = (
    (Layer.IMGLOCK, "imglock layer"),
    (Layer.QEMU, "QEMU's lock bytes"),
    (Layer.QEMU_TEST, "QEMU's bytes tested, left to QEMU"),
)


def claim_notes(claim: Claim) -> list[str]:
    """What *claim* holds, one line per file, and why any holder record is missing."""
    layers = ", ".join(words for layer, words in _LAYER_WORDS if layer in claim.layers)
    notes = []
    for member in claim.members:
        notes.append(f"claimed {member.image.filename} {member.mode.value} ({layers})")
        if member.record_problem is not None:
            notes.append(f"no holder record for {member.image.filename}: {member.record_problem}")
    return notes


class GuestControl(Protocol):
    """How to stop a guest from writing when its lock is lost, or cannot be checked."""

    def pause(self, reason: str) -> str:
        """Stop the guest for good (its lock is lost); return a phrase saying how."""
        ...

    def suspend(self) -> str | None:
        """Stop the guest until :meth:`resume` (its lock cannot be checked now).

        Returns how, or None when the guest was not running (then nothing
        is to be resumed either).
        """
        ...

    def resume(self) -> str:
        """Undo :meth:`suspend`; return a phrase saying how."""
        ...


class SignalGuest:
    """Any command: pause it with a signal (SIGSTOP by default).

    Once the command has exited leaving processes that use the images (see
    :mod:`imglock.run.watcher`), every one of them gets the signal.
    """

    def __init__(self, pid: int, signo: int = signal.SIGSTOP) -> None:
        self.pids = [pid]
        self.signo = signo

    def pause(self, reason: str) -> str:
        return self._send(self.signo) or "the command had already exited"

    def suspend(self) -> str | None:
        return self._send(signal.SIGSTOP)

    def resume(self) -> str:
        return self._send(signal.SIGCONT) or "the command had already exited"

    def _send(self, signo: int) -> str | None:
        sent = []
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signo)
                sent.append(str(pid))
        return f"sent {signal_name(signo)} to pid {', '.join(sent)}" if sent else None


def signal_name(signo: int) -> str:
    """SIGSTOP for 19; a real-time signal, which has no name of its own, by number."""
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"signal {signo}"


class Handover(Protocol):
    """What a command's watcher (imglock.run.watcher) must carry on, beyond the locks."""

    def before_fork(self) -> None:
        """In the wrapper, before the watcher is forked: stop any thread."""
        ...

    def in_watcher(self, runner: Runner) -> None:
        """In the watcher, once it runs: take up the work again."""
        ...

    def finish(self) -> None:
        """In the watcher, once the claim has ended: clean up."""
        ...


class RunConfig:
    """What ``imglock run`` was asked to do."""

    def __init__(
        self,
        argv: Sequence[str],
        claim: Claim,
        conflict_exit: int = EX_TEMPFAIL,
        check_interval: float = 5.0,
        check_deadline: float | None = DEFAULT_DEADLINE,
        lock_lost_signal: int = signal.SIGSTOP,
        claim_at_start: bool = True,
        say: Say = _say,
        note: Say = _no_note,
    ) -> None:
        self.argv = argv
        self.claim = claim
        self.conflict_exit = conflict_exit
        #: Seconds between lock re-checks while COMMAND runs (0: never).
        self.check_interval = check_interval
        #: Seconds a lock check may take before the guest is suspended (None: no limit).
        self.check_deadline = check_deadline
        self.lock_lost_signal = lock_lost_signal
        #: Claim at start (False on a migration destination: the handoff claims).
        self.claim_at_start = claim_at_start
        #: Errors (always shown), and notes (shown with -v).
        self.say = say
        self.note = note


class Runner:
    """Runs one command under a claim; :meth:`run` returns its exit status."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        #: Serialises the claim between the main loop and a handoff thread.
        self.claim_lock = threading.Lock()
        self.child = -1
        self.guest: GuestControl | None = None
        #: Set by a migration handoff once the claim is deliberately not held.
        self.lock_expected = True
        self.lost = False
        #: A lock check has not completed within its deadline (until one does),
        #: and how the guest was suspended then (None: it was not running).
        self.stalled = False
        self.suspended: str | None = None
        #: Lines a lock check reported already (each is said once).
        self.noticed: set[str] = set()
        self.lock_watch: LockWatch | None = None
        self.on_started: Callable[[Runner], None] | None = None
        #: Set by a QEMU handoff: what a watcher must take over besides the locks.
        self.handover: Handover | None = None
        #: The pid of the watcher the claim was handed to, once it was.
        self.watcher = 0
        #: Whether the command's orphans become our children (PR_SET_CHILD_SUBREAPER).
        self.subreaper = False

    def run(self) -> int:
        claim = self.config.claim
        claim.open()
        from imglock.run.survivors import become_subreaper

        # Orphans of COMMAND (a daemon's launcher exits at once) become our
        # children, so that step 6 finds them among our descendants.
        self.subreaper = become_subreaper()
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, *FORWARDED})
        try:
            return self._run(claim, old_mask)
        finally:
            try:
                if self.watcher:
                    claim.close()  # the watcher and the survivors hold the claim
                else:
                    claim.release()
            except LockError as exc:
                # The descriptors are closed all the same, and the locks went
                # with them: say so, and let COMMAND's status stand.
                self.config.say(f"{exc} (while releasing: the image is free all the same)")
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _run(self, claim: Claim, old_mask: set[int | signal.Signals]) -> int:
        gate_r, gate_w = os.pipe()
        err_r, err_w = os.pipe()  # both O_CLOEXEC: EOF on err_r means exec succeeded
        self.child = os.fork()
        if self.child == 0:  # pragma: no cover - the child execs or exits
            os.close(gate_w)
            os.close(err_r)
            _child(self.config.argv, claim.fds, gate_r, err_w, old_mask)
        os.close(gate_r)
        os.close(err_w)
        try:
            faults.point("run:forked")
            claim.owner_pid = self.child
            claim.command = list(self.config.argv)
            if self.config.claim_at_start:
                with interruptible(old_mask):
                    claim.acquire()
                for line in claim_notes(claim):
                    self.config.note(line)
            else:
                # Here, in the main thread and before COMMAND runs: what the
                # handoff's claim needs besides its locks is not then on the
                # guest's downtime, and no import runs in another thread when
                # a daemonizing QEMU makes us fork.
                claim.prepare()
                self.config.note("migration destination: images are claimed at the handoff")
            self.lock_expected = self.config.claim_at_start
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
            self.config.say(f"{self.config.argv[0]}: {os.strerror(failed)}")
            return EX_NOTFOUND if failed == errno.ENOENT else EX_NOEXEC
        faults.point("run:started")
        claim.qemu_holds_its_bytes()
        self.guest = self.guest or SignalGuest(self.child, self.config.lock_lost_signal)
        if self.on_started is not None:
            self.on_started(self)
        self.start_checks()
        try:
            status = self._wait()
        finally:
            self.stop_checks()
        self._hand_over_to_survivors(old_mask)
        return status

    def _hand_over_to_survivors(self, mask: set[int | signal.Signals]) -> None:
        """Step 6: if processes COMMAND left behind still use the claim, let them keep it."""
        from imglock.run.survivors import descendants, using

        claim = self.config.claim
        if self.subreaper and not _has_children():
            return  # every descendant would be our child by now: there is none
        files = claim.file_keys()
        survivors = using(descendants(os.getpid()), files)
        if not survivors:
            _reap_orphans()
            return
        faults.point("run:survivors")
        heir = self._heir(survivors)
        from imglock.lock import procfs

        command = procfs.argv(heir)
        with self.claim_lock:
            try:
                claim.relabel(heir, command)
            except LockError as exc:
                self.config.say(f"{exc} (the claim stays with pid {heir} under the old name)")
        pidfds = {}
        for pid in survivors:
            with contextlib.suppress(OSError):  # gone meanwhile: nothing to keep for it
                pidfds[pid] = os.pidfd_open(pid)
        # A pid seen in /proc may have been reused before its pidfd was
        # opened: keep only the pidfds of processes that still use the files.
        for pid in set(pidfds) - using(pidfds, files):
            os.close(pidfds.pop(pid))
        # Only now, with a pidfd on each survivor, may their zombies be reaped
        # (a reaped pid may be reused at once).
        _reap_orphans()
        if not pidfds:
            return
        self.child = heir if heir in pidfds else min(pidfds)
        if isinstance(self.guest, SignalGuest):
            self.guest.pids = sorted(pidfds)
        if self.handover is not None:
            self.handover.before_fork()
        from imglock.run import watcher

        self.watcher = watcher.start(self, pidfds, mask)
        for fd in pidfds.values():
            os.close(fd)
        faults.point("run:handed-over")
        self.config.note(
            f"{len(pidfds)} process(es) left by the command still use the images: "
            f"the claim stays with pid {self.child} ({' '.join(command or ['?'])}), "
            f"watched by pid {self.watcher}"
        )

    def _heir(self, survivors: set[int]) -> int:
        """The survivor to name in the lock: the oldest (a daemon, before its workers)."""
        from imglock.lock import procfs

        return min(survivors, key=lambda pid: (procfs.start_time(pid) or 0.0, pid))

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

    # -- the lock check (imglock.lockcheck) ---------------------------------

    def start_checks(self) -> None:
        """Check the claim every --check-interval seconds, in the background."""
        interval = check_interval(self.config.check_interval)
        if interval is None:
            return
        self.lock_watch = LockWatch(
            self._checked,
            interval,
            self._lost,
            self.config.check_deadline,
            self._stalled,
            self._intact,
            self._noticed,
        ).start()

    def stop_checks(self) -> None:
        if self.lock_watch is not None:
            self.lock_watch.stop()
            self.lock_watch = None

    def _checked(self) -> list[str]:
        with self.claim_lock:
            if not self.lock_expected or self.lost:
                return []  # a migration owns the claim, or it is lost already
            return self.config.claim.verify()

    def _files(self) -> str:
        names = [m.image.filename for m in self.config.claim.members]
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    def _lost(self, exc: LockLost) -> None:
        """A lock is gone: pause the guest for good, and say so loudly."""
        self.lost = True
        assert self.guest is not None
        how = self.guest.pause(str(exc))
        self.config.say(
            f"{exc}; guest paused ({how}); imglock will not resume it "
            "nor take the claim again (see imglock(7), LOCK LOSS)"
        )

    def _stalled(self, deadline: float) -> None:
        """A check has not come back: suspend the guest before the server could let go."""
        if self.lost or self.stalled or not self.lock_expected:
            return
        assert self.guest is not None
        self.stalled = True
        self.suspended = self.guest.suspend()
        how = self.suspended or "it was not running"
        self.config.say(
            f"{self._files()}: lock check has not completed in {deadline:g} s "
            f"(the storage does not answer): guest paused ({how}) until a check completes"
        )

    def _intact(self) -> None:
        """A check that stalled came back with the claim intact: undo the suspension."""
        if not self.stalled or self.lost:
            return
        self.stalled = False
        assert self.guest is not None
        suspended, self.suspended = self.suspended, None
        if suspended is None:  # it was not running: nothing to resume
            self.config.say(f"{self._files()}: lock check completed, claim intact")
            return
        how = self.guest.resume()
        self.config.say(
            f"{self._files()}: lock check completed, claim intact: guest resumed ({how})"
        )

    def _noticed(self, line: str) -> None:
        if line not in self.noticed:
            self.noticed.add(line)
            self.config.say(line)


def forwarded(info: signal.struct_siginfo, session_leader: bool) -> bool:
    """Whether a signal the wrapper received must be passed on to COMMAND.

    Everything sent by a process (kill(1), systemd, a supervisor) is; of what
    the kernel sent, only a hangup that reached the wrapper as the leader of
    its session, which COMMAND did not get.
    """
    if info.si_code != SI_KERNEL:
        return True
    return info.si_signo == signal.SIGHUP and session_leader


def check_interval(seconds: float) -> float | None:
    """The timeout between lock checks: None (never) for 0 and for infinity."""
    import math

    return None if seconds <= 0 or math.isinf(seconds) else seconds


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


def run_command(config: RunConfig, runner: Runner | None = None) -> int:
    """Run *config*; return the exit status for the wrapper (flock(1)'s conventions)."""
    try:
        return (runner or Runner(config)).run()
    except Interrupted as exc:
        name = signal_name(exc.signo)
        config.say(f"{name} while claiming the images: {config.argv[0]} not started")
        return 128 + exc.signo
    except LockConflict as exc:
        config.say(str(exc))
        return config.conflict_exit
    except ImglockError as exc:
        config.say(str(exc))
        return exc.exit_status
