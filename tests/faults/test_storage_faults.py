"""Storage faults: a lost lock is never masked, and the guest stops before another host writes.

On the GlusterFS rig's fault volume (``imglock-faults``), host A holds a
qcow2 image: a real QEMU under ``imglock run`` (checking its claim every
:data:`CHECK_INTERVAL` s, a check allowed :data:`CHECK_DEADLINE` s), or a
program holding a library claim watched with :meth:`imglock.Claim.watch`.
Host B keeps trying to write the image (``imglock run``, a plain QEMU, or
``qemu-io -c 'write ...'``, tests/support/fault_rival.py), and host C samples who
runs and who holds it (tests/support/fault_sampler.py) while the storage fails for
real (tests/support/storage_faults.py).  Every fault runs with the volume option
``client.strict-locks`` on and off.

A guest may write while it runs and its host's client still carries its
writes (alive and not stopped).  The rule checked in every case: the
*unsafe window*, from B's first write (a VM of B's running, a write of
qemu-io done) until A can no longer write, is

- 0 with ``client.strict-locks on``;
- with it off, at most one check interval plus the deadline: a reconnected
  client re-opens A's descriptors without their locks, so B may get in
  before A's next check, which comes at most one check interval later and
  takes at most the deadline.

With checks further apart than a reconnect takes, A's QEMU is also asked
to write all along (a probe, tests/support/fault_sampler.py): with strict-locks on
the server refuses its descriptors, which is what keeps the window at 0
until A's next check.

Run with ``-s`` to see each case's figures: time from the fault to A's
pause, the unsafe window, the slowest answer of A's monitor.
"""

from __future__ import annotations

import enum
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
from conftest import REQUIRE_GLUSTER, QemuImg
from fault_sampler import (
    QEMU_WRITE_BYTE,
    RUNNING,
    Qmp,
    Sampler,
    Samples,
    Steps,
    both,
    first,
    probe_results,
    value_at,
)
from gluster_hosts import Datastore, Host, unavailable_reason
from lock_sampler import owner_names
from processes import alive, holds_for, process_tree, state, wait_until
from qemu_vm import TINY_PC
from storage_faults import (
    RECONNECT_TIMEOUT,
    Remount,
    Volume,
    remount,
    restart_glusterd,
    wait_reachable,
)
from wrapped_vm import WrappedVM, WrappedVMs

from imglock.lock import fcntl_locks
from imglock.lock.identity import host_tag

pytestmark = [pytest.mark.gluster, pytest.mark.qemu]

#: Seconds between host A's lock checks.
CHECK_INTERVAL = 1.0
#: Seconds one check may take before A's guest is paused.
CHECK_DEADLINE = 1.5
#: Seconds between checks as issue 16's operator had them: longer than a
#: client takes to reconnect to a restarted brick (some 3 s).
LONG_INTERVAL = 5.0
#: network.ping-timeout for the hung brick that the clients give up on;
#: well above the deadline, so that the deadline pauses first.
SHORT_PING_TIMEOUT = 5
#: Seconds a hang that the clients survive lasts.
HANG = 5.0
#: Seconds a brick stays dead in the "delayed restart" case: more than a check interval.
DEAD_BRICK = 2.5 * CHECK_INTERVAL
#: Seconds a fault that should change nothing is watched afterwards: several checks.
OBSERVE = 3 * CHECK_INTERVAL + CHECK_DEADLINE
#: Seconds between two tries of host B.
RIVAL_PAUSE = 0.2
#: Seconds to wait for anything here.
TIMEOUT = 40.0
#: How soon QEMU's monitor answers under ``imglock run``, hung brick or not (issue 16).
MONITOR_LATENCY = 0.1
LOST_MESSAGE = "lock lost"
OVERDUE_MESSAGE = "lock check has not completed"
RESUMED_MESSAGE = "claim intact: guest resumed"
IMAGE = "disk.qcow2"
#: The id of A's drive, for the probe's writes.
DRIVE = "disk"
FAULT_IMAGE_SIZE = "64M"
SUPPORT = Path(__file__).parents[1] / "support"
RIVAL = str(SUPPORT / "fault_rival.py")
#: How each of B's tries ends when A holds the image: ``imglock run``'s
#: conflict status (-E, 75 by default), QEMU's and qemu-io's failure.
REFUSED_STATUS = {"imglock-run": 75, "qemu": 1, "qemu-io": 1}
LIBRARY_HOLDER = str(SUPPORT / "library_holder.py")


