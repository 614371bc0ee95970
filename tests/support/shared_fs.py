"""Hosts on a shared network filesystem, whichever it is: what the two-host suite needs of one.

The two-host tests run once per filesystem that shares locks between
hosts (the ``datastore`` fixture of tests/conftest.py): GlusterFS
(tests/support/gluster_hosts.py) and CephFS (tests/support/cephfs_hosts.py).  Each
filesystem's module mounts it three times on this machine, each mount
through a client process of its own: hosts A and B take part in a test,
host C only looks.  A host's commands run in UTS and PID namespaces of
their own, so each host has its own host name and its own pids, and its
client process is what its kernel is to the datastore: kill it and the
host has crashed, stop it and the host hangs.

Filesystems differ exactly where imglock's promises live (who keeps a dead
host's locks, what a lock query reports), so a datastore states such
differences as facts (:class:`Datastore`) and a test asks them, rather than
one copy of the test per filesystem.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from processes import wait_until

REPO = str(Path(__file__).parents[2])
HOST_NAMES = ("host-a", "host-b", "host-c")
#: How long a live mount's client gets to answer a stat.
STAT_TIMEOUT = 5.0


def client_of(mount: Path | str, program: bytes) -> int | None:
    """The pid of a *program* process (glusterfs, ceph-fuse) with *mount* as an argument."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(program) and os.fsencode(mount) in argv:
            return int(entry.name)
    return None


def mount_answers(mount: Path, fstype: str) -> bool:
    """True when *mount* is a live mount of *fstype* (its client answers a stat)."""
    try:
        with open("/proc/self/mountinfo") as f:
            mounted = any(
                line.split()[4] == os.fspath(mount) and f" - {fstype} " in line for line in f
            )
        if not mounted:
            return False
        proc = subprocess.run(
            ["stat", "-c", "%i", mount], capture_output=True, timeout=STAT_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def rig_missing(kind: str, mounts: Sequence[Path], fstype: str, up: str) -> str | None:
    """Why two-host tests cannot run on the *kind* rig at *mounts* (brought up by *up*), or None."""
    if os.geteuid() != 0:
        return "needs root (UTS/PID namespaces for the hosts, FUSE client control)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    missing = [str(m) for m in mounts if not mount_answers(m, fstype)]
    if missing:
        return f"no {kind} mount at {', '.join(missing)} (run {up} as root)"
    return None


@dataclass
class Host:
    """One host: a host name, its own mount of the datastore, and the test's directory there."""

    name: str
    mount: Path
    #: The test's directory, the same one on every host, relative to the mount.
    workdir: str

    @property
    def dir(self) -> Path:
        return self.mount / self.workdir

    def path(self, name: str) -> Path:
        """*name* in the test's directory, as this host sees it."""
        return self.dir / name

    def prefix(self, *, as_init: bool = True) -> list[str]:
        """A command prefix that runs a command on this host.

        The command is pid 1 of a fresh PID namespace (with its own /proc),
        in a UTS namespace whose host name is this host's; it and everything
        it started die with the ``unshare`` process that runs it.  With
        *as_init* false a shell is pid 1 and the command its child: a pid 1
        ignores the signals it sends itself (such as a SIGSTOP fault).
        """
        run = 'hostname "$0" && exec "$@"' if as_init else 'hostname "$0" && "$@"'
        return [
            "unshare", "--uts", "--pid", "--fork", "--mount-proc", "--kill-child",
            "sh", "-c", run, self.name,
        ]  # fmt: skip

    def run(
        self, argv: Sequence[str | os.PathLike[str]], **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        """Run *argv* on this host and wait for it."""
        kwargs.setdefault("timeout", 60)
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            [*self.prefix(), *(os.fspath(arg) for arg in argv)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": REPO},
            **kwargs,
        )

    def imglock(
        self, *args: str | os.PathLike[str], **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        """Run the real ``imglock`` command on this host."""
        return self.run([sys.executable, "-m", "imglock", *args], **kwargs)

    def popen(
        self, argv: Sequence[str | os.PathLike[str]], as_init: bool = True, **kwargs: object
    ) -> subprocess.Popen[str]:
        """Start *argv* on this host (its pid 1 unless *as_init* is false); the caller ends it."""
        kwargs.setdefault("env", {**os.environ, "PYTHONPATH": REPO})
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            [*self.prefix(as_init=as_init), *(os.fspath(arg) for arg in argv)], text=True, **kwargs
        )

    # -- the host's kernel, as far as the datastore is concerned -----------
    # Only for a host of its own (Datastore.own_host): the shared mounts
    # may be in use by other tests meanwhile.

    def client_pid(self) -> int:
        """The pid of the client process that serves this host's mount."""
        raise NotImplementedError(f"{type(self).__name__} names no client process")

    def crash(self) -> float:
        """The host dies, as the datastore sees it: its client process is killed.

        Returns when it was killed (``time.monotonic()``, once the signal is
        sent): from then on the client carries nothing, though it takes a
        while to exit.
        """
        pid = self.client_pid()
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), what="the client to die", timeout=10)
        return killed_at

    def hang(self) -> None:
        """The host hangs: its client process stops, its locks stay with the server."""
        os.kill(self.client_pid(), signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.client_pid(), signal.SIGCONT)


class Datastore(Protocol):
    """Hosts A, B and C on one shared filesystem, and what the two-host suite must know of it."""

    @property
    def filesystem(self) -> str:
        """The suite's name for the filesystem: ``glusterfs`` or ``cephfs``."""

    @property
    def fstype(self) -> str:
        """The type its mounts have in /proc/self/mountinfo (what ``imglock doctor`` reads)."""

    @property
    def crash_drops_locks_at_once(self) -> bool:
        """Whether the lock manager lets go of a host's locks as soon as its client dies.

        Where it does not, they stay held until :meth:`release_crashed`.
        """

    @property
    def hung_client_stalls_others(self) -> bool:
        """Whether others wait, rather than being answered, on a file a hung client has open.

        (CephFS: the MDS must take back the client's capabilities on the
        file first, which a stopped client never gives.)
        """

    @property
    def a(self) -> Host: ...

    @property
    def b(self) -> Host: ...

    @property
    def c(self) -> Host: ...

    @property
    def hosts(self) -> tuple[Host, Host, Host]: ...

    def own_host(self, name: str) -> Host:
        """A host with a mount (a client process) of its own, for a test to crash or hang."""

    def release_crashed(self, host: Host) -> None:
        """Free the locks of *host*, whose client was killed, as an operator would."""

    def close(self) -> None:
        """Unmount the test's own hosts and remove the test's directory."""
