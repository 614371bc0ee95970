"""libvirt 9.0 as the manager above QEMU: the daemons of ``tests/libvirt/up``.

Three libvirtd, each in mount and UTS namespaces of its own (hosts
``libvirt-a``, ``libvirt-b`` and ``libvirt-c``); tests reach them by the
URIs in ``IMGLOCK_LIBVIRT_A``, ``_B`` and ``_C``.  A and B run domains as
root, and a domain's ``<emulator>`` there is a two-line program that runs
this checkout's ``imglock-qemu`` over the real QEMU.  C is libvirt as Debian
ships it (domains as libvirt-qemu), for the README's recipe as it stands.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest
from processes import alive, wait_until

#: The project's root: the emulator runs this checkout's imglock.
ROOT = Path(__file__).resolve().parents[2]
UP = ROOT / "tests" / "libvirt" / "up"
REQUIRE_LIBVIRT = os.environ.get("IMGLOCK_REQUIRE_LIBVIRT") == "1"
#: Seconds for a virsh command (a start with TCG takes well under one).
VIRSH_TIMEOUT = 60.0
QEMU = "/usr/bin/qemu-system-x86_64"
#: The XML namespace of libvirt's QEMU pass-through (<qemu:commandline>).
QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"


def unavailable_reason() -> str | None:
    """Why the libvirt tests cannot run here, or None when they can."""
    for name in ("IMGLOCK_LIBVIRT_A", "IMGLOCK_LIBVIRT_B", "IMGLOCK_LIBVIRT_C"):
        if not os.environ.get(name):
            return f'{name} is not set: start the daemons with eval "$(tests/libvirt/up)"'
    if not os.path.exists(QEMU):
        return f"{QEMU} not found"
    check = subprocess.run([UP, "--check"], capture_output=True, timeout=VIRSH_TIMEOUT)
    if check.returncode != 0:
        return "the libvirt daemons of tests/libvirt/up do not answer"
    return None


def required_host(name: str) -> Libvirt:
    """Host *name* (``a``, ``b`` or ``c``); the test fails without it under CI, else skips."""
    reason = unavailable_reason()
    if reason is not None and REQUIRE_LIBVIRT:
        pytest.fail(f"libvirt tests are required (IMGLOCK_REQUIRE_LIBVIRT=1): {reason}")
    if reason is not None:
        pytest.skip(reason)
    return Libvirt.of(name)


class VirshError(Exception):
    """A virsh command failed; the message is its stderr."""


@dataclass(frozen=True)
class Libvirt:
    """One libvirtd, as virsh reaches it."""

    #: "a" or "b": the host's name is ``libvirt-NAME``.
    name: str
    uri: str

    @classmethod
    def of(cls, name: str) -> Libvirt:
        return cls(name, os.environ[f"IMGLOCK_LIBVIRT_{name.upper()}"])

    @property
    def hostname(self) -> str:
        return f"libvirt-{self.name}"

    @property
    def state_dir(self) -> Path:
        """Where this host's private copies of libvirt's directories are."""
        return Path(os.environ.get("IMGLOCK_LIBVIRT_DIR", "/tmp/imglock-libvirt")) / self.name

    def virsh(self, *args: str | os.PathLike[str], timeout: float = VIRSH_TIMEOUT) -> str:
        """Run ``virsh -c URI ARGS``; its output, or :class:`VirshError` with its stderr."""
        proc = subprocess.run(
            ["virsh", "-q", "-c", self.uri, *(os.fspath(arg) for arg in args)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise VirshError(proc.stderr.strip() or f"virsh {args[0]!s}: exit {proc.returncode}")
        output: str = proc.stdout
        return output


def host_namespace(host: Libvirt) -> str:
    """The UTS namespace of the host's daemons: its QEMUs run in it too."""
    return os.readlink(f"/proc/{keeper(host)}/ns/uts")


def keeper(host: Libvirt) -> str:
    """The pid of the host's virtlogd, which keeps its namespaces while libvirtd restarts."""
    return (host.state_dir / "virtlogd.pid").read_text().strip()


def on_host(host: Libvirt) -> list[str]:
    """The command prefix that runs a program on *host*: in its mount and UTS namespaces."""
    return ["nsenter", "-t", keeper(host), "-m", "-u"]


