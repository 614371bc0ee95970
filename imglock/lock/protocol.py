"""The imglock lock protocol (version 2): which bytes stand for a claim, and how it is won.

Two layers of byte-range read locks live on an image (imglock(7) is the
specification; this module is its one implementation, its byte map
in :mod:`imglock.lock.byte_map`, which it exports as its own):

* the **imglock layer**, far past any data an image can hold, in three
  kinds of region: a *holder* region per mode, where a claimer that has won
  locks ``HOLDER_BASE[mode] + 2 * owner_id`` (two bytes when it also
  carries QEMU's bytes, one otherwise); an *intent* region per mode, where a
  claimer locks ``INTENT_BASE[mode] + owner_id`` while it decides; and one
  *queue*, where a waiter locks a byte whose offset packs its arrival
  ticket, its mode and who it is.
* the **QEMU layer**, QEMU's own permission bytes (``file-posix``), taken
  and tested exactly as a QEMU writer, reader or ``share-rw=on`` disk would.

A claim is won like this (every test is F_OFD_GETLK with F_WRLCK over the
ranges of conflicting modes, so it sees the others' read locks):

1. take the intent byte;
2. test the rivals: conflicting holders and intents, and (first attempt)
   every conflicting waiter, or (a waiter's attempt) after testing, without
   an intent, that no conflicting waiter is ahead of it in the queue and
   that no rival holds or claims the image;
3. test QEMU's bytes, take them, test them again (QEMU's own order);
4. take the holder bytes, then drop the intent.

Two claimers that both hold intents and test see each other and both back
off, so at most one of any conflicting pair gets to step 4 (each takes its
intent before it tests, and keeps it until its holder bytes are taken); and
holder bytes are only ever taken by a claimer that has won, so no one, on
any host, ever sees a holder that is not one.  A claimer that loses and may
wait takes a place in the queue; later arrivals see it and queue behind it,
which serves a waiting writer once those ahead of it have left.

A live migration's destination takes step 1 early (:func:`announce`,
when the incoming migration begins) and keeps its intent until its guest
runs (:func:`withdraw`); steps 2-4 follow once the source has let go,
during the migration or at the switch-over: the same steps, however far
apart, so the argument above holds, and the switch-over holds at most a
test and the holder bytes.  While only holders are in its way (the
source) it tests again with its intent kept; another claimer's intent
or a waiter in its way makes it drop the intent and carry on as any
claimer whose first attempt failed, so an early intent never serves it
before a waiter.  An intent is never a holder: nothing names it as one.

Bytes 0 (libvirt's virtlockd), 100-163 and 200-263 (QEMU) are never locked
by the imglock layer.

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
3. the source of a live migration, once its QEMU has reported that the
   migration completed (it inactivated its images before it said so):
   that QEMU no longer writes.

The check (imglock(7), LOCK CHECK AND LOSS).  A lock manager may forget a
holder's locks (a GlusterFS brick or an NFS server restarted) while its
descriptors go on working, and then taking a byte again succeeds whoever
took it meanwhile.  So a held claim is checked by looking only
(:func:`verify`): every byte it holds is tested from a *second* open file
description of the file, which holds nothing and so sees the claim's
locks as another's; a byte not seen held, or an error of the lock
manager, is a loss.  A rival's lock seen while the claim's own bytes are
intact is held outside the protocol (a claimer that follows it would
have seen the claim): it is reported, and is no loss.
"""

