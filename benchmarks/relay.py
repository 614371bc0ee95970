"""A TCP relay that adds a fixed delay to each direction: a network round-trip time.

``tc netem`` needs a kernel module and a network namespace of one's own;
a relay in user space needs neither.  It listens on 127.0.0.1, opens one
connection to the target for each connection it accepts, and passes each
chunk of bytes on *delay* seconds after it arrived, in the order it
arrived, each direction on its own.  Chunks that arrive close together
leave close together: requests in flight overlap as they would on a
network with that latency, rather than queueing behind one another.

Run: ``python -m benchmarks.relay --to HOST:PORT [--delay-ms 5]``; it prints
``listening on 127.0.0.1:PORT`` once it accepts connections, and relays
until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

LOOPBACK = "127.0.0.1"
#: The default delay each way: 5 ms, a 10 ms round trip (a metro-area link).
DEFAULT_DELAY_MS = 5.0
CHUNK = 1 << 16


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
        return cls(host or LOOPBACK, int(port))


async def _delayed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
) -> None:
    """Copy *reader* to *writer*, each chunk *delay* seconds after it arrived, in order.

    End of stream is passed on the same way, after the chunks before it.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def receive() -> None:
        try:
            while chunk := await reader.read(CHUNK):
                queue.put_nowait((loop.time() + delay, chunk))
        except ConnectionError:
            pass
        queue.put_nowait((loop.time() + delay, b""))

    receiving = asyncio.create_task(receive())
    try:
        while True:
            due, chunk = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not chunk:
                if writer.can_write_eof():
                    writer.write_eof()
                break
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        receiving.cancel()


async def _relay_one(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target: Endpoint,
    delay: float,
) -> None:
    try:
        server_reader, server_writer = await asyncio.open_connection(target.host, target.port)
    except OSError:
        client_writer.close()
        return
    try:
        await asyncio.gather(
            _delayed(client_reader, server_writer, delay),
            _delayed(server_reader, client_writer, delay),
        )
    finally:
        for writer in (client_writer, server_writer):
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: Endpoint, delay: float
) -> None:
    # When the relay stops, its connections end with it, quietly.
    with contextlib.suppress(asyncio.CancelledError):
        await _relay_one(reader, writer, target, delay)


async def serve(target: Endpoint, delay: float, port: int = 0) -> None:
    """Relay connections to *target* on 127.0.0.1:*port* until cancelled or signalled."""
    server = await asyncio.start_server(
        lambda r, w: _connection(r, w, target, delay), LOOPBACK, port
    )
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening on {LOOPBACK}:{bound}", flush=True)
    async with server:
        await stopped.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.relay", description=__doc__)
    parser.add_argument("--to", type=Endpoint.parse, required=True, help="HOST:PORT to relay to")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: any)")
    parser.add_argument(
        "--delay-ms", type=float, default=DEFAULT_DELAY_MS, help="delay each way, in ms"
    )
    args = parser.parse_args(argv)
    asyncio.run(serve(args.to, args.delay_ms / 1e3, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