class Outcome(enum.Enum):
    #: The server lost A's locks: A stops for good and says so once; B then gets in.
    LOST = "lost"
    #: The locks stay but no check can complete: the deadline pauses A, which
    #: resumes once a check proves the claim intact; B never gets in.
    PAUSED = "paused"
    #: Nothing happened to the locks: A runs throughout, no word; B never gets in.
    UNDISTURBED = "undisturbed"


# -- host A: what holds the image -------------------------------------------


class Holder(Protocol):
    """Host A's holder of the image, as the test drives it."""

    #: What its messages start with.
    program: str

    def guest(self, samples: Samples) -> Steps: ...
    def stopped(self) -> bool: ...
    def lost_said(self) -> bool: ...
    def messages(self) -> list[str]: ...
    def end(self) -> int: ...


@dataclass
class VmHolder:
    """A QEMU under ``imglock run`` on host A; host C's sampler has a monitor of its own on it."""

    vm: WrappedVM
    monitor: Path
    #: QEMU's standard output: how the sampler's probe writes went.
    out: Path
    program: str = "imglock: "

    def guest(self, samples: Samples) -> Steps:
        return samples.running("a")

    def stopped(self) -> bool:
        return self.vm.runstate() != RUNNING

    def messages(self) -> list[str]:
        return self.vm.stderr().splitlines()

    def lost_said(self) -> bool:
        return any(LOST_MESSAGE in line for line in self.messages())

    def end(self) -> int:
        return self.vm.quit()


