"""How ``imglock run`` stops a guest from writing: the guest control a VMM's adapter gives."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


class GuestControl(Protocol):
    """How to stop a guest from writing when its lock is lost, or cannot be checked."""

    def pause(self, reason: str) -> str:
        """Stop the guest for good (its lock is lost); return a phrase saying how."""
        ...

    def suspend(self) -> str | None:
        """Stop the guest until :meth:`resume` (its lock cannot be checked now).

        Returns how, or None when the guest was not running (then nothing
        is to be resumed either).
        """
        ...

    def resume(self) -> str:
        """Undo :meth:`suspend`; return a phrase saying how."""
        ...

    def retarget(self, named: int, pids: Sequence[int]) -> None:
        """The processes using the images are now *pids*, *named* the one the lock names.

        Once the command has exited leaving processes behind (see
        :mod:`imglock.run.watcher`), these are the guest.
        """
        ...


def signal_name(signo: int) -> str:
    """SIGSTOP for 19; a real-time signal, which has no name of its own, by number."""
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"signal {signo}"


@dataclass
class SignalGuest:
    """Any command: pause it with a signal (SIGSTOP by default).

    Once the command has exited leaving processes that use the images,
    every one of them gets the signal.
    """

    pid: int
    signo: int = signal.SIGSTOP
    pids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.pids = [self.pid]

    def pause(self, reason: str) -> str:
        return self._send(self.signo) or "the command had already exited"

    def suspend(self) -> str | None:
        return self._send(signal.SIGSTOP)

    def resume(self) -> str:
        return self._send(signal.SIGCONT) or "the command had already exited"

    def retarget(self, named: int, pids: Sequence[int]) -> None:
        self.pids = sorted(pids)

    def _send(self, signo: int) -> str | None:
        sent = []
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signo)
                sent.append(str(pid))
        return f"sent {signal_name(signo)} to pid {', '.join(sent)}" if sent else None
