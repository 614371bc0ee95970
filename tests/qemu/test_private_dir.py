"""Private socket directories of wrapped QEMUs: a killed wrapper's go at the next start.

``imglock run`` gives QEMU a monitor socket in a 0700 directory named
after the wrapper's pid and PID namespace, and removes it when QEMU ends.  A wrapper killed
with SIGKILL cannot; the next wrapped QEMU's start removes every such
directory it can prove stale, and nothing else.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ENV
from processes import wait_until
from qemu_vm import NONE_MACHINE

from imglock.run import private_dir


@pytest.fixture
def parent() -> Iterator[Path]:
    # Under /tmp: unix socket paths are short (107 bytes at most).
    path = Path(tempfile.mkdtemp(prefix="imglock-test-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def gone_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


#: This process's PID namespace, as the directories' names give it.
NAMESPACE = os.stat("/proc/self/ns/pid").st_ino


def private(
    parent: Path, pid: int, socket_state: str | None = "dead", namespace: int = NAMESPACE
) -> Path:
    """A private directory as wrapper *pid* leaves it: a dead socket, a live one, or none."""
    path = parent / f"imglock-{namespace}-{pid}-a1b2c3d4"
    path.mkdir(mode=0o700)
    if socket_state is not None:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path / private_dir.SOCKET_NAME))
        if socket_state == "listening":
            sock.listen()
            LISTENING.append(sock)  # closed after the test
        else:
            sock.close()  # the file stays, nobody listens: QEMU is gone
    return path


LISTENING: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_listeners() -> Iterator[None]:
    yield
    while LISTENING:
        LISTENING.pop().close()


def test_the_directory_of_a_killed_wrapper_whose_qemu_is_gone_is_removed(
    parent: Path, gone_pid: int
) -> None:
    stale = private(parent, gone_pid)
    assert private_dir.sweep(str(parent)) == [str(stale)]
    assert not stale.exists()


def test_an_empty_one_is_removed_too(parent: Path, gone_pid: int) -> None:
    stale = private(parent, gone_pid, socket_state=None)
    assert private_dir.sweep(str(parent)) == [str(stale)]


def test_one_whose_qemu_still_listens_is_kept(parent: Path, gone_pid: int) -> None:
    # The daemonized QEMU of a watcher that was killed: it still runs.
    kept = private(parent, gone_pid, socket_state="listening")
    assert private_dir.sweep(str(parent)) == []
    assert (kept / private_dir.SOCKET_NAME).exists()


def test_one_named_after_a_live_process_is_kept(parent: Path) -> None:
    kept = private(parent, os.getpid())
    assert private_dir.sweep(str(parent)) == []
    assert kept.exists()


def test_one_from_another_pid_namespace_is_never_judged(parent: Path, gone_pid: int) -> None:
    # A host or container sharing this /tmp: its pids mean nothing here.
    kept = private(parent, gone_pid, namespace=NAMESPACE + 1)
    assert private_dir.sweep(str(parent)) == []
    assert (kept / private_dir.SOCKET_NAME).exists()


def test_one_holding_anything_else_is_kept(parent: Path, gone_pid: int) -> None:
    kept = private(parent, gone_pid)
    (kept / "notes").write_text("not imglock's")
    assert private_dir.sweep(str(parent)) == []
    assert (kept / "notes").exists()


def test_one_another_could_enter_is_kept(parent: Path, gone_pid: int) -> None:
    kept = private(parent, gone_pid)
    kept.chmod(0o755)
    assert private_dir.sweep(str(parent)) == []


def test_a_symbolic_link_by_that_name_is_never_followed(parent: Path, gone_pid: int) -> None:
    target = private(parent, gone_pid).rename(parent / "elsewhere")
    (parent / f"imglock-{NAMESPACE}-{gone_pid}-link").symlink_to(target)
    assert private_dir.sweep(str(parent)) == []
    assert (target / private_dir.SOCKET_NAME).exists()


def test_other_names_are_left_alone(parent: Path, gone_pid: int) -> None:
    names = (
        "imglock-wrap-x1", f"imglock-{NAMESPACE}-{gone_pid}", "imglock-",
        f"other-{NAMESPACE}-{gone_pid}-x", f"imglock-{gone_pid}-x",
        f"imglock-{NAMESPACE}-0-x", f"imglock-{NAMESPACE}-99999999999999999999999-x",
    )  # fmt: skip
    for name in names:
        (parent / name).mkdir(mode=0o700)
    assert private_dir.sweep(str(parent)) == []


@pytest.mark.qemu
def test_a_wrapped_qemu_clears_what_a_killed_wrapper_left(
    qemu_system_path: str, raw_image: Path, tmp_path: Path
) -> None:
    def wrapped(*extra: str) -> subprocess.Popen[bytes]:
        argv = [
            sys.executable, "-m", "imglock", "run", "--", qemu_system_path, *NONE_MACHINE,
            "-drive", f"file={raw_image},if=none,format=raw", *extra,
        ]  # fmt: skip
        return subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    tmp = Path(tempfile.gettempdir())
    killed = wrapped()
    try:
        sockets = f"imglock-{NAMESPACE}-{killed.pid}-*/{private_dir.SOCKET_NAME}"
        wait_until(lambda: list(tmp.glob(sockets)), what="the wrapper's socket")
        (left,) = tmp.glob(f"imglock-{NAMESPACE}-{killed.pid}-*")
        qemu = int(Path(f"/proc/{killed.pid}/task/{killed.pid}/children").read_text().split()[0])
        os.kill(killed.pid, signal.SIGKILL)
        os.kill(qemu, signal.SIGKILL)
    finally:
        killed.kill()
        killed.wait()
    # Dead, its descriptors are closed, reaped or not (its parent is gone).
    wait_until(lambda: not _accepts(left / private_dir.SOCKET_NAME), what="QEMU to be gone")
    assert left.exists()  # nobody was left to remove it

    incoming = tmp_path / "incoming.sock"
    nxt = wrapped("-incoming", f"unix:{incoming}")  # waits for a migration: runs until ended
    try:
        wait_until(incoming.exists, what="the next wrapped QEMU")
        assert not left.exists()
        assert list(tmp.glob(f"imglock-{NAMESPACE}-{nxt.pid}-*"))  # its own is there
    finally:
        nxt.send_signal(signal.SIGTERM)
        nxt.wait(timeout=20)


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except ConnectionRefusedError:
            return False
    return True
