"""Storage faults caused for real on the GlusterFS rig's fault volume.

``tests/gluster/up`` brings up a second volume, ``imglock-faults``, that the
fault tests alone use: its brick may be killed, stopped and restarted, its
options changed, its clients killed, stopped and remounted.  What is done
here is what an operator's or a datacenter's bad day does:

- the brick (the server holding every POSIX lock of the volume): killed and
  started again (``volume start VOL force``), stopped and started with
  ``volume stop``/``volume start``, frozen with SIGSTOP (a hung server);
- the management daemon glusterd: restarted (locks live in the brick, not here);
- a host's client (its kernel, as far as the datastore goes): see
  :class:`gluster_hosts.Host` for killing and freezing it; here a lazy
  unmount and a new mount at the same path (:func:`remount`);
- volume options (``client.strict-locks``, ``network.ping-timeout``): set for
  a test and put back after it (:meth:`Volume.options`).

Clients reconnect to a restarted brick on their own (GlusterFS clients
retry every 3 s); :func:`wait_reachable` waits until a path answers a
``stat`` again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from gluster_hosts import DEFAULT_STATE_DIR, REMOUNT_TIMEOUT, Host, client_pid
from processes import alive, wait_until

#: The volume that only the fault tests may break (tests/gluster/up).
FAULT_VOLUME = "imglock-faults"
GLUSTER = ("gluster", "--mode=script")
#: Seconds a gluster command gets (glusterd answers in well under one).
COMMAND_TIMEOUT = 60.0
#: Seconds for a brick to start, or to die (a killed brick takes a second or two to exit).
BRICK_TIMEOUT = 20.0
#: Seconds for a client to find its brick again: it retries every 3 s.
RECONNECT_TIMEOUT = 30.0
#: Seconds a ``stat`` through a mount may take before the mount counts as not answering.
STAT_TIMEOUT = 5.0


def gluster(*args: str) -> str:
    """Run ``gluster --mode=script ARGS`` and return what it printed; fail the test if it fails."""
    proc = subprocess.run(
        [*GLUSTER, *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    if proc.returncode != 0:
        raise AssertionError(f"gluster {' '.join(args)} failed: {proc.stderr or proc.stdout}")
    return proc.stdout


def state_dir() -> Path:
    """The rig's state directory (``tests/gluster/up``): glusterd's pid file is there."""
    return Path(os.environ.get("IMGLOCK_GLUSTER_DIR", DEFAULT_STATE_DIR))


@dataclass
class Volume:
    """One GlusterFS volume with one brick, as ``gluster volume ...`` manages it."""

    name: str = FAULT_VOLUME

    def brick_pid(self) -> int | None:
        """The pid of the volume's brick process while glusterd sees it online, else None."""
        out = subprocess.run(
            [*GLUSTER, "volume", "status", self.name, "--xml"],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        ).stdout
        try:
            node = ET.fromstring(out).find("./volStatus/volumes/volume/node")
        except ET.ParseError:
            return None  # a stopped volume: gluster says so in words
        if node is None or node.findtext("status") != "1":
            return None
        return int(node.findtext("pid") or 0) or None

    def wait_brick(self, *, online: bool) -> int | None:
        """Wait until glusterd sees the brick online (return its pid) or offline."""
        what = f"the brick of {self.name} to be {'online' if online else 'offline'}"
        if online:
            return wait_until(self.brick_pid, what=what, timeout=BRICK_TIMEOUT)
        wait_until(lambda: self.brick_pid() is None, what=what, timeout=BRICK_TIMEOUT)
        return None

    def kill_brick(self) -> None:
        """The server crashes: SIGKILL the brick, and wait until glusterd has seen it go."""
        pid = self.wait_brick(online=True)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        # Gone, not only dead: glusterd takes a brick whose pid still exists
        # (a zombie not reaped yet) for running, and would not start it.
        wait_until(
            lambda: not os.path.exists(f"/proc/{pid}"),
            what="the killed brick to be gone",
            timeout=BRICK_TIMEOUT,
        )
        self.wait_brick(online=False)

    def start(self, *, force: bool = False) -> None:
        """``volume start`` (with *force*: start a brick that died) and wait for the brick."""
        gluster("volume", "start", self.name, *(["force"] if force else []))
        self.wait_brick(online=True)

    def stop(self) -> None:
        """``volume stop``: the brick ends, and with it every lock it held."""
        gluster("volume", "stop", self.name)
        self.wait_brick(online=False)

    def freeze_brick(self) -> int:
        """The server hangs (SIGSTOP): its locks stay, every call to it blocks.  Returns the pid."""
        pid = self.wait_brick(online=True)
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        return pid

    def option(self, name: str) -> str:
        """The option's value as ``volume get`` shows it (a default without its "(DEFAULT)")."""
        for line in gluster("volume", "get", self.name, name).splitlines():
            fields = line.split()
            if fields and fields[0] == name:
                return fields[1]
        raise AssertionError(f"gluster volume get {self.name} {name}: no such option")

    @contextlib.contextmanager
    def options(self, values: Mapping[str, str]) -> Iterator[None]:
        """Set the options *values* for the time of the block, then put the old values back.

        Only a client mounted afterwards is sure to run with them: a mounted
        client takes changed options from glusterd a moment later.
        """
        old = {name: self.option(name) for name in values}
        try:
            for name, value in values.items():
                if old[name] != value:
                    gluster("volume", "set", self.name, name, value)
            yield
        finally:
            for name, value in old.items():
                if values[name] != value:
                    gluster("volume", "set", self.name, name, value)


