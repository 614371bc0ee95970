"""A manager's QMP monitor, relayed to QEMU through a gate.

A manager such as libvirt hands QEMU a listening socket for its monitor
(``-chardev socket,id=ID,fd=N,server=on,wait=off``) and connects to it
itself.  To stand between them, the wrapper keeps that socket, gives QEMU
a listening socket of its own in place of it (same options, another
descriptor), and relays every connection the manager makes: the manager's
commands go to QEMU unchanged, with any descriptors they carry
(``getfd``, ``add-fd``), except those the *gate* holds back or refuses;
QEMU's replies and events come back unchanged.

The gate sees each command, in order, as a JSON object; it returns None to
pass it on (it may first wait: the commands after it wait with it), or a
reason to refuse it, which the manager gets as the command's QMP error.
A connection of the manager's is a connection to QEMU: when the manager
reconnects (a restarted libvirtd), QEMU greets it anew.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

#: Largest chunk read from either side; and descriptors that may come with one
#: (SCM_RIGHTS: libvirt passes one or a few at a time).
CHUNK: Final = 65536
MAX_FDS: Final = 16
#: The QMP error class of a command the gate refuses (qapi/error.json).
REFUSED_CLASS: Final = "GenericError"

Gate = Callable[[Mapping[str, Any]], "str | None"]


class CommandStream:
    """Splits a manager's byte stream into QMP commands, keeping their exact bytes.

    Yields ``(raw, command)`` pairs: *command* is the parsed object (None
    for bytes between objects, or what cannot be parsed: QEMU answers that).
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._decoder = json.JSONDecoder()

    def feed(self, data: bytes) -> list[tuple[bytes, Mapping[str, Any] | None]]:
        self._buffer += data.decode("utf-8", errors="surrogateescape")
        out: list[tuple[bytes, Mapping[str, Any] | None]] = []
        while self._buffer:
            start = len(self._buffer) - len(self._buffer.lstrip())
            if start:
                out.append((self._encode(self._buffer[:start]), None))
                self._buffer = self._buffer[start:]
                continue
            try:
                value, end = self._decoder.raw_decode(self._buffer)
            except json.JSONDecodeError as exc:
                # Not JSON up to the end of a line: QEMU says so to the
                # manager, as it would directly.  Otherwise the rest of the
                # object has not come yet.
                newline = self._buffer.find("\n", exc.pos)
                if newline < 0:
                    break
                out.append((self._encode(self._buffer[: newline + 1]), None))
                self._buffer = self._buffer[newline + 1 :]
                continue
            raw, self._buffer = self._buffer[:end], self._buffer[end:]
            out.append((self._encode(raw), value if isinstance(value, dict) else None))
        return out

    @staticmethod
    def _encode(text: str) -> bytes:
        return text.encode("utf-8", errors="surrogateescape")


def refusal(command: Mapping[str, Any], reason: str) -> bytes:
    """The QMP error reply to *command*, refused for *reason*."""
    reply: dict[str, Any] = {"error": {"class": REFUSED_CLASS, "desc": reason}}
    if "id" in command:
        reply["id"] = command["id"]
    return json.dumps(reply).encode() + b"\r\n"


@dataclass(eq=False)
class MonitorProxy:
    """Relays each connection to the manager's *listener* to QEMU's socket at *qemu_path*."""

    listener: socket.socket
    qemu_path: str
    gate: Gate
    #: Says what went wrong in the relay (it never raises into its threads).
    say: Callable[[str], None]
    _closed: threading.Event = field(default_factory=threading.Event)

    def start(self) -> MonitorProxy:
        threading.Thread(target=self._accept, name="imglock-qmp-proxy", daemon=True).start()
        return self

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                manager, _address = self.listener.accept()
            except OSError:
                return  # closed
            try:
                qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                qemu.connect(self.qemu_path)
            except OSError as exc:
                self.say(f"QMP relay: cannot reach QEMU's monitor: {exc}")
                manager.close()
                continue
            self._relay(manager, qemu)

    def _relay(self, manager: socket.socket, qemu: socket.socket) -> None:
        """One connection: QEMU to the manager in a thread, the manager's commands here."""
        to_manager = threading.Lock()
        back = threading.Thread(target=self._replies, args=(qemu, manager, to_manager), daemon=True)
        back.start()
        try:
            self._commands(manager, qemu, to_manager)
        finally:
            for end in (manager, qemu):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
            back.join()
            manager.close()
            qemu.close()

    def _replies(self, qemu: socket.socket, manager: socket.socket, lock: threading.Lock) -> None:
        with contextlib.suppress(OSError):
            while data := qemu.recv(CHUNK):
                with lock:
                    manager.sendall(data)
        with contextlib.suppress(OSError):
            manager.shutdown(socket.SHUT_RDWR)

    def _commands(self, manager: socket.socket, qemu: socket.socket, lock: threading.Lock) -> None:
        stream = CommandStream()
        #: Descriptors received and not yet passed on: they go with the next
        #: bytes passed to QEMU, where a getfd or add-fd finds them as it
        #: would directly.
        pending: list[int] = []
        try:
            while True:
                data, fds, _flags, _address = socket.recv_fds(manager, CHUNK, MAX_FDS)
                pending += fds
                if not data:
                    return
                for raw, command in stream.feed(data):
                    reason = self.gate(command) if command is not None else None
                    if reason is not None and command is not None:
                        with lock:
                            manager.sendall(refusal(command, reason))
                        continue
                    if pending:
                        socket.send_fds(qemu, [raw], pending)
                        for fd in pending:
                            os.close(fd)
                        pending = []
                    else:
                        qemu.sendall(raw)
        except OSError:
            return  # either side gone: the connection ends
        finally:
            for fd in pending:
                os.close(fd)