import contextlib
import enum
import time
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from imglock import faults
from imglock.errors import LockConflict, LockError, LockLost
from imglock.lock import fcntl_locks, flock
from imglock.lock.byte_map import (
    HOLDER_BASE,
    HOLDER_PLAIN,
    HOLDER_WITH_QEMU,
    IMGLOCK_END,
    IMGLOCK_START,
    INTENT_BASE,
    MODE_TABLE,
    PERM_CONSISTENT_READ,
    PERM_RESIZE,
    PERM_WRITE,
    QEMU_PERM_BASE,
    QEMU_PERM_NAMES,
    QEMU_PERM_SLOTS,
    QEMU_READER_PERMS,
    QEMU_READER_UNSHARED,
    QEMU_SHARED_BASE,
    QEMU_SHARED_WRITER_PERMS,
    QEMU_SHARED_WRITER_UNSHARED,
    QEMU_WRITER_PERMS,
    QEMU_WRITER_UNSHARED,
    QUEUE_BASE,
    QUEUE_SIZE,
    SLOT_SIZE,
    TICKET_BITS,
    TICKET_MAX,
    WAITER_HOST_BITS,
    Holding,
    Mode,
    ModeRow,
    Range,
    Waiting,
    conflicts,
    in_imglock_layer,
    intent_byte,
    mode_at,
    qemu_bytes,
    queue_byte,
    read_holding,
    read_intent,
    read_waiting,
    strongest,
)
from imglock.lock.fcntl_locks import RangeLock
from imglock.lock.identity import Owner

#: The protocol's whole public face: its operations, and the byte map they
#: work on (:mod:`imglock.lock.byte_map`), so that a claimer imports one module.
__all__ = [
    "HOLDER_BASE",
    "HOLDER_PLAIN",
    "HOLDER_WITH_QEMU",
    "IMGLOCK_END",
    "IMGLOCK_START",
    "INTENT_BASE",
    "MODE_TABLE",
    "PERM_CONSISTENT_READ",
    "PERM_RESIZE",
    "PERM_WRITE",
    "QEMU_PERM_BASE",
    "QEMU_PERM_NAMES",
    "QEMU_PERM_SLOTS",
    "QEMU_READER_PERMS",
    "QEMU_READER_UNSHARED",
    "QEMU_SHARED_BASE",
    "QEMU_SHARED_WRITER_PERMS",
    "QEMU_SHARED_WRITER_UNSHARED",
    "QEMU_WRITER_PERMS",
    "QEMU_WRITER_UNSHARED",
    "QUEUE_BASE",
    "QUEUE_SIZE",
    "SLOT_SIZE",
    "TICKET_BITS",
    "TICKET_MAX",
    "WAITER_HOST_BITS",
    "Held",
    "Holding",
    "Layer",
    "Layers",
    "Mode",
    "ModeRow",
    "Place",
    "ProtocolConflict",
    "Range",
    "Waiting",
    "acquire",
    "carries_qemu",
    "change_mode",
    "conflicts",
    "enqueue",
    "flock_layer",
    "flock_layer_for_file",
    "handed_to_qemu",
    "holder_range",
    "imglock_byte",
    "in_imglock_layer",
    "intent_byte",
    "leave",
    "missing",
    "mode_at",
    "qemu_bytes",
    "queue_byte",
    "read_holding",
    "read_intent",
    "read_waiting",
    "relabel",
    "release",
    "rival_ranges",
    "strongest",
    "ticket_now",
    "verify",
    "waiters",
]


class Layer(enum.Flag):
    """Which lock layers a claim takes."""

    IMGLOCK = enum.auto()
    QEMU = enum.auto()
    #: Test QEMU's bytes as a QEMU writer (or reader) would, without taking
    #: them: for wrapping QEMU itself, which takes its own bytes once it runs.
    QEMU_TEST = enum.auto()
    #: A whole-file flock(2) too, where the filesystem keeps flock apart from
    #: fcntl locks (see :mod:`imglock.lock.flock`) ...
    FLOCK = enum.auto()
    #: ... or on any filesystem (``--flock on``).
    FLOCK_EVERYWHERE = enum.auto()
    #: The claim's own QEMU runs and holds QEMU's bytes (nothing to take or
    #: test): the holder range still marks them as this holder's.
    QEMU_HELD = enum.auto()


Layers = Layer


def flock_layer(policy: str) -> Layer:
    """The flock layer for ``--flock`` *policy*: auto, on or off."""
    return {"auto": Layer.FLOCK, "on": Layer.FLOCK_EVERYWHERE, "off": Layer(0)}[policy]


