"""Hosts on a real network filesystem: CephFS mounted three times on this machine.

``tests/cephfs/up`` brings up a one-node Ceph cluster and mounts its
filesystem ``imglock`` three times, each mount through its own ``ceph-fuse``
client (cephx users client.a, b and c): hosts A, B and C as
tests/support/shared_fs.py describes them.  The filesystem's MDS is the lock
manager all of them talk to.  A second filesystem, ``imglock-faults``, is
the fault tests' own (tests/support/cephfs_faults.py), mounted the same way.

A test that crashes, hangs or evicts a host mounts one of its own for that
(:meth:`Datastore.own_host`): a client with a cephx user and an MDS session
of its own, so that nothing it suffers reaches the shared mounts.

Unlike GlusterFS's brick, the MDS keeps a dead client's session open, and
its locks held, until ``session_autoclose`` (300 s by default) unless the
session is evicted: :meth:`Datastore.release_crashed` evicts it, as an
operator would.

The mounts are found from ``IMGLOCK_CEPHFS_A``/``_B``/``_C`` (the fault
filesystem's from ``IMGLOCK_CEPHFS_FAULTS_A``...), as ``tests/cephfs/up``
prints them, else at the script's default place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import shared_fs
from processes import alive, poll_until, wait_until
from shared_fs import HOST_NAMES

DEFAULT_STATE_DIR = "/tmp/imglock-cephfs"
#: The filesystems tests/cephfs/up creates: the shared one, and the fault tests' own.
FILESYSTEM = "imglock"
FAULT_FILESYSTEM = "imglock-faults"
FSTYPE = "fuse.ceph-fuse"
#: How long a newly mounted client gets to answer.
REMOUNT_TIMEOUT = 20.0
#: Seconds a ``ceph`` command gets (the mon answers in well under one).
COMMAND_TIMEOUT = 60.0
#: Seconds a ``stat`` through a mount may take before the mount counts as not answering.
STAT_TIMEOUT = 5.0
#: What a private client may do: the same as client.a, b and c of tests/cephfs/up.
CLIENT_CAPS = ("mon", "allow r", "mds", "allow rw", "osd", "allow rw")


def state_dir() -> Path:
    """The cluster's state directory (``tests/cephfs/up``): its configuration, keys and pids."""
    return Path(os.environ.get("IMGLOCK_CEPHFS_DIR", DEFAULT_STATE_DIR))


def conf() -> Path:
    return state_dir() / "ceph.conf"


def mount_points(faults: bool = False) -> list[Path]:
    """Where hosts A, B and C mount the filesystem (mounted or not).

    With *faults*, their mounts of the fault tests' own filesystem
    (``IMGLOCK_CEPHFS_FAULTS_A``... as ``tests/cephfs/up`` prints them).
    """
    default = state_dir() / "mnt"
    variable, name = ("IMGLOCK_CEPHFS_FAULTS_", "f") if faults else ("IMGLOCK_CEPHFS_", "")
    return [
        Path(os.environ.get(f"{variable}{letter}", default / f"{name}{letter.lower()}"))
        for letter in "ABC"
    ]


