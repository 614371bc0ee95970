"""Faults caused for real on the CephFS rig's fault filesystem.

``tests/cephfs/up`` makes a second filesystem, ``imglock-faults``, with an
MDS of its own, that the fault tests alone use: its MDS may be killed and
started again, its clients killed or evicted, its session timeouts changed.
What is done here is what an operator's or a datacenter's bad day does:

- the MDS (the server holding every lock of the filesystem): killed with
  SIGKILL and started again with its own command line (:func:`kill_mds`,
  :func:`start_mds`); the clients re-send their locks to the new one, and
  it waits ``mds_reconnect_timeout`` (45 s) for a session that does not
  come back;
- a host's client: see :class:`cephfs_hosts.Host` for killing and freezing
  it, :func:`cephfs_hosts.evict` for evicting its session (it is then
  blocklisted);
- the filesystem's settings (``session_timeout``, ``session_autoclose``):
  set for a test and put back after it (:func:`settings`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator, Mapping

from cephfs_hosts import (
    COMMAND_TIMEOUT,
    FAULT_FILESYSTEM,
    ceph,
    conf,
    evict,
    sessions,
    state_dir,
)
from processes import alive, wait_until

#: Seconds for an MDS to die, or to start and become active again (some 4 s
#: without a dead session; see :data:`RECONNECT_TIMEOUT`).
MDS_TIMEOUT = 30.0


def fs_info(filesystem: str = FAULT_FILESYSTEM) -> dict[str, object]:
    """The filesystem's MDS map (``ceph fs get NAME``)."""
    mdsmap: dict[str, object] = json.loads(ceph("fs", "get", filesystem, "--format", "json"))[
        "mdsmap"
    ]
    return mdsmap


def active_mds(filesystem: str = FAULT_FILESYSTEM) -> str | None:
    """The name of the filesystem's active MDS, if one is active."""
    info = fs_info(filesystem)["info"]
    assert isinstance(info, dict)
    for daemon in info.values():
        if daemon["state"] == "up:active":
            return str(daemon["name"])
    return None


def mds_pid(name: str) -> int | None:
    """The pid of MDS *name* as ``tests/cephfs/up`` recorded it, while it runs."""
    try:
        pid = int((state_dir() / "run" / f"mds.{name}.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def kill_mds(filesystem: str = FAULT_FILESYSTEM) -> str:
    """The MDS crashes: SIGKILL the filesystem's active MDS; returns its name."""
    name = wait_until(
        lambda: active_mds(filesystem), what=f"an active MDS for {filesystem}", timeout=MDS_TIMEOUT
    )
    assert name is not None
    pid = mds_pid(name)
    assert pid is not None, f"mds.{name} does not run"
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: exited(pid), what=f"mds.{name} to die", timeout=MDS_TIMEOUT)
    return name


def exited(pid: int) -> bool:
    """Whether every thread of process *pid* has exited.

    Not only its first: that one turns zombie as soon as it has exited
    itself, while the others may still be closing the process's files (an
    MDS's pidfile stays locked until then, and an MDS started meanwhile
    refuses to run).
    """
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    return not any(alive(int(thread)) for thread in threads)


def start_mds(name: str) -> None:
    """Start MDS *name* again, as ``tests/cephfs/up`` does (it daemonizes)."""
    subprocess.run(
        ["ceph-mds", "-c", os.fspath(conf()), "-i", name],
        check=True,
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
    )
    wait_until(lambda: mds_pid(name), what=f"mds.{name} to run", timeout=MDS_TIMEOUT)


def evict_dead_sessions(filesystem: str = FAULT_FILESYSTEM) -> list[int]:
    """Evict every session whose client (a process of this machine) is gone; their ids.

    Left by a test run that was itself killed: until ``session_autoclose``
    each would make a restarted MDS wait ``mds_reconnect_timeout`` for it.
    """
    dead = [
        int(entry["id"])
        for entry in sessions(filesystem)
        if not alive(int(entry.get("client_metadata", {}).get("pid", 0)))
    ]
    for session in dead:
        evict(session, filesystem)
    return dead


def setting(name: str, filesystem: str = FAULT_FILESYSTEM) -> str:
    """A filesystem setting as ``ceph fs get`` shows it (session_timeout, session_autoclose)."""
    return str(fs_info(filesystem)[name])


@contextlib.contextmanager
def settings(values: Mapping[str, str], filesystem: str = FAULT_FILESYSTEM) -> Iterator[None]:
    """``ceph fs set`` the *values* for the time of the block, then put the old ones back."""
    old = {name: setting(name, filesystem) for name in values}
    try:
        for name, value in values.items():
            ceph("fs", "set", filesystem, name, value)
        yield
    finally:
        for name, value in old.items():
            ceph("fs", "set", filesystem, name, value)
