"""Live migration under ``imglock run``: at every moment at most one side holds the claim.

Both QEMUs are real (a tiny PC under TCG), each wrapped by the real
``imglock run``; the test drives the migration through each QEMU's own QMP
monitor (the one on the user's command line, beside the wrapper's) and
watches the image's holders from outside, as an operator's
``imglock status`` would, every millisecond or so.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from qemu_vm import TINY_PC

import imglock
from imglock.qemu.monitor import MonitorThread

pytestmark = pytest.mark.qemu

RUNNING = "running"


@dataclass
class WrappedVM:
    """``imglock run -- qemu-system-x86_64 ...`` with a QMP monitor of the test's own."""

    wrapper: subprocess.Popen[bytes]
    qmp_path: str
    log_path: Path
    wrapped: bool = True
    monitor: MonitorThread | None = None
    known_qemu_pid: int | None = None

    def connect(self) -> MonitorThread:
        self.monitor = MonitorThread.connect(self.qmp_path, timeout=20, process=self.wrapper)
        return self.monitor

    @property
    def qemu_pid(self) -> int:
        """The wrapped QEMU: the wrapper's only child (remembered, for cleaning up)."""
        if not self.wrapped:
            return self.wrapper.pid
        if self.known_qemu_pid is None:
            with open(f"/proc/{self.wrapper.pid}/task/{self.wrapper.pid}/children") as f:
                (pid,) = f.read().split()
            self.known_qemu_pid = int(pid)
        return self.known_qemu_pid

    def status(self) -> str:
        assert self.monitor is not None
        return self.monitor.query_status().status

    def execute(self, command: str, arguments: dict[str, object] | None = None) -> object:
        assert self.monitor is not None
        return self.monitor.call(self.monitor.monitor.execute(command, arguments))

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Lab:
    """A private directory for sockets, a qcow2 chain, and the VMs started."""

    qemu: str
    dir: Path
    image: Path
    vms: list[WrappedVM] = field(default_factory=list)

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def start(
        self,
        name: str,
        *extra: str,
        options: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        wrapped: bool = True,
    ) -> WrappedVM:
        """Start a VM on the image, under ``imglock run`` unless *wrapped* is false."""
        qmp = self.path(f"{name}.qmp")
        argv = [
            self.qemu, *TINY_PC, "-drive", f"file={self.image},if=virtio",
            "-qmp", f"unix:{qmp},server=on,wait=off", *extra,
        ]  # fmt: skip
        if wrapped:
            wrapper = [sys.executable, "-m", "imglock", "-v", "run", "--check-interval", "0.2"]
            argv = [*wrapper, *options, "--", *argv]
        log_path = self.dir / f"{name}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                env={**os.environ, **(env or {})},
            )  # fmt: skip
        vm = WrappedVM(proc, qmp, log_path, wrapped)
        self.vms.append(vm)
        vm.connect()
        return vm

    def exclusive_holders(self) -> list[int]:
        return sorted(
            h.pid or -1
            for h in imglock.holders(self.image)
            if h.layer == "imglock" and h.mode == "exclusive"
        )

    def close(self) -> None:
        for vm in self.vms:
            if vm.monitor is not None:
                vm.monitor.close()
            # A wrapper killed on purpose leaves its QEMU behind: end that too.
            orphan = [vm.known_qemu_pid] if vm.known_qemu_pid else []
            for pid in [*_tree(vm.wrapper.pid), *orphan]:
                with _quiet():
                    os.kill(pid, signal.SIGKILL)
            vm.wrapper.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _tree(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(p) for p in f.read().split()]
    except OSError:
        return [pid]
    return [pid, *[q for child in children for q in _tree(child)]]


def _quiet() -> object:
    import contextlib

    return contextlib.suppress(ProcessLookupError)


def _until(predicate: Callable[[], object], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what or predicate}")


@pytest.fixture
def lab(qemu_system_path: str, qemu_img_path: str, tmp_path: Path) -> Iterator[Lab]:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    create = [qemu_img_path, "create", "-q", "-f", "qcow2"]
    subprocess.run([*create, base, "64M"], check=True)
    subprocess.run([*create, "-b", base.name, "-F", "qcow2", top], check=True)
    # Unix socket paths are short: keep them in a 0700 directory under /tmp.
    lab = Lab(qemu_system_path, Path(tempfile.mkdtemp(prefix="imglock-mig-")), top)
    try:
        yield lab
    finally:
        lab.close()


