"""Live migration under ``imglock run``: at every moment at most one side holds the claim.

Both QEMUs are real (a tiny PC under TCG), each wrapped by the real
``imglock run``; the test drives the migration through each QEMU's own QMP
monitor (the one on the user's command line, beside the wrapper's) and
watches the image's holders from outside, as an operator's
``imglock status`` would, every millisecond or so.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from processes import holds_for, state, wait_until
from qemu_vm import TINY_PC
from wrapped_vm import TIMEOUT, Watcher, WrappedVM, WrappedVMs

import imglock
from imglock.api import Claim, ClaimSpec
from imglock.lock import fcntl_locks, protocol
from imglock.lock.identity import Owner
from imglock.lock.protocol import Layer, Mode
from imglock.run.reporter import Reporter
from imglock.run.session import ClaimSession

pytestmark = pytest.mark.qemu

RUNNING = "running"


@dataclass
class Lab:
    """VMs on a qcow2 chain, and the chain's top as any host sees it."""

    vms: WrappedVMs
    image: Path

    def start(
        self,
        name: str,
        *extra: str,
        options: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        wrapped: bool = True,
    ) -> WrappedVM:
        """Start a VM on the image, under ``imglock run`` unless *wrapped* is false."""
        return self.vms.start(
            "-drive", f"file={self.image},if=virtio", *extra,
            name=name, options=("--check-interval", "0.2", *options), machine=TINY_PC, env=env,
            wrapped=wrapped,
        )  # fmt: skip

    def migrate(
        self, source: WrappedVM, name: str, *options: str, env: dict[str, str] | None = None
    ) -> WrappedVM:
        """Start a destination *name* and migrate *source* to it."""
        socket = self.vms.path("migrate.sock")
        dest = self.start(name, "-incoming", f"unix:{socket}", options=options, env=env)
        wait_until(socket.exists, what="the incoming socket", timeout=TIMEOUT)
        source.qmp("migrate", {"uri": f"unix:{socket}"})
        return dest

    def wait_for_claim(self, vm: WrappedVM, what: str) -> None:
        """Wait until *vm*'s QEMU, and it alone, holds the image exclusive."""
        wait_until(lambda: self.exclusive_holders() == [vm.qemu_pid], what=what, timeout=TIMEOUT)

    def exclusive_holders(self) -> list[int]:
        return sorted(
            h.pid or -1
            for h in imglock.holders(self.image)
            if h.layer == "imglock" and h.mode == "exclusive"
        )


def intents(image: Path) -> list[fcntl_locks.RangeLock]:
    """The exclusive intents held on *image*: claimers deciding, a destination announcing."""
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        start = protocol.INTENT_BASE[protocol.Mode.EXCLUSIVE]
        return fcntl_locks.all_conflicting(fd, start, protocol.SLOT_SIZE, str(image))
    finally:
        os.close(fd)


@pytest.fixture
def lab(qemu_system_path: str, qemu_img_path: str, tmp_path: Path) -> Iterator[Lab]:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    create = [qemu_img_path, "create", "-q", "-f", "qcow2"]
    subprocess.run([*create, base, "64M"], check=True)
    subprocess.run([*create, "-b", base.name, "-F", "qcow2", top], check=True)
    with WrappedVMs(qemu_system_path, prefix="imglock-mig-") as vms:
        yield Lab(vms, top)


