"""Which processes still use a claim once the command ``imglock run`` started has exited.

A command may leave processes behind that inherited the claim's
descriptors: QEMU's ``-daemonize`` (its launcher exits once the daemon
runs), a shell's background job.  The claim belongs to them as much as to
the command (imglock(7), LIFETIME).  The wrapper makes itself a child
subreaper (prctl(2) PR_SET_CHILD_SUBREAPER), so such orphans become its
own children instead of init's, and looks for them among its descendants:
a process that has a descriptor open on a file the claim locks.
"""

from __future__ import annotations

import ctypes
import os
from collections import defaultdict
from collections.abc import Iterable
from typing import Final

#: prctl(2) option: orphaned descendants are re-parented to this process.
PR_SET_CHILD_SUBREAPER: Final = 36

FileKey = tuple[int, int]  # (st_dev, st_ino)


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants; False if the system refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def _parent(pid: int, proc: str) -> int | None:
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command: state, then the parent's pid.
    return int(fields[1]) if len(fields) > 1 and fields[0] not in (b"Z", b"X") else None


def descendants(root: int, proc: str = "/proc") -> set[int]:
    """The live descendants of *root* (not counting zombies, which hold no descriptor)."""
    children: dict[int, list[int]] = defaultdict(list)
    for name in os.listdir(proc):
        if name.isdigit():
            parent = _parent(int(name), proc)
            if parent is not None:
                children[parent].append(int(name))
    found: set[int] = set()
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, ())
    return found


def using(pids: Iterable[int], files: set[FileKey], proc: str = "/proc") -> set[int]:
    """Those of *pids* that have a descriptor open on one of *files*."""
    out: set[int] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"{proc}/{pid}/fd")
        except OSError:
            continue  # gone, or not ours to look at
        for fd in fds:
            try:
                st = os.stat(f"{proc}/{pid}/fd/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in files:
                out.add(pid)
                break
    return out
