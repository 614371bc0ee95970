"""The claim session: the one owner of a run's :class:`~imglock.api.Claim` and its lifecycle.

A run's claim goes through a few states, and only this module moves it::

    planned --take--> held --hand_over--> handed-over --take_back--> held
    planned --prepare_arrival--> prepared --take_on_arrival--> held   (migration destination;
                                 its intents announced meanwhile, withdrawn once the guest runs;
                       prepared --claim_early--> held  once the source has let go, and
                       back --abandon_arrival--> prepared  if the incoming migration fails)
    held --(a lock check finds a lock gone)--> lost   (for good: migrating away and
                                                       back does not make it held)
    any --end / leave--> ended

Everything that acts on the claim while the command runs (the runner, the
lock check, a VMM adapter's migration handoff and block-graph follower,
the watcher of a daemonized command) does it through the session's
methods.  The session serialises those threads with one lock, decides from
its state whether a lock check or a change of files applies now, and says
what it does through the reporter it was given.
"""

from __future__ import annotations

import contextlib
import enum
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from imglock.api import Claim
from imglock.errors import ImglockError, LockError, LockLost
from imglock.lock.protocol import Layer, Mode, imglock_byte
from imglock.lockcheck import LockWatch
from imglock.run.guest import GuestControl
from imglock.run.reporter import Reporter

FileKey = tuple[int, int]  # (st_dev, st_ino)
#: One file of the claim, as :attr:`Claim.members` lists it.
Member = Any


class State(enum.Enum):
    """Where a run's claim stands."""

    #: Opened (or to be opened), nothing taken yet.
    PLANNED = "planned"
    #: A migration destination: everything ready, the locks taken at the handoff.
    PREPARED = "prepared"
    HELD = "held"
    #: A migration source after the switch-over: released, descriptors kept.
    HANDED_OVER = "handed-over"
    #: A lock check found a lock gone: never taken again.
    LOST = "lost"
    ENDED = "ended"


#: Seconds between looks at a destination's claim while a manager's resume waits for it.
RESUME_POLL: Final = 0.001
#: The first pause between an announced arrival's attempts during the migration (it doubles).
EARLY_FIRST: Final = 0.001

_LAYER_WORDS: Final = (
    (Layer.IMGLOCK, "imglock layer"),
    (Layer.QEMU, "QEMU's lock bytes"),
    (Layer.QEMU_TEST, "QEMU's bytes tested, left to QEMU"),
)


def claim_notes(claim: Claim) -> list[str]:
    """What *claim* holds, one line per file, and why any holder record is missing."""
    layers = ", ".join(words for layer, words in _LAYER_WORDS if layer in claim.layers)
    notes = []
    for member in claim.members:
        notes.append(f"claimed {member.image.filename} {member.mode.value} ({layers})")
        if member.record_problem is not None:
            notes.append(f"no holder record for {member.image.filename}: {member.record_problem}")
    return notes


def check_interval(seconds: float) -> float | None:
    """The timeout between lock checks: None (never) for 0 and for infinity."""
    return None if seconds <= 0 or math.isinf(seconds) else seconds


@dataclass(eq=False)
class FileEditor:
    """The claim's files, to change under the session's lock (:meth:`ClaimSession.files`)."""

    _claim: Claim

    @property
    def members(self) -> list[Member]:
        return list(self._claim.members)

    def add(self, path: str, mode: Mode) -> Member:
        return self._claim.add_file(path, mode)

    def drop(self, member: Member) -> None:
        self._claim.drop_file(member)

    def change_mode(self, member: Member, mode: Mode) -> None:
        self._claim.change_file_mode(member, mode)