def test_migration_hands_the_claim_over_and_never_to_two_at_once(lab: Lab) -> None:
    source = lab.start("source")
    lab.wait_for_claim(source, what="the source's claim")
    with Watcher(lab.image) as watcher:
        dest = lab.migrate(source, "dest")
        wait_until(
            lambda: dest.runstate() == RUNNING, what="the destination guest to run", timeout=TIMEOUT
        )
        lab.wait_for_claim(dest, what="the destination's claim")
        samples = watcher.stop()

    gaps = sorted(b[0] - a[0] for a, b in itertools.pairwise(samples))
    # Two cores run two TCG guests here: allow the odd scheduling hiccup.
    assert gaps[len(gaps) * 99 // 100] < 0.005, "the watcher sampled too rarely to mean anything"
    assert max(len(holders) for _t, holders in samples) == 1
    owners = [holders[0] for _t, holders in samples if holders]
    # The claim moved once, from the source to the destination, never back.
    assert owners[0] == source.qemu_pid and owners[-1] == dest.qemu_pid
    assert set(owners) == {source.qemu_pid, dest.qemu_pid}
    switch = owners.index(dest.qemu_pid)
    assert all(pid == dest.qemu_pid for pid in owners[switch:])
    assert source.runstate() == "postmigrate"
    assert source.process.poll() is None  # the source VM is still there, without the claim


def test_the_source_removes_its_record_after_the_switch_over_never_naming_a_holder_by_it(
    lab: Lab,
) -> None:
    # Records are files: removed at the switch-over, they would be file
    # system traffic while the destination activates the image.  The source
    # drops its locks at once and its record a little later; meanwhile the
    # record names nobody.
    source = lab.start("source")
    lab.wait_for_claim(source, what="the source's claim")
    dest = lab.migrate(source, "dest")
    wait_until(
        lambda: dest.runstate() == RUNNING, what="the destination guest to run", timeout=TIMEOUT
    )
    stale_seen = False

    def records_switched() -> bool:
        nonlocal stale_seen
        report = imglock.inspect(lab.image)
        # (The source's QEMU keeps QEMU's "consistent read" byte: a qemu holder.)
        assert source.qemu_pid not in [h.pid for h in report.holders if h.layer == "imglock"]
        stale_pids = [r.pid for r in report.stale_records]
        stale_seen |= source.qemu_pid in stale_pids
        named = [h.command for h in report.holders if h.pid == dest.qemu_pid]
        return not stale_pids and bool(named and named[0])

    wait_until(
        records_switched,
        what="the source's record gone and the destination's in its place",
        timeout=20,
    )
    assert stale_seen  # removed after the switch-over, not during it
    assert source.process.poll() is None


def test_the_destination_announces_its_claim_while_the_migration_runs_and_names_no_one(
    lab: Lab,
) -> None:
    # Its intent stands from the start of the migration, so that the
    # switch-over holds only a test and its holder bytes; an intent is no
    # holder, and it is gone once the guest runs.
    source = lab.start("source")
    lab.wait_for_claim(source, what="the source's claim")
    source.qmp("migrate-set-parameters", {"max-bandwidth": 1 << 20})  # a migration that lasts
    dest = lab.migrate(source, "dest")
    wait_until(lambda: intents(lab.image) != [], what="the destination's intent", timeout=TIMEOUT)
    # The destination announces on its own first event, which may come while
    # the source still reports `setup`: either way the migration still runs.
    assert source.migration() in ("setup", "active")
    assert lab.exclusive_holders() == [source.qemu_pid]
    with pytest.raises(imglock.LockConflict) as refused:
        imglock.claim(lab.image, qemu_locks=False)
    assert [h.pid for h in refused.value.holders] == [source.qemu_pid]
    source.qmp("migrate-set-parameters", {"max-bandwidth": 1 << 40})
    wait_until(
        lambda: dest.runstate() == RUNNING, what="the destination guest to run", timeout=TIMEOUT
    )
    lab.wait_for_claim(dest, what="the destination's claim")
    wait_until(lambda: intents(lab.image) == [], what="the intent withdrawn", timeout=TIMEOUT)


def test_destination_resumes_the_guest_only_once_it_holds_the_claim(lab: Lab) -> None:
    source = lab.start("source")
    lab.wait_for_claim(source, what="the source's claim")
    # Freeze the destination's wrapper right after it has claimed, before `cont`.
    dest = lab.migrate(source, "dest", env={"IMGLOCK_FAULTS": "stop=handoff:claimed"})
    wait_until(
        lambda: state(dest.process.pid) == "T",
        what="the destination wrapper to reach the claimed step",
        timeout=TIMEOUT,
    )
    assert lab.exclusive_holders() == [dest.qemu_pid]
    assert dest.runstate() != RUNNING  # claimed, but not yet resumed
    os.kill(dest.process.pid, signal.SIGCONT)
    wait_until(
        lambda: dest.runstate() == RUNNING, what="the destination guest to run", timeout=TIMEOUT
    )


def test_a_cancelled_migration_leaves_the_claim_with_the_source(lab: Lab) -> None:
    source = lab.start("source")
    lab.wait_for_claim(source, what="the source's claim")
    source.qmp("migrate-set-parameters", {"max-bandwidth": 1 << 20})  # still going at cancel
    dest = lab.migrate(source, "dest")
    wait_until(
        lambda: source.migration() == "active", what="the migration to be active", timeout=TIMEOUT
    )
    source.qmp("migrate_cancel")
    wait_until(lambda: source.migration() == "cancelled", what="the cancellation", timeout=TIMEOUT)
    assert dest.process.wait(timeout=20) != 0  # the destination QEMU gives up
    assert source.runstate() == RUNNING
    assert intents(lab.image) == []  # the destination's announced claim went with it
    holds_for(  # while the source's watcher takes in the outcome
        lambda: lab.exclusive_holders() == [source.qemu_pid],
        0.3,
        what="the claim stays with the source",
    )


def test_a_failed_migration_leaves_the_claim_with_the_source(lab: Lab) -> None:
    source = lab.start("source")
    lab.wait_for_claim(source, what="the source's claim")
    source.qmp("migrate", {"uri": f"unix:{lab.vms.path('nobody-listens.sock')}"})
    wait_until(lambda: source.migration() == "failed", what="the failure", timeout=TIMEOUT)

    def source_runs_and_holds() -> bool:
        assert source.runstate() == RUNNING
        assert lab.exclusive_holders() == [source.qemu_pid]
        return True

    # While the source's watcher takes in the outcome.
    holds_for(source_runs_and_holds, 0.3, what="the source runs on, and keeps the claim")


def test_destination_that_cannot_claim_in_time_stays_paused_and_says_why(lab: Lab) -> None:
    # The source is a QEMU outside imglock, and a reader holds a shared claim:
    # the destination cannot have its exclusive claim when the migration ends.
    source = lab.start("source", wrapped=False)
    blocker = subprocess.Popen(
        [sys.executable, "-c", "import sys, imglock; c = imglock.claim(sys.argv[1], "
         "mode='shared', qemu_locks=False); print('held', flush=True); sys.stdin.read()",
         str(lab.image)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert blocker.stdout is not None
        assert blocker.stdout.readline().strip() == "held"
        dest = lab.migrate(source, "dest", "--handoff-timeout", "0.5")
        wait_until(
            lambda: "stays paused" in dest.stderr(),
            what="the destination to give up",
            timeout=TIMEOUT,
        )
        assert dest.runstate() != RUNNING
        assert lab.exclusive_holders() == []
        (line,) = [x for x in dest.stderr().splitlines() if "stays paused" in x]
        assert str(lab.image) in line and f"pid {blocker.pid}" in line
    finally:
        blocker.kill()
        blocker.wait()


def test_lock_loss_stops_a_qemu_guest_through_qmp(lab: Lab) -> None:
    vm = lab.start("vm", env={"IMGLOCK_FAULTS": "fcntl=EIO,after=1.0"})
    wait_until(lambda: vm.runstate() == RUNNING, what="the guest to run", timeout=TIMEOUT)
    wait_until(
        lambda: vm.runstate() == "paused",
        what="the guest to be paused on lock loss",
        timeout=TIMEOUT,
    )
    wait_until(lambda: "lock lost" in vm.stderr(), what="the message", timeout=TIMEOUT)
    assert "QMP stop" in vm.stderr()


def test_a_source_wrapper_killed_right_after_releasing_leaves_the_handoff_intact(
    lab: Lab,
) -> None:
    # Crash matrix, handoff:released: the source's wrapper dies the moment it
    # has let go; the destination still claims and runs, the image stuck nowhere.
    source = lab.start("source", env={"IMGLOCK_FAULTS": "crash=handoff:released"})
    lab.wait_for_claim(source, what="the source's claim")
    source_qemu = source.qemu_pid
    dest = lab.migrate(source, "dest")
    assert source.process.wait(timeout=20) == -signal.SIGKILL
    wait_until(
        lambda: dest.runstate() == RUNNING, what="the destination guest to run", timeout=TIMEOUT
    )
    lab.wait_for_claim(dest, what="the destination's claim")
    assert source_qemu not in lab.exclusive_holders()


def test_a_destination_wrapper_killed_right_after_claiming_leaves_the_claim_with_its_qemu(
    lab: Lab,
) -> None:
    # Crash matrix, handoff:claimed: the destination's wrapper dies between
    # claiming and `cont`.  Its QEMU inherited the locks: the image is held by
    # a live process (whose guest stays paused), and free once that process ends.
    source = lab.start("source")
    lab.wait_for_claim(source, what="the source's claim")
    dest = lab.migrate(source, "dest", env={"IMGLOCK_FAULTS": "crash=handoff:claimed"})
    dest_qemu = dest.qemu_pid
    assert dest.process.wait(timeout=20) == -signal.SIGKILL
    assert lab.exclusive_holders() == [dest_qemu]
    assert dest.runstate() != RUNNING
    os.kill(dest_qemu, signal.SIGKILL)
    wait_until(lambda: lab.exclusive_holders() == [], what="the image to be free", timeout=TIMEOUT)


@pytest.mark.parametrize("attempt", range(10))
def test_a_migration_started_at_once_after_the_source_starts_is_handed_over(
    lab: Lab, attempt: int
) -> None:
    # A manager may migrate a VM the moment its monitor answers, before the
    # wrapper's own monitor is connected: MIGRATION events are on from
    # QEMU's start, and a migration that completed meanwhile is seen.
    socket = lab.vms.path(f"migrate-{attempt}.sock")
    dest = lab.start(f"dest{attempt}", "-incoming", f"unix:{socket}")
    wait_until(socket.exists, what="the incoming socket", timeout=TIMEOUT)
    source = lab.start(f"source{attempt}")
    source.qmp("migrate", {"uri": f"unix:{socket}"})
    wait_until(
        lambda: dest.runstate() == RUNNING, what="the migrated guest to run", timeout=TIMEOUT
    )
    lab.wait_for_claim(dest, what="the destination's claim")
    assert source.runstate() == "postmigrate"
    assert "handoff stopped" not in source.stderr() + dest.stderr()


def _top_node(vm: WrappedVM) -> str:
    """The node name QEMU gave the top image's qcow2 node (a -drive names none)."""
    nodes = vm.qmp("query-named-block-nodes")
    (node,) = [n["node-name"] for n in nodes if n["drv"] == "qcow2" and n["backing_file_depth"]]
    return str(node)


def _save_with_savevm(vm: WrappedVM) -> None:
    vm.qmp("human-monitor-command", {"command-line": "savevm snap"})


def _save_with_snapshot_save(vm: WrappedVM) -> None:
    node = _top_node(vm)
    vm.qmp("snapshot-save", {"job-id": "snap", "tag": "snap", "vmstate": node, "devices": [node]})
    wait_until(
        lambda: [j["status"] for j in vm.qmp("query-jobs")] == ["concluded"],
        what="the snapshot job to conclude", timeout=TIMEOUT,
    )  # fmt: skip


def _save_with_background_snapshot(vm: WrappedVM) -> None:
    vm.qmp(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "background-snapshot", "state": True}]},
    )
    vm.qmp("migrate", {"uri": "exec:cat > /dev/null"})
    wait_until(lambda: vm.migration() == "completed", what="the snapshot", timeout=TIMEOUT)