def flock_layer_for_file(fd: int) -> Layer:
    """The ``auto`` flock layer decided for the file open on *fd*: taken there, or not.

    It depends only on the file's filesystem, which does not change while
    the file is open, so a claim decides it once per file (a stat and a
    mountinfo read) instead of in every attempt.
    """
    return Layer.FLOCK_EVERYWHERE if flock.applies(fd, everywhere=False) else Layer(0)


class Held(NamedTuple):
    """What one descriptor holds for one claim: enough to release or verify it."""

    mode: Mode
    layers: Layer
    owner: Owner
    #: (start, length) of every byte range taken, the holder range first.
    ranges: tuple[Range, ...] = ()
    #: Whether a flock(2) is held too.
    flock: bool = False


class Place(NamedTuple):
    """A waiter's place in an image's queue: the byte it holds there."""

    offset: int
    mode: Mode


# --- Where each thing lies ------------------------------------------------------------


def carries_qemu(layers: Layer) -> bool:
    """Whether a holder with *layers* marks that QEMU's bytes are its own."""
    return bool(layers & (Layer.QEMU | Layer.QEMU_TEST | Layer.QEMU_HELD))


def holder_range(mode: Mode, owner: Owner, layers: Layer = Layer.IMGLOCK) -> Range:
    """The bytes a holder locks in the imglock layer."""
    length = HOLDER_WITH_QEMU if carries_qemu(layers) else HOLDER_PLAIN
    return HOLDER_BASE[mode] + 2 * owner.id, length


def imglock_byte(mode: Mode, owner: Owner) -> int:
    """The first byte of a holder's range: what names it to any host."""
    return holder_range(mode, owner)[0]


def _joined(ranges: Iterable[Range]) -> list[Range]:
    """(start, length) ranges in order, adjacent ones joined: one fcntl call per run."""
    runs: list[Range] = []
    for start, length in sorted(ranges):
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + length)
        else:
            runs.append((start, length))
    return runs


def _runs(offsets: Iterable[int]) -> list[Range]:
    """Single bytes as (start, length) runs of adjacent ones."""
    return _joined((byte, 1) for byte in set(offsets))


def _bytes(ranges: Iterable[Range]) -> set[int]:
    return {b for start, length in ranges for b in range(start, start + length)}


def rival_ranges(mode: Mode, *, with_queue: bool) -> list[Range]:
    """The ranges whose others' locks may stand in the way of a claim in *mode*.

    Holders and intents of conflicting modes and, *with_queue*, the whole
    queue (where waiters of a compatible mode are then skipped): adjacent
    regions joined, so that an exclusive or a shared claim tests one range.
    """
    ranges = [(QUEUE_BASE, QUEUE_SIZE)] if with_queue else []
    for other in Mode:
        if conflicts(mode, other):
            ranges += [(HOLDER_BASE[other], SLOT_SIZE), (INTENT_BASE[other], SLOT_SIZE)]
    return _joined(ranges)


# --- Tests ------------------------------------------------------------------------------


class ProtocolConflict(LockConflict):
    """A claim lost; :attr:`lock` is the lock that was in the way.

    :attr:`queued` says that the lock was a waiter's place ahead of the
    claimer (the image may be free of holders), :attr:`claiming` that it
    was another claimer's intent; :attr:`flock` that it was someone's
    flock(2) on the whole file.
    """

    def __init__(self, filename: str, mode: Mode, lock: RangeLock, *, flock: bool = False) -> None:
        self.lock = lock
        self.flock = flock
        self.queued = read_waiting(lock.start) is not None
        #: Another claimer's intent (a claimer deciding) was in the way.
        self.claiming = lock.length == 1 and read_intent(lock.start) is not None
        #: Neither: a holder (or a lock outside the protocol) was in the way.
        self.held = not (self.queued or self.claiming)
        super().__init__(filename, f"cannot claim {mode.value}: held by another process")


def _in_the_way(fd: int, filename: str, mode: Mode, start: int, end: int) -> RangeLock | None:
    """The first lock in [start, end) that conflicts with *mode*.

    Queue bytes of waiters whose mode is compatible are stepped over; any
    other lock found is in the way.  Uncontended, this is one test.
    """
    while start < end:
        lock = fcntl_locks.conflicting(fd, start, end - start, filename)
        if lock is None:
            return None
        waiting = read_waiting(lock.start) if lock.length == 1 else None
        if waiting is None or conflicts(mode, waiting.mode):
            return lock
        start = lock.start + 1
    return None


