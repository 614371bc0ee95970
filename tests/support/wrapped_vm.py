"""QEMU under the real ``imglock run``, driven through a QMP monitor of the test's own.

``imglock run`` adds a private monitor of its own; the test's monitor sits
beside it on the command line (``-qmp``), as a management tool's would
(``vms`` is the fixture of that name in conftest.py, a :class:`WrappedVMs`)::

    vm = vms.start("-blockdev", ..., options=("--lockspace", space))
    vm.qmp("blockdev-add", {...})
    wait_until(lambda: vm.runstate() == "running", what="the guest to run", timeout=TIMEOUT)

Leaving the context ends every wrapper and every QEMU it started, also a
QEMU whose wrapper was killed.  :class:`Watcher` samples an image's
exclusive holders from a process of its own while a test moves the claim.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processes import alive, children, describe_processes, process_tree, wait_until
from qemu_vm import NONE_MACHINE, connect_test_monitor

from imglock.qemu.monitor import MonitorClosed, MonitorThread

#: Seconds a QEMU under TCG on a busy machine gets to get somewhere.
TIMEOUT = 20.0

REPO = str(Path(__file__).parents[2])


@dataclass
class MonitoredVM:
    """A QEMU seen through the test's own QMP monitor (``-qmp`` on its command line)."""

    monitor: MonitorThread

    @classmethod
    def connect(cls, path: str | os.PathLike[str], timeout: float = TIMEOUT) -> MonitoredVM:
        """Connect to the QMP socket at *path* (of a QEMU not started here, such as a daemon)."""
        return cls(MonitorThread.connect(path, timeout=timeout))

    def qmp(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run a QMP command on the test's own monitor."""
        return self.monitor.call(self.monitor.monitor.execute(command, arguments), timeout=30)

    def runstate(self) -> str:
        status: str = self.monitor.query_status(timeout=10).status
        return status

    def migration(self) -> str | None:
        """The outgoing migration's status (``query-migrate``), if any."""
        status: str | None = self.qmp("query-migrate").get("status")
        return status

    def close(self) -> None:
        self.monitor.close()

    def __enter__(self) -> MonitoredVM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass
class WrappedVM(MonitoredVM):
    """One ``imglock run -- qemu-system-x86_64 ...`` and the test's monitor on that QEMU."""

    #: What the test started: the wrapper (QEMU itself when not wrapped, or
    #: the command that runs the wrapper on a host of its own).
    process: subprocess.Popen[Any]
    log_path: Path
    _qemu_pid: int | None = None

    @property
    def qemu_pid(self) -> int:
        """The QEMU: the end of the started process's line of only children."""
        if self._qemu_pid is None:
            pid = self.process.pid
            while below := children(pid):
                (pid,) = below
            self._qemu_pid = pid
        return self._qemu_pid

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")

    def qmp(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run a QMP command on the test's own monitor; a QEMU gone says why, from its stderr."""
        try:
            return super().qmp(command, arguments)
        except MonitorClosed as exc:
            raise AssertionError(f"{exc}\nwhat the run said:\n{self.stderr()}") from None

    def quit(self) -> int:
        """Ask QEMU to quit; return the wrapper's exit status."""
        with contextlib.suppress(Exception):
            self.qmp("quit")
        self.monitor.close()
        return self.process.wait(timeout=20)


class WrappedVMs:
    """Starts wrapped VMs in a private 0700 directory; ends them all on exit."""

    def __init__(self, qemu: str, prefix: str = "imglock-wrap-") -> None:
        self.qemu = qemu
        # /tmp keeps unix socket paths short (107 bytes at most).
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.vms: list[WrappedVM] = []

    def path(self, name: str) -> Path:
        """A path in the private directory, for a socket or a file."""
        return self.dir / name

    def start(
        self,
        *qemu_args: str | os.PathLike[str],
        options: Sequence[str | os.PathLike[str]] = (),
        machine: Sequence[str] = NONE_MACHINE,
        env: dict[str, str] | None = None,
        name: str | None = None,
        wrapped: bool = True,
        popen: Callable[..., subprocess.Popen[Any]] = subprocess.Popen,
    ) -> WrappedVM:
        """Start ``imglock -v run OPTIONS -- qemu MACHINE QEMU_ARGS -qmp TEST-SOCKET``.

        Without *wrapped*, QEMU alone (a VM outside imglock); *popen* starts
        the command line (on a host of its own, for instance).
        """
        name = name or f"vm{len(self.vms)}"
        qmp = self.path(f"{name}.qmp")
        argv = [
            self.qemu, *machine, *[os.fspath(arg) for arg in qemu_args],
            "-qmp", f"unix:{qmp},server=on,wait=off",
        ]  # fmt: skip
        if wrapped:
            wrapper = [sys.executable, "-m", "imglock", "-v", "run"]
            argv = [*wrapper, *[os.fspath(option) for option in options], "--", *argv]
        log_path = self.path(f"{name}.log")
        with log_path.open("wb") as log:
            process = popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                env={**os.environ, "PYTHONPATH": REPO, **(env or {})},
            )  # fmt: skip
        try:
            monitor = connect_test_monitor(qmp, process)
        except BaseException as exc:
            seen = describe_processes(process.pid)
            for pid in reversed(process_tree(process.pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait()
            raise AssertionError(
                f"QEMU did not start ({exc}); processes then: {seen}; "
                f"the wrapper said: {log_path.read_text()}"
            ) from None
        vm = WrappedVM(monitor, process, log_path)
        self.vms.append(vm)
        vm.qemu_pid  # noqa: B018 - remembered now, for ending it after a killed wrapper
        return vm

    def end(self, vm: WrappedVM) -> None:
        """Kill *vm*: what the test started, all below it, and its QEMU, orphaned or not."""
        vm.monitor.close()
        for pid in {*process_tree(vm.process.pid), vm.qemu_pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        vm.process.wait()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(vm.qemu_pid, os.WNOHANG)
        wait_until(
            lambda: not alive(vm.qemu_pid),
            what=f"QEMU (pid {vm.qemu_pid}) to be gone",
            timeout=TIMEOUT,
        )

    def close(self) -> None:
        for vm in self.vms:
            self.end(vm)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> WrappedVMs:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


SAMPLER = str(Path(__file__).with_name("lock_sampler.py"))


class Watcher:
    """tests/support/lock_sampler.py in a process of its own, sampling an image's exclusive holders.

    The holders are pids, or with *owners* ``HOSTTAG:PID`` names (for holders
    on several hosts).  Leaving the context ends the sampler if :meth:`stop`
    did not.
    """

    def __init__(self, image: str | os.PathLike[str], *, owners: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, SAMPLER, *(["--owners"] if owners else []), image],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"

    def stop(self) -> list[tuple[float, list[Any]]]:
        """End the sampling; its samples: (monotonic time, holders)."""
        out, _ = self.proc.communicate(timeout=30)
        return [(t, holders) for t, holders in json.loads(out)]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