@pytest.mark.parametrize(
    "save", [_save_with_savevm, _save_with_snapshot_save, _save_with_background_snapshot]
)
def test_a_snapshot_made_as_a_migration_keeps_the_claim(lab: Lab, save: object) -> None:
    # QEMU makes these snapshots with its migration code, and says
    # "completed" at the end; the guest keeps its images and runs on.
    vm = lab.start("vm")
    lab.wait_for_claim(vm, what="the VM's claim")
    save(vm)  # type: ignore[operator]
    wait_until(
        lambda: "a snapshot completed" in vm.stderr(), what="the wrapper to see it", timeout=TIMEOUT
    )
    assert vm.runstate() == RUNNING
    assert lab.exclusive_holders() == [vm.qemu_pid]
    assert "claim released" not in vm.stderr()


# --- The destination's claim during the migration, at the session's level ---------------


def _destination(image: Path) -> ClaimSession:
    """A migration destination's session on *image*, prepared and announced."""
    claim = Claim([ClaimSpec(str(image), Mode.EXCLUSIVE)], layers=Layer.IMGLOCK)
    session = ClaimSession(claim, Reporter(note=lambda _line: None))
    session.open()
    session.prepare_arrival()
    session.announce_arrival()
    assert intents(image) != []
    return session


class _MigrationEnd(threading.Event):
    """The migration's end, as :meth:`ClaimSession.claim_early` waits on it between
    attempts; :attr:`polling` is set at its first wait, when its first look is done."""

    def __init__(self) -> None:
        super().__init__()
        self.polling = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.polling.set()
        return super().wait(timeout)