def emulator(directory: Path, *run_options: str) -> Path:
    """The ``<emulator>``: this checkout's ``imglock-qemu`` (``imglock run --exec`` over QEMU).

    With *run_options*, ``imglock run --exec RUN_OPTIONS -- QEMU`` itself
    (``--handoff-timeout 2``...): libvirt passes no environment to set them.
    """
    path = directory / ("imglock-qemu" if not run_options else "imglock-run-qemu")
    if run_options:
        program = f"-m imglock run --exec {' '.join(run_options)} -- {QEMU}"
    else:
        program = "-m imglock.cli.emulator"
    path.write_text(f'#!/bin/sh\nexec env PYTHONPATH={ROOT} {sys.executable} {program} "$@"\n')
    path.chmod(0o755)
    return path


@dataclass(frozen=True)
class Disk:
    """A disk of a domain: a file, its format and its target (vda, sda...)."""

    source: Path
    target: str = "vda"
    format: str = "qcow2"
    device: str = "disk"

    def xml(self) -> str:
        bus = "sata" if self.device == "cdrom" else "virtio"
        readonly = "<readonly/>" if self.device == "cdrom" else ""
        return (
            f"<disk type='file' device='{self.device}'>"
            f"<driver name='qemu' type='{self.format}'/>"
            f"<source file={quoteattr(os.fspath(self.source))}/>"
            f"<target dev='{self.target}' bus='{bus}'/>{readonly}</disk>"
        )


