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

import os
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal, NamedTuple

from imglock.lock import fcntl_locks, records
from imglock.lock.byte_map import (
    QEMU_PERM_BASE,
    QEMU_PERM_NAMES,
    QEMU_PERM_SLOTS,
    QEMU_SHARED_BASE,
    TICKET_BITS,
    Holding,
    Mode,
    Waiting,
    in_imglock_layer,
    qemu_bytes,
    read_holding,
    read_intent,
    read_waiting,
)
from imglock.lock.fcntl_locks import RangeLock
from imglock.lock.holder import Holder as Holder
from imglock.lock.identity import hostname
from imglock.lock.lockspace import open_lock_target
from imglock.lock.proclocks import FlockTable

# The /proc view of processes (procfs) is deliberately imported where it is
# first used, once some lock is seen: most images have none, and `status`
# of free images reads nothing of /proc but /proc/locks.
if TYPE_CHECKING:
    from imglock.lock import procfs


class LocalLocks:
    """The /proc view of local locks, taken once and reused for many images
    (with the record directories' listings, also read once)."""

    def __init__(self, flocks: FlockTable | None = None) -> None:
        self._index: dict[procfs.FileKey, list[procfs.LocalLock]] | None = None
        #: /proc/locks, read at most once (``status`` starts it in the background).
        self._flocks = flocks
        self.record_dirs = records.RecordDirs()

    def flocked(self, st: os.stat_result) -> bool:
        """Whether some local process holds a flock(2) lock on the file (from /proc/locks).

        Lock tests do not see flock locks, so this is what says that /proc
        is worth reading for a file whose fcntl locks are all free.
        """
        if self._flocks is None:
            self._flocks = FlockTable()
        return self._flocks.has(st)

    def on(self, st: os.stat_result) -> "list[procfs.LocalLock]":
        if self._index is None:
            from imglock.lock import procfs

            self._index = procfs.scan()
        return self._index.get((st.st_dev, st.st_ino), [])


class Survey(NamedTuple):
    """All that is known about one image's holders and waiters."""

    holders: list[Holder]
    #: Records whose lock is gone: shown, never obeyed.
    stale_records: list[records.Record]
    #: Claimers waiting in the image's queue, first first (never holders).
    waiting: list[Holder]


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _since_ticket(ticket: int, now: float) -> str | None:
    """When a waiter arrived, from its ticket (seconds modulo 2**TICKET_BITS, its clock)."""
    period = 1 << TICKET_BITS
    ago = (int(now) - ticket) % period
    if ago > period // 2:  # a ticket a little ahead of this clock (skew, a burst)
        ago = 0
    return _iso(now - ago)