@contextlib.contextmanager
def _source_and_early_destination(image: Path) -> Iterator[tuple[imglock.Claim, ClaimSession]]:
    """A source holding *image*, and a destination trying for it early, in a thread
    that has looked once and found the source in its way (a source that let go
    before that first look would leave nothing to win early)."""
    source = imglock.claim(image, qemu_locks=False)
    session = _destination(image)
    finished = _MigrationEnd()
    early = threading.Thread(target=session.claim_early, args=(finished, 0.005))
    early.start()
    try:
        wait_until(finished.polling.is_set, what="the destination's first look", timeout=TIMEOUT)
        yield source, session
    finally:
        finished.set()
        early.join()
        session.end()
        source.release()


def test_an_announced_destination_wins_the_claim_as_soon_as_the_source_lets_go(
    tmp_path: Path,
) -> None:
    # So that the switch-over, once its QEMU has completed, has no lock call left.
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(4096))
    with _source_and_early_destination(image) as (source, session):
        holds_for(lambda: not session.held, 0.1, what="the destination waits for the source")
        source.release()
        wait_until(lambda: session.held, what="the destination's claim", timeout=TIMEOUT)
        assert [h.pid for h in imglock.holders(image) if h.layer == "imglock"] == [os.getpid()]
        session.take_on_arrival(wait=0, backoff_cap=0.001)  # nothing left to take
        assert session.held
        session.withdraw_arrival()
        assert intents(image) == []


