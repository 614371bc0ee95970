"""Round trips on the critical path: GlusterFS with a simulated network round-trip time.

On one machine a GlusterFS client reaches its brick in ~0.2 ms, so a
round trip costs next to nothing and the figures of
``benchmarks/bench_gluster.py`` cannot tell one round trip more from
none.  Here hosts A and B are GlusterFS clients of the volume of
``tests/gluster/up`` mounted for this run only, each reaching the brick
through ``benchmarks/relay.py``, which delays each direction (5 ms each
way by default: a 10 ms round trip).  The same figures as there, each
beside its floor measured through the same relayed mounts in the same run,
and each also counted in round trips:

* one round trip: F_OFD_GETLK through relayed host B (the unit of the
  rest), beside the same call through host B's direct mount;
* ``imglock status DIR`` of 1,000 images from host B, beside a serial
  open + F_OFD_GETLK + close of each file and ``ls -l``;
* claim+release of a qcow2 and its backing file from host B, with its
  filesystem calls (the lock calls among them) counted, beside the
  per-file floor;
* the downtime a migration A→B under ``imglock run`` (and under
  ``imglock run --exec``) adds to plain QEMU on the same mounts, in ms and
  in round trips (goal: at most 2), with the lock calls between STOP and
  RESUME counted.

The images are made through the direct mount of host A (the same volume),
so that setting up costs no relayed round trips.  The relayed mounts and
the relay are gone when it ends, whatever happened.
Run: ``python -m benchmarks.bench_rtt [--quick] [--delay-ms MS]`` (as root).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from benchmarks import bench_gluster, bench_migration
from benchmarks.relay import DEFAULT_DELAY_MS
from benchmarks.timing import Figure, Row, Unavailable, bytecode_env, median_per_call, print_table
from imglock.lock import fcntl_locks
from imglock.qemu.monitor import EVENT_RESUME, EVENT_STOP

VOLUME = "imglock"
SECTION = "GlusterFS through a relay adding a round-trip time"
#: The migration's goal, from issue 16: the handoff adds at most 2 round trips.
GOAL_ROUND_TRIPS = 2
#: Seconds a relay or a new client gets to answer, and a mount to go away.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
#: The host names of the relayed clients, as in tests/gluster/up.
HOSTS = ("a", "b")
#: The image ``bench_migration.across_hosts`` migrates, in the workspace.
MIGRATED = "mig.qcow2"
#: A MIGRATION event saying ``completed``, as strace prints it (quotes escaped).
COMPLETED = '\\"status\\": \\"completed\\"'
#: Lock calls, and the sends that carry QEMU's events, with wall-clock times and file names.
STRACE = ("strace", "-f", "-qq", "-ttt", "-y", "-s", "200", "-e", "trace=fcntl,sendmsg,write")


class SetupError(Exception):
    """The relay or a relayed mount could not be set up."""


def _gluster_state() -> Path:
    return Path(os.environ.get("IMGLOCK_GLUSTER_DIR", bench_gluster.DEFAULT_STATE_DIR))


def brick_port(volume: str = VOLUME) -> int:
    """The TCP port of *volume*'s brick, as glusterd reports it."""
    status = subprocess.run(
        ["gluster", "--mode=script", "volume", "status", volume, "--xml"],
        capture_output=True, text=True, timeout=STOP_TIMEOUT, check=False,
    )  # fmt: skip
    found = re.search(r"<port>(\d+)</port>", status.stdout)
    if status.returncode != 0 or found is None or found.group(1) == "0":
        raise SetupError(f"volume {volume}: no brick port in `gluster volume status`")
    return int(found.group(1))