@dataclass
class Domain:
    """A transient-free, defined TCG domain on one libvirtd; undefined by :meth:`remove`."""

    host: Libvirt
    emulator: Path
    disks: list[Disk]
    name: str = field(default_factory=lambda: f"imglock-{uuid.uuid4().hex[:10]}")
    #: More of QEMU's options (libvirt's <qemu:commandline>): a test's own monitor.
    qemu_args: tuple[str, ...] = ()

    def xml(self) -> str:
        devices = "".join(disk.xml() for disk in self.disks)
        extra = "".join(f"<qemu:arg value={quoteattr(arg)}/>" for arg in self.qemu_args)
        return (
            f"<domain type='qemu' xmlns:qemu='{QEMU_NAMESPACE}'><name>{self.name}</name>"
            "<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>"
            # SCSI disks come and go without the guest's help (a virtio
            # disk's unplug waits for a guest OS that is not there).
            f"<devices><emulator>{self.emulator}</emulator>{devices}"
            "<controller type='scsi' model='virtio-scsi'/></devices>"
            f"<qemu:commandline>{extra}</qemu:commandline></domain>"
        )

    def define(self, directory: Path) -> Domain:
        path = directory / f"{self.name}.xml"
        path.write_text(self.xml())
        self.host.virsh("define", path)
        return self

    def virsh(self, command: str, *args: str | os.PathLike[str]) -> str:
        """``virsh COMMAND DOMAIN ARGS``; a failure says the end of the domain's log too."""
        try:
            return self.host.virsh(command, self.name, *args)
        except VirshError as exc:
            raise VirshError(f"{exc}\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 12) -> str:
        """The last lines of the domain's log (QEMU's stderr, imglock's messages)."""
        log = self.host.state_dir / "log" / "qemu" / f"{self.name}.log"
        try:
            text = log.read_text(errors="replace")
        except OSError:
            return f"(no log at {log})"
        return "\n".join(line for line in text.splitlines()[-lines:])

    def state(self) -> str:
        return self.virsh("domstate").strip()

    def pid(self) -> int | None:
        """The pid libvirt tracks for the running domain (its pid file), or None."""
        try:
            return int((self.host.state_dir / "run" / "qemu" / f"{self.name}.pid").read_text())
        except (OSError, ValueError):
            return None

    def qemu_pids(self) -> list[int]:
        """The QEMUs this domain's host runs for it (``-name guest=NAME`` in its namespaces)."""
        found = []
        host = host_namespace(self.host)
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                namespace = os.readlink(f"/proc/{entry}/ns/uts")
            except OSError:
                continue
            if (argv[0].endswith(b"qemu-system-x86_64") and namespace == host
                    and f"guest={self.name},".encode() in b" ".join(argv)):  # fmt: skip
                found.append(int(entry))
        return [pid for pid in found if alive(pid)]

    def remove(self) -> None:
        """Destroy the domain if it runs, and undefine it (also its saved state)."""
        try:
            if self.state() != "shut off":
                self.virsh("destroy")
        except VirshError:
            pass
        try:
            wait_until(lambda: not self.qemu_pids(), what=f"{self.name}'s QEMU to end", timeout=30)
        finally:
            for pid in self.qemu_pids():  # left running: end it, and fail all the same
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(VirshError):
            self.virsh("undefine", "--managed-save", "--snapshots-metadata")


def holders(imglock: list[str], path: Path) -> list[dict[str, object]]:
    """``imglock status --json PATH``'s holders of *path*."""
    proc = subprocess.run(
        [*imglock, "status", "--json", os.fspath(path)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode in (0, 1), proc.stderr
    found: list[dict[str, object]] = json.loads(proc.stdout)[0]["holders"]
    return found


def restart_libvirtd(host: Libvirt) -> None:
    """Stop the host's libvirtd (SIGTERM) and start it again in its namespaces.

    Its virtlogd keeps the namespaces alive meanwhile; the domains keep running.
    """
    pid = int((host.state_dir / "libvirtd.pid").read_text())
    os.kill(pid, 15)
    wait_until(lambda: not alive(pid), what="libvirtd to stop", timeout=30)
    subprocess.run(
        [*on_host(host), "libvirtd", "-d", "-p", os.fspath(host.state_dir / "libvirtd.pid")],
        check=True,
        timeout=VIRSH_TIMEOUT,
    )

    def answers() -> bool:
        try:
            host.virsh("version")
        except (VirshError, subprocess.TimeoutExpired):
            return False
        return True

    wait_until(answers, what="libvirtd to answer again", timeout=30)


def bind_in_namespace(host: Libvirt, source: Path, target: Path) -> None:
    """Make *target* show *source* to the host's daemons and domains (a bind mount there).

    With *source* and *target* two mounts of one network filesystem, a
    domain's disk path is the same on both hosts while each host goes
    through its own client.  Done once: a target that shows *source* already
    is left as it is.
    """
    enter = ["nsenter", "-t", keeper(host), "-m"]
    device = os.stat(source).st_dev
    inside = subprocess.run(
        [*enter, "stat", "-c", "%d", os.fspath(target)], capture_output=True, text=True, timeout=30
    )
    if inside.returncode == 0 and int(inside.stdout) == device:
        return
    subprocess.run(
        [*enter, "mount", "--bind", os.fspath(source), os.fspath(target)], check=True, timeout=30
    )


def migrate(domain: Domain, destination: Libvirt, *flags: str) -> str:
    """``virsh migrate --live`` *domain* to *destination* over a unix socket (no TCP port)."""
    socket = domain.host.state_dir / f"{domain.name}.migrate"
    uri = destination.uri.replace("qemu://", "qemu+unix://", 1)
    return domain.virsh(
        "migrate", "--live", "--unsafe", uri, "--migrateuri", f"unix://{socket}", *flags
    )


@dataclass
class EventWatch:
    """A QMP monitor of the test's own on a domain's QEMU: the events it sees, from the start.

    The domain names the socket (:meth:`args`); a thread connects as soon as
    QEMU creates it and keeps every event until QEMU closes it.
    """

    path: Path
    events: list[str] = field(default_factory=list)
    greeted: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def args(self) -> tuple[str, ...]:
        return ("-qmp", f"unix:{self.path},server=on,wait=off")

    def start(self) -> EventWatch:
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        sock = wait_until(self._connect, what=f"QEMU's monitor at {self.path}", timeout=60)
        with sock, sock.makefile("rb") as lines:
            self.greeted.set()
            sock.sendall(b'{"execute": "qmp_capabilities"}\n')
            for line in lines:
                message = json.loads(line)
                if "event" in message:
                    self.events.append(str(message["event"]))

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.fspath(self.path))
        except OSError:
            sock.close()
            return None
        return sock

    def stop(self) -> list[str]:
        """The events seen, once QEMU has closed the monitor."""
        assert self._thread is not None
        self._thread.join(60)
        return self.events
