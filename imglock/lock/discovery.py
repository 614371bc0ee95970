"""Holder discovery: who holds an image, read from its locks.

Locks are enumerated with conflict tests over the whole offset range, so
this works from any host that mounts the image, without a daemon.  Each
lock is then read by where it lies:

* one byte in the imglock layer: an imglock holder, whose mode is the
  region and whose host and pid are packed in the offset;
* bytes in QEMU's permission ranges: QEMU (or a tool speaking its bytes),
  decoded into QEMU's permission names;
* anything else (virtlockd's byte 0, cloud-hypervisor's data range, a
  whole-file lock from flock(2) on NFS): a foreign holder with its range.

On the holder's own host, /proc attributes every lock to its processes;
holder records add the host name, command and start time for the rest.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final, Literal

from imglock.lock import fcntl_locks, records
from imglock.lock.fcntl_locks import RangeLock
from imglock.lock.holder import Holder as Holder
from imglock.lock.identity import Owner, hostname
from imglock.lock.protocol import (
    IMGLOCK_END,
    IMGLOCK_EXCLUSIVE_BASE,
    QEMU_PERM_BASE,
    QEMU_PERM_NAMES,
    QEMU_PERM_SLOTS,
    QEMU_SHARED_BASE,
    REGION_BASE,
    mode_at,
)

if TYPE_CHECKING:  # imported when some lock is seen: most images have none
    from imglock.lock import procfs

#: A lock range in the imglock layer wider than this is not one holder's bytes.
_MAX_OWNER_BYTES: Final = 64


class LocalLocks:
    """The /proc view of local locks, taken once and reused for many images
    (with the record directories' listings, also read once)."""

    __slots__ = ("_index", "record_dirs")

    def __init__(self) -> None:
        self._index: dict[procfs.FileKey, list[procfs.LocalLock]] | None = None
        self.record_dirs = records.RecordDirs()

    def on(self, st: os.stat_result) -> list[procfs.LocalLock]:
        if self._index is None:
            from imglock.lock import procfs

            self._index = procfs.scan()
        return self._index.get((st.st_dev, st.st_ino), [])


class Survey:
    """All that is known about one image's holders."""

    __slots__ = ("holders", "stale_records")

    def __init__(self, holders: list[Holder], stale_records: list[records.Record]) -> None:
        self.holders = holders
        #: Records whose lock is gone: shown, never obeyed.
        self.stale_records = stale_records


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _bytes_of(start: int, end: int) -> range:
    return range(start, min(end, start + _MAX_OWNER_BYTES))


def _kind(start: int, end: int) -> Literal["imglock", "qemu", "foreign"]:
    if start >= IMGLOCK_EXCLUSIVE_BASE and end <= IMGLOCK_END and end - start <= _MAX_OWNER_BYTES:
        return "imglock"
    for base in (QEMU_PERM_BASE, QEMU_SHARED_BASE):
        if base <= start and end <= base + QEMU_PERM_SLOTS:
            return "qemu"
    return "foreign"


def _perm_names(bytes_held: Iterable[int], base: int) -> tuple[str, ...]:
    bits = sorted({b - base for b in bytes_held if base <= b < base + QEMU_PERM_SLOTS})
    return tuple(QEMU_PERM_NAMES[b] if b < len(QEMU_PERM_NAMES) else f"bit {b}" for b in bits)


class _Attributor:
    """Names, commands and start times for pids and owners."""

    def __init__(self, recs: Iterable[records.Record]) -> None:
        self.by_owner = {r.owner: r for r in recs}
        self.used: set[int] = set()

    def local(self, pid: int) -> tuple[str | None, str | None]:
        from imglock.lock import procfs

        # Secrets on a command line (QEMU's -object secret,data=...) are
        # shown as in a record: redacted, even to those who may read /proc.
        argv = procfs.argv(pid)
        return (records.redact(argv) if argv else None), _iso(procfs.start_time(pid))

    def imglock(self, byte: int, local_pids: list[int]) -> Holder:
        mode = mode_at(byte)
        assert mode is not None  # only bytes of the imglock layer come here
        owner_id = byte - REGION_BASE[mode]
        owner = Owner.from_id(owner_id)
        record = self.by_owner.get(owner_id)
        if record is not None:
            self.used.add(owner_id)
        pid: int | None = owner.pid
        host: str | None = record.host if record else None
        command = record.command if record else None
        since = record.since if record else None
        if owner.is_this_host:
            host = hostname()
            if local_pids and owner.pid not in local_pids:
                # The claimer is gone; a child that inherited the lock holds it.
                pid = min(local_pids)
            if pid is not None and (local_pids or record is None):
                local_command, started = self.local(pid)
                command = local_command or command
                since = since or started
        return Holder(
            layer="imglock",
            mode=mode.value,
            pid=pid,
            host=host or owner.tag_text,
            command=command,
            since=since,
            owner=owner_id,
            local_pids=tuple(sorted(local_pids)),
        )


def survey(
    fd: int,
    filename: str,
    st: os.stat_result,
    *,
    record_dir: str | None = None,
    record_name: str | None = None,
    local: LocalLocks | None = None,
) -> Survey:
    """Everyone holding locks on the file open as *fd* (a descriptor with no locks of its own)."""
    seen = fcntl_locks.all_conflicting(fd, 0, fcntl_locks.OFFSET_MAX, filename)
    local_locks = (local or LocalLocks()).on(st) if seen else []
    index = local.record_dirs if local is not None else None
    recs = records.read_all(record_dir, record_name, index) if record_dir and record_name else []
    names = _Attributor(recs)
    holders: list[Holder] = []

    # imglock layer: one holder per owner byte, from the tests and from /proc.
    owner_pids: dict[int, list[int]] = defaultdict(list)
    for lock in seen:
        if _kind(lock.start, lock.end) == "imglock":
            for byte in _bytes_of(lock.start, lock.end):
                owner_pids.setdefault(byte, [])
    for ll in local_locks:
        if _kind(ll.start, ll.end) == "imglock":
            for byte in _bytes_of(ll.start, ll.end):
                owner_pids[byte].append(ll.pid)
    # QEMU layer, locally: the bytes each process holds.
    qemu_by_pid: dict[int, set[int]] = defaultdict(set)
    for ll in local_locks:
        if _kind(ll.start, ll.end) == "qemu":
            qemu_by_pid[ll.pid].update(range(ll.start, ll.end))
    explained = set().union(*qemu_by_pid.values()) if qemu_by_pid else set()

    for byte, pids in sorted(owner_pids.items()):
        holder = names.imglock(byte, sorted(set(pids)))
        # QEMU bytes held by the same processes belong to the same claim
        # (imglock's QEMU layer, or the wrapped QEMU itself): one holder.
        qemu_bytes = set().union(*(qemu_by_pid.pop(pid, set()) for pid in holder.local_pids))
        if qemu_bytes:
            holder = holder._replace(
                perms=_perm_names(qemu_bytes, QEMU_PERM_BASE),
                unshared=_perm_names(qemu_bytes, QEMU_SHARED_BASE),
            )
        holders.append(holder)

    for pid, held in sorted(qemu_by_pid.items()):
        command, since = names.local(pid)
        holders.append(_qemu_holder(held, pid, hostname(), command, since))
    remote = {
        b
        for lock in seen
        if _kind(lock.start, lock.end) == "qemu"
        for b in range(lock.start, lock.end)
        if b not in explained
    }
    if remote:
        holders.append(_qemu_holder(remote, None, None, None, None))

    # Anything else is someone else's lock.
    holders += _foreign(seen, local_locks, names)
    return Survey(holders, stale_records=[r for r in recs if r.owner not in names.used])


def _qemu_holder(
    held: set[int], pid: int | None, host: str | None, command: str | None, since: str | None
) -> Holder:
    return Holder(
        layer="qemu",
        perms=_perm_names(held, QEMU_PERM_BASE),
        unshared=_perm_names(held, QEMU_SHARED_BASE),
        pid=pid,
        host=host,
        command=command,
        since=since,
        local_pids=(pid,) if pid is not None else (),
    )


def _foreign(
    seen: list[RangeLock], local_locks: list[procfs.LocalLock], names: _Attributor
) -> list[Holder]:
    out: list[Holder] = []
    done: set[tuple[int, int, int | None]] = set()
    for ll in local_locks:
        if _kind(ll.start, ll.end) != "foreign" or (ll.start, ll.end, ll.pid) in done:
            continue
        done.add((ll.start, ll.end, ll.pid))
        command, since = names.local(ll.pid)
        out.append(
            Holder(
                layer="foreign",
                mode="exclusive" if ll.write else "shared",
                pid=ll.pid,
                host=hostname(),
                command=command,
                since=since,
                local_pids=(ll.pid,),
                range=(ll.start, ll.end),
            )
        )
    local_ranges = {(ll.start, ll.end) for ll in local_locks}
    for lock in seen:
        if _kind(lock.start, lock.end) != "foreign" or (lock.start, lock.end) in local_ranges:
            continue
        out.append(
            Holder(
                layer="foreign",
                mode="exclusive" if lock.type == fcntl_locks.F_WRLCK else "shared",
                pid=lock.pid if lock.pid > 0 else None,
                range=(lock.start, lock.end),
            )
        )
    return out


def holders(path: str | os.PathLike[str], *, lockspace: str | None = None) -> list[Holder]:
    """Everyone holding *path*: imglock holders, QEMU, and foreign locks.

    Takes no lock and reads no more of the image than its header's format
    needs.  With *lockspace*, the image's lock file there is read instead.
    """
    from imglock.lock.lockspace import open_lock_target

    with open_lock_target(os.fspath(path), lockspace) as target:
        return survey(
            target.fd,
            target.filename,
            target.st,
            record_dir=target.record_dir,
            record_name=target.record_name,
        ).holders