def ceph(*args: str) -> str:
    """Run ``ceph -c CONF ARGS`` against the rig's cluster; what it printed, or fail the test."""
    proc = subprocess.run(
        ["ceph", "-c", os.fspath(conf()), *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"ceph {' '.join(args)} failed: {proc.stderr or proc.stdout}")
    return proc.stdout


def client_pid(mount: Path | str) -> int | None:
    """The pid of the ceph-fuse client serving *mount*, if one does."""
    pid = shared_fs.client_of(mount, b"ceph-fuse")
    return pid if pid is not None and alive(pid) else None


def answers(mount: Path) -> bool:
    """True when *mount* is a live ceph-fuse mount (its client answers a stat)."""
    return shared_fs.mount_answers(mount, FSTYPE)


def unavailable_reason(faults: bool = False) -> str | None:
    """Why the two-host tests (on the fault filesystem with *faults*) cannot run here, or None."""
    return shared_fs.rig_missing("CephFS", mount_points(faults), FSTYPE, "tests/cephfs/up")


def sessions(filesystem: str) -> list[dict[str, Any]]:
    """The MDS's client sessions of *filesystem* (``session ls``)."""
    listed: list[dict[str, Any]] = json.loads(
        ceph("tell", f"mds.{filesystem}:0", "session", "ls", "--format", "json")
    )
    return listed


def session_of(user: str, filesystem: str) -> int | None:
    """The MDS session id of cephx user client.*user* on *filesystem*, if it has one open."""
    for entry in sessions(filesystem):
        if entry.get("client_metadata", {}).get("entity_id") == user:
            return int(entry["id"])
    return None


def evict(session: int, filesystem: str) -> None:
    """Evict the client with MDS session id *session*: the MDS drops its locks, the OSDs
    blocklist it (``ceph tell mds.NAME client evict``)."""
    ceph("tell", f"mds.{filesystem}:0", "client", "evict", f"id={session}")


@dataclass
class Host(shared_fs.Host):
    """One host: a host name, its own ceph-fuse mount, and the test's directory there."""

    #: Its MDS session id, where known (a host of a test's own).
    session: int | None = None

    def client_pid(self) -> int:
        pid = client_pid(self.mount)
        assert pid is not None, f"no ceph-fuse client serves {self.mount}"
        return pid


@dataclass
class OwnClient:
    """A private client of :meth:`Datastore.own_host`: its cephx user, keyring and mount."""

    user: str
    keyring: Path
    mount: Path
    pid: int


class Datastore:
    """Hosts A, B and C on one CephFS filesystem; hosts of a test's own to crash, hang or evict.

    With *faults*, on the filesystem that fault tests alone use (tests/support/cephfs_faults.py).
    """

    filesystem = "cephfs"
    fstype = FSTYPE
    #: The MDS keeps a dead client's session, and its locks, until
    #: session_autoclose, or until the session is evicted.
    crash_drops_locks_at_once = False
    #: Another client's look-up of a file waits until the MDS has taken back
    #: the hung client's capabilities on it: until session_timeout (60 s).
    hung_client_stalls_others = True

    def __init__(self, faults: bool = False) -> None:
        self.fs_name = FAULT_FILESYSTEM if faults else FILESYSTEM
        self.mounts = mount_points(faults)
        workdir = f"imglock-test-{uuid.uuid4().hex[:12]}"
        os.mkdir(self.mounts[0] / workdir)
        self.a, self.b, self.c = (
            Host(name, mount, workdir) for name, mount in zip(HOST_NAMES, self.mounts, strict=True)
        )
        self.own: list[OwnClient] = []

    @property
    def hosts(self) -> tuple[Host, Host, Host]:
        return self.a, self.b, self.c

    def own_host(self, name: str, *options: str) -> Host:
        """A host with a ceph-fuse client of its own, for a test to crash, hang or evict.

        Its own cephx user (client.NAME-XXXX) and MDS session, at a private
        mount point; *options* are more ceph-fuse options (such as
        ``--client_reconnect_stale=true``).  Unmounted, its client ended and
        its user removed when the test is over.
        """
        user = f"{name}-{uuid.uuid4().hex[:8]}"
        mount = Path(tempfile.mkdtemp(prefix=f"imglock-{name}-", dir="/tmp"))
        keyring = mount.with_suffix(".keyring")
        ceph("auth", "get-or-create", f"client.{user}", *CLIENT_CAPS, "-o", os.fspath(keyring))
        subprocess.run(
            [
                "ceph-fuse", "-c", conf(), "--id", user, "-k", keyring,
                "--client_fs", self.fs_name, *options, mount,
            ],
            check=True, capture_output=True, timeout=REMOUNT_TIMEOUT,
        )  # fmt: skip
        wait_until(lambda: answers(mount), what=f"{mount} to answer", timeout=REMOUNT_TIMEOUT)
        pid = client_pid(mount)
        assert pid is not None, f"no ceph-fuse client serves {mount}"
        self.own.append(OwnClient(user, keyring, mount, pid))
        return Host(name, mount, self.a.workdir, session_of(user, self.fs_name))

    def release_crashed(self, host: shared_fs.Host) -> None:
        """Evict *host*'s session, as an operator frees a dead host's images before
        session_autoclose: its locks go at once."""
        assert isinstance(host, Host) and host.session is not None, f"{host.name} is not our own"
        evict(host.session, self.fs_name)

    def close(self) -> None:
        for client in self.own:
            end_client(client, self.fs_name)
        shutil.rmtree(self.c.dir, ignore_errors=True)


def end_client(client: OwnClient, filesystem: str) -> None:
    """Unmount a private client and close its MDS session, whatever became of it.

    A session left open (its client killed) would hold its locks for
    ``session_autoclose`` and make every MDS restart wait for it
    (``mds_reconnect_timeout``): one the client cannot close, it is evicted.
    """
    if alive(client.pid):
        os.kill(client.pid, signal.SIGCONT)  # a stopped client would not unmount
        # A clean unmount ends the client, which closes its session.
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(["umount", client.mount], capture_output=True, timeout=STAT_TIMEOUT)
        # Given a moment to close its session; one that does not, is killed and evicted.
        poll_until(lambda: not alive(client.pid), timeout=STAT_TIMEOUT, interval=0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(client.pid, signal.SIGKILL)
    wait_until(lambda: not alive(client.pid), what="the client to die", timeout=10)
    session = session_of(client.user, filesystem)
    if session is not None:
        evict(session, filesystem)
    subprocess.run(["umount", "-l", client.mount], capture_output=True, check=False)
    with contextlib.suppress(OSError):
        client.mount.rmdir()
    with contextlib.suppress(OSError):
        client.keyring.unlink()
    with contextlib.suppress(AssertionError):
        ceph("auth", "rm", f"client.{client.user}")