@dataclass
class LibraryHolder:
    """tests/support/library_holder.py on host A: stops itself when its watch reports a loss."""

    proc: subprocess.Popen[str]
    pid: int
    host: str
    lines: list[dict[str, Any]] = field(default_factory=list)
    program: str = ""

    @classmethod
    def start(
        cls, host: Host, image: Path, interval: float, *, stop_on_loss: bool = True
    ) -> LibraryHolder:
        argv = [sys.executable, LIBRARY_HOLDER, *(["--stop-on-loss"] if stop_on_loss else [])]
        argv += [str(interval), str(CHECK_DEADLINE), str(image)]
        # Not the host's pid 1: that one could not stop itself.
        proc = host.popen(
            argv, as_init=False, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        first_line = proc.stdout.readline()
        assert first_line, f"the library holder died: {proc.communicate()[1]}"
        holder = cls(proc, process_tree(proc.pid)[-1], host.name, [json.loads(first_line)])
        threading.Thread(target=holder._read, daemon=True).start()
        return holder

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def guest(self, samples: Samples) -> Steps:
        return samples.usable("holder")

    def stopped(self) -> bool:
        return state(self.pid) in (None, "T", "Z")

    @property
    def owner(self) -> str:
        """The holder as host C's lock tests name it (HOSTTAG:PID)."""
        return f"{host_tag(self.host):x}:{self.lines[0]['held']}"

    def verify(self) -> str | None:
        """Ask for :meth:`imglock.Claim.verify`; its loss message, or None if it passed."""
        assert self.proc.stdin is not None
        asked = len(self.verdicts())
        self.proc.stdin.write("verify\n")
        self.proc.stdin.flush()
        wait_until(lambda: len(self.verdicts()) > asked, what="verify()", timeout=TIMEOUT)
        verdict: str | None = self.verdicts()[asked]
        return verdict

    def verdicts(self) -> list[str | None]:
        return [line["verify"] for line in self.lines if "verify" in line]

    def losses(self) -> list[dict[str, Any]]:
        return [line for line in self.lines if "lost" in line]

    def lost_said(self) -> bool:
        return bool(self.losses())

    def messages(self) -> list[str]:
        return [line["lost"] for line in self.losses()]

    def end(self) -> int:
        if alive(self.pid):
            os.kill(self.pid, signal.SIGCONT)
        _out, err = self.proc.communicate("", timeout=TIMEOUT)
        assert "Traceback" not in err, err
        return self.proc.returncode


# -- host B: the rival ---------------------------------------------------------


@dataclass
class Rival:
    """Host B trying, again and again, to write the image (tests/support/fault_rival.py)."""

    kind: str
    proc: subprocess.Popen[str]
    log: Path
    #: The test's monitor on a VM of B's; host C's sampler has one of its own.
    monitor: Path
    sampler_monitor: Path

    def attempts(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def got_in(self) -> bool:
        if self.kind == "qemu-io":
            return any(a["status"] == 0 for a in self.attempts())
        try:
            session = Qmp(str(self.monitor))
        except OSError:
            return False
        try:
            return bool(session.execute("query-status")["status"] == RUNNING)
        finally:
            session.close()

    def first_write(self, samples: Samples) -> float | None:
        """When B could first write: a qemu-io write done, or a VM of B's running."""
        if self.kind == "qemu-io":
            return min((a["ended"] for a in self.attempts() if a["status"] == 0), default=None)
        return first(samples.running("b"), True, 0.0)


def rival_command(kind: str, qemu: str, image: Path, monitors: list[Path]) -> list[str]:
    vm = [qemu, *TINY_PC, "-drive", f"file={image},if=virtio"]
    for monitor in monitors:
        vm += ["-qmp", f"unix:{monitor},server=on,wait=off"]
    if kind == "imglock-run":
        wrapper = [sys.executable, "-m", "imglock", "run", "--wait", "1"]
        return [*wrapper, "--check-interval", str(CHECK_INTERVAL), "--", *vm]
    if kind == "qemu":
        return vm
    return ["qemu-io", "-f", "qcow2", "-c", "write -P 0xbb 0 4k", str(image)]


# -- the faults ----------------------------------------------------------------


@dataclass
class Scene:
    """What a fault acts on: the volume, host A (its own mount), one of A's processes."""

    volume: Volume
    a: Host
    inside: int
    frozen: list[int] = field(default_factory=list)
    remounts: list[Remount] = field(default_factory=list)
    #: When A's client was killed, if the fault killed it.
    killed_at: float | None = None

    def heal(self) -> None:
        """Whatever a fault left broken, mended for the tests after this one."""
        for pid in self.frozen:
            os.kill(pid, signal.SIGCONT)
        for mount in self.remounts:
            mount.end()
        if self.volume.brick_pid() is None:
            self.volume.start(force=True)


def kill_brick(scene: Scene) -> None:
    scene.volume.kill_brick()


def start_brick(scene: Scene) -> None:
    scene.volume.start(force=True)


def stop_volume(scene: Scene) -> None:
    scene.volume.stop()


def start_volume(scene: Scene) -> None:
    scene.volume.start()


def freeze_brick(scene: Scene) -> None:
    scene.frozen.append(scene.volume.freeze_brick())


def thaw(scene: Scene) -> None:
    os.kill(scene.frozen.pop(), signal.SIGCONT)


def hang_client(scene: Scene) -> None:
    scene.a.hang()


def resume_client(scene: Scene) -> None:
    scene.a.resume()


def crash_client(scene: Scene) -> None:
    scene.killed_at = scene.a.crash()


def glusterd(scene: Scene) -> None:
    restart_glusterd()


def remount_a(scene: Scene) -> None:
    scene.remounts.append(remount(scene.a, scene.inside))


FaultStep = Callable[[Scene], None]


@dataclass(frozen=True)
class Fault:
    name: str
    begin: FaultStep
    end: FaultStep | None
    outcome: Outcome
    #: Seconds from begin to end; with *until_lost*, until A has reported its loss.
    hold: float = 0.0
    until_lost: bool = False
    options: Mapping[str, str] = field(default_factory=dict)

    @property
    def hangs_brick(self) -> bool:
        return self.begin is freeze_brick


BRICK_KILLED = Fault("brick-killed-restarted-at-once", kill_brick, start_brick, Outcome.LOST)
BRICK_KILLED_LONG = Fault(
    "brick-killed-restarted-later", kill_brick, start_brick, Outcome.LOST, hold=DEAD_BRICK
)
VOLUME_STOPPED = Fault("volume-stopped-started", stop_volume, start_volume, Outcome.LOST)
BRICK_HUNG = Fault("brick-hung-5s", freeze_brick, thaw, Outcome.PAUSED, hold=HANG)
BRICK_HUNG_PAST_PING = Fault(
    "brick-hung-past-ping-timeout", freeze_brick, thaw, Outcome.LOST, until_lost=True,
    options={"network.ping-timeout": str(SHORT_PING_TIMEOUT)},
)  # fmt: skip
CLIENT_HUNG = Fault("client-of-a-hung-5s", hang_client, resume_client, Outcome.PAUSED, hold=HANG)
CLIENT_KILLED = Fault("client-of-a-killed", crash_client, None, Outcome.LOST)
GLUSTERD_RESTARTED = Fault("glusterd-restarted", glusterd, None, Outcome.UNDISTURBED)
REMOUNTED = Fault("umount-l-and-remount", remount_a, None, Outcome.UNDISTURBED)


@dataclass(frozen=True)
class Case:
    fault: Fault
    holder: str  # "run" or "library"
    rival: str  # "imglock-run", "qemu" or "qemu-io"
    #: Seconds between A's checks.
    interval: float = CHECK_INTERVAL
    #: Whether A's QEMU is asked to write all along (see tests/support/fault_sampler.py).
    probe: bool = False

    @property
    def id(self) -> str:
        every = "" if self.interval == CHECK_INTERVAL else f"-checked-every-{self.interval:g}s"
        return f"{self.fault.name}-{self.holder}{every}-vs-{self.rival}"


CASES = [
    Case(BRICK_KILLED, "run", "qemu-io"),
    # Checks further apart than a reconnect takes: B gets in before A's next
    # check, and only the server's refusal (strict-locks) keeps A from writing.
    Case(BRICK_KILLED, "run", "qemu-io", interval=LONG_INTERVAL, probe=True),
    Case(BRICK_KILLED, "run", "imglock-run", interval=LONG_INTERVAL, probe=True),
    Case(BRICK_KILLED, "run", "qemu", interval=LONG_INTERVAL, probe=True),
    Case(BRICK_KILLED, "library", "imglock-run"),
    Case(BRICK_KILLED_LONG, "run", "imglock-run"),
    Case(VOLUME_STOPPED, "run", "qemu"),
    Case(VOLUME_STOPPED, "library", "qemu-io"),
    Case(BRICK_HUNG, "run", "qemu-io"),
    Case(BRICK_HUNG_PAST_PING, "run", "imglock-run"),
    Case(CLIENT_HUNG, "run", "qemu"),
    Case(CLIENT_KILLED, "run", "qemu-io"),
    Case(CLIENT_KILLED, "library", "qemu"),
    Case(GLUSTERD_RESTARTED, "run", "imglock-run"),
    Case(REMOUNTED, "run", "qemu"),
]


# -- fixtures ------------------------------------------------------------------


@pytest.fixture
def fault_store() -> Iterator[Datastore]:
    """Hosts A, B and C on the fault volume, in a directory of the test's own."""
    reason = unavailable_reason(faults=True)
    if reason is not None:
        if REQUIRE_GLUSTER:
            pytest.fail(f"fault tests are required (IMGLOCK_REQUIRE_GLUSTER=1): {reason}")
        pytest.skip(reason)
    store = Datastore(faults=True)
    try:
        yield store
    finally:
        store.close()


@dataclass
class Rig:
    """The case's pieces, each ended (and the volume mended) when the test is over."""

    store: Datastore
    vms: WrappedVMs
    qemu: str
    a: Host
    image: Path
    started: list[subprocess.Popen[Any]] = field(default_factory=list)

    def holder(self, kind: str, interval: float) -> tuple[Holder, int, dict[str, Path]]:
        """Start host A's holder; return it, a pid of host A, and its monitor for the sampler."""
        if kind == "library":
            holder = LibraryHolder.start(self.a, self.image, interval)
            self.started.append(holder.proc)
            return holder, holder.pid, {}
        monitor = self.vms.path("a-sampler.qmp")
        probe_log = self.vms.path("a.out")

        def popen(argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
            # QEMU says how the probe's writes went on its standard output.
            with probe_log.open("wb") as out:
                return self.a.popen(argv, **{**kwargs, "stdout": out})

        vm = self.vms.start(
            "-drive", f"file={self.image},if=virtio,id={DRIVE}",
            "-qmp", f"unix:{monitor},server=on,wait=off",
            name="a", machine=TINY_PC, popen=popen,
            options=("--check-interval", str(interval), "--check-deadline", str(CHECK_DEADLINE)),
        )  # fmt: skip
        wait_until(lambda: vm.runstate() == RUNNING, what="A's guest to run", timeout=TIMEOUT)
        return VmHolder(vm, monitor, probe_log), vm.qemu_pid, {"a": monitor}

    def rival(self, kind: str) -> Rival:
        """Host B starts trying to write the image."""
        b = self.store.b
        monitors = [self.vms.path("b.qmp"), self.vms.path("b-sampler.qmp")]
        log = self.vms.path("rival.log")
        command = rival_command(kind, self.qemu, b.path(IMAGE), monitors)
        with log.open("w") as out:
            proc = b.popen([sys.executable, RIVAL, str(RIVAL_PAUSE), *command], stdout=out)
        self.started.append(proc)
        return Rival(kind, proc, log, *monitors)

    def close(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()  # unshare --kill-child: the host's processes go with it
            proc.wait()


@pytest.fixture
def rig(
    request: pytest.FixtureRequest,
    strict: bool,
    fault_store: Datastore,
    qemu_img: QemuImg,
    qemu_system_path: str,
) -> Iterator[Rig]:
    """Host A (a mount of its own) and the image, with the case's volume options set.

    Host A mounts once the options are set: its client surely runs with them.
    """
    case: Case | None = request.node.callspec.params.get("case")
    options = {"client.strict-locks": "on" if strict else "off"}
    options.update(case.fault.options if case is not None else {})
    with Volume().options(options):
        a = fault_store.own_host("host-a")
        image = a.path(IMAGE)
        qemu_img("create", "-q", "-f", "qcow2", image, FAULT_IMAGE_SIZE)
        with WrappedVMs(qemu_system_path, prefix="imglock-faults-") as vms:
            rig = Rig(fault_store, vms, qemu_system_path, a, image)
            try:
                yield rig
            finally:
                rig.close()


# -- what is measured ------------------------------------------------------------


@dataclass
class Figures:
    """One case's measurements, in seconds."""

    pause: float | None  # from the fault until A's guest was paused (the holder stopped)
    window: float  # B able to write while A still could (see the module docstring)
    latency: float | None  # the slowest answer of A's monitor during the fault

    def __str__(self) -> str:
        def show(value: float | None) -> str:
            return "-" if value is None else f"{value:.3f} s"

        return (
            f"fault->pause {show(self.pause)}, unsafe window {show(self.window)}, "
            f"A's monitor at worst {show(self.latency)}"
        )


def a_writes(
    samples: Samples, holder: Holder, probed: bool, killed_at: float | None = None
) -> Steps:
    """When host A could write: its guest ran, its client carried writes, and
    (where probed) its descriptors did.

    A client killed at *killed_at* carries nothing from then on.  The
    sampler goes on listing it while it exits, and until its next sample:
    a server that has dropped its locks, and a rival that has written, may
    come first.
    """
    writes = both(holder.guest(samples), samples.usable("client-a"))
    if killed_at is not None:
        writes = both(writes, [(0.0, True), (killed_at, False)])
    if not probed:
        return writes
    assert isinstance(holder, VmHolder)
    return both(writes, samples.writes("a", probe_results(holder.out.read_text())))


def measure(
    samples: Samples,
    writes: Steps,
    holder: Holder,
    rival: Rival,
    fault_at: float,
    fault_end: float,
) -> Figures:
    b_first = rival.first_write(samples)
    window = 0.0
    if b_first is not None and value_at(writes, b_first):
        stop = first(writes, False, b_first)
        window = (stop if stop is not None else time.monotonic()) - b_first
    pause = first(holder.guest(samples), False, fault_at)
    latency = None
    if isinstance(holder, VmHolder):
        latency = max(samples.latencies("a", fault_at, fault_end), default=None)
    return Figures(None if pause is None else pause - fault_at, window, latency)


def lines_saying(lines: list[str], *words: str) -> list[str]:
    """The lines that say any of *words*."""
    return [line for line in lines if any(w in line for w in words)]


# -- the suite -------------------------------------------------------------------


@pytest.mark.parametrize("strict", [True, False], ids=["strict-locks-on", "strict-locks-off"])
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_storage_fault_never_lets_two_hosts_write_and_never_goes_unreported(
    rig: Rig, case: Case, strict: bool
) -> None:
    fault = case.fault
    holder, inside, monitors = rig.holder(case.holder, case.interval)
    scene = Scene(Volume(), rig.a, inside)
    processes = {"client-a": rig.a.client_pid()}
    if isinstance(holder, LibraryHolder):
        processes["holder"] = holder.pid
    rival = rig.rival(case.rival)
    monitors = {**monitors, "b": rival.sampler_monitor}
    probes = {"a": DRIVE} if case.probe else {}
    sampler = Sampler(rig.store.c.path(IMAGE), monitors, processes, probes)

    def cause(fault_at: float) -> None:
        fault.begin(scene)
        hold(fault, holder, fault_at)
        if fault.end is not None:
            fault.end(scene)

    run = run_fault(
        holder, rival, sampler, cause, lambda: settle(fault.outcome, holder, rival, rig), scene.heal
    )
    samples, fault_at = run.samples, run.fault_at
    writes = a_writes(samples, holder, case.probe, scene.killed_at)
    figures = measure(samples, writes, holder, rival, fault_at, run.fault_end)
    print(f"\n{case.id} strict-locks={'on' if strict else 'off'}: {figures}")

    check_run(run, writes, holder, rival)
    bound = 0.0 if strict else case.interval + CHECK_DEADLINE
    assert figures.window <= bound, f"A and B could both write for {figures}: {rival.attempts()}"
    check_outcome(case, rig.image, holder, rival, samples, fault_at, figures)
    if fault.hangs_brick and isinstance(holder, VmHolder):
        assert figures.latency is not None and figures.latency <= MONITOR_LATENCY, (
            f"QEMU's monitor under imglock run stalled with the brick hung: {figures}"
        )


@dataclass
class Run:
    """One fault as host C's sampler saw it, and how A's holder ended."""

    samples: Samples
    #: A's holder's exit status.
    status: int
    fault_at: float
    fault_end: float


def run_fault(
    holder: Holder,
    rival: Rival,
    sampler: Sampler,
    cause: Callable[[float], None],
    settle: Callable[[], None],
    heal: Callable[[], None],
) -> Run:
    """B refused while A holds the image; then *cause* the fault (told when it
    began) and *settle* it; the samples taken, A's holder ended, and *heal*
    what the fault broke, whatever happens."""
    try:
        # B is refused while A holds the image, before anything fails.
        wait_until(rival.attempts, what="B's first try", timeout=TIMEOUT)
        assert not rival.got_in(), rival.attempts()
        fault_at = time.monotonic()
        cause(fault_at)
        fault_end = time.monotonic()
        settle()
        samples = sampler.stop()
        # B gives up before A lets go: a try of B's after that would count as
        # a write while A could.
        rival.proc.kill()
        rival.proc.wait()
        status = holder.end()
    finally:
        sampler.kill()
        heal()
    return Run(samples, status, fault_at, fault_end)


def check_run(run: Run, writes: Steps, holder: Holder, rival: Rival) -> None:
    """What every fault leaves true: the samples saw A writing before it and
    B not (so that the window means something), A said nothing as a
    traceback, and its holder exited 0."""
    # (At some moment before it: under load a check may have run past its
    # deadline and paused A's guest for a while just before the fault.)
    assert any(now for when, now in writes if when <= run.fault_at), (
        "A could not write before the fault"
    )
    assert (rival.first_write(run.samples) or run.fault_at) >= run.fault_at, (
        "B wrote before the fault"
    )
    messages = holder.messages()
    assert not lines_saying(messages, "Traceback"), messages
    assert run.status == 0, f"A's holder exited {run.status}: {messages}"


def hold(fault: Fault, holder: Holder, fault_at: float) -> None:
    """Keep the fault up for its time: until A reports the loss, or *hold* seconds."""
    if fault.until_lost:
        wait_until(holder.lost_said, what="A to report its loss", timeout=TIMEOUT)
        return
    if fault.outcome is Outcome.PAUSED:
        wait_until(holder.stopped, what="the deadline to pause A", timeout=fault.hold)
    time.sleep(max(0.0, fault_at + fault.hold - time.monotonic()))


def settle(
    outcome: Outcome, holder: Holder, rival: Rival, rig: Rig, timeout: float = TIMEOUT
) -> None:
    """Wait for the end a fault must come to, from host A's and host B's side,
    each step for at most *timeout* seconds."""
    wait_reachable(rig.store.b.dir, rig.store.c.dir, timeout=max(timeout, RECONNECT_TIMEOUT))
    if outcome is Outcome.LOST:
        # Whether A resumed meanwhile, or wrote while B did, the samples tell.
        wait_until(rival.got_in, what="B to get the lost image", timeout=timeout)
        wait_until(holder.stopped, what="A to be paused", timeout=timeout)
        wait_until(holder.lost_said, what="A to report its loss", timeout=timeout)
        return
    if outcome is Outcome.PAUSED:
        wait_until(lambda: not holder.stopped(), what="A to be resumed", timeout=timeout)
    # Several checks of A's, B trying all along: a false alarm, or a claim let go, would show.

    def a_runs_alone() -> bool:
        assert not holder.stopped(), f"A stopped: {holder.messages()}"
        assert not rival.got_in(), f"B got in, A still holding: {rival.attempts()}"
        return True

    holds_for(a_runs_alone, OBSERVE, what="A runs, B refused", interval=CHECK_INTERVAL / 4)


def check_outcome(
    case: Case,
    image: Path,
    holder: Holder,
    rival: Rival,
    samples: Samples,
    fault_at: float,
    figures: Figures,
) -> None:
    messages = holder.messages()
    lost = lines_saying(messages, LOST_MESSAGE) if isinstance(holder, VmHolder) else messages
    if case.fault.outcome is Outcome.LOST:
        assert len(lost) == 1, f"not one loss reported: {messages}"
        # One line that names the file: "imglock: FILE: lock lost: ..." (the
        # library's LockLost without the program name).
        assert lost[0].startswith(f"{holder.program}{image}: {LOST_MESSAGE}"), lost[0]
        assert figures.pause is not None, f"A's guest was never paused: {messages}"
        if case.fault.until_lost:
            # Paused by the deadline first, before the client gave up on the server.
            overdue = lines_saying(messages, OVERDUE_MESSAGE)
            assert len(overdue) == 1, messages
            assert messages.index(overdue[0]) < messages.index(lost[0]), messages
            assert figures.pause < SHORT_PING_TIMEOUT, figures
        # Paused for good: never resumed by imglock.
        paused = fault_at + figures.pause
        assert first(holder.guest(samples), True, paused + 1e-6) is None, "A was resumed"
        return
    assert not lost, f"a false alarm: {messages}"
    assert rival.first_write(samples) is None, f"B got in, A holding: {rival.attempts()}"
    # Every try of B's was refused as a conflict, with its documented exit status.
    refused = {attempt["status"] for attempt in rival.attempts()}
    assert refused == {REFUSED_STATUS[rival.kind]}, rival.attempts()
    # Host C saw A alone hold it, whenever a look answered.
    holders = {tuple(names) for names in samples.holder_names()}
    assert len(holders) == 1 and len(next(iter(holders))) == 1, holders
    if case.fault.outcome is Outcome.PAUSED:
        for words in (OVERDUE_MESSAGE, RESUMED_MESSAGE):
            (line,) = lines_saying(messages, words)
            assert line.startswith(f"{holder.program}{image}: "), line
        assert figures.pause is not None
    else:
        assert figures.pause is None, f"A was paused: {figures}: {messages}"
        assert not lines_saying(messages, OVERDUE_MESSAGE), messages


# -- the library -------------------------------------------------------------------


def held_from(host: Host) -> tuple[list[str], bool]:
    """What host C sees held of the image: imglock's exclusive holders, QEMU's write byte."""
    image = str(host.path(IMAGE))
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        writer = fcntl_locks.conflicting(fd, QEMU_WRITE_BYTE, 1, image) is not None
        return owner_names(fd, image), writer
    finally:
        os.close(fd)


@pytest.mark.parametrize("strict", [True, False], ids=["strict-locks-on", "strict-locks-off"])
def test_a_library_claim_lost_in_a_brick_restart_is_reported_once_and_never_taken_again(
    rig: Rig, strict: bool
) -> None:
    holder = LibraryHolder.start(rig.a, rig.image, CHECK_INTERVAL, stop_on_loss=False)
    rig.started.append(holder.proc)
    c = rig.store.c
    assert held_from(c) == ([holder.owner], True)
    scene = Scene(Volume(), rig.a, holder.pid)
    try:
        kill_brick(scene)
        start_brick(scene)
    finally:
        scene.heal()
    wait_reachable(c.dir)
    wait_until(holder.lost_said, what="the watch to call back", timeout=TIMEOUT)
    # After the reconnect, verify() says lost, and takes nothing again: the
    # bytes it looked at stay free for anyone else.
    for _ in range(2):
        assert holder.verify() is not None, "verify() passed a lost claim"
        assert held_from(c) == ([], False)
    # The watch went on checking: one call back, however many checks saw the loss.
    holds_for(
        lambda: len(holder.losses()) == 1,
        3 * CHECK_INTERVAL,
        what="one call back, however many checks saw the loss",
    )
    assert IMAGE in holder.losses()[0]["lost"]
    assert holder.losses()[0]["type"] == "LockLost"
    assert holder.end() == 0
