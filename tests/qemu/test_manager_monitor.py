"""A manager's monitor, passed to QEMU as a listening socket, goes through imglock.

libvirt hands QEMU its monitor as a listening socket (``-chardev
socket,fd=N,server=on``) and connects to it itself.  Under ``imglock run``
every command reaches QEMU as the manager sent it, with the descriptors it
carries, except a ``cont`` that would let the guest run without its
claim: the manager gets a QMP error instead, and the guest stays paused.
The manager here is this test, with a real QEMU behind a real relay.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import ENV, QemuImg, imglock_holders
from processes import wait_until
from qemu_vm import NONE_MACHINE

pytestmark = pytest.mark.qemu

TIMEOUT = 20.0


@dataclass
class Manager:
    """A QMP client on the manager's side of the relay, as libvirt would be."""

    sock: socket.socket
    buffer: bytes = b""
    events: list[str] = field(default_factory=list)

    @classmethod
    def connect(cls, path: Path) -> Manager:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        sock.connect(str(path))
        manager = cls(sock)
        assert "QMP" in manager.receive(), "no greeting"
        assert manager.execute("qmp_capabilities") == {"return": {}, "id": "qmp_capabilities"}
        return manager

    def receive(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, "the relay closed the connection"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, fds: list[int] | None = None, **arguments: Any) -> Any:
        """Send *command*; its reply (events meanwhile are kept in :attr:`events`)."""
        text = json.dumps({"execute": command, "arguments": arguments, "id": command})
        if fds:
            socket.send_fds(self.sock, [text.encode() + b"\r\n"], fds)
        else:
            self.sock.sendall(text.encode() + b"\r\n")
        while True:
            message = self.receive()
            if "event" in message:
                self.events.append(message["event"])
            elif message.get("id") == command:
                return message

    def status(self) -> str:
        return str(self.execute("query-status")["return"]["status"])

    def close(self) -> None:
        self.sock.close()


@dataclass
class ManagedVM:
    """QEMU under ``imglock run --exec``, its monitor a listening socket of the test's."""

    process: subprocess.Popen[str]
    monitor: Path

    def manager(self) -> Manager:
        return Manager.connect(self.monitor)


@pytest.fixture
def image(tmp_path: Path, qemu_img: QemuImg) -> Path:
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "16M")
    return path


@pytest.fixture
def managed(tmp_path: Path, image: Path, qemu_system_path: str) -> Iterator[ManagedVM]:
    """QEMU started as libvirt starts it: paused, its monitor a socket passed as a descriptor."""
    path = tmp_path / "monitor.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    fd = listener.fileno()
    command = [
        sys.executable, "-m", "imglock", "run", "--exec", "--check-interval", "0.2", "--",
        qemu_system_path, *NONE_MACHINE, "-S",
        "-drive", f"file={image},format=qcow2,if=none,id=disk0",
        "-chardev", f"socket,id=charmonitor,fd={fd},server=on,wait=off",
        "-mon", "chardev=charmonitor,id=monitor,mode=control",
    ]  # fmt: skip
    process = subprocess.Popen(command, env=ENV, pass_fds=[fd], text=True)
    listener.close()  # QEMU's (the relay's) now, as libvirt leaves it
    try:
        wait_until(lambda: imglock_holders(image), what="the claim", timeout=TIMEOUT)
        yield ManagedVM(process, path)
    finally:
        process.kill()
        process.wait()


def test_the_managers_commands_reach_qemu_and_a_cont_runs_the_guest_it_claimed(
    managed: ManagedVM, image: Path
) -> None:
    manager = managed.manager()
    assert manager.status() == "prelaunch"
    assert manager.execute("cont") == {"return": {}, "id": "cont"}
    wait_until(lambda: manager.status() == "running", what="the guest to run", timeout=TIMEOUT)
    (holder,) = imglock_holders(image)
    assert holder.pid == managed.process.pid  # QEMU itself, the pid the manager started


def test_a_cont_after_the_claim_is_lost_is_refused_and_the_guest_stays_paused(
    managed: ManagedVM, image: Path, tmp_path: Path
) -> None:
    manager = managed.manager()
    manager.execute("cont")
    wait_until(lambda: manager.status() == "running", what="the guest to run", timeout=TIMEOUT)
    # The image is replaced under the running VM: its claim no longer covers it.
    replacement = tmp_path / "other.qcow2"
    replacement.write_bytes(image.read_bytes())
    os.replace(replacement, image)
    wait_until(lambda: manager.status() == "paused", what="imglock to pause the guest",
               timeout=TIMEOUT)  # fmt: skip
    manager.events.clear()
    reply = manager.execute("cont")
    assert reply["error"]["class"] == "GenericError", reply
    assert "claim is lost" in reply["error"]["desc"]
    assert manager.status() == "paused" and "RESUME" not in manager.events


def test_descriptors_the_manager_passes_reach_qemu(managed: ManagedVM, tmp_path: Path) -> None:
    manager = managed.manager()
    passed = tmp_path / "passed"
    passed.write_bytes(b"")
    fd = os.open(passed, os.O_RDONLY)
    try:
        assert manager.execute("getfd", fds=[fd], fdname="given") == {"return": {}, "id": "getfd"}
    finally:
        os.close(fd)
    assert manager.execute("closefd", fdname="given") == {"return": {}, "id": "closefd"}
    missing = manager.execute("closefd", fdname="given")
    assert "error" in missing  # QEMU had it, and closed it


def test_a_manager_that_reconnects_is_greeted_anew(managed: ManagedVM) -> None:
    first = managed.manager()
    assert first.status() == "prelaunch"
    first.close()
    second = managed.manager()  # greeting and capabilities again, as from QEMU itself
    assert second.status() == "prelaunch"


def test_a_blockdev_add_of_a_file_another_holds_is_refused_before_qemu_opens_it(
    managed: ManagedVM, tmp_path: Path, qemu_img: QemuImg
) -> None:
    other, free = tmp_path / "other.qcow2", tmp_path / "free.qcow2"
    for path in (other, free):
        qemu_img("create", "-q", "-f", "qcow2", path, "16M")
    holder = subprocess.Popen(
        [sys.executable, "-m", "imglock", "run", "--exec", "--image", str(other), "--",
         "sleep", "60"],
        env=ENV,
    )  # fmt: skip
    try:
        wait_until(lambda: [h.pid for h in imglock_holders(other)] == [holder.pid],
                   what="another holder", timeout=TIMEOUT)  # fmt: skip
        manager = managed.manager()
        node: dict[str, Any] = {"driver": "qcow2", "node-name": "other",
                                "file": {"driver": "file", "filename": str(other)}}  # fmt: skip
        reply = manager.execute("blockdev-add", **node)
        assert reply["error"]["class"] == "GenericError", reply
        assert f"{other}: held imglock exclusive by pid {holder.pid}" in reply["error"]["desc"]
        nodes = manager.execute("query-named-block-nodes", flat=True)["return"]
        assert "other" not in {n["node-name"] for n in nodes}  # QEMU never opened it
        added: dict[str, Any] = {"driver": "qcow2", "node-name": "free",
                                 "file": {"driver": "file", "filename": str(free)}}  # fmt: skip
        assert manager.execute("blockdev-add", **added) == {"return": {}, "id": "blockdev-add"}
        wait_until(lambda: imglock_holders(free), what="the added file claimed", timeout=TIMEOUT)
    finally:
        holder.kill()
        holder.wait()
