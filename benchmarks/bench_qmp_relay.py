"""A manager's QMP round trip through imglock's relay, beside one straight to QEMU.

A manager (libvirt) passes QEMU its monitor as a listening socket.  Under
``imglock run`` that socket is relayed (:mod:`imglock.qemu.proxy`): every
command and reply crosses the helper beside QEMU.  This measures the median
round trip of ``query-status`` both ways, on the same machine, in the same
run: QEMU given the manager's socket directly, and QEMU under ``imglock run
--exec`` given the same kind of socket.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.timing import Figure, median_of

SECTION = "manager's QMP round trip"
QEMU = ("qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none", "-S")


def _start(path: Path, wrapper: Sequence[str]) -> subprocess.Popen[bytes]:
    """QEMU (behind *wrapper*) with its monitor on a listening socket at *path*, passed as a fd."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    fd = listener.fileno()
    monitor = ["-chardev", f"socket,id=charmonitor,fd={fd},server=on,wait=off",
               "-mon", "chardev=charmonitor,id=monitor,mode=control"]  # fmt: skip
    process = subprocess.Popen([*wrapper, *QEMU, *monitor], pass_fds=[fd])
    listener.close()
    return process


def _round_trip(path: Path, runs: int) -> float:
    """Median seconds of one ``query-status`` and its reply, over a negotiated connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        lines = sock.makefile("rb")
        lines.readline()  # the greeting: once QEMU (and the relay) are up
        sock.sendall(b'{"execute": "qmp_capabilities"}\r\n')
        lines.readline()
        command = json.dumps({"execute": "query-status"}).encode() + b"\r\n"

        def once() -> None:
            sock.sendall(command)
            lines.readline()

        return median_of(once, runs)


def figures(quick: bool = False) -> list[Figure]:
    runs = 300 if quick else 3000
    root = Path(tempfile.mkdtemp(prefix="imglock-bench-"))
    medians = {}
    for name, wrapper in (
        ("straight", ()),
        ("relayed", (sys.executable, "-m", "imglock", "-q", "run", "--exec", "--")),
    ):
        path = root / f"{name}.sock"
        process = _start(path, wrapper)
        try:
            medians[name] = _round_trip(path, runs)
        finally:
            process.kill()
            process.wait()
    return [
        Figure(
            "QMP query-status round trip through imglock's relay",
            medians["relayed"],
            "straight to QEMU",
            medians["straight"],
            "≤ +0.2 ms",
        )
    ]
