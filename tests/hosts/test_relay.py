"""benchmarks/relay.py, the simulated network of ``benchmarks/bench_rtt.py``.

The relay runs as the benchmark runs it, a process of its own, in front of
a real TCP server of the test's own that echoes what it gets and notes
when each piece arrived.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = str(Path(__file__).parents[2])
#: The delay each way: large beside a busy machine's scheduling noise.
DELAY = 0.1
#: Seconds any one receive may take before the test fails.
TIMEOUT = 10.0


class EchoServer:
    """A TCP server on 127.0.0.1 that echoes one connection, noting when each piece arrived."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.arrivals: list[tuple[float, bytes]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            while data := conn.recv(1 << 16):
                self.arrivals.append((time.monotonic(), data))
                conn.sendall(data)
        # Closing answers the relay's end of stream with one of our own.

    def close(self) -> None:
        self.listener.close()


@contextlib.contextmanager
def relay(port: int, delay: float = DELAY) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """``python -m benchmarks.relay`` to 127.0.0.1:*port*; yields its port and process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.relay", "--to", f"127.0.0.1:{port}",
         "--delay-ms", str(delay * 1e3)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        yield int(line.rsplit(":", 1)[1]), proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=TIMEOUT)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def receive(sock: socket.socket, size: int) -> bytes:
    """Exactly *size* bytes from *sock* (fewer only if it ends first)."""
    got = bytearray()
    while len(got) < size and (data := sock.recv(size - len(got))):
        got += data
    return bytes(got)


def test_bytes_come_back_whole_and_in_order_both_ways(echo: EchoServer) -> None:
    payload = os.urandom(2 << 20)
    # Pieces of uneven sizes, sent while the echo comes back.
    cuts = [0, *sorted({(i * 7919) % len(payload) for i in range(1, 200)}), len(payload)]
    with relay(echo.port, delay=0.005) as (port, _), connect(port) as sock:

        def send() -> None:
            for start, end in itertools.pairwise(cuts):
                sock.sendall(payload[start:end])

        sender = threading.Thread(target=send)
        sender.start()
        echoed = receive(sock, len(payload))
        sender.join()
    assert echoed == payload


def test_each_direction_is_delayed(echo: EchoServer) -> None:
    with relay(echo.port) as (port, _), connect(port) as sock:
        sent = time.monotonic()
        sock.sendall(b"ping")
        assert receive(sock, 4) == b"ping"
        back = time.monotonic()
    (arrived, data), *_ = echo.arrivals
    assert data == b"ping"
    assert arrived - sent >= DELAY  # toward the server
    assert back - arrived >= DELAY  # and back


def test_messages_in_flight_overlap_rather_than_queue(echo: EchoServer) -> None:
    """Five requests sent 10 ms apart come back within about one round trip, not five."""
    with relay(echo.port) as (port, _), connect(port) as sock:
        start = time.monotonic()
        for i in range(5):
            sock.sendall(b"%d" % i)
            time.sleep(0.01)  # the spacing of the requests is what is measured
        assert receive(sock, 5) == b"01234"
        elapsed = time.monotonic() - start
    assert 2 * DELAY <= elapsed < 3 * 2 * DELAY  # one after another would take 5 * 2 * DELAY


def test_end_of_stream_follows_the_data(echo: EchoServer) -> None:
    with relay(echo.port) as (port, _), connect(port) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)
        assert receive(sock, 100) == b"last words"  # then the server's close came through
        assert sock.recv(1) == b""


def test_a_target_that_refuses_ends_the_connection() -> None:
    with socket.create_server(("127.0.0.1", 0)) as unused:
        closed_port = unused.getsockname()[1]
    with relay(closed_port) as (port, proc), connect(port) as sock:
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1) == b""
        assert proc.poll() is None  # the relay goes on for the next connection


def test_sigterm_stops_it_quietly_with_connections_open(echo: EchoServer) -> None:
    with relay(echo.port) as (port, proc), connect(port) as sock:
        sock.sendall(b"in flight")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0
    assert stderr == ""
