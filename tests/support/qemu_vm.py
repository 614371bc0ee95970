"""Real QEMU VMs for tests: start them, talk to them over QMP, never leak them.

Each VM gets a private QMP monitor (added with
:func:`imglock.qemu.cmdline.with_extra_args`, as ``imglock run`` adds
it), sockets live in a fresh 0700 directory with a short path (unix socket
paths are limited to 107 bytes, which pytest's ``tmp_path`` can exceed),
and the fixture kills every VM it started, whatever the test did.

Use it from a test through the ``qemu_vms`` fixture of conftest.py: it asks
for ``qemu_system_path``, so that the tests are skipped with a reason where
QEMU is not installed::

    from qemu_vm import TINY_PC, QemuVMs

    def test_something(qemu_vms: QemuVMs, raw_image: Path) -> None:
        vm = qemu_vms.start([*TINY_PC, "-drive", f"file={raw_image},format=raw,if=virtio"])
        with vm.connect() as monitor:
            assert monitor.query_status().running
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imglock.qemu.cmdline import with_extra_args
from imglock.qemu.monitor import MonitorError, MonitorThread

#: A small, quick x86 PC: no default devices, no display, TCG so that it
#: runs without /dev/kvm, 64 MiB so that a migration takes milliseconds.
TINY_PC: tuple[str, ...] = (
    "-M", "pc", "-m", "64", "-nodefaults", "-display", "none", "-accel", "tcg",
)  # fmt: skip

#: A machine without devices or RAM: enough for block-layer and QMP tests.
NONE_MACHINE: tuple[str, ...] = ("-M", "none", "-nodefaults", "-display", "none")

#: How long a VM gets to exit after SIGTERM before it is killed.
TERMINATE_GRACE = 3.0


#: How long one connection to a test's monitor may wait for QEMU's greeting,
#: and how many connections are tried before QEMU is said not to answer.
MONITOR_ATTEMPT_TIMEOUT = 10.0
MONITOR_ATTEMPTS = 3


def connect_test_monitor(
    qmp: str | os.PathLike[str],
    process: subprocess.Popen[Any],
    attempt_timeout: float = MONITOR_ATTEMPT_TIMEOUT,
) -> MonitorThread:
    """A test's monitor on *qmp*, through a new connection if one is never greeted.

    One connection that QEMU accepts and never greets must not stand for a
    QEMU that does not answer: each try is bounded by *attempt_timeout*,
    and the last one's error is raised (a caller that started the QEMU adds
    :func:`processes.describe_processes`).
    """
    attempt = 1
    while True:
        try:
            return MonitorThread.connect(qmp, timeout=attempt_timeout, process=process)
        except MonitorError:
            if attempt == MONITOR_ATTEMPTS or process.poll() is not None:
                raise
            attempt += 1


@dataclass
class QemuVM:
    """A QEMU process started by :class:`QemuVMs`."""

    name: str
    argv: list[str]
    qmp_path: str
    log_path: Path
    process: subprocess.Popen[bytes]
    monitors: list[MonitorThread] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def connect(self, timeout: float = 10.0) -> MonitorThread:
        """A synchronous monitor on the VM's private QMP socket (closed at teardown)."""
        monitor = connect_test_monitor(self.qmp_path, self.process, timeout)
        self.monitors.append(monitor)
        return monitor

    def log(self) -> str:
        """What QEMU wrote on stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for QEMU to exit on its own; return its status."""
        return self.process.wait(timeout)

    def terminate(self) -> int:
        """End QEMU (SIGTERM, then SIGKILL) and close its monitors; return its status."""
        for monitor in self.monitors:
            monitor.close()
        self.monitors.clear()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(TERMINATE_GRACE)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


class QemuVMs:
    """Starts VMs and owns a private 0700 directory for their sockets.

    A context manager: leaving it ends every VM it started.
    """

    def __init__(self, qemu: str) -> None:
        self.qemu = qemu
        # mkdtemp makes the directory 0700; /tmp keeps socket paths short.
        self.dir = Path(tempfile.mkdtemp(prefix="imglock-vm-", dir="/tmp"))
        os.chmod(self.dir, 0o700)
        self.vms: list[QemuVM] = []

    def path(self, name: str) -> str:
        """A path in the private directory (for migration sockets and the like)."""
        return str(self.dir / name)

    def start(
        self,
        args: Sequence[str],
        *,
        name: str | None = None,
        freeze_cpu: bool = False,
    ) -> QemuVM:
        """Start ``qemu-system-x86_64 ARGS`` with a private QMP socket.

        ``freeze_cpu`` adds ``-S`` (as ``imglock run`` does on a migration
        destination).  stdin and stdout are closed; stderr goes to a log
        file shown by :meth:`QemuVM.log`.
        """
        name = name or f"vm{len(self.vms)}"
        qmp_path = self.path(f"{name}.qmp")
        argv = with_extra_args([self.qemu, *args], qmp_socket=qmp_path, freeze_cpu=freeze_cpu)
        log_path = self.dir / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log
            )
        vm = QemuVM(name, argv, qmp_path, log_path, process)
        self.vms.append(vm)
        return vm

    def close(self) -> None:
        """Terminate every VM and remove the directory."""
        for vm in self.vms:
            with contextlib.suppress(Exception):
                vm.terminate()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> QemuVMs:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def ofd_lock_bytes(pid: int, path: str | os.PathLike[str]) -> set[int]:
    """The single bytes of ``path`` that process ``pid`` holds OFD locks on.

    Read from /proc/PID/fdinfo, which lists each open file description's
    locks: the only way to tell which local process holds an OFD lock
    (F_OFD_GETLK reports pid -1).  Multi-byte ranges are expanded.
    """
    target = os.stat(path)
    held: set[int] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            st = os.stat(fd)
            info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
        except (FileNotFoundError, PermissionError):
            continue
        if (st.st_dev, st.st_ino) != (target.st_dev, target.st_ino):
            continue
        for line in info.splitlines():
            # lock:	1: OFDLCK  ADVISORY  READ  -1 08:01:1234 100 100
            if line.startswith("lock:") and "OFDLCK" in line:
                fields = line.split()
                start, end = int(fields[-2]), fields[-1]
                stop = start if end == "EOF" else int(end)
                held.update(range(start, stop + 1))
    return held
