"""The live-migration handoff of ``imglock run`` for QEMU, through QMP.

At each point of a migration at most one side may run, and so at most one
side holds the claim (the idea of QEMU's old claim/release hooks):

* **source**: the claim is kept while the guest runs or is paused; once a
  migration has *completed* (the images inactive, the guest stopped in
  ``finish-migrate``, on its way to ``postmigrate``), it is released.
  A failed or cancelled migration keeps it.  If the guest is resumed on the
  source afterwards, the claim is taken back, and the guest is stopped if
  that fails.
* **destination** (``-incoming``): QEMU starts without a claim and with
  ``-S``.  Once the incoming migration has begun, the claim's intent bytes
  are taken (announced), and while a holder (the source) stands in the
  way the claim is tried for, until the source lets go: the claim is then
  won before the destination's QEMU completes, and the switch-over has no
  lock call left.  Otherwise, once the incoming migration has completed,
  the claim is taken with the intents (a test and the holder bytes),
  retrying until the handoff timeout.  Either judges only the imglock
  layer (the destination's own QEMU holds QEMU's bytes by then), and only
  once the claim is held is the guest resumed with ``cont``, unless the
  user asked for ``-S``; the intents are withdrawn after.  A failed or
  cancelled incoming migration gives up the intents, and a claim won
  meanwhile, at once.  A destination that has taken over is then watched
  as a source, for the next migration.

The wrapper talks to QEMU through a QMP monitor of its own, on a socket in
a private 0700 directory, added beside whatever monitors the user has.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import shutil
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from imglock import faults
from imglock.errors import ImglockError
from imglock.qemu.cmdline import has_freeze_cpu, migration_incoming, with_extra_args
from imglock.qemu.monitor import (
    EVENT_MIGRATION,
    EVENT_RESUME,
    MIGRATION_TERMINAL,
    Event,
    MigrationOutcome,
    MigrationStatus,
    Monitor,
    MonitorClosed,
    MonitorError,
    MonitorThread,
    RunStatus,
    call_hook,
    watch_destination,
    watch_source,
)
from imglock.run.graph import GraphFollower
from imglock.run.private_dir import SOCKET_NAME
from imglock.run.reporter import Reporter
from imglock.run.session import ClaimSession

#: How long QEMU gets to create its QMP socket after exec.
CONNECT_TIMEOUT: Final = 30.0
#: MIGRATION events on from QEMU's start (qemu-facts: a monitor that turns
#: them on later fails while a migration runs, and misses one started at once).
MIGRATION_EVENTS_ARGS: Final = ("-global", "migration.x-events=on")
#: How long QMP ``stop`` (or ``cont``) may take before SIGSTOP stands in for it.
STOP_TIMEOUT: Final = 2.0
#: While the source is letting go, retry the destination's claim this often at most.
HANDOFF_BACKOFF_CAP: Final = 0.0005
#: While the migration runs, the announced destination tries for the claim this often at
#: most (a test per file while the source holds): it wins within this much of the source's
#: release, well before its own QEMU has activated the images and completed.
EARLY_POLL_CAP: Final = 0.02
#: How long after the handoff a source removes its holder records.  Removed
#: at once, they were file system traffic while the destination activates
#: the images and takes the claim: on GlusterFS, 2.5 ms more guest downtime.
#: A switch-over takes milliseconds; meanwhile ``status`` flags the records
#: as stale and names no holder by them.
RECORDS_AFTER_HANDOFF: Final = 1.0


@dataclass(frozen=True, slots=True)
class _Child:
    """The QEMU child as the monitor sees it: alive until it is a zombie.

    The runner's main loop reaps the child; this must not, so it reads
    /proc instead of calling waitpid.
    """

    pid: int

    def poll(self) -> int | None:
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            return 0
        return 0 if state in (b"Z", b"X") else None


@dataclass
class Handoff:
    """The QMP side of one wrapped QEMU: its monitor, its migration watchers, its guest control."""

    argv: list[str]
    socket: str
    incoming: bool
    #: Destination: resume the guest once claimed (the user did not pass -S).
    resume_on_arrival: bool
    timeout: float
    #: Keeps the claim equal to QEMU's block graph while it runs (imglock.run.graph).
    follower: GraphFollower | None = None
    session: ClaimSession | None = None
    #: QEMU's pid (the process the lock names, once a watcher carries on).
    pid: int = -1
    monitor: MonitorThread | None = None
    #: The guest was stopped with SIGSTOP (QMP did not answer): SIGCONT it to resume.
    _sigstopped: bool = False
    _closed: threading.Event = field(default_factory=threading.Event)
    #: The incoming migration has ended (or the handoff closed): no more early attempts.
    _arrival_over: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def for_command(
        cls,
        argv: Sequence[str],
        private_dir: str,
        timeout: float,
        follower: GraphFollower | None = None,
    ) -> Handoff:
        """Prepare the QEMU command line: our monitor, and -S on a destination."""
        socket = os.path.join(private_dir, SOCKET_NAME)
        incoming = migration_incoming(argv) is not None
        user_paused = has_freeze_cpu(argv)
        extended = with_extra_args(argv, qmp_socket=socket, freeze_cpu=incoming and not user_paused)
        extended += MIGRATION_EVENTS_ARGS
        return cls(extended, socket, incoming, incoming and not user_paused, timeout, follower)

    def attach(self, session: ClaimSession, pid: int) -> None:
        """QEMU runs as *pid*: connect to it and watch it, in the background.

        Connecting may take a while (QEMU creates the socket after it has
        parsed its options); the runner's main loop must go on forwarding signals.
        """
        self.session = session
        self.pid = pid
        if self.follower is not None:
            self.follower = self.follower.following(session, pid, self)
        threading.Thread(target=self._watch, name="imglock-handoff", daemon=True).start()

    @property
    def _reporter(self) -> Reporter:
        assert self.session is not None
        return self.session.reporter

    # -- a daemonized QEMU (-daemonize): the watcher takes over -----------

    def before_fork(self) -> None:
        self.close()

    def in_watcher(self, session: ClaimSession, pid: int) -> None:
        """Connect again, from the watcher, and watch the daemon as the wrapper did."""
        self.monitor = None
        self._closed = threading.Event()
        self._arrival_over = threading.Event()
        # A destination that has claimed already is watched as a source.
        self.incoming = self.incoming and not session.held
        self.attach(session, pid)

    def finish(self) -> None:
        """The daemon is gone: close the monitor and remove the private directory."""
        self.close()
        shutil.rmtree(os.path.dirname(self.socket), ignore_errors=True)

    # -- the guest control (imglock.run.guest) ----------------------------

    def pause(self, reason: str) -> str:
        """Stop the guest with QMP ``stop`` (SIGSTOP if the monitor is not up)."""
        if self.monitor is not None:
            try:
                self.monitor.stop(timeout=STOP_TIMEOUT)
                return "QMP stop"
            except (ImglockError, TimeoutError):
                pass
        try:
            os.kill(self.pid, signal.SIGSTOP)
        except ProcessLookupError:
            return "QEMU had already exited"
        self._sigstopped = True
        return f"QMP unavailable: sent SIGSTOP to pid {self.pid}"

    def suspend(self) -> str | None:
        """Stop a running guest until :meth:`resume`; None if it was not running.

        ``query-status`` and ``stop`` do no I/O on the images, so QEMU
        answers them while a server hangs (``stop`` halts the vCPUs before
        it waits for requests in flight).  When QEMU's main loop is itself
        stuck in a call on the storage (a hung client, a stat of an image),
        neither comes back: then SIGSTOP stands in (see :meth:`pause`), and
        :meth:`resume` sends SIGCONT before ``cont``.
        """
        if self.monitor is not None:
            try:
                if not self.monitor.query_status(timeout=STOP_TIMEOUT).running:
                    return None
            except (ImglockError, TimeoutError):
                pass
        return self.pause("the lock check has not completed")

    def resume(self) -> str:
        """Undo :meth:`suspend`: SIGCONT if it came to that, then QMP ``cont``."""
        how = []
        if self._sigstopped:
            self._sigstopped = False
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
                how.append(f"sent SIGCONT to pid {self.pid}")
        if self.monitor is not None:
            try:
                self.monitor.cont(timeout=STOP_TIMEOUT)
                how.append("QMP cont")
            except (ImglockError, TimeoutError) as exc:
                how.append(f"QMP cont failed: {exc}")
        return ", ".join(how) or "no monitor to resume it with"

    def retarget(self, named: int, pids: Sequence[int]) -> None:
        """QMP stops the guest whichever process holds the images; SIGSTOP goes to *named*."""
        self.pid = named
        if self.follower is not None and self.session is not None:
            self.follower = self.follower.following(self.session, named, self)

    def close(self) -> None:
        self._closed.set()
        self._arrival_over.set()
        if self.monitor is not None:
            self.monitor.close()

    # -- the monitor's side -----------------------------------------------

    def _watch(self) -> None:
        try:
            self.monitor = MonitorThread.connect(
                self.socket, timeout=CONNECT_TIMEOUT, process=_Child(self.pid)
            )
            if self._closed.is_set():
                self.monitor.close()
                return
            if self.follower is not None:
                self.monitor.start(self.follower.follow).add_done_callback(self._follower_ended)
            self.monitor.start(self._keep_paused_once_lost)
            if self.incoming:
                self.monitor.start(self._announce_arrival)
            watcher = self._destination_then_source if self.incoming else self._source
            self.monitor.start(watcher).result()
        except MonitorClosed:
            return  # QEMU exited (it closes its monitor only then): the runner says how
        except Exception as exc:  # a watcher thread must say why it stopped, not die silently
            if not self._closed.is_set() and _alive(self.pid):
                text = str(exc) if isinstance(exc, ImglockError) else repr(exc)
                self._reporter.error(f"migration handoff stopped: {text}")

    def _follower_ended(self, future: concurrent.futures.Future[None]) -> None:
        if future.cancelled() or self.session is None or self._closed.is_set():
            return
        exc = future.exception()
        if exc is not None and _alive(self.pid):
            text = str(exc) if isinstance(exc, ImglockError) else repr(exc)
            self._reporter.error(f"following QEMU's block graph stopped: {text}")

    async def _keep_paused_once_lost(self, monitor: Monitor) -> None:
        """A guest whose claim is lost stays paused, whoever resumes it (a manager's ``cont``).

        imglock never takes a lost claim again: the way back is a new QEMU
        (a restart, or a migration to one), which claims through the whole
        protocol (imglock(7), LOCK LOSS).
        """
        listener = monitor.listen({EVENT_RESUME})
        try:
            while True:
                await listener.get()
                listener.clear()
                if self.session is None or not self.session.lost:
                    continue
                try:
                    await monitor.stop()
                except MonitorError:
                    return
                self._reporter.error(
                    "the guest was resumed although its claim is lost: paused again "
                    "(see imglock(7), LOCK LOSS)"
                )
        finally:
            monitor.unlisten(listener)

    async def _announce_arrival(self, monitor: Monitor) -> None:
        """Announce the claim when the incoming migration begins; withdraw it if that fails.

        Its first MIGRATION event (``setup`` or ``active``) comes at the
        start of the transfer, well before the switch-over; the intents
        then stand for the length of the migration, and the claim is won
        as soon as the source lets go (ClaimSession.claim_early).  A
        manager often starts the migration as soon as the destination
        listens, before this monitor does: so, events on and listened for,
        the migration's status is asked once, and one already under way is
        announced at once rather than at its switch-over.
        """
        listener = monitor.listen({EVENT_MIGRATION})
        announcing: threading.Thread | None = None
        try:
            await monitor.enable_migration_events()
            status: str | None = await monitor.migration_status()
            while True:
                if status in MIGRATION_TERMINAL:
                    self._arrival_over.set()
                if status == MigrationStatus.COMPLETED:
                    return  # the arrival's claim takes it from here
                if status in MIGRATION_TERMINAL:
                    if announcing is not None:
                        abandon = functools.partial(self._abandon, announcing)
                        self._in_background(abandon, "imglock-withdraw")
                    return
                if announcing is None and status not in (None, MigrationStatus.NONE):
                    announcing = self._in_background(self._announce, "imglock-announce")
                status = Event.from_message(await listener.get()).migration_status
        finally:
            monitor.unlisten(listener)

    @staticmethod
    def _in_background(target: Callable[[], None], name: str) -> threading.Thread:
        """Lock calls off the monitor's event loop, which goes on serving QEMU's events."""
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        return thread

    def _announce(self) -> None:
        assert self.session is not None
        self.session.announce_arrival()
        self.session.claim_early(self._arrival_over, EARLY_POLL_CAP)

    def _abandon(self, announcing: threading.Thread) -> None:
        assert self.session is not None
        announcing.join()  # not withdrawn before it is taken
        self.session.abandon_arrival()

    async def _source(self, monitor: Monitor) -> None:
        await watch_source(
            monitor, release=self._release, reclaim=self._reclaim, on_outcome=self._outcome
        )

    def _outcome(self, outcome: MigrationOutcome) -> None:
        """Say how a migration (or a snapshot made as one) ended, and what became of the claim."""
        if not outcome.completed:
            why = f": {outcome.error}" if outcome.error else ""
            self._reporter.note(f"migration {outcome.status}{why}: the claim stays here")
        elif outcome.runstate.status not in (RunStatus.FINISH_MIGRATE, RunStatus.POSTMIGRATE):
            self._reporter.note(
                "a snapshot completed (savevm, snapshot-save or background-snapshot), "
                "not a migration: the guest keeps its images, and the claim stays"
            )

    async def _destination_then_source(self, monitor: Monitor) -> None:
        await watch_destination(monitor, claim=self._claim, resume=self.resume_on_arrival)
        # The guest runs: now the intents and the holder records, off its downtime.
        self._in_background(self._settle_arrival, "imglock-records")
        await self._source(monitor)

    def _release(self) -> None:
        assert self.session is not None
        self.session.hand_over()
        faults.point("handoff:released")
        self._reporter.note("migration completed: claim released to the destination")
        later = threading.Timer(RECORDS_AFTER_HANDOFF, self.session.remove_records)
        later.daemon = True
        later.start()

    def _reclaim(self) -> None:
        assert self.session is not None
        self.session.take_back()

    async def _claim(self) -> None:
        assert self.session is not None
        if not self.session.held:  # else won during the migration: nothing left to take
            await call_hook(self._take_on_arrival)
        faults.point("handoff:claimed")
        self._reporter.note("incoming migration completed: claim taken")

    def _take_on_arrival(self) -> None:
        assert self.session is not None
        self.session.take_on_arrival(self.timeout, HANDOFF_BACKOFF_CAP)

    def _settle_arrival(self) -> None:
        assert self.session is not None
        self.session.withdraw_arrival()
        self.session.write_deferred_records()


def _alive(pid: int) -> bool:
    return _Child(pid).poll() is None
