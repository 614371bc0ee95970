"""Local attribution of locks to processes, through /proc/PID/fdinfo/FD.

F_OFD_GETLK reports l_pid = -1 for OFD locks, so a lock test alone cannot
say which process holds a lock.  On the holder's own host the kernel lists
every lock an open file holds in the ``lock:`` lines of that descriptor's
fdinfo; scanning them maps each lock on an inode to its pids.  Only what
the caller may read is read: other users' processes are skipped quietly
where /proc hides them (hidepid), as lslocks(8) does.
"""

import os
import re
from collections import defaultdict
from typing import Final, NamedTuple

from imglock.lock.fcntl_locks import OFFSET_MAX

#: "lock:\t1: OFDLCK  ADVISORY  READ -1 fd:01:1234 100 100" (end inclusive, EOF for 0 length)
_LOCK_LINE: Final = re.compile(
    rb"^lock:\s+\d+:\s+(?P<kind>\S+)\s+\S+\s+(?P<type>\S+)\s+\S+\s+"
    rb"(?P<major>[0-9a-f]+):(?P<minor>[0-9a-f]+):(?P<ino>\d+)\s+(?P<start>\d+)\s+(?P<end>\d+|EOF)",
    re.MULTILINE,
)

FileKey = tuple[int, int]  # (st_dev, st_ino)


class LocalLock(NamedTuple):
    """One lock held through one descriptor of one local process."""

    pid: int
    fd: int
    #: "OFDLCK", "POSIX" or "FLOCK".
    kind: str
    write: bool
    start: int
    #: One past the last byte.
    end: int

    def covers(self, start: int, end: int) -> bool:
        return self.start <= start and end <= self.end


def _parse(blob: bytes, pid: int, fd: int, out: dict[FileKey, list[LocalLock]]) -> None:
    for m in _LOCK_LINE.finditer(blob):
        dev = os.makedev(int(m["major"], 16), int(m["minor"], 16))
        end = OFFSET_MAX if m["end"] == b"EOF" else int(m["end"]) + 1
        out[(dev, int(m["ino"]))].append(
            LocalLock(
                pid=pid,
                fd=fd,
                kind=m["kind"].decode(),
                write=m["type"] == b"WRITE",
                start=int(m["start"]),
                end=end,
            )
        )


def scan(proc: str = "/proc") -> dict[FileKey, list[LocalLock]]:
    """Every lock visible in fdinfo on this host, by file."""
    out: dict[FileKey, list[LocalLock]] = defaultdict(list)
    try:
        pids = [int(name) for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        return out
    for pid in pids:
        base = f"{proc}/{pid}/fdinfo"
        try:
            fds = os.listdir(base)
        except OSError:
            continue
        for name in fds:
            try:
                with open(f"{base}/{name}", "rb") as f:
                    blob = f.read()
            except OSError:
                continue
            if b"lock:" in blob:
                _parse(blob, pid, int(name), out)
    return out


def argv(pid: int, proc: str = "/proc") -> list[str] | None:
    """The arguments of *pid*, or None if they cannot be read (or it has none)."""
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    args = [a.decode("utf-8", "backslashreplace") for a in raw.rstrip(b"\0").split(b"\0")]
    return args if any(args) else None


def command_line(pid: int, proc: str = "/proc") -> str | None:
    """The command line of *pid* as one string, or None if it cannot be read."""
    args = argv(pid, proc)
    return " ".join(args) if args else None


def start_time(pid: int, proc: str = "/proc") -> float | None:
    """When *pid* started, as a Unix time, or None if unknown."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open(f"{proc}/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
    except (OSError, IndexError, StopIteration, ValueError):
        return None
    # Field 22 of stat (index 19 after the command) is the start in clock ticks.
    return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