def _first_rival(fd: int, filename: str, mode: Mode, ranges: Iterable[Range]) -> RangeLock | None:
    for start, length in ranges:
        lock = _in_the_way(fd, filename, mode, start, start + length)
        if lock is not None:
            return lock
    return None


def _qemu_conflict(fd: int, filename: str, tests: Sequence[int]) -> RangeLock | None:
    """QEMU's conflict test for *tests*: one test over their span, precise ones on a hit."""
    if not tests:
        return None
    lo, hi = min(tests), max(tests) + 1
    lock = fcntl_locks.conflicting(fd, lo, hi - lo, filename)
    if lock is None or (len(tests) == hi - lo):
        return lock
    # The span holds bytes no one needs to test (another reader's 100...): look closer.
    for start, length in _runs(tests):
        found = fcntl_locks.conflicting(fd, start, length, filename)
        if found is not None:
            return found
    return None


def _take(fd: int, filename: str, mode: Mode, start: int, length: int) -> None:
    """Read-lock [start, start+length); a write lock in the way is a conflict."""
    if not fcntl_locks.try_read_lock(fd, start, length, filename):
        lock = fcntl_locks.conflicting(fd, start, length, filename)
        raise ProtocolConflict(
            filename, mode, lock or RangeLock(fcntl_locks.F_WRLCK, start, length, -1)
        )


def _unlock_quietly(fd: int, filename: str, ranges: Iterable[Range]) -> None:
    # Rolling back after a failure must not hide the failure itself; an
    # unlock that fails leaves a lock that dies with the descriptor anyway.
    for start, length in ranges:
        with contextlib.suppress(Exception):
            fcntl_locks.unlock(fd, start, length, filename)


# --- Claiming ---------------------------------------------------------------------------


def acquire(
    fd: int,
    filename: str,
    mode: Mode,
    layers: Layer = Layer.IMGLOCK,
    owner: Owner | None = None,
    place: Place | None = None,
    *,
    keep: Iterable[int] = (),
    had_flock: Mode | None = None,
    announced: bool = False,
) -> Held:
    """Try once to claim the image open on *fd* in *mode*; on conflict hold nothing new and raise.

    Without *place*, every conflicting waiter in the queue is in the way;
    with the *place* of a waiter (see :func:`enqueue`), only those ahead of
    it.  *keep* lists bytes this descriptor already holds (a mode change):
    they are neither taken again nor dropped on failure; *had_flock* says
    the mode of the flock layer it holds, which is then converted.
    *announced* says that the intent byte is held already (:func:`announce`):
    it is neither taken nor dropped here, win or lose (:func:`withdraw`).

    Raises :class:`ProtocolConflict` (a LockConflict) when another open file
    description is in the way, LockError when the system refuses the lock
    itself (ENOLCK, EIO...).
    """
    owner = owner or Owner.current()
    kept = set(keep)
    taken: list[Range] = []
    intent: Range | None = None
    with_flock = flock_taken = False
    try:
        if place is not None:
            # A waiter defers to those ahead of it, and looks before it
            # leaps: while the image is held it tests without taking an
            # intent (which would make others' attempts fail meanwhile).
            lock = _in_the_way(fd, filename, mode, QUEUE_BASE, place.offset)
            lock = lock or _first_rival(fd, filename, mode, rival_ranges(mode, with_queue=False))
            if lock is not None:
                raise ProtocolConflict(filename, mode, lock)
        if Layer.IMGLOCK in layers:
            if not announced:
                intent = (intent_byte(mode, owner), 1)
                _take(fd, filename, mode, *intent)
            faults.point("acquire:own-byte")
            lock = _first_rival(fd, filename, mode, rival_ranges(mode, with_queue=place is None))
            if lock is not None:
                raise ProtocolConflict(filename, mode, lock)
        if layers & (Layer.QEMU | Layer.QEMU_TEST):
            qemu_take, qemu_test = qemu_bytes(mode)
            lock = _qemu_conflict(fd, filename, qemu_test)
            if lock is not None:
                raise ProtocolConflict(filename, mode, lock)
            if Layer.QEMU in layers:
                for run in _runs(set(qemu_take) - kept):
                    _take(fd, filename, mode, *run)
                    taken.append(run)
                    faults.point("acquire:qemu-byte")
                faults.point("acquire:untested")
                lock = _qemu_conflict(fd, filename, qemu_test)
                if lock is not None:
                    raise ProtocolConflict(filename, mode, lock)
        if layers & (Layer.FLOCK | Layer.FLOCK_EVERYWHERE):
            with_flock = _take_flock(fd, filename, mode, layers, had_flock)
            flock_taken = with_flock and had_flock is None
        if Layer.IMGLOCK in layers:
            _take(fd, filename, mode, *holder_range(mode, owner, layers))
    except BaseException:
        _unlock_quietly(fd, filename, [*taken, *([intent] if intent else [])])
        if flock_taken:
            _release_flock(fd)
        raise
    if intent is not None:
        fcntl_locks.unlock(fd, intent[0], intent[1], filename)
    return _held(mode, layers, owner, with_flock)