def _kind(start: int, end: int) -> Literal["imglock", "qemu", "foreign"]:
    if in_imglock_layer(start, end) and (
        read_holding(start, end - start) is not None
        or (end - start == 1 and (read_waiting(start) or read_intent(start)) is not None)
    ):
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

    def imglock(self, holding: Holding, local_pids: list[int]) -> Holder:
        owner = holding.owner
        owner_id = owner.id
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
            mode=holding.mode.value,
            pid=pid,
            host=host or owner.tag_text,
            command=command,
            since=since,
            owner=owner_id,
            local_pids=tuple(sorted(local_pids)),
        )

    def waiter(self, waiting: Waiting, local_pids: list[int], now: float) -> Holder:
        command = None
        host = f"host#{waiting.host_bits:04x}"
        if local_pids:
            host = hostname()
            command, _started = self.local(min(local_pids))
        return Holder(
            layer="imglock",
            mode=waiting.mode.value,
            pid=waiting.pid,
            host=host,
            command=command,
            since=_since_ticket(waiting.ticket, now),
            local_pids=tuple(sorted(local_pids)),
            place=waiting.offset,
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
    local = local or LocalLocks()
    local_locks = local.on(st) if seen or local.flocked(st) else []
    index = local.record_dirs
    recs = records.read_all(record_dir, record_name, index) if record_dir and record_name else []
    names = _Attributor(recs)
    holders: list[Holder] = []

    # imglock layer: holder ranges and queue bytes, from the tests and from /proc.
    # (Intent bytes are a claimer deciding, neither holder nor waiter yet.)
    holding_pids: dict[tuple[int, int], list[int]] = {}
    waiting_pids: dict[int, list[int]] = {}
    for start, end, pid in [(lock.start, lock.end, None) for lock in seen] + [
        (ll.start, ll.end, ll.pid) for ll in local_locks
    ]:
        if _kind(start, end) != "imglock":
            continue
        if read_holding(start, end - start) is not None:
            pids = holding_pids.setdefault((start, end - start), [])
        elif read_waiting(start) is not None:
            pids = waiting_pids.setdefault(start, [])
        else:
            continue
        if pid is not None:
            pids.append(pid)
    # QEMU layer, locally: the bytes each process holds.
    qemu_by_pid: dict[int, set[int]] = defaultdict(set)
    for ll in local_locks:
        if _kind(ll.start, ll.end) == "qemu":
            qemu_by_pid[ll.pid].update(range(ll.start, ll.end))
    explained = set().union(*qemu_by_pid.values()) if qemu_by_pid else set()

    marked: list[int] = []  # holders that carry QEMU's bytes, by index
    for (start, length), pids in sorted(holding_pids.items()):
        holding = read_holding(start, length)
        assert holding is not None
        holder = names.imglock(holding, sorted(set(pids)))
        # QEMU bytes held by the same processes belong to the same claim
        # (imglock's QEMU layer, or the wrapped QEMU itself): one holder.
        qemu_bytes_held = set().union(*(qemu_by_pid.pop(p, set()) for p in holder.local_pids))
        if qemu_bytes_held:
            holder = holder._replace(
                perms=_perm_names(qemu_bytes_held, QEMU_PERM_BASE),
                unshared=_perm_names(qemu_bytes_held, QEMU_SHARED_BASE),
            )
        elif holding.with_qemu:
            marked.append(len(holders))
        holders.append(holder)
    now = time.time()
    waiting = [
        names.waiter(w, sorted(set(waiting_pids[w.offset])), now)
        for w in sorted(filter(None, map(read_waiting, waiting_pids)))
    ]

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
    # From another host, QEMU's bytes of a holder that marks them as its own
    # are its, not a second, anonymous QEMU's (see imglock(7) for where
    # this is ambiguous): only bytes no such holder would hold remain.
    for at in marked:
        holder = holders[at]
        own = set(qemu_bytes(Mode(holder.mode))[0]) if holder.mode else set()
        if own & remote:
            holders[at] = holder._replace(
                perms=_perm_names(own, QEMU_PERM_BASE), unshared=_perm_names(own, QEMU_SHARED_BASE)
            )
    remote -= {b for i in marked for b in qemu_bytes(Mode(holders[i].mode or "shared"))[0]}
    if remote:
        holders.append(_qemu_holder(remote, None, None, None, None))

    # flock(2) locks, seen only on their own host (in /proc): those of an
    # imglock holder's processes are its flock layer, the others holders.
    claimed_pids = {p for h in holders if h.layer == "imglock" for p in h.local_pids}
    flocks = [ll for ll in local_locks if ll.kind == "FLOCK"]
    holders += _flock_holders([ll for ll in flocks if ll.pid not in claimed_pids], names)

    # Anything else is someone else's lock.
    holders += _foreign(seen, [ll for ll in local_locks if ll.kind != "FLOCK"], names)
    return Survey(holders, [r for r in recs if r.owner not in names.used], waiting)


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


def _flock_holders(flocks: "list[procfs.LocalLock]", names: _Attributor) -> list[Holder]:
    """One holder per process holding a flock(2) lock (fdinfo lists it under each)."""
    seen: dict[int, bool] = {}
    for ll in flocks:
        seen[ll.pid] = seen.get(ll.pid, False) or ll.write
    out = []
    for pid, write in sorted(seen.items()):
        command, since = names.local(pid)
        out.append(
            Holder(
                layer="flock",
                mode="exclusive" if write else "shared",
                pid=pid,
                host=hostname(),
                command=command,
                since=since,
                local_pids=(pid,),
            )
        )
    return out


def _foreign(
    seen: list[RangeLock], local_locks: "list[procfs.LocalLock]", names: _Attributor
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
    """Everyone holding *path* (any file): imglock holders, QEMU, flock and foreign locks.

    Never a claimer that has not won: those waiting are listed by
    :func:`imglock.inspect` (``.waiting``), apart from the holders.

    Takes no lock and reads no more of the image than its header's format
    needs.  With *lockspace*, the image's lock file there is read instead.
    """
    with open_lock_target(os.fspath(path), lockspace) as target:
        return survey(
            target.fd,
            target.filename,
            target.st,
            record_dir=target.record_dir,
            record_name=target.record_name,
        ).holders
