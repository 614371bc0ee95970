"""Hosts on a real network filesystem: GlusterFS mounted three times on this machine.

``tests/gluster/up`` brings up a one-brick volume and mounts it three times,
each mount through its own ``glusterfs`` client process: hosts A, B and C
as tests/support/shared_fs.py describes them.  The brick's lock translator is the
lock manager all of them talk to, as NFS clients talk to their server.  A
test that crashes or hangs a host mounts one of its own for that
(:meth:`Datastore.own_host`): the three shared mounts may be in use by
other tests at the same time.

The mounts are found from ``IMGLOCK_GLUSTER_A``/``_B``/``_C`` (as
``tests/gluster/up`` prints them), else at the script's default place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path

import shared_fs
from processes import wait_until
from shared_fs import HOST_NAMES as HOST_NAMES
from shared_fs import REPO as REPO

DEFAULT_STATE_DIR = "/tmp/imglock-gluster"
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
    return shared_fs.client_of(mount, b"glusterfs")


def answers(mount: Path) -> bool:
    """True when *mount* is a live GlusterFS mount (its client answers a stat)."""
    return shared_fs.mount_answers(mount, "fuse.glusterfs")


def unavailable_reason(faults: bool = False) -> str | None:
    """Why the two-host tests (on the fault volume with *faults*) cannot run here, or None."""
    return shared_fs.rig_missing(
        "GlusterFS", mount_points(faults), "fuse.glusterfs", "tests/gluster/up"
    )


class Host(shared_fs.Host):
    """One host: a host name, its own mount of the volume, and the test's directory there."""

    def client_pid(self) -> int:
        pid = client_pid(self.mount)
        assert pid is not None, f"no glusterfs client serves {self.mount}"
        return pid


class Datastore:
    """Hosts A, B and C on one GlusterFS volume; hosts of a test's own to crash or hang.

    With *faults*, on the volume that fault tests alone use (tests/support/storage_faults.py).
    """

    filesystem = "glusterfs"
    fstype = "fuse.glusterfs"
    #: A killed client's connection to the brick closes with it, and the
    #: brick's lock translator drops every lock that came through it.
    crash_drops_locks_at_once = True
    #: The brick answers for a stopped client's locks itself.
    hung_client_stalls_others = False

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

    def release_crashed(self, host: shared_fs.Host) -> None:
        """Nothing to do: the brick let go of *host*'s locks when its client died."""

    def close(self) -> None:
        for mount in self.own_mounts:
            pid = client_pid(mount)
            if pid is not None:
                os.kill(pid, signal.SIGCONT)  # a stopped client would not unmount
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)

                def ended(proc_dir: str = f"/proc/{pid}") -> bool:
                    return not os.path.exists(proc_dir)

                wait_until(ended, what="the client to end", timeout=10)
            with contextlib.suppress(OSError):
                mount.rmdir()
            with contextlib.suppress(OSError):
                os.unlink(Path(tempfile.gettempdir(), f"{mount.name}.log"))
        shutil.rmtree(self.c.dir, ignore_errors=True)
