"""The :class:`Claim`: a claim on images and all they depend on, put together from its parts.

A claim of several images is all or nothing, like QEMU's old
``bdrv_claim_all``: on any failure everything already taken is released.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Final, NoReturn, Self, SupportsIndex

from imglock import faults
from imglock.claims import graph_edits, holder_records, migration, waiting
from imglock.claims.conflicts import Contended, intruder, named_conflict
from imglock.claims.member import Member
from imglock.claims.opening import conflict_at_top, open_members
from imglock.claims.spec import ClaimSpec, as_seconds
from imglock.claims.waiting import BACKOFF_CAP, Backoff, Queued
from imglock.errors import ImageError, LockConflict, LockLost
from imglock.lock.identity import Owner
from imglock.lock.protocol import Layer, Mode, ProtocolConflict
from imglock.lockcheck import DEFAULT_DEADLINE, LockWatch

#: Why copy.copy, copy.deepcopy and pickle refuse a Claim.
_NOT_COPYABLE: Final = (
    "a Claim cannot be copied or pickled: its locks belong to descriptors that "
    "only the Claim that opened them may close"
)


class Claim:
    """A claim on one or more images and everything they depend on.

    Created unclaimed; :meth:`acquire` takes it (all or nothing), and
    :meth:`release` gives it back and closes every descriptor.  As a context
    manager it acquires on entry if needed and releases on exit.

    The locks belong to the open descriptors (OFD locks), not to this
    object: a process forked while the claim is held shares them, and the
    image stays claimed until the last process holding the descriptors
    closes them or exits.  The claim is owned by the process that opened it
    (:attr:`process`).  :meth:`release` (or leaving a ``with`` block) in any
    other process, such as a forked child, only closes that process's own
    copies of the descriptors: the owner's claim is untouched.  In the owner,
    release closes the descriptors rather than unlocking them, so a child
    that still holds them keeps the image claimed (``imglock status`` names
    it) until it exits.
    """

    def __init__(
        self,
        specs: Sequence[ClaimSpec],
        wait: float = 0.0,
        layers: Layer = Layer.IMGLOCK | Layer.QEMU,
        lockspace: str | None = None,
        record: bool = True,
        owner_pid: int | None = None,
        command: list[str] | None = None,
        backoff_cap: float = BACKOFF_CAP,
    ) -> None:
        self.specs = specs
        self.wait = as_seconds("wait", wait)
        self.layers = layers
        self.lockspace = lockspace
        self.record = record
        #: The pid the lock offset names; default: this process.
        self.owner_pid = owner_pid
        #: The command line written to holder records; default: this process's.
        self.command = command
        #: The longest pause between attempts while waiting (a migration handoff
        #: polls faster: every millisecond of it is guest downtime).
        self.backoff_cap = backoff_cap
        self.members: list[Member] = []
        #: The process that opened the descriptors: the only one whose
        #: release may end the claim (see the class docstring).
        self.process = os.getpid()
        #: True while the locks are held.
        self.held = False

    def __repr__(self) -> str:
        return (
            f"Claim(specs={self.specs!r}, wait={self.wait!r}, layers={self.layers!r}, "
            f"lockspace={self.lockspace!r}, held={self.held!r})"
        )

    @property
    def fds(self) -> list[int]:
        """Every descriptor that carries a lock of this claim (for a child to inherit)."""
        return [m.image.lock_target[0] for m in self.members]

    @property
    def descriptors(self) -> set[int]:
        """Every descriptor the claim has open: images, lock files, and the lock check's."""
        return {fd for m in self.members for fd in m.image.descriptors()}

    @property
    def images(self) -> list[tuple[str, Mode]]:
        """(filename, mode) of every file claimed, top images first."""
        return [(m.image.filename, m.mode) for m in self.members]

    @property
    def owned_here(self) -> bool:
        """Whether this process is the one that opened the claim (not a forked copy)."""
        return self.process == os.getpid()

    def file_keys(self) -> set[tuple[int, int]]:
        """(st_dev, st_ino) of every open file of the claim: images and lock files."""
        keys = set()
        for member in self.members:
            keys.add(member.image.key())
            lock_file = member.image.lock_file_key()
            if lock_file is not None:
                keys.add(lock_file)
        return keys

    def _owner(self) -> Owner:
        return Owner.current(self.owner_pid)

    # -- opening and taking -------------------------------------------------

    def open(self) -> Self:
        """Open every image (and its chain) without claiming anything yet.

        ``imglock run`` opens first, so that the command it starts inherits
        the descriptors the claim is then taken on.
        """
        if not self.members:
            try:
                self.members = open_members(self.specs, self.lockspace)
            except ImageError as exc:
                # A chain that cannot be followed here (a backing file of
                # another host's path) of an image someone holds: who holds
                # it is the answer, as it would be with the chain in place.
                conflict = conflict_at_top(self.specs, self.lockspace)
                if conflict is None:
                    raise
                raise conflict from exc
            self.process = os.getpid()
        return self

    def prepare(self) -> Self:
        """Open the images and settle now all that :meth:`acquire` needs besides locks.

        A migration destination prepares before the switch-over, so that the
        guest's downtime holds only the lock calls themselves (see
        :func:`imglock.claims.migration.prepare`).
        """
        self.open()
        migration.prepare(self.members, self.layers, self.owner_pid)
        return self

    def announce(self) -> bool:
        """Take every file's intent byte now, ahead of :meth:`arrive`; False if they are not held.

        A migration destination announces once its incoming migration has
        begun (imglock(7), MIGRATION): other claimers meanwhile see a
        claimer deciding and back off, as from any claimer's intent.  The
        intents are held until :meth:`withdraw` (or release).
        """
        if self.held or not self.members:
            return False
        return migration.announce(self.members, self._owner())

    def withdraw(self) -> None:
        """Drop the intent bytes :meth:`announce` took (a claim won keeps its holder bytes)."""
        migration.withdraw(self.members)

    def arrive(self) -> Self:
        """Claim every image as an announced migration destination; as :meth:`acquire` otherwise.

        With its intents held already, each attempt is the test and the
        holder bytes.  While only holders are in the way (the source has
        not let go yet), it tries again with its intents kept, up to
        :attr:`wait` seconds; another claimer's intent or a waiter in the
        way has it withdraw and claim as anyone does (:meth:`acquire`:
        queueing behind the waiters), in the time left.  The intents stay
        held after a win: :meth:`withdraw` them once the guest runs.
        """
        if self.held or not self.announced:
            return self.acquire()
        deadline = time.monotonic() + max(self.wait, 0.0)
        backoff = Backoff(self.backoff_cap)
        while True:
            lost = self.try_arrival()
            if lost is None:
                return self
            remaining = deadline - time.monotonic()
            if not lost.conflict.held or remaining <= 0:
                self.withdraw()
                return self._acquire(deadline, lost=lost)
            backoff.pause(remaining)

    @property
    def announced(self) -> bool:
        """Whether intents announced ahead of an arrival are held (:meth:`announce`)."""
        return any(m.image.intent is not None for m in self.members)

    def try_arrival(self) -> Contended | None:
        """One attempt of an announced arrival: None once held, else what was in the way.

        Nothing new is held after a loss, and the intents are kept either way.
        """
        try:
            self._claim_all()
        except Contended as exc:
            return exc
        return None

    def first_rival(self) -> ProtocolConflict | None:
        """A look at what stands in the way of a first attempt, file by file; nothing taken."""
        for member in self.members:
            lock = member.image.rival(member.mode)
            if lock is not None:
                return ProtocolConflict(member.image.filename, member.mode, lock)
        return None

    def acquire(self) -> Self:
        """Claim every image, waiting up to :attr:`wait` seconds; raise LockConflict if not.

        A claimer that waits takes a place in the queue of the image that
        holds it up (one image at a time, so that waiters on several images
        never wait for each other in a circle), and from then on defers only
        to those ahead of it there; claimers that arrive later queue behind.
        """
        if self.held:
            return self
        return self._acquire(time.monotonic() + max(self.wait, 0.0))

    def _acquire(self, deadline: float, lost: Contended | None = None) -> Self:
        """:meth:`acquire` until *deadline*; *lost*: its first attempt, made and lost already."""
        opened_here = not self.members
        self.open()
        backoff = Backoff(self.backoff_cap)
        queued: Queued | None = None
        try:
            while True:
                exc: LockConflict | Contended | None = lost
                lost = None
                if exc is None:
                    try:
                        self._claim_all(queued)
                        waiting.leave(queued)
                        return self
                    except (LockConflict, Contended) as caught:
                        exc = caught
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    waiting.leave(queued)
                    if isinstance(exc, Contended):
                        place = queued.place_of(exc.member) if queued else None
                        raise named_conflict(exc.member, exc.conflict, place) from None
                    raise exc
                if isinstance(exc, Contended) and (
                    queued is None or queued.member is not exc.member
                ):
                    waiting.leave(queued)
                    queued = None  # (enqueue may fail: hold no place meanwhile)
                    queued = waiting.enqueue(exc.member, self._owner())
                backoff.pause(remaining)
        except BaseException:
            waiting.leave(queued)
            if opened_here:
                self.close()
            raise

    def _claim_all(self, queued: Queued | None = None) -> None:
        owner = self._owner()
        taken: list[Member] = []
        # A waiter tries the file it waits for first: the others are taken
        # only once it has that one, not again and again while it waits.
        members = self.members
        if queued is not None:
            members = [queued.member, *(m for m in members if m is not queued.member)]
        try:
            for member in members:
                place = queued.place_of(member) if queued else None
                try:
                    member.image.take(member.mode, self.layers, owner, place)
                except ProtocolConflict as exc:
                    raise Contended(member, exc) from None
                taken.append(member)
                faults.point("claim:member")
        except BaseException:
            for member in taken:
                member.image.drop()
            raise
        faults.point("claim:taken")
        self.held = True
        if self.record:
            self._write_records(owner)
            faults.point("claim:recorded")

    # -- holder records -----------------------------------------------------

    def _write_records(self, owner: Owner) -> None:
        for member in self.members:
            self._write_record(member, owner)

    def _write_record(self, member: Member, owner: Owner) -> None:
        holder_records.write(member, owner, self.command, lockspace=self.lockspace is not None)

    def remove_records(self) -> None:
        """Remove the holder records of a claim that is no longer held here.

        After ``release(close=False)``: a migration source removes them once
        the destination has had time to take over, so that their removal is
        not file system traffic at the destination's critical moment.
        Does nothing while the claim is held.
        """
        if not self.held and self.owned_here:
            for member in self.members:
                holder_records.remove(member)

    def write_records(self) -> None:
        """Write the holder records of a claim taken without them (``record=False``).

        A migration destination claims without records, so that only the
        locks are between the switch-over and the guest running again, and
        writes them once the guest runs.  Does nothing unless held here.
        """
        if self.held and self.owned_here:
            self._write_records(self._owner())

    # -- following a VM's block graph (imglock.run.graph) ------------------

    def add_file(self, path: str, mode: Mode, role: str = "top") -> Member:
        """Open one more file and claim it in *mode*, alone (no chain is followed).

        For a file a running VM opened: its block graph lists every file of
        a chain itself.  The descriptor stays with this process.  Raises
        LockConflict naming the holder (nothing is held then), ImageError
        if the file cannot be opened.
        """
        owner = self._owner()
        member = graph_edits.add_file(
            path, mode, role, lockspace=self.lockspace, layers=self.layers, owner=owner
        )
        self.members.append(member)
        if self.record:
            self._write_record(member, owner)
        return member

    def drop_file(self, member: Member) -> None:
        """Unclaim one file that the VM has closed, and close our descriptor.

        An explicit unlock (see :func:`imglock.claims.graph_edits.drop_file`).
        """
        self.members.remove(member)
        try:
            graph_edits.drop_file(member)
        finally:
            holder_records.remove(member)

    def change_file_mode(self, member: Member, mode: Mode) -> None:
        """Turn one file's claim into one in *mode* on the same descriptor.

        Never unclaimed in between (see protocol.change_mode).  Raises
        LockConflict naming the holder; the old mode is kept then.
        """
        changed = graph_edits.change_file_mode(member, mode)
        held = member.image.held
        if changed and held is not None and self.record and member.recorded_as is not None:
            self._write_record(member, held.owner)

    def qemu_holds_its_bytes(self) -> None:
        """The wrapped QEMU runs now, and holds QEMU's bytes on descriptors of its own.

        They were tested before it started (Layer.QEMU_TEST); from now on
        they are QEMU's (Layer.QEMU_HELD), so later claims and mode changes
        (a migration handoff, a block job that makes QEMU write a backing
        file) judge the imglock layer only, and never meet QEMU as a rival.
        """
        if Layer.QEMU_TEST not in self.layers:
            return
        self.layers = self.layers & ~Layer.QEMU_TEST | Layer.QEMU_HELD
        for member in self.members:
            member.image.qemu_holds_its_bytes()

    # -- checking -----------------------------------------------------------

    def verify(self) -> list[str]:
        """Check that every lock of this claim is still held; raise LockLost if not.

        Each file's bytes are looked at from a second open file description
        (see protocol.verify): a check never takes a byte, so a lock the
        server forgot is reported, never quietly taken again.  A path that
        no longer leads to the file claimed (the image, or its lock file,
        replaced or removed) is reported as a loss too: a claimer arriving
        now would lock the new file.

        After a loss the claim stays as it is (release() it; a new claim
        goes through the whole protocol again).  Returns one line for each
        lock found in the way that is held outside imglock's protocol
        while the claim's own are intact: not a loss, but worth a word.
        """
        notices = []
        for member in list(self.members) if self.held else ():
            for lock in member.image.verify():
                notices.append(intruder(member, lock))
        return notices

    def watch(
        self,
        on_loss: Callable[[LockLost], None],
        *,
        interval: float = 5.0,
        deadline: float | None = DEFAULT_DEADLINE,
        on_stall: Callable[[float], None] | None = None,
        on_intact: Callable[[], None] | None = None,
    ) -> LockWatch:
        """Check this claim every *interval* seconds in a background thread.

        ``on_loss(exc)`` is called once, from that thread, when a lock is
        lost (see :meth:`verify`), and the watch ends.  A check that has not
        completed after *deadline* seconds (a server that hangs) calls
        ``on_stall(deadline)``, and ``on_intact()`` once a check completes
        with the claim intact.  Stop it with the returned watch's ``stop()``.
        """
        interval = as_seconds("interval", interval)
        if deadline is not None:
            deadline = as_seconds("deadline", deadline)
        return LockWatch(
            self.verify,
            interval,
            on_loss,
            deadline,
            on_stall or _ignore,
            on_intact or _ignore,
        ).start()

    # -- the holder's name ---------------------------------------------------

    def relabel(self, pid: int, command: list[str] | None = None) -> None:
        """Name process *pid* as the holder (case 2 of the lifetime rule).

        For a command that handed the image to another process (a daemon it
        forked, a background child) before exiting: the lock offset and the
        holder records then name the process that actually uses the image,
        on every host.  The claim stays held throughout.
        """
        if not self.owned_here:
            return
        if not self.held:  # a later acquire (a migration destination's) names *pid*
            self.owner_pid = pid
            self.command = command if command is not None else self.command
            return
        new = Owner.current(pid)
        for member in self.members:
            held = member.image.held
            if held is None or held.owner == new:
                continue
            member.image.relabel(new)
            if self.record:
                holder_records.rewrite(member, new, command or self.command)
        self.owner_pid = pid
        if command is not None:
            self.command = command

    # -- ending -------------------------------------------------------------

    def release(self, *, close: bool = True) -> None:
        """End the claim: close every descriptor, and remove the holder records.

        Idempotent.  The locks go with the descriptors; a process that
        inherited them (a forked child, a command's background child) keeps
        the image claimed until it closes them too.  In a process other than
        the owner (:attr:`process`) only that process's descriptors are closed.

        ``close=False`` is the explicit unlock of a migration source whose
        QEMU has inactivated its images: the locks are dropped for every
        process sharing the descriptors, which are kept for a later
        :meth:`acquire` (the guest may be resumed here), and so are the
        holder records, until :meth:`remove_records` (a record whose lock is
        gone names no holder: ``status`` flags it as stale).  Outside the
        owner process it does nothing.
        """
        if not self.owned_here:
            self.held = False
            if close:
                self.close()
            return
        if not close:
            held, self.held = self.held, False
            if held:
                migration.unlock(self.members)
            return
        self.held = False
        pending, self.members = self.members, []
        try:
            while pending:
                member = pending.pop(0)
                member.close()
                faults.point("release:unlocked")
                with contextlib.suppress(OSError):  # a record on a mount gone away
                    holder_records.remove(member)
        finally:
            for member in pending:  # left open by an error: closed all the same
                member.close()

    def close(self) -> None:
        """Close every descriptor (which drops any lock still on them)."""
        members, self.members = self.members, []
        self.held = False
        for member in members:
            member.close()

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    # A copy would share the descriptor numbers: collecting it would close
    # the original's descriptors (and so drop its locks) while the original
    # still says held, and the original's release would then close whatever
    # reuses those numbers.  A claim is one object in one process.
    def __copy__(self) -> NoReturn:
        raise TypeError(_NOT_COPYABLE)

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError(_NOT_COPYABLE)

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise TypeError(_NOT_COPYABLE)

    def __del__(self) -> None:
        # A claim dropped without release must not leak descriptors (and so locks).
        for member in getattr(self, "members", ()):
            member.close()


def _ignore(*_args: object) -> None:
    """A hook the caller did not ask for."""
