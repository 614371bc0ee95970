"""Who runs and who holds an image, sampled from a third host while storage fails.

    python tests/support/fault_sampler.py CONFIG_JSON

CONFIG_JSON names what to watch::

    {"image": PATH, "monitors": {NAME: QMP_SOCKET}, "processes": {NAME: PID},
     "probes": {NAME: DRIVE}}

*image* is the image as the sampling host mounts it; each monitor is a QMP
socket of a VM's own for the sampler (a VM that is not started yet is
looked for again and again); each process is a pid whose state letter is
recorded.  A VM with a probe is also asked, after each query-status, to
write one sector of DRIVE through its own block layer (HMP ``qemu-io``):
whether its descriptors still carry writes, which a server may refuse
(GlusterFS ``client.strict-locks``) while the guest runs on.  QEMU says
how each write went on its standard output, in order (see
:func:`probe_results`).  Never probe through a hung server: the write
would hold up QEMU's main loop.
Every source is sampled in a thread of its own, every
:data:`PERIOD` seconds, so that one that blocks (a lock test through a hung
mount, a monitor that stopped answering) holds up only itself.  Prints
``ready`` once every source has been sampled, and one JSON object of
samples when its standard input closes (see :class:`Samples`); all times
are ``time.monotonic()``, the same clock in every process of the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gluster_hosts import REPO
from lock_sampler import owner_names
from processes import poll_until, state

from imglock.errors import ImglockError
from imglock.lock import fcntl_locks
from imglock.lock.protocol import PERM_WRITE, QEMU_PERM_BASE

#: Seconds between two samples of one source.
PERIOD = 0.03
#: Seconds a monitor gets to answer one query-status before the sampler gives up on it.
QMP_TIMEOUT = 10.0
#: QEMU's lock byte for its "write" permission: held by every QEMU that may write.
QEMU_WRITE_BYTE = QEMU_PERM_BASE + PERM_WRITE


RUNNING = "running"
#: The status recorded when a VM's monitor cannot be reached because QEMU is not there.
GONE = "gone"


class Qmp:
    """A bare QMP session on a unix socket: enough for query-status, nothing else."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(QMP_TIMEOUT)
        try:
            self.sock.connect(path)
            self.file = self.sock.makefile("rwb")
            self._reply()  # the greeting
            self.execute("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def _reply(self) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError("QEMU closed its monitor")
            message: dict[str, Any] = json.loads(line)
            if "event" not in message:
                return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        message = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self.file.write(json.dumps(message).encode() + b"\n")
        self.file.flush()
        return self._reply().get("return")

    def close(self) -> None:
        self.sock.close()


#: A value that changes over time: (time, value) at each change, in time order.
Steps = list[tuple[float, bool]]


@dataclass
class Samples:
    """What the sampler saw.

    ``runstates[name]``: [asked, answered, status, probed] per query-status
    (status None where the monitor could not be reached or gave no answer;
    probed: whether a probe's write was made after it);
    ``states[name]``: [time, state letter or None once gone];
    ``holders``: [asked, answered, imglock exclusive holders as
    ``HOSTTAG:PID``, whether QEMU's write byte is held] (None for both when
    the lock test failed).
    """

    runstates: dict[str, list[list[Any]]] = field(default_factory=dict)
    states: dict[str, list[list[Any]]] = field(default_factory=dict)
    holders: list[list[Any]] = field(default_factory=list)

    def running(self, name: str) -> Steps:
        """Whether the VM *name* runs, as of each answer (a query that got none changes nothing)."""
        return [(answered, status == RUNNING) for _, answered, status, _ in self.runstates[name]
                if status is not None]  # fmt: skip

    def writes(self, name: str, results: list[bool]) -> Steps:
        """Whether the probe's writes through VM *name*'s own descriptors went through.

        *results*: how each write went, in order (:func:`probe_results`).
        """
        probed = [answered for _, answered, _, probed in self.runstates[name] if probed]
        return list(zip(probed, results, strict=False))

    def usable(self, name: str) -> Steps:
        """Whether process *name* can act: it exists and is not stopped (nor a zombie)."""
        return [(t, letter not in (None, "T", "t", "Z")) for t, letter in self.states[name]]

    def holder_names(self) -> list[list[str]]:
        """The exclusive imglock holders of every lock test that answered."""
        return [names for _, _, names, _ in self.holders if names is not None]

    def latencies(self, name: str, start: float, end: float) -> list[float]:
        """How long each query-status to VM *name* asked in [start, end] took to answer."""
        return [answered - asked for asked, answered, *_ in self.runstates[name]
                if start <= asked <= end]  # fmt: skip


def sample_monitor(path: str, probe: str | None, out: list[list[Any]]) -> None:
    session: Qmp | None = None
    while True:
        asked = time.monotonic()
        status = None
        probed = False
        try:
            session = session or Qmp(path)
            status = session.execute("query-status")["status"]
            if probe is not None:
                session.execute("human-monitor-command", {"command-line": probe})
                probed = True
        except (FileNotFoundError, ConnectionRefusedError, EOFError):
            status = GONE  # not started yet, or exited
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no answer: what the VM does is not known
        if status in (None, GONE) and session is not None:
            session.close()
            session = None
        out.append([asked, time.monotonic(), status, probed])
        time.sleep(PERIOD)


def sample_process(pid: int, out: list[list[Any]]) -> None:
    while True:
        out.append([time.monotonic(), state(pid)])
        time.sleep(PERIOD)


def sample_holders(image: str, out: list[list[Any]]) -> None:
    fd = -1
    while True:
        asked = time.monotonic()
        try:
            if fd < 0:
                fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
            names: list[str] | None = owner_names(fd, image)
            writer = fcntl_locks.conflicting(fd, QEMU_WRITE_BYTE, 1, image) is not None
        except (OSError, ImglockError):  # a failed look is a sample too: the mount is down
            names, writer = None, None
            if fd >= 0:
                # A descriptor from before a brick restart may be refused, even its close.
                with contextlib.suppress(OSError):
                    os.close(fd)
            fd = -1
        out.append([asked, time.monotonic(), names, writer])
        time.sleep(PERIOD)


def await_samples(series: list[list[list[Any]]], since: float) -> None:
    """Wait (boundedly: a source may hang) until every series has a sample taken after *since*."""
    poll_until(
        lambda: all(s and s[-1][0] > since for s in series), timeout=QMP_TIMEOUT, interval=PERIOD
    )


def main() -> None:
    config = json.loads(sys.argv[1])
    samples = Samples()
    sources: list[tuple[Any, tuple[Any, ...]]] = [
        (sample_holders, (config["image"], samples.holders))
    ]
    probes = config.get("probes", {})
    for name, path in config.get("monitors", {}).items():
        probe = f'qemu-io {probes[name]} "write -P 0xaa 0 512"' if name in probes else None
        sources.append((sample_monitor, (path, probe, samples.runstates.setdefault(name, []))))
    for name, pid in config.get("processes", {}).items():
        sources.append((sample_process, (pid, samples.states.setdefault(name, []))))
    for target, args in sources:
        threading.Thread(target=target, args=args, daemon=True).start()
    # Ready once every source has been sampled: a test then has a "before".
    series = [args[-1] for _, args in sources]
    await_samples(series, 0.0)
    print("ready", flush=True)
    sys.stdin.read()
    # And an "after": every source sampled once more since the test said stop.
    await_samples(series, time.monotonic())
    # Copies: the threads go on appending while the lists are written out.
    report = {
        "runstates": {name: list(s) for name, s in samples.runstates.items()},
        "states": {name: list(s) for name, s in samples.states.items()},
        "holders": list(samples.holders),
    }
    sys.stdout.write(json.dumps(report))
    sys.stdout.flush()
    # A thread blocked in a lock test on a hung mount would hold up a normal exit.
    os._exit(0)


if __name__ == "__main__":
    main()


class Sampler:
    """This script in a process of its own, from start to :meth:`stop`.

    It looks at the image through the mount given (host C's), but runs in
    none of the hosts' PID namespaces: it sees every host's processes.
    """

    def __init__(
        self,
        image: str | os.PathLike[str],
        monitors: Mapping[str, str | os.PathLike[str]],
        processes: Mapping[str, int],
        probes: Mapping[str, str] | None = None,
    ) -> None:
        config = {
            "image": os.fspath(image),
            "monitors": {name: os.fspath(path) for name, path in monitors.items()},
            "processes": dict(processes),
            "probes": dict(probes or {}),
        }
        self.proc = subprocess.Popen(
            [sys.executable, __file__, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": REPO},
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"

    def stop(self) -> Samples:
        """End the sampling; what it saw."""
        out, _ = self.proc.communicate(timeout=30)
        return Samples(**json.loads(out))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def probe_results(stderr: str) -> list[bool]:
    """How each probe's write went, from what QEMU wrote on its standard output."""
    return [line.startswith("wrote ") for line in stderr.splitlines()
            if line.startswith(("wrote ", "write failed:"))]  # fmt: skip


def value_at(steps: Steps, t: float) -> bool:
    """The value of *steps* at time *t* (False before its first change)."""
    value = False
    for when, now in steps:
        if when > t:
            break
        value = now
    return value


def both(a: Steps, b: Steps) -> Steps:
    """True where *a* and *b* both are."""
    times = sorted({t for t, _ in a} | {t for t, _ in b})
    return [(t, value_at(a, t) and value_at(b, t)) for t in times]


def first(steps: Steps, value: bool, after: float) -> float | None:
    """The first time after *after* at which *steps* takes *value*, if it does."""
    if value_at(steps, after) == value:
        return after
    return next((t for t, now in steps if t > after and now == value), None)
