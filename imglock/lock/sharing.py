"""Are the locks on a directory's filesystem shared between hosts?

imglock protects an image from other hosts only where the filesystem's lock
manager gives every host the same view of the locks (NLM or NFSv4 locks,
the CephFS MDS, the GFS2/OCFS2 DLM, GlusterFS's lock translator).  Two ways
to tell, both here:

* the **mount**: its type and options (``/proc/self/mountinfo``), which
  rule out local filesystems and lock-disabling options (NFS ``nolock``,
  ``local_lock=``; GFS2/OCFS2 ``localflocks``; CIFS ``nobrl``);
* a **probe** that two hosts run at once on the directory: each read-locks
  bytes of one probe file whose offsets spell its host name, and tests for
  the other's.  A host that sees the other's bytes names that host; one
  that also finds them in its own kernel's ``/proc/locks`` knows the other
  "host" is this very machine (two containers), which proves nothing about
  other hosts.
"""

import enum
import os
import stat
import time
from collections.abc import Callable, Iterable
from typing import Final, NamedTuple

from imglock.errors import ImageError, LockError
from imglock.lock import fcntl_locks
from imglock.lock.identity import hostname
from imglock.lock.mounts import LOCAL_FILESYSTEMS, MOUNTINFO, Mount, read_mounts

PROC_LOCKS: Final = "/proc/locks"

#: The probe file, created (empty, never written) in the directory probed.
PROBE_FILE: Final = ".imglock-probe"
#: Its mode when created (the umask may narrow it): every host's prober reads it.
PROBE_MODE: Final = 0o644
#: Probe locks live in one region of the probe file: one slot per prober.
PROBE_BASE: Final = 1 << 61
SLOT_BITS: Final = 32
SLOT_SIZE: Final = 1 << 16
PROBE_REGION: Final = SLOT_SIZE << SLOT_BITS
#: Within a slot: "I am here", "I have seen another", then the name's bytes,
#: byte i of the name at NAME_OFFSET + 256*i + value.
PRESENT_OFFSET: Final = 0
ACK_OFFSET: Final = 1
NAME_OFFSET: Final = 256
MAX_NAME_BYTES: Final = (SLOT_SIZE - NAME_OFFSET) // 256
#: How often a prober looks for others, and how long it stays once it has
#: seen one that has not yet seen it.
PROBE_INTERVAL: Final = 0.05
LINGER: Final = 5.0


class Verdict(enum.StrEnum):
    SHARED = "shared"
    LOCAL = "local"
    UNKNOWN = "unknown"


class Assessment(NamedTuple):
    mount: Mount
    verdict: Verdict
    reason: str


class Peer(NamedTuple):
    """Another prober seen through the probe file."""

    host: str
    slot: int
    #: Its probe lock is in this kernel's /proc/locks: it runs on this machine.
    same_kernel: bool
    #: It has seen another prober too (this one, usually).
    acknowledged: bool


class ProbeResult(NamedTuple):
    host: str
    peers: tuple[Peer, ...]

    @property
    def verdict(self) -> Verdict:
        """SHARED once a prober on another kernel was seen; UNKNOWN otherwise."""
        if any(not peer.same_kernel for peer in self.peers):
            return Verdict.SHARED
        return Verdict.UNKNOWN


# -- the mount -----------------------------------------------------------

#: Filesystems (as mountinfo names them) whose lock manager spans hosts.
SHARED_FILESYSTEMS: Final = {
    "nfs": "NFSv2/3 locks through the NLM lock manager (lockd and rpc.statd on every host)",
    "nfs4": "NFSv4 locks, part of the protocol, held by the server",
    "ceph": "CephFS locks, held by the MDS",
    "fuse.ceph-fuse": "CephFS locks, held by the MDS",
    "fuse.glusterfs": "GlusterFS locks, held by the bricks' lock translator",
    "gfs2": "GFS2 locks, through the cluster's DLM",
    "ocfs2": "OCFS2 locks, through the cluster's DLM",
    "cifs": "SMB byte-range locks, held by the server (mandatory there, not advisory)",
    "smb3": "SMB byte-range locks, held by the server (mandatory there, not advisory)",
}


