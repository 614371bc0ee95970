"""Which files have flock(2) locks on this host, from /proc/locks.

Lock tests (F_OFD_GETLK) do not see flock locks on local filesystems, so
/proc/locks is the one place that shows them.  Reading it is slow however
little it holds: the kernel takes ``file_rwsem`` for writing (fs/locks.c,
``locks_start``), which waits for an RCU grace period, about 10 ms on an
idle machine.  The wait sleeps in the kernel without the GIL, so a caller
that will need the table starts the read in the background early
(``imglock status`` does as soon as the command is known), and the wait
overlaps its other work instead of adding to it.
"""

from __future__ import annotations

import os
import threading
from typing import Final

PROC_LOCKS: Final = "/proc/locks"


def file_key(dev: int, ino: int) -> str:
    """The name /proc/locks gives the file with this device and inode."""
    return f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"


class FlockTable:
    """One read of /proc/locks: the files that have flock locks, as :func:`file_key` names them.

    With *background*, the read starts at once in a thread; otherwise it
    happens at the first :meth:`files`.  Either way it happens once, so one
    `status` or one conflict report sees one consistent picture.
    """

    def __init__(self, *, background: bool = False) -> None:
        self._files: frozenset[str] | None = None
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        if background:
            self._reader = threading.Thread(target=self._read, name="imglock-proc-locks")
            self._reader.daemon = True
            self._reader.start()

    def _read(self) -> None:
        found: set[str] = set()
        try:
            with open(PROC_LOCKS, "rb") as f:
                for line in f:
                    # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"
                    fields = line.split()
                    if len(fields) > 5 and fields[1] == b"FLOCK":
                        found.add(fields[5].decode())
        except OSError:
            pass  # no /proc (a container without it): no flock holders to name
        self._files = frozenset(found)

    def files(self) -> frozenset[str]:
        if self._reader is not None:
            self._reader.join()
        with self._lock:  # `status` looks at several images from threads
            if self._files is None:
                self._read()
        assert self._files is not None
        return self._files

    def has(self, st: os.stat_result) -> bool:
        """Whether some process on this host holds a flock lock on the file *st* describes."""
        return file_key(st.st_dev, st.st_ino) in self.files()
