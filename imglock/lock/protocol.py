"""The imglock lock protocol: which bytes stand for a claim, and how conflicts are decided.

Two layers of byte-range read locks live on an image (see imglock(7)):

* the **imglock layer**, far past any data an image can hold: a holder
  read-locks one byte, ``IMGLOCK_EXCLUSIVE_BASE + owner_id`` for an
  exclusive claim or ``IMGLOCK_SHARED_BASE + owner_id`` for a shared one.
  The offset names the holder to anyone who tests the range, on any host.
* the **QEMU layer**, QEMU's own permission bytes (``file-posix``): a holder
  read-locks ``QEMU_PERM_BASE + perm`` for each permission it uses and
  ``QEMU_SHARED_BASE + perm`` for each it refuses to share, exactly as a
  QEMU writer (exclusive) or reader (shared) would, so that qemu-img and
  qemu-system refuse what imglock holds and the other way round.

Every claim first takes its own bytes, then tests the bytes that would
conflict with F_WRLCK, and rolls back if any other open file description
holds one.  Two racing claimers may therefore both fail; callers that wait
retry with jittered backoff (:mod:`imglock.api`).  Bytes 0 (libvirt's
virtlockd), 100-163 and 200-263 (QEMU) are never locked by the imglock layer.

The lifetime rule (imglock(7), LIFETIME).  An OFD lock belongs to the open
file description, and so to every process that inherited a descriptor of
it; an F_UNLCK by any one of them drops the lock for all.  A claim
therefore ends by *closing* its descriptors (always safe: the lock lives on
in whoever else still has the description, and vanishes with the last of
them).  :func:`release`, the explicit unlock, is used in three cases only,
each where no other live process relies on the bytes it drops:

1. rolling back the bytes a claim attempt has just taken, before the claim
   is held (:func:`acquire`, and a claim of several files);
2. changing a holder's own bytes on the same description, to a new owner
   (:func:`relabel`) or a new mode (:func:`change_mode`): the new bytes are
   taken before the old ones are dropped, so the image is never unclaimed
   in between;
3. the source of a live migration, once its QEMU has reported that it
   inactivated its images (``postmigrate``): that QEMU no longer writes.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterable
from typing import Final

from imglock import faults
from imglock.errors import LockConflict, LockError, LockLost
from imglock.lock import fcntl_locks
from imglock.lock.identity import OWNER_BITS, Owner

# The imglock layer: three adjacent regions of 2**56 bytes starting at 2**62,
# far beyond any image (and any QEMU or virtlockd byte), below OFFSET_MAX.
IMGLOCK_REGION_SIZE: Final = 1 << OWNER_BITS
IMGLOCK_EXCLUSIVE_BASE: Final = 1 << 62
IMGLOCK_SHARED_BASE: Final = IMGLOCK_EXCLUSIVE_BASE + IMGLOCK_REGION_SIZE
IMGLOCK_SHARED_WRITE_BASE: Final = IMGLOCK_SHARED_BASE + IMGLOCK_REGION_SIZE
IMGLOCK_END: Final = IMGLOCK_SHARED_WRITE_BASE + IMGLOCK_REGION_SIZE

# QEMU's layer (block/file-posix.c: RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE).
QEMU_PERM_BASE: Final = 100
QEMU_SHARED_BASE: Final = 200
#: QEMU reserves 64 bits for each set; only the first five have ever been used.
QEMU_PERM_SLOTS: Final = 64

#: BlockPermission bits in QEMU's order, with the names its messages use.
QEMU_PERM_NAMES: Final = (
    "consistent read",
    "write",
    "write unchanged",
    "resize",
    "change children",  # QEMU <= 6.1 only
)
PERM_CONSISTENT_READ: Final = 0
PERM_WRITE: Final = 1
PERM_RESIZE: Final = 3

#: What a running QEMU writer holds on its top image, and what it refuses to share.
QEMU_WRITER_PERMS: Final = (PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE)
QEMU_WRITER_UNSHARED: Final = (PERM_WRITE, PERM_RESIZE)
#: ... and on a backing file it only reads.
QEMU_READER_PERMS: Final = (PERM_CONSISTENT_READ,)
QEMU_READER_UNSHARED: Final = (PERM_WRITE, PERM_RESIZE)
#: What a QEMU 7.2 disk device with ``share-rw=on`` holds on a raw image
#: (measured: bytes 100 and 101 only): it reads and writes, and shares all.
#: (On a qcow2 the format layer refuses to share write and resize whatever
#: the device says, so QEMU holds a writer's bytes there.)
QEMU_SHARED_WRITER_PERMS: Final = (PERM_CONSISTENT_READ, PERM_WRITE)
QEMU_SHARED_WRITER_UNSHARED: Final = ()


class Mode(enum.StrEnum):
    """How an image is claimed."""

    #: One writer, and no one else: the top image of a running VM.
    EXCLUSIVE = "exclusive"
    #: Any number of readers, and no writer: a backing file, a CD-ROM.
    SHARED = "shared"
    #: Writers that share the disk on purpose (QEMU's ``share-rw=on``,
    #: libvirt's <shareable/>, a cluster filesystem inside the guests):
    #: compatible with one another, never with an exclusive holder or with
    #: shared readers, who need an image that does not change under them.
    SHARED_WRITE = "shared-write"


def conflicts(a: Mode, b: Mode) -> bool:
    """Whether claims in modes *a* and *b* exclude each other."""
    return a is Mode.EXCLUSIVE or b is Mode.EXCLUSIVE or a is not b


def strongest(a: Mode, b: Mode) -> Mode:
    """The one mode that covers both *a* and *b* (one file asked for twice)."""
    return a if a is b else Mode.EXCLUSIVE


class Layer(enum.Flag):
    """Which lock layers a claim takes."""

    IMGLOCK = enum.auto()
    QEMU = enum.auto()
    #: Test QEMU's bytes as a QEMU writer (or reader) would, without taking
    #: them: for wrapping QEMU itself, which takes its own bytes once it runs.
    QEMU_TEST = enum.auto()


Layers = Layer


# A plain class, not a dataclass or NamedTuple: those cost far more to define,
# and every command that takes or looks at a lock loads this module.
class Held:
    """What one descriptor holds for one claim: enough to release or verify it."""

    __slots__ = ("layers", "mode", "owner", "ranges")

    def __init__(
        self, mode: Mode, layers: Layer, owner: Owner, ranges: tuple[tuple[int, int], ...] = ()
    ) -> None:
        self.mode = mode
        self.layers = layers
        self.owner = owner
        #: (start, length) of every byte range taken.
        self.ranges = ranges


#: Where each mode's holders lock their byte.
REGION_BASE: Final = {
    Mode.EXCLUSIVE: IMGLOCK_EXCLUSIVE_BASE,
    Mode.SHARED: IMGLOCK_SHARED_BASE,
    Mode.SHARED_WRITE: IMGLOCK_SHARED_WRITE_BASE,
}


def imglock_byte(mode: Mode, owner: Owner) -> int:
    """The byte a holder locks in the imglock layer."""
    return REGION_BASE[mode] + owner.id


def mode_at(offset: int) -> Mode | None:
    """The mode whose region holds *offset*, if any."""
    for mode, base in REGION_BASE.items():
        if base <= offset < base + IMGLOCK_REGION_SIZE:
            return mode
    return None


def _imglock_rivals(mode: Mode) -> list[tuple[int, int]]:
    """The ranges whose other holders conflict with a claim in *mode*: one test each."""
    return _joined((REGION_BASE[m], IMGLOCK_REGION_SIZE) for m in Mode if conflicts(mode, m))


#: QEMU's (perms, unshared) for each mode: as a writer, a reader, a share-rw=on writer.
QEMU_PERMISSIONS: Final = {
    Mode.EXCLUSIVE: (QEMU_WRITER_PERMS, QEMU_WRITER_UNSHARED),
    Mode.SHARED: (QEMU_READER_PERMS, QEMU_READER_UNSHARED),
    Mode.SHARED_WRITE: (QEMU_SHARED_WRITER_PERMS, QEMU_SHARED_WRITER_UNSHARED),
}


def qemu_bytes(mode: Mode) -> tuple[list[int], list[int]]:
    """(bytes to take, bytes to test) for the QEMU layer of a claim in *mode*."""
    perms, unshared = QEMU_PERMISSIONS[mode]
    take = [QEMU_PERM_BASE + p for p in perms] + [QEMU_SHARED_BASE + p for p in unshared]
    # A permission we use conflicts with anyone refusing to share it, and a
    # permission we refuse to share conflicts with anyone using it.
    test = [QEMU_SHARED_BASE + p for p in perms] + [QEMU_PERM_BASE + p for p in unshared]
    return take, test


def _joined(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, length) ranges in order, adjacent ones joined: one fcntl call per run."""
    runs: list[tuple[int, int]] = []
    for start, length in sorted(ranges):
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + length)
        else:
            runs.append((start, length))
    return runs