def mount_of(path: str) -> Mount:
    """The mount that *path* (a directory) lives on."""
    try:
        st = os.stat(path)
        mounts = read_mounts()
    except OSError as exc:
        raise ImageError(path, f"cannot look at the mount: {os.strerror(exc.errno or 0)}") from None
    real = os.path.realpath(path)

    def contains(mount: Mount) -> bool:
        point = mount.mount_point.rstrip("/") + "/"
        return (real.rstrip("/") + "/").startswith(point)

    device = (os.major(st.st_dev), os.minor(st.st_dev))
    candidates = [m for m in mounts if contains(m)]
    on_device = [m for m in candidates if m.device == device] or candidates
    if not on_device:
        raise ImageError(path, "cannot find its mount in " + MOUNTINFO)
    # The innermost mount; among equals (mounted over), the last one wins.
    return max(reversed(on_device), key=lambda m: len(m.mount_point))


def assess(mount: Mount) -> Assessment:
    """Whether the locks on *mount* are shared between hosts, and why, from type and options."""
    fstype = mount.fstype

    def verdict(v: Verdict, reason: str) -> Assessment:
        return Assessment(mount, v, reason)

    if fstype in ("nfs", "nfs4"):
        if mount.option("nolock") is not None:
            return verdict(Verdict.LOCAL, "NFS mounted with nolock: locks stay on this host")
        local_lock = mount.option("local_lock")
        if local_lock in ("posix", "all"):
            return verdict(
                Verdict.LOCAL, f"NFS mounted with local_lock={local_lock}: locks stay on this host"
            )
    if fstype in ("gfs2", "ocfs2") and mount.option("localflocks") is not None:
        return verdict(Verdict.LOCAL, f"{fstype} mounted with localflocks: locks stay on this host")
    if fstype in ("cifs", "smb3") and mount.option("nobrl") is not None:
        return verdict(Verdict.LOCAL, f"{fstype} mounted with nobrl: locks stay on this host")
    if fstype in SHARED_FILESYSTEMS:
        return verdict(Verdict.SHARED, SHARED_FILESYSTEMS[fstype])
    if fstype in LOCAL_FILESYSTEMS or mount.source.startswith("/dev/"):
        return verdict(
            Verdict.LOCAL,
            f"{fstype} is a local filesystem: its locks are seen by this host only "
            "(a shared block device needs a lockspace on a filesystem that shares locks)",
        )
    if fstype.startswith("fuse"):
        return verdict(
            Verdict.UNKNOWN,
            f"{fstype} is a FUSE filesystem: locks are shared only if it forwards them "
            "to a lock manager (run the probe on two hosts)",
        )
    return verdict(Verdict.UNKNOWN, f"{fstype}: not known to imglock (run the probe on two hosts)")


# -- the probe -----------------------------------------------------------


