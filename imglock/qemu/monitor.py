"""A small QMP client for handing disk images over during a live migration.

``imglock run`` starts QEMU with a private QMP monitor (see
:func:`imglock.qemu.cmdline.with_extra_args`) and uses it to follow the
VM's life:

* **Source side** (:func:`watch_source`): when an outgoing migration
  completes, QEMU has already inactivated the images (it flushed them and
  will not write again), and the guest is stopped (``finish-migrate``,
  then ``postmigrate``).  The claim is released at once, so the
  destination can take it.  A failed or cancelled migration leaves the
  source running with its images active: the claim is kept.  Should the
  VM be resumed after the handoff (an operator's ``cont`` once the
  destination gave up), the claim is taken back, and the VM is stopped if
  that fails.
* **Destination side** (:func:`watch_destination`): QEMU runs with
  ``-incoming`` and ``-S``, so the guest cannot start on its own.  When
  the incoming migration has completed, the claim is taken (waiting for
  the source to release it is the claim's business), and only then is the
  guest resumed with ``cont``.

The lock library stays out of this module: the watchers take ``claim``,
``release`` and ``reclaim`` callables.  Plain functions run in a worker
thread (a claim may wait for seconds), coroutine functions are awaited.

Behaviour of QEMU 7.2 this relies on (measured by tests/qemu/test_qemu_monitor.py):

* ``MIGRATION`` events are only sent after ``migrate-set-capabilities``
  with ``events: true``; the capability is per QEMU and may be set on a
  destination before or during ``inmigrate``.
* Source: ``setup``, ``active``, then ``STOP`` (entering
  ``finish-migrate``), ``completed``, and the run state becomes
  ``postmigrate`` slightly after the ``completed`` event.  The images are
  inactivated before ``completed`` is announced.  A failed or cancelled
  migration resumes a source that was running (``RESUME``); one that was
  paused ends in ``postmigrate`` too, so that state alone proves nothing:
  only a ``completed`` status does.
* Destination: run state ``inmigrate`` throughout; at completion QEMU
  activates the images (taking its own locks) *even with* ``-S``, unless
  the ``late-block-activate`` capability is set, then sets the run state
  (``paused`` with ``-S``, ``running`` without, or the source's own state
  when the source was not running) and only then announces ``completed``.
  Both signals come from one step of QEMU's main loop, so a
  ``query-status`` reply that shows the run state has left ``inmigrate``
  is always preceded by the ``completed`` event (when events are on).
  A failed incoming migration makes the destination QEMU exit (status 1),
  also when the source cancels.
* QEMU's own lock bytes through a handoff (virtio disk, destination with
  ``-S``): a qcow2 source holds 100, 101, 103, 201, 203 and keeps 100 once
  inactive; the destination holds none while ``inmigrate`` and all five at
  completion, before ``cont``.  A raw source holds 100, 101, 201 and keeps
  none; the destination takes 100, 101 at completion and 201 at ``cont``.
  With ``late-block-activate`` the destination holds nothing until
  ``cont``.  ``cont`` on the source after the handoff fails with
  ``Failed to get "write" lock`` while the destination holds the image.
* Timing, 64 MiB TCG guest over a unix socket on one host: ``migrate`` to
  ``completed`` 9-36 ms (median 16); ``completed`` to ``postmigrate``
  1-6 ms (the first ``query-status`` after the event still said
  ``finish-migrate`` in 3 of 12 runs); the destination's ``completed``
  5-14 ms after the source's STOP; source STOP to destination RESUME
  7-17 ms (median 11) with an immediate ``cont``, 14-25 ms with a
  release/claim in between; QEMU's own ``downtime`` figure 2-15 ms.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import enum
import functools
import inspect
import os
import threading
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, QMPClient, QMPError
from qemu.qmp import Runstate as SessionState
from qemu.qmp.message import Message

from imglock.errors import EX_OSERR, ImglockError

T = TypeVar("T")


class RunStatus(enum.StrEnum):
    """The run states imglock looks for (qapi/run-state.json, RunState)."""

    RUNNING = "running"
    PAUSED = "paused"
    PRELAUNCH = "prelaunch"
    INMIGRATE = "inmigrate"
    FINISH_MIGRATE = "finish-migrate"
    POSTMIGRATE = "postmigrate"


class MigrationStatus(enum.StrEnum):
    """The migration statuses imglock looks for (qapi/migration.json, MigrationStatus)."""

    NONE = "none"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


MIGRATION_TERMINAL: Final = frozenset(
    {MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED}
)

# Events (qapi/run-state.json, qapi/migration.json).
EVENT_MIGRATION: Final = "MIGRATION"
EVENT_STOP: Final = "STOP"
EVENT_RESUME: Final = "RESUME"
EVENT_SHUTDOWN: Final = "SHUTDOWN"
WATCHED_EVENTS: Final = frozenset({EVENT_MIGRATION, EVENT_STOP, EVENT_RESUME, EVENT_SHUTDOWN})

# Migration capabilities (qapi/migration.json, MigrationCapability).
CAPABILITY_EVENTS: Final = "events"
CAPABILITY_LATE_BLOCK_ACTIVATE: Final = "late-block-activate"

#: How often connect() retries while QEMU has not created its socket yet.
CONNECT_RETRY_INTERVAL: Final = 0.02
#: How often run states are polled where QEMU sends no event for a change
#: (a source settling after a migration ended).  Nothing waits on it: a
#: source lets go of the claim at ``completed``, and a poll each millisecond
#: only took CPU from the QEMUs at the switch-over.
POLL_INTERVAL: Final = 0.010
#: How often a destination's run state is polled between events.
INCOMING_POLL_INTERVAL: Final = 0.1
#: How long a source may take from ``completed`` to ``postmigrate``.
SETTLE_TIMEOUT: Final = 10.0


# --------------------------------------------------------------------------
# Errors


class MonitorError(ImglockError):
    """The QMP monitor cannot be reached or used; names the socket."""

    exit_status = EX_OSERR


class MonitorClosed(MonitorError):
    """QEMU closed the monitor (it exited, or was killed)."""


class CommandFailed(MonitorError):
    """QEMU answered a QMP command with an error.

    :attr:`command` is the command, :attr:`error_class` QEMU's error class
    (``"GenericError"``...), :attr:`description` its message.
    """

    def __init__(self, path: str, command: str, error_class: str, description: str) -> None:
        self.command = command
        self.error_class = error_class
        self.description = description
        super().__init__(path, f"QMP {command} failed: {description}")


# --------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class RunState:
    """What ``query-status`` says: whether the guest runs, and the run state name."""

    running: bool
    status: str


@dataclass(frozen=True)
class MigrationOutcome:
    """How a migration ended, as seen from one side.

    :attr:`status` is ``completed``, ``failed`` or ``cancelled``;
    :attr:`runstate` is the VM's run state once it settled;
    :attr:`error` is QEMU's ``error-desc`` for a failure, when it gives one.
    """

    status: str
    runstate: RunState
    error: str | None = None

    @property
    def completed(self) -> bool:
        """Whether the migration completed (on a source, a snapshot completes too)."""
        return self.status == MigrationStatus.COMPLETED


@dataclass(frozen=True)
class Event:
    """A QMP event as received: name, data, and QEMU's timestamp (seconds)."""

    name: str
    data: Mapping[str, Any]
    timestamp: float

    @classmethod
    def from_message(cls, msg: Message) -> Event:
        """Convert a qemu.qmp event message."""
        stamp = msg.get("timestamp")
        seconds = 0.0
        if isinstance(stamp, dict):
            seconds = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
        data = msg.get("data")
        return cls(
            name=str(msg.get("event")),
            data=data if isinstance(data, dict) else {},
            timestamp=seconds,
        )

    @property
    def migration_status(self) -> str | None:
        """The ``status`` of a MIGRATION event, else None."""
        if self.name != EVENT_MIGRATION:
            return None
        status = self.data.get("status")
        return status if isinstance(status, str) else None


