"""One holder of an image, as discovery reports it.

Plain data; the error classes name it through a protocol
(:class:`imglock.errors.Holder`), without importing the lock layer.
"""

from typing import Any, Literal, NamedTuple

HolderLayer = Literal["imglock", "qemu", "flock", "foreign"]


class Holder(NamedTuple):
    """One holder of an image, as far as its locks (and records) tell."""

    layer: HolderLayer
    #: "exclusive", "shared" or "shared-write" for the imglock layer, "exclusive"
    #: or "shared" for flock and foreign locks; None for QEMU.
    mode: str | None = None
    #: QEMU's permission names held, and refused to others (QEMU layer).
    perms: tuple[str, ...] = ()
    unshared: tuple[str, ...] = ()
    pid: int | None = None
    host: str | None = None
    command: str | None = None
    #: ISO 8601 UTC, or None when unknown.
    since: str | None = None
    #: The imglock owner id, when the holder is imglock's.
    owner: int | None = None
    #: Every local process holding the lock (several after fork, or OFD sharing).
    local_pids: tuple[int, ...] = ()
    #: The locked byte range [start, end) for foreign locks.
    range: tuple[int, int] | None = None
    #: For a waiter: its byte in the image's queue (lower is further ahead).
    place: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "layer": self.layer,
            "mode": self.mode,
            "perms": list(self.perms),
            "unshared": list(self.unshared),
            "pid": self.pid,
            "host": self.host,
            "command": self.command,
            "since": self.since,
        }
        if self.range is not None:
            out["range"] = {"start": self.range[0], "end": self.range[1]}
        return out

    def describe(self) -> str:
        """A short phrase naming the holder, for error messages."""
        what = self.mode or "/".join(self.perms) or "locked"
        who = [f"pid {self.pid}" if self.pid is not None else "unknown pid"]
        if self.host:
            who.append(f"on {self.host}")
        text = f"{self.layer} {what} by {' '.join(who)}"
        if self.command:
            text += f" ({_short(self.command)})"
        return text


def _short(command: str, limit: int = 60) -> str:
    return command if len(command) <= limit else command[: limit - 3] + "..."