@dataclass(eq=False)
class ClaimSession:
    """One run's claim, its state, and the lock that serialises it between threads."""

    claim: Claim
    reporter: Reporter = field(default_factory=Reporter)
    state: State = State.PLANNED
    #: A lock check has not completed within its deadline (until one does).
    stalled: bool = False
    #: How the guest was suspended when a check stalled (None: it was not running).
    _suspended: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    #: Lines a lock check reported already (each is said once).
    _noticed: set[str] = field(default_factory=set)
    _watch: LockWatch | None = None
    _guest: GuestControl | None = None
    #: The destination's holder records are still to be written.
    _records_due: bool = False
    #: Why a migration destination could not take its claim, once it could not.
    _arrival_refused: str | None = None
    #: A migration destination won its claim before its incoming migration completed.
    _won_early: bool = False

    def _move_to(self, state: State) -> None:
        """Go to *state*, unless the claim is lost: it stays lost (never checked again)."""
        if not self.lost:
            self.state = state

    # -- what the others may read --------------------------------------------

    @property
    def held(self) -> bool:
        """Whether the claim is meant to be held now (not handed over, prepared or lost)."""
        return self.state is State.HELD

    @property
    def lost(self) -> bool:
        return self.state is State.LOST

    @property
    def fds(self) -> list[int]:
        """The descriptors that carry the locks, for the command to inherit."""
        return self.claim.fds

    @property
    def descriptors(self) -> set[int]:
        return self.claim.descriptors

    def file_keys(self) -> set[FileKey]:
        return self.claim.file_keys()

    def filenames(self) -> list[str]:
        return [m.image.filename for m in self.claim.members]

    def own_bytes(self) -> list[tuple[FileKey, int]]:
        """((st_dev, st_ino) of the lock file, the claim's own imglock byte) for every held file."""
        if not self.claim.held:
            return []
        out = []
        for member in self.claim.members:
            held = member.image.held
            if held is None or Layer.IMGLOCK not in held.layers:
                continue
            fd, _name = member.image.lock_target
            try:
                st = os.fstat(fd)
            except OSError:
                continue  # a mount gone away: no process can be found holding it
            out.append(((st.st_dev, st.st_ino), imglock_byte(held.mode, held.owner)))
        return out

    # -- starting ------------------------------------------------------------

    def open(self) -> None:
        """Open every file (and its chain): bad images fail here, before anything runs."""
        self.claim.open()

    def name_owner(self, pid: int, argv: Sequence[str]) -> None:
        """Name *pid*, running *argv*, as the holder (the command, not the wrapper)."""
        self.claim.owner_pid = pid
        self.claim.command = list(argv)

    def take(self) -> None:
        """Take the claim (planned -> held), and note what it holds."""
        self.claim.acquire()
        self.state = State.HELD
        for line in claim_notes(self.claim):
            self.reporter.note(line)

    def prepare_arrival(self) -> None:
        """A migration destination: everything but the locks now (planned -> prepared).

        In the main thread and before the command runs: what the handoff's
        claim needs besides its locks is not then on the guest's downtime,
        and no import runs in another thread when a daemonizing VMM makes
        the wrapper fork.
        """
        self.claim.prepare()
        self.state = State.PREPARED
        self.reporter.note("migration destination: images are claimed at the handoff")

    def command_started(self) -> None:
        """The command runs: a QEMU among it now holds its own lock bytes."""
        self.claim.qemu_holds_its_bytes()

    # -- a live migration ----------------------------------------------------

    def hand_over(self) -> None:
        """The migration completed: release to the destination (held -> handed-over).

        The descriptors are kept: the guest may be resumed here and need them back.
        """
        with self._lock:
            self._move_to(State.HANDED_OVER)
            self.claim.release(close=False)

    def remove_records(self) -> None:
        """Remove the holder records of a claim handed over (not if it was taken back meanwhile)."""
        with self._lock:
            self.claim.remove_records()

    def take_back(self) -> None:
        """The guest was resumed here after migrating away: take the claim again (-> held).

        Nothing to do when it is held already (a manager's resume was let
        through only once it was taken back).
        """
        with self._lock:
            if self.state is State.HELD:
                return
            try:
                self.claim.acquire()
            except ImglockError as exc:
                self.reporter.error(f"{exc}; guest resumed here after migrating away, stopping it")
                raise
            self._move_to(State.HELD)

    def announce_arrival(self) -> None:
        """The incoming migration has begun: take the intent bytes now, off the switch-over.

        Only while still prepared (an arrival that came first has claimed already).
        """
        with self._lock:
            if self.state is State.PREPARED:
                self.claim.announce()

    def claim_early(self, finished: threading.Event, poll_cap: float) -> None:
        """Win an announced arrival's claim during the migration, once the source has let go.

        Only where a holder stands in the way to begin with (the source,
        which lets go once its migration has completed: its QEMU no longer
        writes): a look first, then attempts, every *poll_cap* seconds at
        most, until one wins (prepared -> held), *finished* is set (the
        switch-over claims then), or another claimer or a waiter stands in
        line (the intents are withdrawn, and the switch-over claims as
        anyone does).  The switch-over then has nothing left to take.
        """
        with self._lock:
            if self.state is not State.PREPARED or not self.claim.announced:
                return
            try:
                first = self.claim.first_rival()
            except LockError:
                return  # the switch-over claims, and says what went wrong
            if first is not None and not first.held:
                self.claim.withdraw()  # in line behind another: no early intent holds it up
                return
        if first is None:
            return
        delay = EARLY_FIRST
        while not finished.wait(delay):
            delay = min(delay * 2, poll_cap)
            with self._lock:
                if self.state is not State.PREPARED or not self.claim.announced:
                    return
                try:
                    with self._records_deferred():
                        lost = self.claim.try_arrival()
                except LockError:
                    return
                if lost is None:
                    self.state, self._won_early = State.HELD, True
                    return
                if not lost.conflict.held:
                    self.claim.withdraw()
                    return

    def abandon_arrival(self) -> None:
        """The incoming migration failed: drop the intents, and a claim won meanwhile (-> prepared).

        The guest never ran here; the source keeps running with its own claim.
        """
        with self._lock:
            if self._won_early and self.state is State.HELD:
                self.claim.release(close=False)
                self.state, self._won_early = State.PREPARED, False
            self.claim.withdraw()

    def withdraw_arrival(self) -> None:
        """Drop the intent bytes of an arrival: the guest runs."""
        with self._lock:
            self.claim.withdraw()

    @contextlib.contextmanager
    def _records_deferred(self) -> Iterator[None]:
        """An arrival claims without holder records: they are written once the guest runs."""
        claim = self.claim
        self._records_due, claim.record = claim.record, False
        try:
            yield
        finally:
            claim.record = self._records_due

    def take_on_arrival(self, wait: float, backoff_cap: float) -> None:
        """The incoming migration completed: take the claim (prepared -> held).

        Only the locks are on the critical path (with the intents announced,
        a test and the holder bytes; none once :meth:`claim_early` has won):
        the intents are withdrawn and the holder records written once the
        guest runs (:meth:`withdraw_arrival`, :meth:`write_deferred_records`).
        """
        claim = self.claim
        with self._lock:
            if self.state is State.HELD:  # won during the migration
                self._won_early = False
                return
            claim.wait = wait
            claim.backoff_cap = backoff_cap
            try:
                with self._records_deferred():
                    claim.arrive()
            except ImglockError as exc:
                claim.withdraw()
                self.reporter.error(f"{exc}; the migrated guest stays paused")
                self._arrival_refused = str(exc)
                raise
            self.state = State.HELD

    def admit_resume(self, timeout: float) -> str | None:
        """Whether the guest may run now (a manager resumes it): None if so, else why not.

        A migration destination's claim is waited for, up to *timeout*
        seconds; a source that handed its claim over takes it back first (the
        migration failed after the switch-over, and the manager resumes it
        here).  A lost or ended claim never lets the guest run.
        """
        deadline = time.monotonic() + timeout
        while True:
            state, refused = self.state, self._arrival_refused
            if state is State.HELD:
                return None
            if state is State.LOST:
                return "its claim is lost (imglock(7), LOCK LOSS)"
            if state is State.ENDED:
                return "its claim has ended"
            if state is State.HANDED_OVER:
                try:
                    self.take_back()
                except ImglockError as exc:
                    return str(exc)
                return None
            if refused is not None:
                return refused
            if time.monotonic() > deadline:
                return f"its claim is not held after {timeout:g} s"
            time.sleep(RESUME_POLL)

    def write_deferred_records(self) -> None:
        if not self._records_due:
            return
        with self._lock:
            self.claim.write_records()

    # -- following the files a VMM has open ----------------------------------

    @contextlib.contextmanager
    def files(self) -> Iterator[FileEditor | None]:
        """The claim's files to change, under the session's lock; None when not held now.

        A migration owns the claim while it is handed over or prepared, and a
        lost claim is never changed.
        """
        with self._lock:
            yield FileEditor(self.claim) if self.held else None

    def members(self) -> list[Member]:
        return list(self.claim.members)

    # -- the lock check (imglock.lockcheck) ----------------------------------

    def watch(self, guest: GuestControl, interval: float, deadline: float) -> None:
        """Check the claim every *interval* seconds in the background; stop *guest* on trouble.

        A check that takes longer than *deadline* seconds (inf: no limit)
        suspends the guest until one completes.
        """
        self._guest = guest
        every = check_interval(interval)
        if every is None:
            return
        limit = None if math.isinf(deadline) else deadline
        self._watch = LockWatch(
            self._check, every, self._lost, limit, self._stall, self._intact, self._notice
        ).start()

    def stop_watching(self) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    def _check(self) -> list[str]:
        with self._lock:
            if not self.held:
                return []  # a migration owns the claim, or it is lost already
            return self.claim.verify()

    def _files(self) -> str:
        names = self.filenames()
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    def _lost(self, exc: LockLost) -> None:
        """A lock is gone: pause the guest for good, and say so loudly."""
        self.state = State.LOST
        assert self._guest is not None
        how = self._guest.pause(str(exc))
        self.reporter.error(
            f"{exc}; guest paused ({how}); imglock will not resume it "
            "nor take the claim again (see imglock(7), LOCK LOSS)"
        )

    def _stall(self, deadline: float) -> None:
        """A check has not come back: suspend the guest before the server could let go."""
        if self.stalled or not self.held:
            return
        assert self._guest is not None
        self.stalled = True
        self._suspended = self._guest.suspend()
        how = self._suspended or "it was not running"
        self.reporter.error(
            f"{self._files()}: lock check has not completed in {deadline:g} s "
            f"(the storage does not answer): guest paused ({how}) until a check completes"
        )

    def _intact(self) -> None:
        """A check that stalled came back with the claim intact: undo the suspension."""
        if not self.stalled or self.lost:
            return
        self.stalled = False
        assert self._guest is not None
        suspended, self._suspended = self._suspended, None
        if suspended is None:  # it was not running: nothing to resume
            self.reporter.error(f"{self._files()}: lock check completed, claim intact")
            return
        how = self._guest.resume()
        self.reporter.error(
            f"{self._files()}: lock check completed, claim intact: guest resumed ({how})"
        )

    def _notice(self, line: str) -> None:
        if line not in self._noticed:
            self._noticed.add(line)
            self.reporter.error(line)

    # -- the processes a command left behind ---------------------------------

    def relabel(self, pid: int, argv: list[str] | None, why_kept: str) -> None:
        """Name *pid* (running *argv*) as the holder; on failure say so, ending with *why_kept*."""
        with self._lock:
            try:
                self.claim.relabel(pid, argv)
            except LockError as exc:
                self.reporter.error(f"{exc} ({why_kept})")

    def detached(self, reporter: Reporter) -> ClaimSession:
        """This session as a detached watcher carries it on: its process, its reporter.

        Called in the watcher, once forked: the claim is the watcher's to end now.
        """
        self.claim.process = os.getpid()
        return ClaimSession(
            self.claim,
            reporter,
            self.state,
            self.stalled,
            self._suspended,
            _records_due=self._records_due,
            _arrival_refused=self._arrival_refused,
        )

    # -- ending --------------------------------------------------------------

    def end(self) -> None:
        """Release the claim and close its descriptors (-> ended).

        A failure to unlock is said: the descriptors are closed all the same,
        and the locks went with them.
        """
        self.state = State.ENDED
        try:
            self.claim.release()
        except LockError as exc:
            self.reporter.error(f"{exc} (while releasing: the image is free all the same)")

    def leave(self) -> None:
        """Close this process's descriptors, leaving the claim to the processes that share them."""
        self.state = State.ENDED
        self.claim.close()