def announce(fd: int, filename: str, mode: Mode, owner: Owner) -> None:
    """Take the intent byte ahead of an attempt: step 1 of a claim, done early.

    For a migration destination, from the start of the incoming migration
    until the guest runs (imglock(7), MIGRATION): its attempt at the
    switch-over is then the test and the holder byte alone
    (``acquire(..., announced=True)``), and it stands out to every other
    claimer meanwhile, as any claimer deciding does.  Raises
    ProtocolConflict if a write lock covers the byte.
    """
    _take(fd, filename, mode, intent_byte(mode, owner), 1)


def first_rival(fd: int, filename: str, mode: Mode) -> RangeLock | None:
    """A look, taking nothing: the first lock in the way of a first attempt in *mode*.

    The test of step 2 (holders, intents and waiters), made on its own: an
    announced claimer sees whether anyone is there to let go before it tries.
    """
    return _first_rival(fd, filename, mode, rival_ranges(mode, with_queue=True))


def withdraw(fd: int, filename: str, mode: Mode, owner: Owner) -> None:
    """Drop the intent byte that :func:`announce` took (unlocking it when not held is harmless)."""
    fcntl_locks.unlock(fd, intent_byte(mode, owner), 1, filename)


def _take_flock(fd: int, filename: str, mode: Mode, layers: Layer, had: Mode | None = None) -> bool:
    """Take the flock layer (or convert the one held in mode *had*); False if it does not apply."""
    if had is None and not flock.applies(fd, bool(layers & Layer.FLOCK_EVERYWHERE)):
        return False
    if flock.take(fd, filename, exclusive=mode.alone):
        return True
    # flock(2) cannot convert a lock atomically: a refused conversion has
    # dropped the old one, so take it back as it was (see imglock(7)).
    if had is not None:
        with contextlib.suppress(Exception):
            flock.take(fd, filename, exclusive=had.alone)
    raise ProtocolConflict(filename, mode, RangeLock(fcntl_locks.F_WRLCK, 0, 0, -1), flock=True)


def _release_flock(fd: int) -> None:
    with contextlib.suppress(Exception):
        flock.release(fd)


def _held(mode: Mode, layers: Layer, owner: Owner, with_flock: bool = False) -> Held:
    """What a holder in *mode* with *layers* holds: its holder range first."""
    ranges = [holder_range(mode, owner, layers)] if Layer.IMGLOCK in layers else []
    if Layer.QEMU in layers:
        ranges += _runs(qemu_bytes(mode)[0])
    return Held(mode, layers, owner, tuple(ranges), with_flock)


def ticket_now() -> int:
    """This host's clock as a queue ticket: seconds, modulo 2**TICKET_BITS."""
    return int(time.time()) & TICKET_MAX


