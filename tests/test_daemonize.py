"""``imglock run -- qemu-system-x86_64 ... -daemonize``: the claim lives as long as the daemon.

QEMU's launcher exits once the daemon runs; ``imglock run`` returns to the
shell with its status, and the claim stays with the daemon for its whole
life: refused to every rival, named by ``status``, re-checked, handed over
by a live migration, and released when the daemon exits.  Every QEMU here
is real (TCG), and so is every rival: another process, as on another host.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import processes
import pytest
from conftest import ENV
from processes import alive
from qemu_vm import NONE_MACHINE, TINY_PC

import imglock
from imglock.lock.identity import Owner, hostname
from imglock.qemu.monitor import MonitorThread

pytestmark = pytest.mark.qemu

TIMEOUT = 20.0
IMGLOCK = [sys.executable, "-m", "imglock"]
#: QEMUs under TCG on a busy machine: give them time.
wait_until = functools.partial(processes.wait_until, timeout=TIMEOUT)


@dataclass
class Daemon:
    """A QEMU daemonized under ``imglock run``, and the watcher that keeps its claim."""

    pid: int
    watcher: int
    #: The directory of the wrapper's private QMP socket.
    private_dir: str
    wrapper: subprocess.CompletedProcess[str]


@dataclass
class Lab:
    qemu: str
    dir: Path
    image: Path
    lockspace: str | None
    #: Processes to kill at the end (daemons, watchers, wrapped QEMUs).
    pids: list[int] = field(default_factory=list)
    wrappers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def lockspace_options(self) -> list[str]:
        return ["--lockspace", self.lockspace] if self.lockspace else []

    def qemu_argv(self, *extra: str, machine: tuple[str, ...] = NONE_MACHINE) -> list[str]:
        drive = f"file={self.image},format=qcow2,if=none,id=disk"
        return [self.qemu, *machine, "-drive", drive, *extra]

    def daemonize(
        self,
        *extra: str,
        machine: tuple[str, ...] = NONE_MACHINE,
        env: dict[str, str] | None = None,
    ) -> Daemon:
        pidfile = self.path("vm.pid")
        argv = [
            *IMGLOCK, "-v", "run", "--check-interval", "0.1", *self.lockspace_options(), "--",
            *self.qemu_argv("-daemonize", "-pidfile", pidfile, *extra, machine=machine),
        ]  # fmt: skip
        # Captured output: the call returns only once no one holds its pipes,
        # so this also shows that neither the daemon nor the watcher keeps them.
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=TIMEOUT, env={**ENV, **(env or {})}
        )
        if os.path.exists(pidfile):
            self.pids.append(int(Path(pidfile).read_text()))
        assert proc.returncode == 0, proc.stderr
        pid = int(Path(pidfile).read_text())
        found = re.search(r"watched by pid (\d+)", proc.stderr)
        assert found, proc.stderr
        watcher = int(found[1])
        self.pids.append(watcher)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            socket = re.search(rb"path=([^,\0]+)/qmp\.sock", f.read())
        assert socket, "no private QMP socket on the daemon's command line"
        return Daemon(pid, watcher, socket[1].decode(), proc)

    def imglock_holders(self) -> list[imglock.Holder]:
        return [
            h for h in imglock.holders(self.image, lockspace=self.lockspace) if h.layer == "imglock"
        ]

    def wrapped(self, *args: str, machine: tuple[str, ...] = TINY_PC) -> subprocess.Popen[bytes]:
        """``imglock run -- QEMU ARGS`` in the background (not daemonized)."""
        argv = [
            *IMGLOCK,
            "run",
            *self.lockspace_options(),
            "--",
            *self.qemu_argv(*args, machine=machine),
        ]
        wrapper = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=ENV,
        )
        self.wrappers.append(wrapper)
        return wrapper

    def end_wrappers(self) -> None:
        """Kill every wrapper this lab started, and its QEMU, which would outlive it."""
        for wrapper in self.wrappers:
            children = f"/proc/{wrapper.pid}/task/{wrapper.pid}/children"
            with contextlib.suppress(OSError), open(children) as f:
                self.pids += [int(pid) for pid in f.read().split()]
            wrapper.kill()
            wrapper.wait()

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*IMGLOCK, *args], capture_output=True, text=True, timeout=TIMEOUT, env=ENV
        )


@pytest.fixture(params=[None, "lockspace"])
def lab(request: pytest.FixtureRequest, qemu_system_path: str, qemu_img_path: str) -> Iterator[Lab]:
    # Unix socket paths are short: a 0700 directory under /tmp.
    tmp = Path(tempfile.mkdtemp(prefix="imglock-dmn-", dir="/tmp"))
    image = tmp / "vm.qcow2"
    subprocess.run([qemu_img_path, "create", "-q", "-f", "qcow2", image, "64M"], check=True)
    lockspace = None
    if request.param == "lockspace":
        lockspace = str(tmp / "lockspace")
        os.mkdir(lockspace)
    lab = Lab(qemu_system_path, tmp, image, lockspace)
    try:
        yield lab
    finally:
        lab.end_wrappers()
        for pid in lab.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in lab.pids:
            wait_until(f"pid {pid} is gone", lambda pid=pid: not alive(pid))
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_daemonized_qemu_keeps_its_claim_for_its_whole_life(lab: Lab) -> None:
    daemon = lab.daemonize()
    assert alive(daemon.pid) and alive(daemon.watcher)

    # status names the daemon: pid, host and command, from its lock offset and record.
    (holder,) = lab.imglock_holders()
    assert (holder.pid, holder.host, holder.mode) == (daemon.pid, hostname(), "exclusive")
    assert holder.owner is not None and Owner.from_id(holder.owner).pid == daemon.pid
    assert holder.command is not None and "-daemonize" in holder.command

    # Every rival is refused: the library without QEMU's bytes, a wrapper
    # without them, and (with a lockspace) a second wrapped QEMU.
    with pytest.raises(imglock.LockConflict) as conflict:
        imglock.claim(lab.image, qemu_locks=False, lockspace=lab.lockspace)
    assert f"pid {daemon.pid}" in str(conflict.value)
    rival = lab.run(
        "run",
        "--qemu-locks",
        "off",
        *lab.lockspace_options(),
        "--image",
        str(lab.image),
        "--",
        "true",
    )
    assert rival.returncode == 75, rival.stderr
    if lab.lockspace:
        second = lab.run("run", *lab.lockspace_options(), "--", *lab.qemu_argv())
        assert second.returncode == 75, second.stderr

    # The private QMP socket lives as long as the daemon.
    assert os.path.exists(os.path.join(daemon.private_dir, "qmp.sock"))

    # The daemon exits: the claim, the watcher, the record and the socket go with it.
    os.kill(daemon.pid, signal.SIGTERM)
    wait_until("the image is free", lambda: not imglock.holders(lab.image, lockspace=lab.lockspace))
    wait_until("the watcher is gone", lambda: not alive(daemon.watcher))
    wait_until("the private directory is gone", lambda: not os.path.exists(daemon.private_dir))
    record_dir = Path(lab.lockspace or lab.dir) / ".imglock"
    assert not record_dir.exists() or not any(record_dir.iterdir())
    with imglock.claim(lab.image, lockspace=lab.lockspace):
        pass


def test_the_lock_check_goes_on_for_a_daemon_and_pauses_it_through_qmp(lab: Lab) -> None:
    # A lost lock cannot be caused for real here: from 1 s after start-up,
    # every lock call of the wrapper (and so of its watcher) fails with EIO.
    qmp = lab.path("user.qmp")
    daemon = lab.daemonize(
        "-qmp", f"unix:{qmp},server=on,wait=off", machine=TINY_PC,
        env={"IMGLOCK_FAULTS": "fcntl=EIO,after=1"},
    )  # fmt: skip
    monitor = MonitorThread.connect(qmp, timeout=TIMEOUT)
    try:
        wait_until(
            "the daemon's guest is paused", lambda: monitor.query_status().status == "paused"
        )
    finally:
        monitor.close()
    assert alive(daemon.pid)


def test_a_daemonized_source_hands_its_claim_over_in_a_live_migration(lab: Lab) -> None:
    source_qmp = lab.path("source.qmp")
    source = lab.daemonize("-qmp", f"unix:{source_qmp},server=on,wait=off", machine=TINY_PC)
    migration = lab.path("migrate.sock")
    dest = lab.wrapped("-incoming", f"unix:{migration}")
    wait_until("the destination listens", lambda: os.path.exists(migration))
    monitor = MonitorThread.connect(source_qmp, timeout=TIMEOUT)
    try:
        monitor.call(monitor.monitor.execute("migrate", {"uri": f"unix:{migration}"}))
        wait_until(
            "the destination holds the claim",
            lambda: [h.pid for h in lab.imglock_holders()] not in ([], [source.pid]),
        )
        (holder,) = lab.imglock_holders()
        with open(f"/proc/{dest.pid}/task/{dest.pid}/children") as f:
            assert holder.pid in [int(p) for p in f.read().split()]  # the destination's QEMU
        assert monitor.query_status().status == "postmigrate"
        monitor.call(monitor.monitor.execute("quit"))
    finally:
        monitor.close()
    wait_until("the source's watcher is gone", lambda: not alive(source.watcher))
    wait_until("the source's daemon is gone", lambda: not alive(source.pid))
    # The destination keeps the claim after the source has gone.
    assert [h.pid for h in lab.imglock_holders()] == [holder.pid]
    dest.terminate()
    dest.wait(timeout=TIMEOUT)
    wait_until("the image is free", lambda: not imglock.holders(lab.image, lockspace=lab.lockspace))


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_watcher_ended_by_a_signal_leaves_the_claim_and_the_socket_to_the_daemon(
    lab: Lab, signo: int
) -> None:
    daemon = lab.daemonize()
    os.kill(daemon.watcher, signo)
    wait_until("the watcher is gone", lambda: not alive(daemon.watcher))
    assert alive(daemon.pid)
    (holder,) = lab.imglock_holders()
    assert holder.pid == daemon.pid and holder.local_pids == (daemon.pid,)
    with pytest.raises(imglock.LockConflict):
        imglock.claim(lab.image, qemu_locks=False, lockspace=lab.lockspace)
    assert os.path.exists(os.path.join(daemon.private_dir, "qmp.sock"))
    os.kill(daemon.pid, signal.SIGKILL)
    wait_until("the image is free", lambda: not imglock.holders(lab.image, lockspace=lab.lockspace))
    shutil.rmtree(daemon.private_dir)  # no watcher is left to remove it


def test_a_daemonized_destination_takes_the_claim_over_in_a_live_migration(lab: Lab) -> None:
    source_qmp, migration = lab.path("source.qmp"), lab.path("migrate.sock")
    source = lab.wrapped("-qmp", f"unix:{source_qmp},server=on,wait=off")
    wait_until("the source holds the claim", lambda: lab.imglock_holders() != [])
    dest = lab.daemonize("-incoming", f"unix:{migration}", machine=TINY_PC)
    # Until the migration completes the destination holds nothing: the source does.
    assert [h.pid for h in lab.imglock_holders()] != [dest.pid]
    monitor = MonitorThread.connect(source_qmp, timeout=TIMEOUT)
    try:
        monitor.call(monitor.monitor.execute("migrate", {"uri": f"unix:{migration}"}))
        wait_until(
            "the daemonized destination holds the claim",
            lambda: [h.pid for h in lab.imglock_holders()] == [dest.pid],
        )
        monitor.call(monitor.monitor.execute("quit"))
    finally:
        monitor.close()
    source.wait(timeout=TIMEOUT)
    (holder,) = lab.imglock_holders()
    assert holder.pid == dest.pid and holder.command is not None and "-incoming" in holder.command
    # The lock offset itself, which every host reads, names the daemon.
    assert holder.owner is not None and Owner.from_id(holder.owner).pid == dest.pid
    os.kill(dest.pid, signal.SIGTERM)
    wait_until("the image is free", lambda: not imglock.holders(lab.image, lockspace=lab.lockspace))
    wait_until("the watcher is gone", lambda: not alive(dest.watcher))
