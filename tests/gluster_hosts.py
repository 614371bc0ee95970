"""Hosts on a real network filesystem: GlusterFS mounted three times on this machine.

``tests/gluster/up`` brings up a one-brick volume and mounts it three times,
each mount through its own ``glusterfs`` client process.  Each mount is a
host: the brick's lock translator is the lock manager all of them talk to,
as NFS clients talk to their server, and a client process is what a host's
kernel is to its mounts (kill it and the host has crashed; stop it and the
host hangs).  A test that crashes or hangs a host mounts one of its own
for that (:meth:`Datastore.own_host`): the three shared mounts may be in
use by other tests at the same time.  Commands of a host run in UTS and PID namespaces of their own,
so each host has its own host name and its own pids.

Hosts A and B take part in a test; host C is a third vantage point that only
looks.  The mounts are found from ``IMGLOCK_GLUSTER_A``/``_B``/``_C`` (as
``tests/gluster/up`` prints them), else at the script's default place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from processes import wait_until

REPO = str(Path(__file__).parents[1])
DEFAULT_STATE_DIR = "/tmp/imglock-gluster"
HOST_NAMES = ("host-a", "host-b", "host-c")
#: How long a newly mounted client gets to answer.
REMOUNT_TIMEOUT = 20.0


def mount_points(faults: bool = False) -> list[Path]:
    """Where hosts A, B and C mount the volume (mounted or not).

    With *faults*, their mounts of the fault tests' own volume
    (``IMGLOCK_GLUSTER_FAULTS_A``... as ``tests/gluster/up`` prints them).
    """
    default = Path(os.environ.get("IMGLOCK_GLUSTER_DIR", DEFAULT_STATE_DIR), "mnt")
    variable, name = ("IMGLOCK_GLUSTER_FAULTS_", "f") if faults else ("IMGLOCK_GLUSTER_", "")
    return [
        Path(os.environ.get(f"{variable}{letter}", default / f"{name}{letter.lower()}"))
        for letter in "ABC"
    ]


def client_pid(mount: Path | str) -> int | None:
    """The pid of the glusterfs client process serving *mount*, if one does.

    (Or of the one with any other argument *mount*, such as its ``--log-file=``.)
    """
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"glusterfs") and os.fsencode(mount) in argv:
            return int(entry.name)
    return None


def answers(mount: Path) -> bool:
    """True when *mount* is a live GlusterFS mount (its client answers a stat)."""
    try:
        with open("/proc/self/mountinfo") as f:
            mounted = any(
                line.split()[4] == os.fspath(mount) and " - fuse.glusterfs " in line for line in f
            )
        if not mounted:
            return False
        proc = subprocess.run(["stat", "-c", "%i", mount], capture_output=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def unavailable_reason(faults: bool = False) -> str | None:
    """Why the two-host tests (on the fault volume with *faults*) cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (UTS/PID namespaces for the hosts, FUSE client control)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    missing = [str(m) for m in mount_points(faults) if not answers(m)]
    if missing:
        return f"no GlusterFS mount at {', '.join(missing)} (run tests/gluster/up as root)"
    return None


@dataclass
class Host:
    """One host: a host name, its own mount of the volume, and the test's directory there."""

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
            [*self.prefix(), *map(os.fspath, argv)],
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
            [*self.prefix(as_init=as_init), *map(os.fspath, argv)], text=True, **kwargs
        )

    # -- the host's kernel, as far as the datastore is concerned -----------
    # Only for a host of its own (Datastore.own_host): the shared mounts
    # may be in use by other tests meanwhile.

    def client_pid(self) -> int:
        pid = client_pid(self.mount)
        assert pid is not None, f"no glusterfs client serves {self.mount}"
        return pid

    def crash(self) -> None:
        """The host dies, as the datastore sees it: its client process is killed."""
        pid = self.client_pid()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), what="the client to die", timeout=10)

    def hang(self) -> None:
        """The host hangs: its client process stops, its locks stay with the server."""
        os.kill(self.client_pid(), signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.client_pid(), signal.SIGCONT)


class Datastore:
    """Hosts A, B and C on one GlusterFS volume; hosts of a test's own to crash or hang.

    With *faults*, on the volume that fault tests alone use (tests/storage_faults.py).
    """

    def __init__(self, faults: bool = False) -> None:
        self.mounts = mount_points(faults)
        workdir = f"imglock-test-{uuid.uuid4().hex[:12]}"
        os.mkdir(self.mounts[0] / workdir)
        self.a, self.b, self.c = (
            Host(name, mount, workdir) for name, mount in zip(HOST_NAMES, self.mounts, strict=True)
        )
        self.own_mounts: list[Path] = []

    @property
    def hosts(self) -> tuple[Host, Host, Host]:
        return self.a, self.b, self.c

    def own_host(self, name: str) -> Host:
        """A host with a mount (a client process) of its own, for a test to crash or hang.

        Mounted like host A's mount, at a private mount point; unmounted,
        and its client ended, when the test is over.
        """
        with open(f"/proc/{client_pid(self.a.mount)}/cmdline", "rb") as f:
            argv = f.read().rstrip(b"\0").split(b"\0")
        mount = Path(tempfile.mkdtemp(prefix=f"imglock-{name}-", dir="/tmp"))
        self.own_mounts.append(mount)
        # The same options; its own pid and log file, and its own mount point.
        options = [a for a in argv[1:-1] if not a.startswith((b"--pid-file=", b"--log-file="))]
        log = Path(tempfile.gettempdir(), f"{mount.name}.log")
        subprocess.run(
            [argv[0], *options, f"--log-file={log}", mount], check=True, timeout=REMOUNT_TIMEOUT
        )
        wait_until(lambda: answers(mount), what=f"{mount} to answer", timeout=REMOUNT_TIMEOUT)
        return Host(name, mount, self.a.workdir)

    def close(self) -> None:
        for mount in self.own_mounts:
            pid = client_pid(mount)
            if pid is not None:
                os.kill(pid, signal.SIGCONT)  # a stopped client would not unmount
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                wait_until(
                    lambda p=pid: not os.path.exists(f"/proc/{p}"),
                    what="the client to end",
                    timeout=10,
                )  # type: ignore[misc]
            with contextlib.suppress(OSError):
                mount.rmdir()
            with contextlib.suppress(OSError):
                os.unlink(Path(tempfile.gettempdir(), f"{mount.name}.log"))
        shutil.rmtree(self.c.dir, ignore_errors=True)
