"""imglock.qemu.monitor against real QEMU 7.2 VMs: QMP basics and migration handoffs.

The migration tests run a source VM and a destination (``-incoming
unix:...`` and ``-S``, as ``imglock run`` starts it) on one image, migrate
over a unix socket, and check what each side goes through.  ``claim`` and
``release`` stand in for the lock library: the destination's claim waits
for the source's release, as a real claim waits for the lock.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from processes import holds_for, wait_until
from qemu_vm import NONE_MACHINE, TINY_PC, QemuVM, QemuVMs, ofd_lock_bytes

from imglock.qemu.monitor import (
    CAPABILITY_EVENTS,
    EVENT_RESUME,
    EVENT_STOP,
    CommandFailed,
    Event,
    MigrationOutcome,
    MigrationStatus,
    Monitor,
    MonitorClosed,
    MonitorError,
    MonitorThread,
    RunState,
    watch_destination,
    watch_source,
)

pytestmark = pytest.mark.qemu

# QEMU's lock bytes (see DESIGN.md): 100 + permission held, 200 + permission
# refused to others; permission 1 is "write".
QEMU_LOCK_WRITE = 101
QEMU_WRITER_QCOW2 = {100, 101, 103, 201, 203}

HANDOFF_TIMEOUT = 10.0


@pytest.fixture
def qcow2_image(qemu_vms: QemuVMs, qemu_img: Any) -> str:
    path = qemu_vms.path("disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    return path


def disk_args(image: str) -> list[str]:
    return [*TINY_PC, "-drive", f"file={image},format=qcow2,if=virtio"]


# --------------------------------------------------------------------------
# Connecting


def test_connect_waits_for_the_socket_then_stop_and_cont(qemu_vms: QemuVMs) -> None:
    vm = qemu_vms.start(TINY_PC, freeze_cpu=True)
    # Connect at once: QEMU has most likely not created its socket yet.
    with vm.connect() as monitor:
        assert monitor.query_status() == RunState(running=False, status="prelaunch")
        monitor.cont()
        assert monitor.query_status() == RunState(running=True, status="running")
        monitor.stop()
        assert monitor.query_status() == RunState(running=False, status="paused")
        monitor.cont()
        assert monitor.query_status().running
        names = [e.name for e in monitor.monitor.history]
        assert names == [EVENT_RESUME, EVENT_STOP, EVENT_RESUME]


def test_connect_to_a_qemu_that_dies_fails_fast(qemu_vms: QemuVMs) -> None:
    vm = qemu_vms.start(["-M", "no-such-machine"])
    started = time.monotonic()
    with pytest.raises(MonitorError, match=r"exited with status 1 before its QMP monitor"):
        MonitorThread.connect(vm.qmp_path, timeout=15, process=vm.process)
    assert time.monotonic() - started < 3
    assert "unsupported machine type" in vm.log()


def test_connect_to_a_killed_qemu_names_the_signal(qemu_vms: QemuVMs) -> None:
    vm = qemu_vms.start(TINY_PC)
    vm.process.kill()
    vm.process.wait()
    with pytest.raises(MonitorError, match="signal 9"):
        asyncio.run(Monitor.connect(vm.qmp_path, timeout=15, process=vm.process))


def test_connect_without_a_socket_times_out(qemu_vms: QemuVMs) -> None:
    started = time.monotonic()
    with pytest.raises(MonitorError, match=r"did not answer within 0.3 s"):
        asyncio.run(Monitor.connect(qemu_vms.path("absent.qmp"), timeout=0.3))
    assert time.monotonic() - started < 2


def test_connect_to_a_silent_socket_times_out(qemu_vms: QemuVMs) -> None:
    path = qemu_vms.path("silent.qmp")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(4)  # accepts connections, never greets
        started = time.monotonic()
        with pytest.raises(MonitorError, match="no greeting"):
            asyncio.run(Monitor.connect(path, timeout=0.5))
        assert time.monotonic() - started < 2


def test_commands_after_qemu_exits_raise_monitor_closed(qemu_vms: QemuVMs) -> None:
    vm = qemu_vms.start(TINY_PC)

    async def scenario() -> None:
        async with await Monitor.connect(vm.qmp_path, process=vm.process) as monitor:
            assert (await monitor.query_status()).running
            vm.process.kill()
            with pytest.raises(MonitorClosed):
                await asyncio.wait_for(monitor.next_event(), 5)
            with pytest.raises(MonitorClosed):
                await monitor.query_status()

    asyncio.run(scenario())


def test_qmp_errors_are_command_failed(qemu_vms: QemuVMs) -> None:
    vm = qemu_vms.start(NONE_MACHINE)
    with vm.connect() as monitor:
        with pytest.raises(CommandFailed, match="no-such-command") as info:
            monitor.call(monitor.monitor.execute("no-such-command"))
        assert info.value.error_class == "CommandNotFound"
        assert info.value.filename == vm.qmp_path


def test_the_users_own_qmp_monitor_keeps_working(qemu_vms: QemuVMs) -> None:
    user_socket = qemu_vms.path("user.qmp")
    vm = qemu_vms.start([*NONE_MACHINE, "-qmp", f"unix:{user_socket},server=on,wait=off"])
    with vm.connect() as ours:
        theirs = MonitorThread.connect(user_socket, process=vm.process)
        try:
            assert theirs.query_status() == ours.query_status()
        finally:
            theirs.close()


# --------------------------------------------------------------------------
# Migration


@dataclass
class Handoff:
    """A source and a destination VM on one image, and a record of the handoff."""

    source: QemuVM
    dest: QemuVM
    src_mon: MonitorThread
    dst_mon: MonitorThread
    uri: str
    image: str
    released: threading.Event = field(default_factory=threading.Event)
    log: list[tuple[str, float, Any]] = field(default_factory=list)

    def note(self, what: str, detail: Any = None) -> None:
        self.log.append((what, time.monotonic(), detail))

    def release(self) -> None:
        self.note(
            "release", (self.src_mon.query_status(), ofd_lock_bytes(self.source.pid, self.image))
        )
        self.released.set()

    def claim(self) -> None:
        # A real claim waits for the lock; this one waits for the release.
        assert self.released.wait(HANDOFF_TIMEOUT), "the source never released"
        self.note(
            "claim",
            (
                self.dst_mon.query_status(),
                ofd_lock_bytes(self.dest.pid, self.image),
                ofd_lock_bytes(self.source.pid, self.image),
            ),
        )

    def migrate(self) -> None:
        self.note("migrate")
        self.src_mon.call(self.src_mon.monitor.execute("migrate", {"uri": self.uri}))


@pytest.fixture
def handoff(qemu_vms: QemuVMs, qcow2_image: str) -> Iterator[Handoff]:
    uri = f"unix:{qemu_vms.path('migrate.sock')}"
    source = qemu_vms.start(disk_args(qcow2_image), name="source")
    dest = qemu_vms.start([*disk_args(qcow2_image), "-incoming", uri], name="dest",
                          freeze_cpu=True)  # fmt: skip
    src_mon, dst_mon = source.connect(), dest.connect()
    # The watchers turn events on themselves; doing it here first means a
    # migration issued right after starting them cannot beat them to it.
    for monitor in (src_mon, dst_mon):
        monitor.call(monitor.monitor.enable_migration_events())
    yield Handoff(source, dest, src_mon, dst_mon, uri, qcow2_image)


def _sequence(events: list[Event]) -> list[str]:
    return [e.migration_status or e.name for e in events]


def _subsequence(wanted: list[str], seen: list[str]) -> bool:
    remaining = iter(seen)
    return all(item in remaining for item in wanted)


def test_live_migration_handoff(handoff: Handoff) -> None:
    outcomes: list[MigrationOutcome] = []
    src_watch = handoff.src_mon.start(
        watch_source, release=handoff.release, reclaim=lambda: None, on_outcome=outcomes.append
    )
    dst_watch = handoff.dst_mon.start(watch_destination, claim=handoff.claim, resume=True)
    assert handoff.src_mon.query_status().status == "running"
    assert handoff.dst_mon.query_status().status == "inmigrate"
    # Before: the source writes the image; the destination holds no lock.
    assert ofd_lock_bytes(handoff.source.pid, handoff.image) == QEMU_WRITER_QCOW2
    assert ofd_lock_bytes(handoff.dest.pid, handoff.image) == set()

    handoff.migrate()
    arrived = dst_watch.result(HANDOFF_TIMEOUT)
    assert arrived.completed and arrived.runstate == RunState(True, "running")

    (release_at, (src_state, src_bytes)), (claim_at, (dst_state, dst_bytes, src_bytes2)) = (
        (when, detail) for what, when, detail in handoff.log if what in ("release", "claim")
    )
    # The source released as soon as it said completed, its guest stopped
    # and its images inactive: it keeps only the "consistent read" byte.
    assert src_state in (RunState(False, "finish-migrate"), RunState(False, "postmigrate"))
    assert src_bytes == src_bytes2 == {100}
    # QEMU 7.2 activates the destination's images at completion even with
    # -S: it holds a writer's lock bytes before it is resumed.
    assert dst_state == RunState(False, "paused")
    assert dst_bytes == QEMU_WRITER_QCOW2
    assert release_at <= claim_at
    assert outcomes == [MigrationOutcome(MigrationStatus.COMPLETED, RunState(False, "postmigrate"))]

    src_seen = _sequence(handoff.src_mon.monitor.history)
    dst_seen = _sequence(handoff.dst_mon.monitor.history)
    assert _subsequence(["setup", "active", EVENT_STOP, "completed"], src_seen), src_seen
    assert EVENT_RESUME not in src_seen
    assert _subsequence(["active", "completed", EVENT_RESUME], dst_seen), dst_seen
    assert EVENT_STOP not in dst_seen

    # Guest downtime: from the source's STOP to the destination's RESUME,
    # both stamped by QEMU with the host's clock.
    stop = next(e for e in handoff.src_mon.monitor.history if e.name == EVENT_STOP)
    resume = next(e for e in handoff.dst_mon.monitor.history if e.name == EVENT_RESUME)
    assert 0 < resume.timestamp - stop.timestamp < 5
    migrate_at = handoff.log[0][1]
    print(
        f"\nQEMU 7.2 handoff: STOP->RESUME {1000 * (resume.timestamp - stop.timestamp):.1f} ms,"
        f" migrate->release {1000 * (release_at - migrate_at):.1f} ms,"
        f" migrate->claim {1000 * (claim_at - migrate_at):.1f} ms;"
        f" source {src_seen}, destination {dst_seen}"
    )

    # With the destination holding the image, QEMU refuses to resume the source.
    with pytest.raises(CommandFailed, match='Failed to get "write" lock'):
        handoff.src_mon.cont()
    assert not src_watch.done()
    handoff.src_mon.call(handoff.src_mon.monitor.execute("quit"))
    assert src_watch.result(HANDOFF_TIMEOUT) is None  # ends when QEMU exits
    assert handoff.source.wait(5) == 0


# QEMU 7.2's lock bytes through a handoff: (source before, source after,
# destination at completion with -S, destination after cont).
HANDOFF_LOCK_BYTES = {
    "qcow2": (QEMU_WRITER_QCOW2, {100}, QEMU_WRITER_QCOW2, QEMU_WRITER_QCOW2),
    "raw": ({100, 101, 201}, set(), {100, 101}, {100, 101, 201}),
}


@pytest.mark.parametrize("fmt", sorted(HANDOFF_LOCK_BYTES))
def test_qemu_lock_bytes_through_a_handoff(fmt: str, qemu_vms: QemuVMs, qemu_img: Any) -> None:
    image = qemu_vms.path(f"disk.{fmt}")
    qemu_img("create", "-q", "-f", fmt, image, "1M")
    args = [*TINY_PC, "-drive", f"file={image},format={fmt},if=virtio"]
    uri = f"unix:{qemu_vms.path('migrate.sock')}"
    source = qemu_vms.start(args, name="source")
    dest = qemu_vms.start([*args, "-incoming", uri], name="dest", freeze_cpu=True)
    src_mon, dst_mon = source.connect(), dest.connect()
    src_before = ofd_lock_bytes(source.pid, image)
    src_mon.call(src_mon.monitor.execute("migrate", {"uri": uri}))
    dst_mon.call(dst_mon.monitor.wait_incoming(timeout=HANDOFF_TIMEOUT))
    src_mon.call(src_mon.monitor.wait_runstate({"postmigrate"}, timeout=5))
    observed = [src_before, ofd_lock_bytes(source.pid, image), ofd_lock_bytes(dest.pid, image)]
    dst_mon.cont()
    observed.append(ofd_lock_bytes(dest.pid, image))
    assert tuple(observed) == HANDOFF_LOCK_BYTES[fmt]


def test_destination_of_a_user_who_asked_for_S_stays_paused(handoff: Handoff) -> None:
    handoff.released.set()
    dst_watch = handoff.dst_mon.start(watch_destination, claim=handoff.claim, resume=False)
    handoff.migrate()
    assert dst_watch.result(HANDOFF_TIMEOUT).runstate == RunState(False, "paused")
    assert handoff.dst_mon.query_status() == RunState(False, "paused")


def test_late_block_activate_defers_the_destination_locks_to_cont(handoff: Handoff) -> None:
    handoff.dst_mon.call(handoff.dst_mon.monitor.set_migration_capabilities(
        late_block_activate=True))  # fmt: skip
    handoff.released.set()
    dst_watch = handoff.dst_mon.start(watch_destination, claim=handoff.claim, resume=True)
    handoff.migrate()
    assert dst_watch.result(HANDOFF_TIMEOUT).runstate.running
    ((_, _, (state, dst_bytes, _)),) = [entry for entry in handoff.log if entry[0] == "claim"]
    assert state == RunState(False, "paused")
    assert dst_bytes == set()  # nothing active until cont
    assert ofd_lock_bytes(handoff.dest.pid, handoff.image) == QEMU_WRITER_QCOW2


def test_incoming_that_completed_before_the_watch_is_seen(handoff: Handoff) -> None:
    handoff.dst_mon.call(handoff.dst_mon.monitor.set_migration_capabilities(events=False))
    handoff.migrate()
    handoff.dst_mon.call(handoff.dst_mon.monitor.wait_runstate({"paused"}, timeout=10))
    handoff.released.set()
    outcome = handoff.dst_mon.start(watch_destination, claim=handoff.claim, resume=True).result(
        HANDOFF_TIMEOUT
    )
    assert outcome.completed and outcome.runstate.running


def test_wait_incoming_is_bounded(handoff: Handoff) -> None:
    with pytest.raises(TimeoutError):
        handoff.dst_mon.call(handoff.dst_mon.monitor.wait_incoming(timeout=0.2))


def test_cancelled_migration_leaves_the_source_running(handoff: Handoff) -> None:
    outcomes: list[MigrationOutcome] = []
    src_watch = handoff.src_mon.start(
        watch_source, release=handoff.release, reclaim=lambda: None, on_outcome=outcomes.append
    )
    dst_watch = handoff.dst_mon.start(watch_destination, claim=handoff.claim, resume=True)
    # 64 MiB of guest RAM at 1 MiB/s: still active when cancelled.
    handoff.src_mon.call(
        handoff.src_mon.monitor.execute("migrate-set-parameters", {"max-bandwidth": 1 << 20})
    )
    handoff.migrate()
    monitor = handoff.src_mon.monitor
    handoff.src_mon.call(monitor.wait_runstate({"running"}, timeout=5))
    wait_until(
        lambda: handoff.src_mon.call(monitor.migration_status()) == "active",
        what="the migration to be active",
        timeout=5,
    )
    handoff.src_mon.call(monitor.execute("migrate_cancel"))

    # A destination whose incoming migration fails exits (QEMU 7.2).
    with pytest.raises(MonitorClosed, match="before the incoming migration completed"):
        dst_watch.result(HANDOFF_TIMEOUT)
    assert handoff.dest.wait(5) == 1
    wait_until(lambda: outcomes, what="the migration's outcome", timeout=5)
    assert outcomes == [MigrationOutcome(MigrationStatus.CANCELLED, RunState(True, "running"))]
    assert not handoff.released.is_set()
    assert handoff.src_mon.query_status() == RunState(True, "running")
    assert ofd_lock_bytes(handoff.source.pid, handoff.image) == QEMU_WRITER_QCOW2
    seen = _sequence(handoff.src_mon.monitor.history)
    assert _subsequence(["setup", "active", "cancelling", "cancelled"], seen), seen
    assert EVENT_STOP not in seen
    assert not src_watch.done()


def test_failed_migration_leaves_the_source_running(handoff: Handoff, qemu_vms: QemuVMs) -> None:
    outcomes: list[MigrationOutcome] = []
    handoff.src_mon.start(
        watch_source, release=handoff.release, reclaim=lambda: None, on_outcome=outcomes.append
    )
    handoff.uri = f"unix:{qemu_vms.path('nobody-listens.sock')}"
    handoff.migrate()
    wait_until(lambda: outcomes, what="the migration's outcome", timeout=5)
    (outcome,) = outcomes
    assert outcome.status == MigrationStatus.FAILED
    assert outcome.runstate == RunState(True, "running")
    assert outcome.error is not None and "nobody-listens.sock" in outcome.error
    assert not handoff.released.is_set()


def test_wait_migration_reports_a_failure(qemu_vms: QemuVMs) -> None:
    vm = qemu_vms.start(TINY_PC)

    async def scenario() -> MigrationOutcome:
        async with await Monitor.connect(vm.qmp_path, process=vm.process) as monitor:
            await monitor.enable_migration_events()
            await monitor.execute("migrate", {"uri": f"unix:{qemu_vms.path('none.sock')}"})
            return await monitor.wait_migration(timeout=5)

    outcome = asyncio.run(scenario())
    assert outcome.status == MigrationStatus.FAILED and not outcome.completed
    assert outcome.runstate == RunState(True, "running")


def test_a_claim_that_fails_leaves_the_destination_paused(handoff: Handoff) -> None:
    def refuse() -> None:
        raise RuntimeError("held by someone else")

    handoff.src_mon.start(watch_source, release=handoff.release, reclaim=lambda: None)
    dst_watch = handoff.dst_mon.start(watch_destination, claim=refuse, resume=True)
    handoff.migrate()
    with pytest.raises(RuntimeError, match="someone else"):
        dst_watch.result(HANDOFF_TIMEOUT)
    assert handoff.dst_mon.query_status() == RunState(False, "paused")


def test_source_resumed_after_the_handoff_claims_again(handoff: Handoff) -> None:
    reclaimed = threading.Event()
    src_watch = handoff.src_mon.start(watch_source, release=handoff.release, reclaim=reclaimed.set)
    handoff.dst_mon.start(watch_destination, claim=handoff.claim, resume=False)
    handoff.migrate()
    assert handoff.released.wait(HANDOFF_TIMEOUT)
    # The destination gives up (dies); the operator resumes the source.
    handoff.dest.terminate()
    handoff.src_mon.cont()
    assert reclaimed.wait(5)
    assert handoff.src_mon.query_status() == RunState(True, "running")
    assert not src_watch.done()


def test_source_resumed_without_its_claim_is_stopped(handoff: Handoff) -> None:
    def refuse() -> None:
        raise RuntimeError("image is held elsewhere")

    src_watch = handoff.src_mon.start(watch_source, release=handoff.release, reclaim=refuse)
    handoff.dst_mon.start(watch_destination, claim=handoff.claim, resume=False)
    handoff.migrate()
    assert handoff.released.wait(HANDOFF_TIMEOUT)
    handoff.dest.terminate()
    handoff.src_mon.cont()
    with pytest.raises(RuntimeError, match="held elsewhere"):
        src_watch.result(5)
    assert handoff.src_mon.query_status() == RunState(False, "paused")


def test_watchers_accept_coroutine_hooks(handoff: Handoff) -> None:
    calls: list[str] = []

    async def release() -> None:
        calls.append("release")
        handoff.released.set()

    async def claim() -> None:
        await asyncio.to_thread(handoff.released.wait, HANDOFF_TIMEOUT)
        calls.append("claim")

    handoff.src_mon.start(watch_source, release=release, reclaim=lambda: None)
    dst_watch = handoff.dst_mon.start(watch_destination, claim=claim, resume=True)
    handoff.migrate()
    assert dst_watch.result(HANDOFF_TIMEOUT).runstate.running
    assert calls == ["release", "claim"]


def test_events_capability_is_left_alone_when_on(qemu_vms: QemuVMs) -> None:
    vm = qemu_vms.start(NONE_MACHINE)
    with vm.connect() as monitor:
        caps = monitor.call(monitor.monitor.migration_capabilities())
        assert caps[CAPABILITY_EVENTS] is False
        monitor.call(monitor.monitor.enable_migration_events())
        monitor.call(monitor.monitor.enable_migration_events())
        assert monitor.call(monitor.monitor.migration_capabilities())[CAPABILITY_EVENTS]


def test_monitor_thread_close_cancels_watchers_and_calls(handoff: Handoff) -> None:
    src_watch = handoff.src_mon.start(watch_source, release=lambda: None, reclaim=lambda: None)
    handoff.src_mon.close()
    assert src_watch.cancelled()
    with pytest.raises(MonitorClosed):
        handoff.src_mon.query_status()
    handoff.src_mon.close()  # twice is harmless
    assert handoff.source.alive()  # closing the monitor leaves QEMU alone


def test_a_call_waiting_in_another_thread_ends_when_the_monitor_closes(
    qemu_vms: QemuVMs,
) -> None:
    vm = qemu_vms.start(TINY_PC)
    monitor = vm.connect()
    errors: list[BaseException] = []

    def wait_forever() -> None:
        try:
            monitor.call(monitor.monitor.next_event({"NO_SUCH_EVENT"}))
        except BaseException as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait_forever)
    waiter.start()
    holds_for(waiter.is_alive, 0.1, what="the call waits for an event that never comes")
    monitor.close()
    waiter.join(5)
    assert not waiter.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], MonitorClosed)


def test_terminate_ends_a_vm_quickly(qemu_vms: QemuVMs) -> None:
    vm = qemu_vms.start(TINY_PC)
    with vm.connect() as monitor:
        assert monitor.query_status().running
    started = time.monotonic()
    vm.terminate()
    assert time.monotonic() - started < 3
    assert not vm.alive()