class ProcessLike(Protocol):
    """What connect() needs of the QEMU process: ``subprocess.Popen`` fits."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...


Hook = Callable[[], object]
"""A claim/release callable: a plain function (run in a thread of its own)
or a coroutine function (awaited)."""


async def call_hook(hook: Hook) -> None:
    """Run *hook*: await a coroutine function, run a plain one in a daemon thread."""
    await _call_hook(hook)


async def _call_hook(hook: Hook) -> None:
    if inspect.iscoroutinefunction(hook):
        await hook()
        return
    result = await _in_daemon_thread(hook)
    if inspect.isawaitable(result):
        await result


async def _in_daemon_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a daemon thread and await its result.

    Not asyncio.to_thread: executor threads are joined when the interpreter
    exits, so a hook stuck in a lock wait would keep the process alive
    after the watcher was cancelled.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed over to the awaiting task
            error = exc
            report = functools.partial(deliver, lambda: future.set_exception(error))
        else:
            report = functools.partial(deliver, lambda: future.set_result(result))
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(report)

    threading.Thread(target=run, name="imglock-qmp-hook", daemon=True).start()
    return await future


# --------------------------------------------------------------------------
# The monitor


class Monitor:
    """One QMP session with one QEMU, with the events ``imglock run`` cares about.

    Make one with :meth:`connect`.  From the moment it is connected it
    records every STOP, RESUME, SHUTDOWN and MIGRATION event (in
    :attr:`history`, and in a queue that :meth:`next_event` consumes), so
    nothing sent between two waits is missed.
    """

    def __init__(self, client: QMPClient, path: str) -> None:
        self._client = client
        self.path = path
        self._listener = EventListener(names=sorted(WATCHED_EVENTS))
        client.register_listener(self._listener)
        self._pending: collections.deque[Event] = collections.deque()
        self._arrived = asyncio.Event()
        self._gone = asyncio.Event()
        self._gone_task = asyncio.create_task(self._watch_session())
        self._pump_task = asyncio.create_task(self._pump())

    # -- connection ---------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        timeout: float = 10.0,
        process: ProcessLike | None = None,
    ) -> Monitor:
        """Connect to QEMU's QMP unix socket, waiting for QEMU to create it.

        Retries every :data:`CONNECT_RETRY_INTERVAL` seconds until
        ``timeout``.  With ``process`` (the QEMU child), gives up as soon
        as it has exited, saying with which status, instead of waiting out
        the timeout.  Raises :class:`MonitorError`.
        """
        path = os.fspath(path)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last_error = "no socket yet"
        while True:
            if process is not None:
                status = process.poll()
                if status is not None:
                    raise MonitorError(
                        path, f"QEMU (pid {process.pid}) exited with {_describe_status(status)} "
                        "before its QMP monitor was ready",
                    )  # fmt: skip
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise MonitorError(
                    path, f"QEMU's QMP monitor did not answer within {timeout:g} s ({last_error})"
                )
            if not os.path.exists(path):
                # Not created yet: skip an attempt that qemu.qmp would log.
                await asyncio.sleep(min(CONNECT_RETRY_INTERVAL, remaining))
                continue
            client = QMPClient("imglock")
            try:
                # A socket that exists but whose QEMU is hung (or busy with
                # another client) accepts and then says nothing: bound it.
                await asyncio.wait_for(client.connect(path), remaining)
            except (TimeoutError, QMPError, OSError) as exc:
                last_error = _describe_exception(exc)
                await _quietly_disconnect(client)
                await asyncio.sleep(min(CONNECT_RETRY_INTERVAL, max(0.0, remaining)))
                continue
            return cls(client, path)

    async def close(self) -> None:
        """Close the session (QEMU keeps running)."""
        for task in (self._gone_task, self._pump_task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await _quietly_disconnect(self._client)
        self._gone.set()

    async def __aenter__(self) -> Monitor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        """Whether the session is over (QEMU exited or :meth:`close` was called)."""
        return self._gone.is_set()

    async def _watch_session(self) -> None:
        while self._client.runstate == SessionState.RUNNING:
            await self._client.runstate_changed()
        self._gone.set()

    # -- commands -----------------------------------------------------------

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run a QMP command and return its ``return`` value.

        Raises :class:`CommandFailed` when QEMU reports an error and
        :class:`MonitorClosed` when QEMU has gone away.
        """
        if self.closed:
            raise MonitorClosed(self.path, f"cannot run QMP {command}: QEMU closed its monitor")
        try:
            return await self._client.execute(command, arguments)
        except ExecuteError as exc:
            raise CommandFailed(self.path, command, exc.error_class, str(exc)) from None
        except (ExecInterruptedError, QMPError, OSError, EOFError) as exc:
            raise MonitorClosed(
                self.path, f"QMP {command} interrupted: QEMU closed its monitor "
                f"({_describe_exception(exc)})",
            ) from None  # fmt: skip

    async def query_status(self) -> RunState:
        """The VM's run state (``query-status``)."""
        reply = await self.execute("query-status")
        return RunState(running=bool(reply["running"]), status=str(reply["status"]))

    async def stop(self) -> None:
        """Pause the guest (``stop``); harmless when it is already paused."""
        await self.execute("stop")

    async def halt(self) -> None:
        """``stop``, done as soon as QEMU has halted the guest's CPUs.

        That is the ``STOP`` event, or the reply if the guest was not
        running.  QEMU sends the event as soon as the CPUs are halted, then
        waits in its main loop for the I/O in flight and flushes the
        images; on storage that hangs that wait, and so the reply, may
        take as long as the storage does, while the guest runs no more.
        """
        listener = self.listen({EVENT_STOP})
        command = asyncio.ensure_future(self.stop())
        # Its reply may come long after the event, or never (QEMU killed).
        command.add_done_callback(lambda f: f.cancelled() or f.exception())
        stopped = asyncio.ensure_future(listener.get())
        try:
            done, _pending = await asyncio.wait(
                {command, stopped}, return_when=asyncio.FIRST_COMPLETED
            )
            if command in done:
                command.result()  # a refusal (or a closed monitor) raises here
        finally:
            stopped.cancel()
            self.unlisten(listener)

    async def cont(self) -> None:
        """Resume the guest (``cont``); this also activates images still inactive."""
        await self.execute("cont")

    async def query_migrate(self) -> Mapping[str, Any]:
        """``query-migrate``: on a destination it describes the incoming migration."""
        reply = await self.execute("query-migrate")
        return reply if isinstance(reply, dict) else {}

    async def migration_status(self) -> str:
        """The current migration status, ``"none"`` if there never was one."""
        status = (await self.query_migrate()).get("status", MigrationStatus.NONE)
        return str(status)

    async def set_migration_capabilities(self, **capabilities: bool) -> None:
        """Set migration capabilities; keyword names use ``_`` for ``-``."""
        await self.execute(
            "migrate-set-capabilities",
            {
                "capabilities": [
                    {"capability": name.replace("_", "-"), "state": state}
                    for name, state in capabilities.items()
                ]
            },
        )

    async def migration_capabilities(self) -> dict[str, bool]:
        """Every migration capability and whether it is on."""
        reply = await self.execute("query-migrate-capabilities")
        return {str(item["capability"]): bool(item["state"]) for item in reply}

    async def enable_migration_events(self) -> None:
        """Turn on MIGRATION events (``migrate-set-capabilities events``).

        Does nothing when they are on already: QEMU refuses to change
        capabilities while an outgoing migration runs (at start-up, when
        ``imglock run`` calls this, none can be running).
        """
        if not (await self.migration_capabilities()).get(CAPABILITY_EVENTS, False):
            await self.set_migration_capabilities(events=True)

    async def block_graph(self) -> Mapping[str, Any]:
        """``x-debug-query-block-graph``: every node, and every edge with its permissions.

        Unstable in name (``x-``) but present from QEMU 4.0 through 7.2 and
        later; the only QMP command that shows which parent uses a node with
        which permissions (``perm``) and lets others use it how
        (``shared-perm``).
        """
        reply = await self.execute("x-debug-query-block-graph")
        return reply if isinstance(reply, dict) else {}

    async def jobs(self) -> list[tuple[str, str]]:
        """``query-jobs``: the (type, status) of every job (``stream``, ``concluded``...).

        Does no I/O on the images.
        """
        reply = await self.execute("query-jobs")
        if not isinstance(reply, list):
            return []
        return [(str(j.get("type")), str(j.get("status"))) for j in reply if isinstance(j, dict)]

    async def named_block_nodes(self) -> list[Mapping[str, Any]]:
        """``query-named-block-nodes`` (flat): every node with its driver and file name."""
        reply = await self.execute("query-named-block-nodes", {"flat": True})
        return [node for node in reply if isinstance(node, dict)] if isinstance(reply, list) else []

    async def pass_fd(self, fd: int, name: str) -> None:
        """Give QEMU a copy of descriptor *fd*, kept under *name* (QMP ``getfd``).

        The copy travels as SCM_RIGHTS over the monitor's unix socket.  QEMU
        keeps it in the monitor until ``closefd`` or until it exits, also
        after this client disconnects (unlike ``add-fd`` sets, which QEMU
        closes when no client is left).  A name passed again replaces the
        older descriptor.
        """
        if self.closed:
            raise MonitorClosed(self.path, "cannot pass a descriptor: QEMU closed its monitor")
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError) as exc:
            raise MonitorClosed(self.path, f"cannot pass a descriptor: {exc}") from None
        await self.execute("getfd", {"fdname": name})

    async def close_fd(self, name: str) -> None:
        """Close the descriptor QEMU keeps under *name* (QMP ``closefd``)."""
        await self.execute("closefd", {"fdname": name})

    # -- events -------------------------------------------------------------

    def listen(self, names: Collection[str]) -> EventListener:
        """A listener of its own for the events *names*, beside the watched ones.

        For a watcher that must not take events from the queue that
        :meth:`next_event` serves (the migration handoff's).  Remove it
        with :meth:`unlisten`.
        """
        listener = EventListener(names=sorted(names))
        self._client.register_listener(listener)
        return listener

    def unlisten(self, listener: EventListener) -> None:
        with contextlib.suppress(Exception):
            self._client.remove_listener(listener)

    async def next_event(
        self, names: Collection[str] | None = None, *, timeout: float | None = None
    ) -> Event:
        """The next recorded event (of ``names``, others are dropped).

        Raises :class:`MonitorClosed` once QEMU has gone and no event is
        left, and TimeoutError after ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while True:
                event = await self._get_event()
                if names is None or event.name in names:
                    return event

    def pending_events(self) -> list[Event]:
        """Take every event already received without waiting."""
        self._absorb()
        events = list(self._pending)
        self._pending.clear()
        self._arrived.clear()
        return events

    @property
    def history(self) -> list[Event]:
        """Every watched event received since connecting, consumed or not."""
        return [Event.from_message(msg) for msg in self._listener.history]

    async def _pump(self) -> None:
        """Move events from qemu.qmp's listener to our queue, and say so.

        Waiters wait on :attr:`_arrived`, never on the listener itself: a
        waiter cancelled (by a timeout) just as an event came in would
        otherwise take that event with it.
        """
        while True:
            self._pending.append(Event.from_message(await self._listener.get()))
            self._arrived.set()

    def _absorb(self) -> None:
        """Take what the listener holds and the pump has not moved yet."""
        self._pending.extend(Event.from_message(msg) for msg in self._listener.clear())

    async def _get_event(self) -> Event:
        while True:
            self._absorb()
            if self._pending:
                event = self._pending.popleft()
                if not self._pending:
                    self._arrived.clear()
                return event
            if self.closed:
                raise MonitorClosed(self.path, "QEMU closed its monitor")
            arrived = asyncio.ensure_future(self._arrived.wait())
            gone = asyncio.ensure_future(self._gone.wait())
            try:
                await asyncio.wait({arrived, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                arrived.cancel()
                gone.cancel()

    # -- waiting ------------------------------------------------------------

    async def wait_runstate(
        self,
        states: Collection[str],
        *,
        among: bool = True,
        timeout: float | None = None,
        poll_interval: float = POLL_INTERVAL,
    ) -> RunState:
        """Poll ``query-status`` until the run state is one of ``states`` (not *among*: none).

        Polling, because QEMU sends no event for most run state changes
        (``finish-migrate`` → ``postmigrate``, ``inmigrate`` → ``paused``).
        """
        async with asyncio.timeout(timeout):
            while True:
                state = await self.query_status()
                if (state.status in states) is among:
                    return state
                await asyncio.sleep(poll_interval)

    async def wait_migration(self, *, timeout: float | None = None) -> MigrationOutcome:
        """Wait for the next MIGRATION event with a terminal status (source side).

        Needs MIGRATION events on (:meth:`enable_migration_events`) before
        the migration starts.  For ``completed`` it then waits for the run
        state to leave ``finish-migrate`` (it becomes ``postmigrate``); for
        a failure it waits for the source to settle back (``running`` when
        it was running).
        """
        async with asyncio.timeout(timeout):
            while True:
                event = await self.next_event({EVENT_MIGRATION})
                if event.migration_status in MIGRATION_TERMINAL:
                    break
        return await self.settle(event.migration_status or "")

    async def settle(self, status: str) -> MigrationOutcome:
        """The outcome of a migration that ended with ``status`` (source side).

        Waits (up to :data:`SETTLE_TIMEOUT`) for the run state to leave
        ``finish-migrate``: QEMU announces ``completed`` before it sets
        ``postmigrate``, and a failure before it resumes the guest.
        """
        try:
            state = await self.wait_runstate(
                {RunStatus.FINISH_MIGRATE}, among=False, timeout=SETTLE_TIMEOUT
            )
        except TimeoutError:
            raise MonitorError(
                self.path, f"migration {status} but the VM stayed in "
                f"{RunStatus.FINISH_MIGRATE} for {SETTLE_TIMEOUT:g} s",
            ) from None  # fmt: skip
        error = None
        if status != MigrationStatus.COMPLETED:
            desc = (await self.query_migrate()).get("error-desc")
            error = desc if isinstance(desc, str) else None
        return MigrationOutcome(status, state, error)

    async def wait_incoming(self, *, timeout: float | None = None) -> None:
        """Wait until the incoming migration has completed (destination side).

        The quick signal is the ``completed`` event: QEMU sets the run state
        before it announces it, so nothing more need be asked, and the
        guest's downtime does not wait for another round trip.  The other
        is the run state leaving ``inmigrate``, confirmed by
        ``query-migrate`` saying ``completed``: it is seen even when the
        migration finished before this monitor was connected, and it does
        not depend on MIGRATION events; the ``completed`` event QEMU sent
        before (when events were on) is consumed then, so that a later
        :func:`watch_source` does not take it for an outgoing migration.
        Raises :class:`MonitorClosed` when QEMU exits (which is what QEMU
        7.2 does when an incoming migration fails).
        """
        saw_completed = False
        try:
            async with asyncio.timeout(timeout):
                state = await self.query_status()
                while state.status == RunStatus.INMIGRATE and not saw_completed:
                    # Events make this quick; the poll covers a migration
                    # whose events are off or were sent before we listened.
                    try:
                        event = await self.next_event(timeout=INCOMING_POLL_INTERVAL)
                    except TimeoutError:
                        state = await self.query_status()
                        continue
                    saw_completed = event.migration_status == MigrationStatus.COMPLETED
        except MonitorClosed:
            raise MonitorClosed(
                self.path, "QEMU exited before the incoming migration completed "
                "(QEMU ends when an incoming migration fails)",
            ) from None  # fmt: skip
        # Left inmigrate: with events on, the completed event came before
        # the reply that said so, and is consumed here.
        self._absorb()
        while not saw_completed and self._pending:
            saw_completed = self._pending.popleft().migration_status == MigrationStatus.COMPLETED
        if not self._pending:
            self._arrived.clear()
        if saw_completed:
            return
        status = await self.migration_status()
        if status != MigrationStatus.COMPLETED:
            raise MonitorError(
                self.path, f"left {RunStatus.INMIGRATE} for {state.status} with migration "
                f"status {status}",
            )  # fmt: skip


# --------------------------------------------------------------------------
# Handoff watchers


async def watch_source(
    monitor: Monitor,
    *,
    release: Hook,
    reclaim: Hook,
    on_outcome: Callable[[MigrationOutcome], object] | None = None,
) -> None:
    """Follow a VM that may migrate away; release its claim when it has.

    Turns MIGRATION events on, then for each migration: on ``completed``
    (the images are inactive and the VM is stopped in ``finish-migrate``,
    on its way to ``postmigrate``) call ``release`` at once; on
    ``failed``/``cancelled`` keep the claim.  If the VM runs again after
    a release (``RESUME``), call ``reclaim``; when that raises, the VM is
    stopped and the exception propagates.  Returns when QEMU exits; raises
    what ``release`` raises.  ``on_outcome`` hears of every migration's
    end (for logs); it runs on the monitor's event loop and must not block.
    """
    await monitor.enable_migration_events()
    released = False
    # A migration started before this monitor was connected (at once after
    # QEMU's start) may have completed already: its events went elsewhere.
    if (
        await monitor.migration_status() == MigrationStatus.COMPLETED
        and (await monitor.query_status()).status == RunStatus.POSTMIGRATE
    ):
        await _call_hook(release)
        released = True
    while True:
        try:
            event = await monitor.next_event({EVENT_MIGRATION, EVENT_RESUME})
        except MonitorClosed:
            return
        if event.name == EVENT_RESUME:
            if released:
                try:
                    await _call_hook(reclaim)
                except Exception:  # not on cancellation: closing must not stop the VM
                    with contextlib.suppress(MonitorError):
                        await monitor.stop()
                    raise
                released = False
            continue
        status = event.migration_status
        if status not in MIGRATION_TERMINAL:
            continue
        if status == MigrationStatus.COMPLETED and not released:
            state = await monitor.query_status()
            if state.status not in (RunStatus.FINISH_MIGRATE, RunStatus.POSTMIGRATE):
                # A snapshot that QEMU makes as a migration (savevm,
                # snapshot-save, background-snapshot) completes too, but
                # the guest keeps its images and runs on: nothing to hand over.
                if on_outcome is not None:
                    on_outcome(MigrationOutcome(status, state))
                continue
        if status == MigrationStatus.COMPLETED and not released:
            # The images are inactive, and the guest is stopped in
            # finish-migrate, from which nothing resumes it ("migration is
            # not finalized yet"): the destination may take over now.
            # Waiting for postmigrate first would add to the guest's downtime.
            await _call_hook(release)
            released = True
        try:
            outcome = await monitor.settle(status or "")
        except MonitorClosed:
            return  # QEMU quit right after the handoff, as management does
        if on_outcome is not None:
            on_outcome(outcome)


async def watch_destination(
    monitor: Monitor,
    *,
    claim: Hook,
    resume: bool,
    timeout: float | None = None,
) -> MigrationOutcome:
    """Take over a VM arriving by migration: wait, ``claim``, then resume it.

    QEMU must have been started with ``-incoming`` and ``-S`` (so the guest
    cannot run before the claim).  Turns MIGRATION events on, waits for
    the incoming migration to complete (:meth:`Monitor.wait_incoming`,
    ``timeout`` bounds that wait), calls ``claim``, and then ``cont`` when
    ``resume`` is true (the user did not ask for ``-S`` and the guest came
    over running).  If ``claim`` raises, the guest stays paused and the
    exception propagates: the caller should then end QEMU.

    QEMU does not tell a destination whether the guest was running on the
    source: with ``-S`` both cases end ``paused``.  So ``resume`` also
    resumes a guest that was paused on the source; a caller that knows
    better passes ``resume=False``.
    """
    await monitor.enable_migration_events()
    await monitor.wait_incoming(timeout=timeout)
    await _call_hook(claim)
    if resume:
        # With -S the guest cannot be running yet: no need to ask first.
        await monitor.cont()
    return MigrationOutcome(MigrationStatus.COMPLETED, await monitor.query_status())


# --------------------------------------------------------------------------
# For synchronous callers


class MonitorThread:
    """A :class:`Monitor` running on its own event loop in a background thread.

    For synchronous code such as ``imglock run``, whose main thread waits
    for the QEMU child and forwards signals::

        with MonitorThread.connect(sock, process=child) as monitor:
            watcher = monitor.start(watch_destination, claim=claim, resume=True)
            watcher.add_done_callback(...)   # runs in the monitor thread
            ...
            monitor.stop()                   # from any thread, e.g. on lock loss

    Methods block the calling thread until QEMU answers; :meth:`start`
    returns a :class:`concurrent.futures.Future`.  :meth:`close` cancels
    what is still running (calls waiting in other threads then raise
    :class:`MonitorClosed`) and ends the thread.  Both threads are daemon
    threads, as are those running hooks, so none of them keeps the process
    alive.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="imglock-qmp", daemon=True)
        self._monitor: Monitor | None = None
        self._path: str | None = None
        # Guards _closing: no coroutine is submitted once close() has begun,
        # so close() can cancel everything that was.
        self._lock = threading.Lock()
        self._closing = False
        self._thread.start()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        timeout: float = 10.0,
        process: ProcessLike | None = None,
    ) -> MonitorThread:
        """Start the thread and connect (see :meth:`Monitor.connect`)."""
        thread = cls()
        thread._path = os.fspath(path)
        try:
            thread._monitor = thread.call(Monitor.connect(path, timeout=timeout, process=process))
        except BaseException:
            thread.close()
            raise
        return thread

    @property
    def monitor(self) -> Monitor:
        """The monitor; use it only from coroutines run by :meth:`call`/:meth:`start`."""
        if self._monitor is None:
            raise MonitorError(self._path, "not connected")
        return self._monitor

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        with self._lock:
            if self._closing:
                coro.close()
                raise MonitorClosed(self._path, "the monitor was closed")
            return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the monitor's loop and wait for its result."""
        future = self._submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"QMP call did not finish within {timeout} s") from None
        except concurrent.futures.CancelledError:
            raise MonitorClosed(self._path, "the monitor was closed") from None

    def start(
        self, watcher: Callable[..., Awaitable[T]], /, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        """Run ``watcher(self.monitor, **kwargs)`` in the background; return its Future."""
        monitor = self.monitor

        async def run() -> T:
            return await watcher(monitor, **kwargs)

        return self._submit(run())

    def query_status(self, timeout: float | None = None) -> RunState:
        """See :meth:`Monitor.query_status`."""
        return self.call(self.monitor.query_status(), timeout)

    def stop(self, timeout: float | None = None) -> None:
        """Pause the guest (see :meth:`Monitor.halt`); for a claim that was lost."""
        self.call(self.monitor.halt(), timeout)

    def cont(self, timeout: float | None = None) -> None:
        """Resume the guest."""
        self.call(self.monitor.cont(), timeout)

    def close(self) -> None:
        """Cancel running watchers and calls, close the session, end the thread."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _shutdown(self) -> None:
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._monitor is not None:
            await self._monitor.close()

    def __enter__(self) -> MonitorThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --------------------------------------------------------------------------
# Helpers


async def _quietly_disconnect(client: QMPClient) -> None:
    """Disconnect, swallowing the reader's EOF that disconnect() re-raises."""
    with contextlib.suppress(Exception):
        await client.disconnect()


def _describe_exception(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "no greeting"
    cause = exc.exc if hasattr(exc, "exc") else exc
    return str(cause) or type(cause).__name__


def _describe_status(status: int) -> str:
    if status < 0:
        return f"signal {-status}"
    return f"status {status}"


__all__ = [
    "CAPABILITY_EVENTS",
    "CAPABILITY_LATE_BLOCK_ACTIVATE",
    "CommandFailed",
    "Event",
    "MigrationOutcome",
    "Monitor",
    "MonitorClosed",
    "MonitorError",
    "MonitorThread",
    "ProcessLike",
    "RunState",
    "watch_destination",
    "watch_source",
]
