"""``imglock run -- qemu-system-x86_64 ... -daemonize``: the claim lives as long as the daemon.

QEMU's launcher exits once the daemon runs; ``imglock run`` returns to the
shell with its status, and the claim stays with the daemon for its whole
life: refused to every rival, named by ``status``, re-checked, handed over
by a live migration, and released when the daemon exits.  Every QEMU here
is real (TCG), and so is every rival: another process, as on another host.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ENV, imglock_holders
from processes import alive, children, wait_until
from qemu_vm import NONE_MACHINE, TINY_PC
from wrapped_vm import TIMEOUT, MonitoredVM, WrappedVM, WrappedVMs

import imglock
from imglock.lock.identity import Owner, hostname

pytestmark = pytest.mark.qemu

IMGLOCK = [sys.executable, "-m", "imglock"]


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
    """An image (in a lockspace or not), daemons and wrapped VMs on it."""

    vms: WrappedVMs
    image: Path
    lockspace: str | None
    #: Daemons and their watchers, to kill at the end.
    pids: list[int] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return self.vms.dir

    def path(self, name: str) -> str:
        return str(self.vms.path(name))

    def lockspace_options(self) -> list[str]:
        return ["--lockspace", self.lockspace] if self.lockspace else []

    def drive(self) -> list[str]:
        return ["-drive", f"file={self.image},format=qcow2,if=none,id=disk"]

    def qemu_argv(self, *extra: str, machine: tuple[str, ...] = NONE_MACHINE) -> list[str]:
        return [self.vms.qemu, *machine, *self.drive(), *extra]

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

    def wait_free(self) -> None:
        """Wait until nothing holds the image, through any layer."""
        wait_until(
            lambda: not imglock.holders(self.image, lockspace=self.lockspace),
            what="the image is free",
            timeout=TIMEOUT,
        )

    def imglock_holders(self) -> list[imglock.Holder]:
        return imglock_holders(self.image, self.lockspace)

    def wrapped(self, *args: str) -> WrappedVM:
        """``imglock run -- QEMU ARGS`` in the background (not daemonized)."""
        return self.vms.start(
            *self.drive(), *args, options=self.lockspace_options(), machine=TINY_PC
        )

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*IMGLOCK, *args], capture_output=True, text=True, timeout=TIMEOUT, env=ENV
        )


@pytest.fixture(params=[None, "lockspace"])
def lab(request: pytest.FixtureRequest, qemu_system_path: str, qemu_img_path: str) -> Iterator[Lab]:
    with WrappedVMs(qemu_system_path, prefix="imglock-dmn-") as vms:
        image = vms.path("vm.qcow2")
        subprocess.run([qemu_img_path, "create", "-q", "-f", "qcow2", image, "64M"], check=True)
        lockspace = None
        if request.param == "lockspace":
            lockspace = str(vms.path("lockspace"))
            os.mkdir(lockspace)
        lab = Lab(vms, image, lockspace)
        try:
            yield lab
        finally:
            for pid in lab.pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            wait_until(
                lambda: not any(alive(pid) for pid in lab.pids),
                what=f"pids {lab.pids} gone",
                timeout=TIMEOUT,
            )


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
    lab.wait_free()
    wait_until(lambda: not alive(daemon.watcher), what="the watcher is gone", timeout=TIMEOUT)
    wait_until(
        lambda: not os.path.exists(daemon.private_dir),
        what="the private directory is gone",
        timeout=TIMEOUT,
    )
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
    with MonitoredVM.connect(qmp) as guest:
        wait_until(
            lambda: guest.runstate() == "paused",
            what="the daemon's guest is paused",
            timeout=TIMEOUT,
        )
    assert alive(daemon.pid)


def test_a_daemonized_source_hands_its_claim_over_in_a_live_migration(lab: Lab) -> None:
    source_qmp = lab.path("source.qmp")
    source = lab.daemonize("-qmp", f"unix:{source_qmp},server=on,wait=off", machine=TINY_PC)
    migration = lab.path("migrate.sock")
    dest = lab.wrapped("-incoming", f"unix:{migration}")
    wait_until(lambda: os.path.exists(migration), what="the destination listens", timeout=TIMEOUT)
    with MonitoredVM.connect(source_qmp) as source_vm:
        source_vm.qmp("migrate", {"uri": f"unix:{migration}"})
        wait_until(
            lambda: [h.pid for h in lab.imglock_holders()] not in ([], [source.pid]),
            what="the destination holds the claim",
            timeout=TIMEOUT,
        )
        (holder,) = lab.imglock_holders()
        assert holder.pid in children(dest.process.pid)  # the destination's QEMU
        assert source_vm.runstate() == "postmigrate"
        source_vm.qmp("quit")
    wait_until(
        lambda: not alive(source.watcher), what="the source's watcher is gone", timeout=TIMEOUT
    )
    wait_until(lambda: not alive(source.pid), what="the source's daemon is gone", timeout=TIMEOUT)
    # The destination keeps the claim after the source has gone.
    assert [h.pid for h in lab.imglock_holders()] == [holder.pid]
    dest.process.terminate()
    dest.process.wait(timeout=TIMEOUT)
    lab.wait_free()


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_watcher_ended_by_a_signal_leaves_the_claim_and_the_socket_to_the_daemon(
    lab: Lab, signo: int
) -> None:
    daemon = lab.daemonize()
    os.kill(daemon.watcher, signo)
    wait_until(lambda: not alive(daemon.watcher), what="the watcher is gone", timeout=TIMEOUT)
    assert alive(daemon.pid)
    (holder,) = lab.imglock_holders()
    assert holder.pid == daemon.pid and holder.local_pids == (daemon.pid,)
    with pytest.raises(imglock.LockConflict):
        imglock.claim(lab.image, qemu_locks=False, lockspace=lab.lockspace)
    assert os.path.exists(os.path.join(daemon.private_dir, "qmp.sock"))
    os.kill(daemon.pid, signal.SIGKILL)
    lab.wait_free()
    shutil.rmtree(daemon.private_dir)  # no watcher is left to remove it


def test_a_daemonized_destination_takes_the_claim_over_in_a_live_migration(lab: Lab) -> None:
    migration = lab.path("migrate.sock")
    source = lab.wrapped()
    wait_until(
        lambda: lab.imglock_holders() != [], what="the source holds the claim", timeout=TIMEOUT
    )
    dest = lab.daemonize("-incoming", f"unix:{migration}", machine=TINY_PC)
    # Until the migration completes the destination holds nothing: the source does.
    assert [h.pid for h in lab.imglock_holders()] != [dest.pid]
    source.qmp("migrate", {"uri": f"unix:{migration}"})
    wait_until(
        lambda: [h.pid for h in lab.imglock_holders()] == [dest.pid],
        what="the daemonized destination holds the claim",
        timeout=TIMEOUT,
    )
    source.qmp("quit")
    source.process.wait(timeout=TIMEOUT)
    (holder,) = lab.imglock_holders()
    assert holder.pid == dest.pid and holder.command is not None and "-incoming" in holder.command
    # The lock offset itself, which every host reads, names the daemon.
    assert holder.owner is not None and Owner.from_id(holder.owner).pid == dest.pid
    os.kill(dest.pid, signal.SIGTERM)
    lab.wait_free()
    wait_until(lambda: not alive(dest.watcher), what="the watcher is gone", timeout=TIMEOUT)