class Watcher:
    """tests/lock_sampler.py in a process of its own, sampling the image's exclusive holders."""

    def __init__(self, lab: Lab) -> None:
        sampler = Path(__file__).with_name("lock_sampler.py")
        self.proc = subprocess.Popen(
            [sys.executable, sampler, lab.image],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"

    def stop(self) -> list[tuple[float, list[int]]]:
        out, _ = self.proc.communicate(timeout=30)
        return [(t, pids) for t, pids in json.loads(out)]


def _migrate(lab: Lab, source: WrappedVM, dest_name: str, *options: str) -> WrappedVM:
    uri = f"unix:{lab.path('migrate.sock')}"
    dest = lab.start(dest_name, "-incoming", uri, options=options)
    _until(lambda: os.path.exists(lab.path("migrate.sock")), what="the incoming socket")
    source.execute("migrate", {"uri": uri})
    return dest


def test_migration_hands_the_claim_over_and_never_to_two_at_once(lab: Lab) -> None:
    source = lab.start("source")
    _until(lambda: lab.exclusive_holders() == [source.qemu_pid], what="the source's claim")
    watcher = Watcher(lab)
    dest = _migrate(lab, source, "dest")
    _until(lambda: dest.status() == RUNNING, what="the destination guest to run")
    _until(lambda: lab.exclusive_holders() == [dest.qemu_pid], what="the destination's claim")
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
    assert source.status() == "postmigrate"
    assert source.wrapper.poll() is None  # the source VM is still there, without the claim


def test_the_source_removes_its_record_after_the_switch_over_never_naming_a_holder_by_it(
    lab: Lab,
) -> None:
    # Records are files: removed at the switch-over, they would be file
    # system traffic while the destination activates the image.  The source
    # drops its locks at once and its record a little later; meanwhile the
    # record names nobody.
    source = lab.start("source")
    _until(lambda: lab.exclusive_holders() == [source.qemu_pid], what="the source's claim")
    dest = _migrate(lab, source, "dest")
    _until(lambda: dest.status() == RUNNING, what="the destination guest to run")
    stale_seen = False
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        report = imglock.inspect(lab.image)
        # (The source's QEMU keeps QEMU's "consistent read" byte: a qemu holder.)
        assert source.qemu_pid not in [h.pid for h in report.holders if h.layer == "imglock"]
        stale_pids = [r.pid for r in report.stale_records]
        stale_seen |= source.qemu_pid in stale_pids
        named = [h.command for h in report.holders if h.pid == dest.qemu_pid]
        if not stale_pids and named and named[0]:
            break
        time.sleep(0.01)
    else:
        raise AssertionError("the source's record stayed, or the destination's never came")
    assert stale_seen  # removed after the switch-over, not during it
    assert source.wrapper.poll() is None


def test_destination_resumes_the_guest_only_once_it_holds_the_claim(lab: Lab) -> None:
    source = lab.start("source")
    _until(lambda: lab.exclusive_holders() == [source.qemu_pid], what="the source's claim")
    uri = f"unix:{lab.path('migrate.sock')}"
    # Freeze the destination's wrapper right after it has claimed, before `cont`.
    dest = lab.start("dest", "-incoming", uri, env={"IMGLOCK_FAULTS": "stop=handoff:claimed"})
    _until(lambda: os.path.exists(lab.path("migrate.sock")), what="the incoming socket")
    source.execute("migrate", {"uri": uri})

    def wrapper_stopped() -> bool:
        with open(f"/proc/{dest.wrapper.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"

    _until(wrapper_stopped, what="the destination wrapper to reach the claimed step")
    assert lab.exclusive_holders() == [dest.qemu_pid]
    assert dest.status() != RUNNING  # claimed, but not yet resumed
    os.kill(dest.wrapper.pid, signal.SIGCONT)
    _until(lambda: dest.status() == RUNNING, what="the destination guest to run")


def test_a_cancelled_migration_leaves_the_claim_with_the_source(lab: Lab) -> None:
    source = lab.start("source")
    _until(lambda: lab.exclusive_holders() == [source.qemu_pid], what="the source's claim")
    source.execute("migrate-set-parameters", {"max-bandwidth": 1 << 20})  # still going at cancel
    dest = _migrate(lab, source, "dest")
    _until(
        lambda: source.execute("query-migrate").get("status") == "active",  # type: ignore[attr-defined]
        what="the migration to be active",
    )
    source.execute("migrate_cancel")
    _until(
        lambda: source.execute("query-migrate").get("status") == "cancelled",  # type: ignore[attr-defined]
        what="the cancellation",
    )
    assert dest.wrapper.wait(timeout=20) != 0  # the destination QEMU gives up
    assert source.status() == RUNNING
    time.sleep(0.3)  # the source's watcher has seen the outcome
    assert lab.exclusive_holders() == [source.qemu_pid]


def test_a_failed_migration_leaves_the_claim_with_the_source(lab: Lab) -> None:
    source = lab.start("source")
    _until(lambda: lab.exclusive_holders() == [source.qemu_pid], what="the source's claim")
    source.execute("migrate", {"uri": f"unix:{lab.path('nobody-listens.sock')}"})
    _until(
        lambda: source.execute("query-migrate").get("status") == "failed",  # type: ignore[attr-defined]
        what="the failure",
    )
    time.sleep(0.3)
    assert source.status() == RUNNING
    assert lab.exclusive_holders() == [source.qemu_pid]


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
        dest = _migrate(lab, source, "dest", "--handoff-timeout", "0.5")
        _until(lambda: "stays paused" in dest.stderr(), what="the destination to give up")
        assert dest.status() != RUNNING
        assert lab.exclusive_holders() == []
        (line,) = [x for x in dest.stderr().splitlines() if "stays paused" in x]
        assert str(lab.image) in line and f"pid {blocker.pid}" in line
    finally:
        blocker.kill()
        blocker.wait()


def test_lock_loss_stops_a_qemu_guest_through_qmp(lab: Lab) -> None:
    vm = lab.start("vm", env={"IMGLOCK_FAULTS": "fcntl=EIO,after=1.0"})
    _until(lambda: vm.status() == RUNNING, what="the guest to run")
    _until(lambda: vm.status() == "paused", what="the guest to be paused on lock loss")
    _until(lambda: "lock lost" in vm.stderr(), what="the message")
    assert "QMP stop" in vm.stderr()


def test_a_source_wrapper_killed_right_after_releasing_leaves_the_handoff_intact(
    lab: Lab,
) -> None:
    # Crash matrix, handoff:released: the source's wrapper dies the moment it
    # has let go; the destination still claims and runs, the image stuck nowhere.
    source = lab.start("source", env={"IMGLOCK_FAULTS": "crash=handoff:released"})
    _until(lambda: lab.exclusive_holders() == [source.qemu_pid], what="the source's claim")
    source_qemu = source.qemu_pid
    dest = _migrate(lab, source, "dest")
    assert source.wrapper.wait(timeout=20) == -signal.SIGKILL
    _until(lambda: dest.status() == RUNNING, what="the destination guest to run")
    _until(lambda: lab.exclusive_holders() == [dest.qemu_pid], what="the destination's claim")
    assert source_qemu not in lab.exclusive_holders()


def test_a_destination_wrapper_killed_right_after_claiming_leaves_the_claim_with_its_qemu(
    lab: Lab,
) -> None:
    # Crash matrix, handoff:claimed: the destination's wrapper dies between
    # claiming and `cont`.  Its QEMU inherited the locks: the image is held by
    # a live process (whose guest stays paused), and free once that process ends.
    source = lab.start("source")
    _until(lambda: lab.exclusive_holders() == [source.qemu_pid], what="the source's claim")
    dest = lab.start(
        "dest", "-incoming", f"unix:{lab.path('migrate.sock')}",
        env={"IMGLOCK_FAULTS": "crash=handoff:claimed"},
    )  # fmt: skip
    dest_qemu = dest.qemu_pid
    _until(lambda: os.path.exists(lab.path("migrate.sock")), what="the incoming socket")
    source.execute("migrate", {"uri": f"unix:{lab.path('migrate.sock')}"})
    assert dest.wrapper.wait(timeout=20) == -signal.SIGKILL
    assert lab.exclusive_holders() == [dest_qemu]
    assert dest.status() != RUNNING
    os.kill(dest_qemu, signal.SIGKILL)
    _until(lambda: lab.exclusive_holders() == [], what="the image to be free")