def client_volfile(relay_port: int, volume: str = VOLUME) -> str:
    """The client volfile glusterd made for *volume*, its brick reached through the relay."""
    path = _gluster_state() / "glusterd" / "vols" / volume / f"{volume}.tcp-fuse.vol"
    try:
        text = path.read_text()
    except OSError as exc:
        raise SetupError(f"{path}: {exc.strerror}") from exc
    # A protocol/client with remote-port set talks to that port directly,
    # without asking glusterd's port mapper where the brick is.
    relayed, count = re.subn(
        r"option remote-host .*",
        f"option remote-host 127.0.0.1\n    option remote-port {relay_port}",
        text,
    )
    if count != 1:
        raise SetupError(f"{path}: expected one protocol/client, found {count}")
    return relayed


def _until(predicate: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SetupError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.05)


def _mounted(mount: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == os.fspath(mount) for line in f)


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _stop_pid(pid_file: Path) -> None:
    """Stop the process *pid_file* names (a client the unmount did not end)."""
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return
    with contextlib.suppress(SetupError):
        _until(lambda: not os.path.exists(f"/proc/{pid}"), "client to end", STOP_TIMEOUT)
        return
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def relay(port: int, delay: float) -> Iterator[int]:
    """``benchmarks/relay.py`` in a process of its own, relaying to 127.0.0.1:*port*.

    Yields the port it listens on.  A process of its own, so that the
    benchmark's own Python never holds up the relay (nor the reverse).
    """
    argv = [sys.executable, "-m", "benchmarks.relay", "--to", f"127.0.0.1:{port}",
            "--delay-ms", str(delay * 1e3)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # ends at the relay's first line, or its exit
        if not line.startswith("listening on "):
            raise SetupError(f"the relay did not start (exit status {proc.poll()})")
        yield int(line.rsplit(":", 1)[1])
    finally:
        _stop(proc)


def _run(argv: Sequence[str | os.PathLike[str]], timeout: float) -> str | None:
    """Run *argv* to its end; None if it succeeded, else what went wrong."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"did not end within {timeout:.0f} s"
    except OSError as exc:
        return exc.strerror or str(exc)
    return None if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


def _rmdir(path: Path) -> None:
    """Remove *path* if it is an empty directory: never rmtree, a mount left is the volume."""
    with contextlib.suppress(OSError):
        path.rmdir()


def _last_line(log: Path) -> str:
    with contextlib.suppress(OSError, IndexError):
        return log.read_text().splitlines()[-1]
    return "no log"


@contextlib.contextmanager
def relayed_client(volfile: Path, mount: Path) -> Iterator[Path]:
    """A FUSE client of the volume at *mount*, started from *volfile*; unmounted at the end."""
    mount.mkdir()
    pid_file, log = mount.with_suffix(".pid"), mount.with_suffix(".log")
    try:
        # The caches off as on the shared mounts: host B sees host A at once.
        failed = _run(
            ["glusterfs", "-f", volfile, "--attribute-timeout=0", "--entry-timeout=0",
             "--negative-timeout=0", f"--pid-file={pid_file}", f"--log-file={log}", mount],
            START_TIMEOUT,
        )  # fmt: skip
        if failed is not None:
            raise SetupError(f"mounting {mount}: {failed}; its log ends: {_last_line(log)}")
        _until(lambda: _mounted(mount) and os.path.isdir(mount), f"{mount} to answer",
               START_TIMEOUT)  # fmt: skip
        yield mount
    finally:
        if _mounted(mount) and _run(["umount", mount], STOP_TIMEOUT) is not None:
            _run(["umount", "-l", mount], STOP_TIMEOUT)  # busy: detach it now, end it below
        _stop_pid(pid_file)
        for leftover in (pid_file, log):
            leftover.unlink(missing_ok=True)
        _rmdir(mount)


@contextlib.contextmanager
def relayed_mounts(delay: float) -> Iterator[list[Path]]:
    """Hosts A and B mounting the volume through one relay adding *delay* each way."""
    with contextlib.ExitStack() as stack:
        root = Path(tempfile.mkdtemp(prefix="imglock-rtt-"))
        stack.callback(_rmdir, root)
        relay_port = stack.enter_context(relay(brick_port(), delay))
        volfile = root / "client.vol"
        volfile.write_text(client_volfile(relay_port))
        stack.callback(volfile.unlink)
        yield [stack.enter_context(relayed_client(volfile, root / host)) for host in HOSTS]


# -- figures in round trips ------------------------------------------------


@contextlib.contextmanager
def getlk(directory: Path) -> Iterator[Callable[[], object]]:
    """One F_OFD_GETLK on a file in *directory*, opened once: one round trip to the brick."""
    path = directory / "rtt-probe"
    path.touch()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield lambda: fcntl_locks.conflicting(fd, 0, 0, str(path))
    finally:
        os.close(fd)


def round_trip_row(relayed: Path, direct: Path, delay: float, rounds: int) -> Figure:
    """The unit: one lock call through relayed host B, beside the same through B's direct mount."""
    with getlk(relayed) as relayed_call, getlk(direct) as direct_call:
        return Figure(
            f"one round trip: F_OFD_GETLK through host B, relayed {delay * 1e3:g} ms each way",
            median_per_call(relayed_call, rounds=rounds, batch=0.1),
            "F_OFD_GETLK through host B's direct mount",
            median_per_call(direct_call, rounds=rounds, batch=0.1),
            "the unit: 1 round trip",
        )


def in_round_trips(row: Row, rtt: float, delay: float) -> Row:
    """*row* from the relayed mounts, named so, with its median and peer in round trips."""
    label = f"+{2 * delay * 1e3:g} ms RTT: {row.what}"
    if isinstance(row, Unavailable):
        return dataclasses.replace(row, what=label)
    counted = f"{row.median / rtt:.1f} vs {row.peer / rtt:.1f} round trips"
    return dataclasses.replace(row, what=label, target=counted)


def added_round_trips(row: Row, rtt: float, delay: float, calls: str) -> Row:
    """A downtime *row*: what it adds to its peer, in ms and in round trips, beside the goal."""
    row = in_round_trips(row, rtt, delay)
    if isinstance(row, Unavailable):
        return row
    added = row.median - row.peer
    target = (
        f"added {added * 1e3:.1f} ms = {added / rtt:.2f} round trips; "
        f"goal ≤ {GOAL_ROUND_TRIPS} round trips"
    )
    return dataclasses.replace(row, what=f"{row.what}; {calls}", target=target)


# -- the lock calls within a migration's downtime ---------------------------


@dataclasses.dataclass(frozen=True)
class Trace:
    """What ``strace -ttt`` saw of one side of a migration: QEMU's events, and lock calls."""

    events: dict[str, float]  # the first time QEMU sent each event, as wall-clock seconds
    locks: list[float]  # when each lock call on the image began

    @classmethod
    def read(cls, path: Path, image: Path) -> Trace:
        events: dict[str, float] = {}
        locks: list[float] = []
        with open(path) as f:
            for line in f:
                parts = line.split(None, 2)
                if len(parts) < 3:
                    continue
                _pid, stamp, call = parts
                for name in (EVENT_STOP, EVENT_RESUME):
                    # strace prints QMP's JSON with its quotes escaped.
                    if f'\\"event\\": \\"{name}\\"' in call:
                        events.setdefault(name, float(stamp))
                if COMPLETED in call:
                    events.setdefault(COMPLETED, float(stamp))
                if call.startswith("fcntl(") and f"<{image}>" in call and "LK" in call:
                    locks.append(float(stamp))
        return cls(events, locks)

    def locks_between(self, start: float, end: float) -> int:
        return sum(start <= t <= end for t in self.locks)


def downtime_lock_calls(on_a: Path, on_b: Path) -> str:
    """The lock calls on the image from the source's STOP to the destination's RESUME.

    One more migration each way, plain and wrapped, with both sides under
    ``strace -f -ttt``: the source QEMU's send of its STOP event and the
    destination's of RESUME bound the downtime in one clock (wall-clock
    time) for both hosts, and the lock calls on the image between them are
    counted.  Each is a round trip; the two hosts' calls may overlap.  The
    destination's calls after its QEMU said ``completed`` are counted apart:
    only those stand between that moment and the guest running.
    """
    if shutil.which("strace") is None:
        return "lock calls not counted: no strace"
    counts = []
    with tempfile.TemporaryDirectory(prefix="imglock-bench-") as scratch:
        root = Path(scratch)
        for wrapped in (False, True):
            out = [root / f"{side}-{wrapped}.strace" for side in ("source", "destination")]
            hosts = tuple(
                [*bench_migration.on_host(host), *STRACE, "-o", str(trace)]
                for host, trace in zip(("host-a", "host-b"), out, strict=True)
            )
            bench_migration.one_migration(
                root, on_a / MIGRATED, wrapped, on_b / MIGRATED, (hosts[0], hosts[1])
            )
            source, destination = (
                Trace.read(out[0], on_a / MIGRATED),
                Trace.read(out[1], on_b / MIGRATED),
            )
            if EVENT_STOP not in source.events or EVENT_RESUME not in destination.events:
                return "lock calls not counted: no STOP or RESUME event in the trace"
            window = (source.events[EVENT_STOP], destination.events[EVENT_RESUME])
            arrived = destination.events.get(COMPLETED, window[0])
            counts.append(
                f"source {source.locks_between(*window)}, "
                f"destination {destination.locks_between(*window)} "
                f"({destination.locks_between(arrived, window[1])} after its completed)"
            )
    return f"lock calls STOP→RESUME, traced: plain {counts[0]}; under imglock run {counts[1]}"


def unavailable() -> str | None:
    """Why the relayed figures cannot be measured here, or None."""
    if bench_gluster.mounts() is None:
        return "not measured: no GlusterFS mounts (tests/gluster/up)"
    if os.geteuid() != 0:
        return "not measured: mounting the relayed clients needs root"
    for tool in ("glusterfs", "gluster", "qemu-img", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            return f"not measured: {tool} is not installed"
    return None


def figures(quick: bool = False, delay_ms: float = DEFAULT_DELAY_MS) -> list[Row]:
    why = unavailable()
    direct = bench_gluster.mounts()
    if why is not None or direct is None:
        return [Unavailable(SECTION, why or "not measured")]
    delay = delay_ms / 1e3
    # A serial pass over 1,000 files takes ~6 round trips a file: a minute.
    status_runs, rounds = (1, 5) if quick else (3, 11)
    try:
        with (
            relayed_mounts(delay) as (relayed_a, relayed_b),
            bench_gluster.workspace(direct[0], relayed_b) as (made, on_b),
            tempfile.TemporaryDirectory() as cache,
        ):
            on_a = relayed_a / made.name
            unit = round_trip_row(on_b, direct[1] / made.name, delay, rounds)
            rtt = unit.median
            rows: list[Row] = [unit]
            for row in bench_gluster.status_rows(made, on_b, status_runs, bytecode_env(cache)):
                rows.append(in_round_trips(row, rtt, delay))
            for row in bench_gluster.claim_rows(made, on_b, rounds):
                rows.append(in_round_trips(row, rtt, delay))
            downtime = bench_migration.across_hosts(on_a, on_b, quick=quick)
            calls = downtime_lock_calls(on_a, on_b)
            rows += [added_round_trips(row, rtt, delay, calls) for row in downtime]
    except SetupError as exc:
        return [Unavailable(SECTION, f"not measured: {exc}")]
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_rtt", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples, rough figures")
    parser.add_argument(
        "--delay-ms", type=float, default=DEFAULT_DELAY_MS, help="delay each way, in ms"
    )
    args = parser.parse_args(argv)
    # A SIGTERM ends the run through its cleanups: no relayed mount is left behind.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    started = time.monotonic()
    rows = figures(quick=args.quick, delay_ms=args.delay_ms)
    print_table(rows, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