def name_bytes(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")[:MAX_NAME_BYTES]


def slot_offsets(slot: int, name: str) -> list[int]:
    """The bytes a prober in *slot* locks: present, then its name spelled out."""
    base = PROBE_BASE + slot * SLOT_SIZE
    return [base + PRESENT_OFFSET] + [
        base + NAME_OFFSET + 256 * i + value for i, value in enumerate(name_bytes(name))
    ]


def decode_peers(locked: Iterable[int], proc_locks: frozenset[int]) -> list[Peer]:
    """Peers from the locked bytes of the probe region (others', as a lock test sees them)."""
    slots: dict[int, dict[int, int]] = {}
    for byte in locked:
        slot, offset = divmod(byte - PROBE_BASE, SLOT_SIZE)
        slots.setdefault(slot, {})[offset] = byte
    peers = []
    for slot, offsets in sorted(slots.items()):
        if PRESENT_OFFSET not in offsets:
            continue  # arriving or leaving: not all its bytes are there
        spelled = sorted(
            divmod(offset - NAME_OFFSET, 256) for offset in offsets if offset >= NAME_OFFSET
        )
        name = bytes(value for _i, value in spelled).decode("utf-8", "surrogateescape")
        same_kernel = offsets[PRESENT_OFFSET] in proc_locks
        peers.append(Peer(name, slot, same_kernel, ACK_OFFSET in offsets))
    return peers


def _locked_bytes(fd: int, filename: str) -> list[int]:
    """Every byte of the probe region that another open file description holds."""
    found: list[int] = []
    for lock in fcntl_locks.all_conflicting(fd, PROBE_BASE, PROBE_REGION, filename):
        if lock.length == 0 or lock.end - lock.start > SLOT_SIZE:
            continue  # a range lock over the region is nobody's probe
        found.extend(range(lock.start, lock.end))
    return found


def _kernel_lock_starts(st: os.stat_result) -> frozenset[int]:
    """Starts of the locks on the probe file that this kernel holds (/proc/locks)."""
    suffix = f":{st.st_ino}"
    starts = set()
    try:
        with open(PROC_LOCKS, encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                # "1: OFDLCK ADVISORY READ -1 fe:00:1234 START END" (a "->" marks waiters).
                if "->" in fields:
                    fields.remove("->")
                if len(fields) >= 8 and fields[5].endswith(suffix):
                    starts.add(int(fields[6]))
    except (OSError, ValueError):
        pass
    return frozenset(starts)


def open_probe_file(directory: str) -> tuple[int, str, os.stat_result]:
    """Open the probe file in *directory* read-only, creating it if missing.

    Never through a link (O_NOFOLLOW), never blocking on a FIFO
    (O_NONBLOCK), created new (O_EXCL) with PROBE_MODE at most, never
    written.  A file already there is used only if it is a regular file
    owned by this user, root or the directory's owner: those could replace
    it anyway, so a file planted by anyone else is refused, not used.
    """
    path = os.path.join(directory, PROBE_FILE)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, PROBE_MODE)
        except FileExistsError:
            fd = os.open(path, flags)
        st = os.fstat(fd)
        owners = {os.geteuid(), 0, os.stat(directory).st_uid}
    except OSError as exc:
        reason = os.strerror(exc.errno or 0)
        raise ImageError(path, f"cannot open the probe file: {reason}") from None
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "the probe file is not a regular file"
    elif st.st_uid not in owners:
        problem = (
            f"the probe file belongs to uid {st.st_uid}, not to this user, root or the "
            "directory's owner: remove it, or probe as its owner"
        )
    if problem is not None:
        os.close(fd)
        raise ImageError(path, problem)
    return fd, path, st


def probe(
    directory: str,
    wait: float,
    *,
    name: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> ProbeResult:
    """Hold a probe lock in *directory* and look for another host's, for up to *wait* s.

    Returns as soon as a prober was seen and has seen this one (or left),
    or after LINGER more seconds; with no prober seen, after *wait*.
    """
    me = name if name is not None else hostname()
    fd, path, st = open_probe_file(directory)
    try:
        # Any 32-bit slot will do that no other prober uses: a random one.
        slot = int.from_bytes(os.urandom(4), "big")
        for byte in slot_offsets(slot, me):
            if not fcntl_locks.try_read_lock(fd, byte, 1, path):
                raise LockError(path, "a write lock covers the probe region")
        ack = PROBE_BASE + slot * SLOT_SIZE + ACK_OFFSET
        deadline = time.monotonic() + wait
        seen: dict[int, Peer] = {}
        linger_until: float | None = None
        while True:
            others = decode_peers(_locked_bytes(fd, path), _kernel_lock_starts(st))
            for peer in others:
                # /proc/locks was read after the test: a peer whose lock is
                # still there now held it then, so its absence there means
                # another kernel.  One that left meanwhile proves nothing.
                present_byte = PROBE_BASE + peer.slot * SLOT_SIZE + PRESENT_OFFSET
                if fcntl_locks.conflicting(fd, present_byte, 1, path) is None:
                    continue
                before = seen.get(peer.slot)
                same_kernel = peer.same_kernel or (before is not None and before.same_kernel)
                seen[peer.slot] = peer._replace(same_kernel=same_kernel)
            if seen and linger_until is None:
                fcntl_locks.try_read_lock(fd, ack, 1, path)
                linger_until = time.monotonic() + LINGER
            present = {peer.slot: peer for peer in others}
            if linger_until is not None:
                # Done once every peer seen has seen us (or has gone).
                if all(s not in present or present[s].acknowledged for s in seen):
                    break
                if time.monotonic() >= linger_until:
                    break
            elif time.monotonic() >= deadline:
                break
            sleep(PROBE_INTERVAL)
        return ProbeResult(me, tuple(seen.values()))
    finally:
        os.close(fd)