def _runs(offsets: Iterable[int]) -> list[tuple[int, int]]:
    """Single bytes as (start, length) runs of adjacent ones."""
    return _joined((byte, 1) for byte in set(offsets))


def _bytes(ranges: Iterable[tuple[int, int]]) -> set[int]:
    return {b for start, length in ranges for b in range(start, start + length)}


def _ranges_for(
    mode: Mode, layers: Layer, owner: Owner
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(ranges to take, ranges to test), the holder's own imglock byte first."""
    take: list[tuple[int, int]] = []
    test: list[tuple[int, int]] = []
    if Layer.IMGLOCK in layers:
        take.append((imglock_byte(mode, owner), 1))
        test += _imglock_rivals(mode)
    if layers & (Layer.QEMU | Layer.QEMU_TEST):
        qemu_take, qemu_test = qemu_bytes(mode)
        take += _runs(qemu_take) if Layer.QEMU in layers else []
        test += _runs(qemu_test)
    return take, test


def _first_conflict(
    fd: int, filename: str, tests: Iterable[tuple[int, int]]
) -> fcntl_locks.RangeLock | None:
    for start, length in tests:
        lock = fcntl_locks.conflicting(fd, start, length, filename)
        if lock is not None:
            return lock
    return None


class ProtocolConflict(LockConflict):
    """A claim lost to another holder; :attr:`lock` is the lock that was in the way."""

    def __init__(self, filename: str, mode: Mode, lock: fcntl_locks.RangeLock) -> None:
        self.lock = lock
        super().__init__(filename, f"cannot claim {mode.value}: held by another process")


def acquire(
    fd: int,
    filename: str,
    mode: Mode,
    layers: Layer = Layer.IMGLOCK,
    owner: Owner | None = None,
) -> Held:
    """Claim the image open on *fd* in *mode*; on conflict hold nothing and raise.

    Raises :class:`ProtocolConflict` (a LockConflict) when another open file
    description holds a conflicting byte, LockError when the system refuses
    the lock itself (ENOLCK, EIO...).
    """
    owner = owner or Owner.current()
    take, tests = _ranges_for(mode, layers, owner)
    taken: list[tuple[int, int]] = []
    try:
        for start, length in take:
            if not fcntl_locks.try_read_lock(fd, start, length, filename):
                lock = fcntl_locks.conflicting(fd, start, length, filename)
                raise ProtocolConflict(
                    filename,
                    mode,
                    lock or fcntl_locks.RangeLock(fcntl_locks.F_WRLCK, start, length, -1),
                )
            taken.append((start, length))
            faults.point("acquire:own-byte" if len(taken) == 1 else "acquire:qemu-byte")
        faults.point("acquire:untested")
        lock = _first_conflict(fd, filename, tests)
        if lock is not None:
            raise ProtocolConflict(filename, mode, lock)
    except BaseException:
        _unlock_quietly(fd, filename, taken)
        raise
    return Held(mode, layers, owner, tuple(taken))


def _unlock_quietly(fd: int, filename: str, ranges: Iterable[tuple[int, int]]) -> None:
    # Rolling back after a failure must not hide the failure itself; an
    # unlock that fails leaves a lock that dies with the descriptor anyway.
    for start, length in ranges:
        with contextlib.suppress(Exception):
            fcntl_locks.unlock(fd, start, length, filename)


def release(fd: int, filename: str, held: Held) -> None:
    """Drop every range of *held* (for every process sharing *fd*'s description).

    Only for the cases of the lifetime rule above; ending a claim closes the
    descriptor instead.  Unlocking what is not held is harmless.
    """
    for start, length in held.ranges:
        fcntl_locks.unlock(fd, start, length, filename)


def relabel(fd: int, filename: str, held: Held, owner: Owner) -> Held:
    """Move *held*'s imglock byte to *owner* (the process now using the image).

    The new byte is taken first and the old one dropped after, on the same
    open file description, so the claim is held throughout; a crash in
    between leaves both bytes, which name the same claim.  Raises LockError
    if the new byte cannot be taken (then nothing changed).
    """
    if Layer.IMGLOCK not in held.layers or owner == held.owner:
        return held
    old = imglock_byte(held.mode, held.owner)
    new = imglock_byte(held.mode, owner)
    if not fcntl_locks.try_read_lock(fd, new, 1, filename):
        raise LockError(filename, "cannot take the new owner's byte: a conflicting lock covers it")
    faults.point("relabel:both")
    fcntl_locks.unlock(fd, old, 1, filename)
    ranges = tuple(
        (new, 1) if (start, length) == (old, 1) else (start, length)
        for start, length in held.ranges
    )
    return Held(held.mode, held.layers, owner, ranges)


def verify(fd: int, filename: str, held: Held) -> None:
    """Check that *held* is still ours and unchallenged; raise LockLost if not.

    Re-taking a held read lock is a no-op for the kernel but a round trip to
    the lock manager on NFS, where a lost lease shows up as EIO or ENOLCK.
    A rival that holds a conflicting byte means the lock was lost silently.
    """
    try:
        for start, length in held.ranges:
            if not fcntl_locks.try_read_lock(fd, start, length, filename):
                raise LockLost(filename, "lock lost: a conflicting lock now covers it")
        # Once running, a wrapped QEMU holds its own bytes: not a rival.
        _take, tests = _ranges_for(held.mode, held.layers & ~Layer.QEMU_TEST, held.owner)
        if _first_conflict(fd, filename, tests) is not None:
            raise LockLost(filename, "lock lost: another process now holds the image")
    except LockLost:
        raise
    except LockError as exc:
        raise LockLost(filename, f"lock lost: {exc.message}", exc.errno) from None


def change_mode(fd: int, filename: str, held: Held, new_mode: Mode) -> Held:
    """Turn the claim *held* on *fd* into one in *new_mode*, on the same descriptor.

    The image is never unclaimed in between: the new mode's bytes are taken
    and tested first, and only then are the bytes the new mode does not use
    dropped.  On a conflict the old claim stays exactly as it was and
    :class:`ProtocolConflict` is raised.  (A second descriptor cannot do
    this: two open file descriptions of one file conflict with each other.)
    """
    if new_mode is held.mode:
        return held
    take, tests = _ranges_for(new_mode, held.layers, held.owner)
    old = _bytes(held.ranges)
    wanted = _bytes(take)
    added: list[tuple[int, int]] = []
    try:
        for start, length in _runs(wanted - old):
            if not fcntl_locks.try_read_lock(fd, start, length, filename):
                lock = fcntl_locks.conflicting(fd, start, length, filename)
                raise ProtocolConflict(
                    filename,
                    new_mode,
                    lock or fcntl_locks.RangeLock(fcntl_locks.F_WRLCK, start, length, -1),
                )
            added.append((start, length))
        lock = _first_conflict(fd, filename, tests)
        if lock is not None:
            raise ProtocolConflict(filename, new_mode, lock)
    except BaseException:
        _unlock_quietly(fd, filename, added)
        raise
    for start, length in _runs(old - wanted):
        fcntl_locks.unlock(fd, start, length, filename)
    own = imglock_byte(new_mode, held.owner)
    ranges = sorted(_runs(wanted), key=lambda r: r[0] != own)  # own imglock byte first
    return Held(new_mode, held.layers, held.owner, tuple(ranges))
