"""QEMU under the real ``imglock run``, driven through a QMP monitor of the test's own.

``imglock run`` adds a private monitor of its own; the test's monitor sits
beside it on the command line (``-qmp``), as a management tool's would::

    @pytest.fixture
    def vms(qemu_system_path: str) -> Iterator[WrappedVMs]:
        with WrappedVMs(qemu_system_path) as vms:
            yield vms

    vm = vms.start("-blockdev", ..., options=("--lockspace", space))
    vm.qmp("blockdev-add", {...})

Leaving the context ends every wrapper and every QEMU it started, also a
QEMU whose wrapper was killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processes import wait_until
from qemu_vm import NONE_MACHINE

from imglock.qemu.monitor import MonitorThread


def until(predicate: Callable[[], object], timeout: float = 20.0, what: str = "") -> None:
    """Poll *predicate* until it is true; fail after *timeout* seconds."""
    wait_until(what or "the condition", predicate, timeout)


@dataclass
class WrappedVM:
    """One ``imglock run -- qemu-system-x86_64 ...`` and the test's monitor on that QEMU."""

    wrapper: subprocess.Popen[bytes]
    log_path: Path
    monitor: MonitorThread
    _qemu_pid: int | None = None

    @property
    def qemu_pid(self) -> int:
        """The wrapped QEMU: the wrapper's only child."""
        if self._qemu_pid is None:
            with open(f"/proc/{self.wrapper.pid}/task/{self.wrapper.pid}/children") as f:
                (pid,) = f.read().split()
            self._qemu_pid = int(pid)
        return self._qemu_pid

    def qmp(self, command: str, arguments: dict[str, object] | None = None) -> Any:
        """Run a QMP command on the test's own monitor."""
        return self.monitor.call(self.monitor.monitor.execute(command, arguments), timeout=30)

    def runstate(self) -> str:
        return self.monitor.query_status(timeout=10).status

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")

    def quit(self) -> int:
        """Ask QEMU to quit; return the wrapper's exit status."""
        with contextlib.suppress(Exception):
            self.qmp("quit")
        self.monitor.close()
        return self.wrapper.wait(timeout=20)


class WrappedVMs:
    """Starts wrapped VMs in a private 0700 directory; ends them all on exit."""

    def __init__(self, qemu: str) -> None:
        self.qemu = qemu
        # /tmp keeps unix socket paths short (107 bytes at most).
        self.dir = Path(tempfile.mkdtemp(prefix="imglock-wrap-", dir="/tmp"))
        self.vms: list[WrappedVM] = []

    def start(
        self,
        *qemu_args: str | os.PathLike[str],
        options: Sequence[str | os.PathLike[str]] = (),
        machine: Sequence[str] = NONE_MACHINE,
        env: dict[str, str] | None = None,
    ) -> WrappedVM:
        """Start ``imglock -v run OPTIONS -- qemu MACHINE QEMU_ARGS -qmp TEST-SOCKET``."""
        name = f"vm{len(self.vms)}"
        qmp = self.dir / f"{name}.qmp"
        argv = [
            sys.executable, "-m", "imglock", "-v", "run", *map(os.fspath, options), "--",
            self.qemu, *machine, *map(os.fspath, qemu_args),
            "-qmp", f"unix:{qmp},server=on,wait=off",
        ]  # fmt: skip
        log_path = self.dir / f"{name}.log"
        with log_path.open("wb") as log:
            wrapper = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), **(env or {})},
            )  # fmt: skip
        try:
            monitor = MonitorThread.connect(qmp, timeout=30, process=wrapper)
        except BaseException:
            wrapper.kill()
            wrapper.wait()
            raise AssertionError(f"QEMU did not start: {log_path.read_text()}") from None
        vm = WrappedVM(wrapper, log_path, monitor)
        self.vms.append(vm)
        vm.qemu_pid  # noqa: B018 - remembered now, for cleaning up after a killed wrapper
        return vm

    def close(self) -> None:
        for vm in self.vms:
            vm.monitor.close()
            for pid in (vm.wrapper.pid, vm.qemu_pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            vm.wrapper.wait()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(vm.qemu_pid, os.WNOHANG)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> WrappedVMs:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