def restart_glusterd() -> None:
    """Stop the management daemon and start it again with its own command line.

    The bricks and their locks stay: glusterd only starts, stops and
    describes them.  Returns once it answers again.
    """
    pid = int((state_dir() / "run" / "glusterd.pid").read_text())
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = [os.fsdecode(arg) for arg in f.read().rstrip(b"\0").split(b"\0")]
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not alive(pid), what="glusterd to exit", timeout=BRICK_TIMEOUT)
    subprocess.run(argv, check=True, timeout=COMMAND_TIMEOUT)  # it daemonizes
    wait_until(
        lambda: subprocess.run([*GLUSTER, "pool", "list"], capture_output=True).returncode == 0,
        what="glusterd to answer again",
        timeout=BRICK_TIMEOUT,
    )


def reachable(path: str | os.PathLike[str], inside: int | None = None) -> bool:
    """Whether a ``stat`` of *path* answers (in the mount namespace of process *inside*).

    In a process of its own, bounded: through a hung mount it would block.
    """
    enter = ["nsenter", "-t", str(inside), "-m"] if inside is not None else []
    try:
        proc = subprocess.run(
            [*enter, "stat", "-c", "%i", os.fspath(path)], capture_output=True, timeout=STAT_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def wait_reachable(*paths: str | os.PathLike[str], timeout: float = RECONNECT_TIMEOUT) -> None:
    """Wait until every path answers a ``stat`` again (its client reconnected).

    A server that waits for a dead client before it serves anyone (a CephFS
    MDS in its reconnect phase) needs a *timeout* beyond its own wait.
    """
    for path in paths:
        wait_until(
            lambda p=path: reachable(p),  # type: ignore[misc]
            what=f"{path} to answer again",
            timeout=timeout,
        )


@dataclass
class Remount:
    """A new mount of the volume at a host's mount point, made after a lazy unmount."""

    client: int
    log: Path

    def end(self) -> None:
        """End the new mount's client (its mount point goes with its namespace)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.client, signal.SIGTERM)
        wait_until(lambda: not alive(self.client), what="the new client to end", timeout=10)
        with contextlib.suppress(OSError):
            self.log.unlink()


def remount(host: Host, inside: int) -> Remount:
    """``umount -l`` the host's mount and mount the volume again at the same path.

    Done on the host, in the mount and PID namespaces of process *inside*
    (one of the host's own processes: commands of a host each see the mounts
    as they were when they started, and its /proc).  The old client stays,
    serving the descriptors opened before; the new one is a client of its
    own, with its own lock owner, and ends with the host.
    """
    with open(f"/proc/{host.client_pid()}/cmdline", "rb") as f:
        argv = [os.fsdecode(arg) for arg in f.read().rstrip(b"\0").split(b"\0")]
    fd, name = tempfile.mkstemp(prefix="imglock-remount-", suffix=".log")
    os.close(fd)
    log = Path(name)
    options = [a for a in argv[1:-1] if not a.startswith(("--pid-file=", "--log-file="))]
    enter = ["nsenter", "-t", str(inside), "-m", "-p"]
    subprocess.run([*enter, "umount", "-l", host.mount], check=True, timeout=COMMAND_TIMEOUT)
    subprocess.run(
        [*enter, argv[0], *options, f"--log-file={log}", host.mount],
        check=True,
        timeout=REMOUNT_TIMEOUT,
    )
    wait_until(
        lambda: reachable(host.dir, inside),
        what=f"the new mount at {host.mount} to answer",
        timeout=REMOUNT_TIMEOUT,
    )
    # Its pid as this test sees it: the one whose command line names the new log.
    client = client_pid(f"--log-file={log}")
    assert client is not None, f"no glusterfs client writes {log}"
    return Remount(client, log)