def waiters(fd: int, filename: str) -> list[Waiting]:
    """Everyone in the image's queue, first first (seen through *fd*, which is not among them)."""
    found = fcntl_locks.all_conflicting(fd, QUEUE_BASE, QUEUE_SIZE, filename)
    out = []
    for lock in found:
        for offset in range(lock.start, min(lock.end, lock.start + 64)):
            waiting = read_waiting(offset)
            if waiting is not None:
                out.append(waiting)
    return out


def enqueue(fd: int, filename: str, mode: Mode, owner: Owner | None = None) -> Place:
    """Take a place at the end of the image's queue.

    The ticket is this host's clock in seconds, but never earlier than one
    already in the queue: a claimer that arrives after a waiter is visible
    queues behind it whatever the hosts' clocks say.
    """
    owner = owner or Owner.current()
    ahead = waiters(fd, filename)
    ticket = ticket_now()
    if ahead:
        ticket = max(ticket, min(TICKET_MAX, max(w.ticket for w in ahead) + 1))
    offset = queue_byte(ticket, mode, owner)
    _take(fd, filename, mode, offset, 1)
    return Place(offset, mode)


def leave(fd: int, filename: str, place: Place) -> None:
    """Give up a place in the queue (having won, or stopped waiting)."""
    fcntl_locks.unlock(fd, place.offset, 1, filename)


def release(fd: int, filename: str, held: Held) -> None:
    """Drop every range of *held*, and its flock (for every process sharing *fd*'s description).

    Only for the cases of the lifetime rule above; ending a claim closes the
    descriptor instead.  Unlocking what is not held is harmless.
    """
    for start, length in held.ranges:
        fcntl_locks.unlock(fd, start, length, filename)
    if held.flock:
        flock.release(fd)


def relabel(fd: int, filename: str, held: Held, owner: Owner) -> Held:
    """Move *held*'s holder range to *owner* (the process now using the image).

    The new range is taken first and the old one dropped after, on the same
    open file description, so the claim is held throughout; a crash in
    between leaves both, which name the same claim.  Raises LockError if the
    new range cannot be taken (then nothing changed).
    """
    if Layer.IMGLOCK not in held.layers or owner == held.owner:
        return held
    old = holder_range(held.mode, held.owner, held.layers)
    new = holder_range(held.mode, owner, held.layers)
    if not fcntl_locks.try_read_lock(fd, *new, filename):
        raise LockError(filename, "cannot take the new owner's byte: a conflicting lock covers it")
    faults.point("relabel:both")
    fcntl_locks.unlock(fd, *old, filename)
    ranges = tuple(new if r == old else r for r in held.ranges)
    return held._replace(owner=owner, ranges=ranges)


def handed_to_qemu(held: Held) -> Held:
    """*held* once the claim's own QEMU runs: QEMU's bytes, tested (Layer.QEMU_TEST)
    before it started, are held by that QEMU now (Layer.QEMU_HELD).

    The ranges stay the same: both mark QEMU's bytes as the holder's.
    """
    if Layer.QEMU_TEST not in held.layers:
        return held
    return held._replace(layers=held.layers & ~Layer.QEMU_TEST | Layer.QEMU_HELD)


def change_mode(fd: int, filename: str, held: Held, new_mode: Mode) -> Held:
    """Turn the claim *held* on *fd* into one in *new_mode*, on the same descriptor.

    The image is never unclaimed in between: the new mode's bytes are won
    (a stronger or other mode, through an intent and the usual tests, the
    queue included) or simply taken (a weaker mode: an exclusive holder
    has no rival to test) before the old mode's bytes are dropped.  On a
    conflict the old claim stays exactly as it was and
    :class:`ProtocolConflict` is raised.  (A second descriptor cannot do
    this: two open file descriptions of one file conflict with each other.)
    """
    if new_mode is held.mode:
        return held
    old = _bytes(held.ranges)
    if held.mode.alone:  # no one else holds the image: nothing to test
        new = _downgraded(fd, filename, held, new_mode, old)
    else:
        new = acquire(
            fd,
            filename,
            new_mode,
            held.layers,
            held.owner,
            keep=old,
            had_flock=held.mode if held.flock else None,
        )
    for start, length in _runs(old - _bytes(new.ranges)):
        fcntl_locks.unlock(fd, start, length, filename)
    return new