def test_an_announced_destination_with_no_one_to_let_go_claims_only_at_the_switch_over(
    tmp_path: Path,
) -> None:
    # No holder to begin with (a source outside imglock, still running): the
    # claim waits for the switch-over, when the source's QEMU has let go.
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(4096))
    session = _destination(image)
    session.claim_early(threading.Event(), 0.005)
    try:
        assert not session.held and imglock.holders(image) == []
    finally:
        session.end()


def test_a_failed_incoming_migration_gives_up_the_claim_won_meanwhile(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(4096))
    with _source_and_early_destination(image) as (source, session):
        source.release()
        wait_until(lambda: session.held, what="the destination's claim", timeout=TIMEOUT)
        session.abandon_arrival()
        assert not session.held
        assert imglock.holders(image) == [] and intents(image) == []


def test_an_announced_destination_meeting_a_waiter_withdraws_at_once(tmp_path: Path) -> None:
    # A waiter keeps its turn: the destination's early intent does not hold it up.
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(4096))
    waiter_fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        protocol.enqueue(waiter_fd, str(image), Mode.EXCLUSIVE, Owner.current(1))
        session = _destination(image)
        try:
            session.claim_early(threading.Event(), 0.005)
            assert not session.held and intents(image) == []
        finally:
            session.end()
    finally:
        os.close(waiter_fd)
