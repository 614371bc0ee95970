"""Downtime that the migration handoff of ``imglock run`` adds, beside plain QEMU.

Downtime here is the destination's RESUME event time minus the source's
STOP event time (QEMU's own timestamps, one host, one clock), for a 64 MiB
TCG guest migrating over a unix socket.  Plain: two bare QEMUs, the
destination resuming by itself at completion.  Wrapped: both under
``imglock run``, the destination resuming only after it has claimed the
image, which the source releases once its migration has completed; and
again under ``imglock run --exec`` (as a manager runs it: the wrapper
execs QEMU, and a helper beside it does the handoff).
Run: ``python -m benchmarks.bench_migration``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from benchmarks.timing import Figure, print_table
from imglock.lock import fcntl_locks
from imglock.qemu.monitor import EVENT_RESUME, EVENT_STOP, MonitorThread

GUEST = ("-M", "pc", "-m", "64", "-nodefaults", "-display", "none", "-accel", "tcg")
#: Each wrapped variant: the words it adds to a row's name, and its ``imglock run`` options.
VARIANTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("under imglock run", ()),
    ("under imglock run --exec", ("--exec",)),
)


@contextlib.contextmanager
def _vm(argv: list[str], qmp: str) -> Iterator[MonitorThread]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    monitor = MonitorThread.connect(qmp, timeout=30, process=proc)
    try:
        monitor.call(monitor.monitor.enable_migration_events())
        yield monitor
    finally:
        monitor.close()
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _event_time(monitor: MonitorThread, name: str, timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in monitor.monitor.history:
            if event.name == name:
                return event.timestamp
        time.sleep(0.002)
    raise TimeoutError(f"no {name} event")


def _wait_until_free(image: Path, timeout: float = 30.0) -> None:
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + timeout
        while fcntl_locks.conflicting(fd, 0, 0, str(image)) is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{image} is still locked")
            time.sleep(0.01)
    finally:
        os.close(fd)


def on_host(name: str) -> list[str]:
    """A prefix that runs a command as host *name* (own UTS and PID namespaces; needs root)."""
    return [
        "unshare", "--uts", "--pid", "--fork", "--kill-child",
        "sh", "-c", 'hostname "$0" && exec "$@"', name,
    ]  # fmt: skip


def one_migration(
    root: Path,
    image: Path,
    wrapped: bool,
    dest_image: Path | None = None,
    hosts: tuple[list[str], list[str]] = ([], []),
    options: Sequence[str] = (),
) -> float:
    """Migrate once; return STOP-to-RESUME in seconds.

    The destination opens *dest_image* (the same image by another path, as
    another host mounts it), each side under its prefix of *hosts*, and
    when *wrapped* under ``imglock run`` with *options*.
    """
    _wait_until_free(image)  # the last run's QEMUs may still be going away
    qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    wrapper = [sys.executable, "-m", "imglock", "run", *options, "--"] if wrapped else []
    uri = f"unix:{root}/mig.sock"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{root}/mig.sock")

    def argv(name: str, disk_image: Path, host: list[str], *extra: str) -> list[str]:
        disk = ("-drive", f"file={disk_image},if=virtio")
        qmp = ("-qmp", f"unix:{root}/{name}.qmp,server=on,wait=off")
        return [*host, *wrapper, qemu, *GUEST, *disk, *qmp, *extra]

    with (
        _vm(argv("src", image, hosts[0]), f"{root}/src.qmp") as src,
        _vm(argv("dst", dest_image or image, hosts[1], "-incoming", uri), f"{root}/dst.qmp") as dst,
    ):
        while not os.path.exists(f"{root}/mig.sock"):
            time.sleep(0.002)
        src.call(src.monitor.execute("migrate", {"uri": uri}))
        stop = _event_time(src, EVENT_STOP)
        resume = _event_time(dst, EVENT_RESUME)
    return resume - stop


def downtime_figure(
    what: str, beside: str, target: str, runs: int, migrate: Callable[[bool], float]
) -> Figure:
    """Median STOP→RESUME of *runs* wrapped migrations beside as many plain ones.

    ``migrate(wrapped)`` migrates once; the two kinds take turns, so that a
    change in the machine's load falls on each alike.
    """
    plain, wrapped = [], []
    for _ in range(runs):
        plain.append(migrate(False))
        wrapped.append(migrate(True))
    plain_s, wrapped_s = statistics.median(plain), statistics.median(wrapped)
    added = f"added {1e3 * (wrapped_s - plain_s):.1f} ms; target {target}"
    return Figure(f"{what} ({runs} runs)", wrapped_s, beside, plain_s, added)


def figures(quick: bool = False) -> list[Figure]:
    root = Path(tempfile.mkdtemp(prefix="imglock-bench-"))
    try:
        image = root / "vm.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "64M"], check=True)
        return [
            downtime_figure(
                f"migration downtime, STOP→RESUME, {variant}",
                "plain QEMU",
                "≤ 5 ms",
                3 if quick else 9,
                functools.partial(one_migration, root, image, options=options),
            )
            for variant, options in VARIANTS
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def across_hosts(
    on_a: Path, on_b: Path, quick: bool = False, via: str = "GlusterFS"
) -> list[Figure]:
    """Downtime migrating host A -> host B, the image on a shared volume (A's and B's paths).

    *via* names the filesystem in the row.
    """
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", on_a / "mig.qcow2", "64M"], check=True
    )
    hosts = (on_host("host-a"), on_host("host-b")) if os.geteuid() == 0 else ([], [])
    root = Path(tempfile.mkdtemp(prefix="imglock-bench-"))
    try:
        return [
            downtime_figure(
                f"migration downtime A→B via {via}, STOP→RESUME, {variant}",
                "plain QEMU, A→B on the same mounts",
                "≤ 5 ms",
                5 if quick else 9,
                functools.partial(
                    one_migration,
                    root,
                    on_a / "mig.qcow2",
                    dest_image=on_b / "mig.qcow2",
                    hosts=hosts,
                    options=options,
                ),
            )
            for variant, options in VARIANTS
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    print_table(figures(quick="--quick" in sys.argv))


if __name__ == "__main__":
    main()