def _downgraded(fd: int, filename: str, held: Held, new_mode: Mode, old: set[int]) -> Held:
    new = _held(new_mode, held.layers, held.owner, held.flock)
    taken: list[Range] = []
    try:
        for run in _runs(_bytes(new.ranges) - old):
            _take(fd, filename, new_mode, *run)
            taken.append(run)
        if held.flock:  # exclusive to shared: no one else holds a flock to take it meanwhile
            _take_flock(fd, filename, new_mode, held.layers, had=held.mode)
    except BaseException:
        _unlock_quietly(fd, filename, taken)
        raise
    return new


def missing(observer: int, filename: str, ranges: Iterable[Range]) -> list[Range]:
    """The bytes of *ranges* that no open file description holds, as *observer* sees them.

    *observer* is a second open file description of the file, which holds
    nothing itself: a lock test from it sees the claim's own locks as
    another's.  Looking never takes a byte, so a lock that the server has
    forgotten (a GlusterFS brick restart, an NFS server reboot) shows up
    as missing instead of being quietly taken again.  One test per range
    when it is held; more only where a range is partly gone.
    """
    gone: list[Range] = []
    pending = [r for r in ranges if r[1] > 0]
    while pending:
        start, length = pending.pop()
        end = start + length
        lock = fcntl_locks.conflicting(observer, start, length, filename)
        if lock is None:
            gone.append((start, length))
            continue
        covered_from, covered_to = max(start, lock.start), min(end, lock.end)
        pending += [
            r for r in ((start, covered_from - start), (covered_to, end - covered_to)) if r[1] > 0
        ]
    return sorted(gone)


def verify(fd: int, filename: str, held: Held, observer: int) -> list[RangeLock]:
    """Check that every byte of *held* is still held; raise LockLost if not.

    The claim's bytes are looked at from *observer*, a second open file
    description of the same file (see :func:`missing`): a check never
    takes a byte it should already hold.  An error of the lock manager
    (EIO or ENOLCK after an NFS lease was lost, ENOTCONN from a client
    cut off from its server, EBADFD from a GlusterFS client that refused
    to reopen a locked file with ``client.strict-locks``) is a loss too.

    Returns the locks of rivals found in the way while the claim's own
    bytes are intact: those are held outside the protocol (a conforming
    claimer would have seen this claim and backed off), by anyone who can
    open the file; they are for the caller to report, and are no loss.
    The flock layer is not checked: flock(2) cannot be tested without
    taking it.
    """
    try:
        gone = missing(observer, filename, held.ranges)
        if gone:
            where = _describe_missing(gone)
            raise LockLost(
                filename,
                f"lock lost: {where} no longer held (seen from a second open file description)",
            )
        tests: list[Range] = []
        if Layer.IMGLOCK in held.layers:
            tests += [(HOLDER_BASE[m], SLOT_SIZE) for m in Mode if conflicts(held.mode, m)]
        # Once running, a wrapped QEMU holds its own bytes: not a rival.
        if Layer.QEMU in held.layers:
            tests += _runs(qemu_bytes(held.mode)[1])
        found = []
        for start, length in _joined(tests):
            lock = fcntl_locks.conflicting(fd, start, length, filename)
            if lock is not None:
                found.append(lock)
        return found
    except LockLost:
        raise
    except LockError as exc:
        raise LockLost(filename, f"lock lost: {exc.message}", exc.errno) from None


def _describe_missing(gone: Sequence[Range]) -> str:
    """The claim's missing bytes, in the words of imglock(7)'s map."""
    qemu = [f"{a}" if n == 1 else f"{a}-{a + n - 1}" for a, n in gone if a < IMGLOCK_START]
    own = [a for a, _n in gone if a >= IMGLOCK_START]
    parts = [f"QEMU's lock bytes {', '.join(qemu)}"] if qemu else []
    parts += [f"the imglock holder byte at {own[0]:#x}"] if own else []
    return " and ".join(parts)
