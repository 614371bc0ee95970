"""Running a command in the wrapper's place (``imglock run --exec``): one pid for both.

A manager that tracks the pid it started (libvirt's pid file and ``virsh
destroy``, systemd's main pid, a cgroup) must reach the VMM itself, not a
wrapper in front of it.  So, as ``chpst`` or ``taskset`` do, the wrapper
becomes the command:

1. open every image and take the claim (or, on a migration destination,
   prepare it), naming this process as the owner: it is about to be the
   command;
2. fork a helper, detached: a grandchild in a session of its own (no
   one's zombie), which keeps the claim's descriptors, a pidfd on this
   process and the standard error (a libvirt domain's log);
3. exec the command here: it inherits the descriptors, and with them the
   claim;
4. the helper waits for the exec (a close-on-exec pipe closes), attaches to
   the VMM (for QEMU: the QMP monitor, the migration handoff, the block
   graph) and checks the locks, as the wrapper would, until the command and
   every process still using its claim have exited; then it ends the claim.

Signals sent to the pid reach the command itself.  Killing the helper
leaves the claim with the command (its descriptors hold the locks), without
the lock check; killing the command lets the helper end the claim at once.
The helper's messages go to the command's standard error and to syslog.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import warnings
from dataclasses import dataclass
from typing import Final

from imglock import faults
from imglock.errors import EX_NOEXEC, EX_NOTFOUND
from imglock.run.runner import INTERRUPTING, Launcher, interruptible
from imglock.run.watcher import WATCHER_FAILED, Watched, helper_reporter, run_watcher

#: What the helper writes before it waits, so that a wrapper never execs
#: before its helper has the descriptors (a fork that failed leaves none).
_HELPER_READY: Final = b"r"


@dataclass(eq=False)
class InPlace(Launcher):
    """Claims, forks the helper, and execs the command in this process."""

    def run(self) -> int:
        """Exec the command here, its claim held; return only if it could not be run."""
        session = self.session
        session.open()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(INTERRUPTING))
        try:
            session.name_owner(os.getpid(), self.argv)
            if self.vmm.claim_at_start:
                with interruptible(mask):
                    session.take()
            else:
                session.prepare_arrival()
            faults.point("run:claimed")
            failed = self._exec_beside_helper(mask)
        except BaseException:
            session.end()
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
        # The exec failed: the helper saw the pipe say so, and ends with nothing to do.
        session.end()
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        session.reporter.error(f"{self.argv[0]}: {os.strerror(failed)}")
        return EX_NOTFOUND if failed == errno.ENOENT else EX_NOEXEC

    def _exec_beside_helper(self, mask: set[int | signal.Signals]) -> int:
        """Start the helper, then exec; the errno of a failed exec."""
        me = os.getpid()
        pidfd = os.pidfd_open(me)
        exec_r, exec_w = os.pipe()  # close-on-exec: EOF on exec_r means the exec succeeded
        ready_r, ready_w = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12)
            middle = os.fork()
        if middle == 0:  # pragma: no cover - the helper's side
            os.close(exec_w)
            os.close(ready_r)
            code = WATCHER_FAILED
            try:
                # The middle process exits at once: the helper is then no one's child.
                code = self._helper(me, pidfd, exec_r, ready_w, mask) if os.fork() == 0 else 0
            finally:
                os._exit(code)
        os.close(exec_r)
        os.close(ready_w)
        os.close(pidfd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(middle, 0)
        ready = os.read(ready_r, 1) == _HELPER_READY
        os.close(ready_r)
        if not ready:
            self.session.reporter.error(
                f"the helper that checks the claim did not start: {self.argv[0]} runs without it"
            )
        faults.point("run:started")
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        # Python ignores SIGPIPE; the command should get the default, as from a shell.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        for fd in self.session.fds:
            os.set_inheritable(fd, True)
        try:
            os.execvp(self.argv[0], self.argv)
        except OSError as exc:
            failed = exc.errno or errno.EIO
        os.write(exec_w, str(failed).encode())
        os.close(exec_w)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        return failed

    def _helper(
        self, pid: int, pidfd: int, exec_r: int, ready: int, mask: set[int | signal.Signals]
    ) -> int:  # pragma: no cover - runs in the helper
        """The helper's life: wait for the exec, then watch the command and its claim."""
        watched = Watched(
            self.session,
            None,
            {pid: pidfd},
            pid,
            self.check_interval,
            self.check_deadline,
            attach_to=self.vmm,
            reporter=helper_reporter(),
        )
        os.write(ready, _HELPER_READY)
        os.close(ready)
        exec_failed = os.read(exec_r, 16)
        os.close(exec_r)
        if exec_failed:
            return 0  # the wrapper says why, and ends the claim
        return run_watcher(watched, mask, keep_stderr=True)
