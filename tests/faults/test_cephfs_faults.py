"""CephFS faults: a lost lock is never masked, and the guest stops before another host writes.

The fault matrix of tests/faults/test_storage_faults.py on the second lock
manager, CephFS through ceph-fuse (the rig's fault filesystem,
``imglock-faults``, tests/support/cephfs_faults.py).  Host A, on a client of its
own (its own cephx user and MDS session), runs a real QEMU under ``imglock
run`` checking its claim every :data:`CHECK_INTERVAL` s, each check allowed
:data:`CHECK_DEADLINE` s; host B keeps trying to write the image
(``imglock run``, a plain QEMU, or ``qemu-io -c 'write ...'``); host C
samples who runs and who holds it, while the client or the MDS fails for
real.

CephFS differs from GlusterFS where it matters:

- a client that dies keeps its session, and its locks, until
  ``session_autoclose`` (300 s by default, 30 s here) unless an operator
  evicts it; A's guest is paused at its next check all the same (the
  mount answers ENOTCONN), and B gets the image only once the session is
  gone;
- an evicted client is blocklisted: its locks go at once, and its writes
  fail (EIO) from then on, so A cannot write while B does even before A's
  next check pauses it;
- with ``client_reconnect_stale=true`` an evicted client reconnects: A's
  open descriptors still fail, but a descriptor opened anew on A could
  write.  imglock's guarantee then is the loss reported at A's next check
  and the guest paused for good; nothing stops another program on A from
  opening the image again and writing beside B (shown by its own test
  below), which is why the default (false) is the safe one;
- an MDS restart keeps every lock (clients re-send them), but lock calls
  block until it is active again: A's check overruns its deadline, the
  guest is paused, and resumed once a check proves the claim intact.  With
  a dead client's session still open, the MDS waits 45 s for it
  (``mds_reconnect_timeout``), and A's guest stays paused that long.

What an operator does about a dead host on CephFS: evict its session
(``ceph tell mds.FS:0 client evict id=N``, the id from ``ceph tell
mds.FS:0 session ls``) to free its images at once rather than after
``session_autoclose``, and before restarting an MDS, which would otherwise
wait for the dead session.

The rule checked in every case, as on GlusterFS: the *unsafe window*,
from B's first write until A can no longer write, is at most one check
interval plus the deadline, and 0 where A's writes are probed
(tests/support/fault_sampler.py).  Run with ``-s`` to see each case's figures.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cephfs_faults import (
    active_mds,
    evict_dead_sessions,
    kill_mds,
    mds_pid,
    settings,
    start_mds,
)
from cephfs_hosts import FAULT_FILESYSTEM, Datastore, Host, evict, unavailable_reason
from conftest import REQUIRE_CEPHFS, QemuImg
from fault_sampler import Sampler, Samples, first
from processes import holds_for, process_tree, state, wait_until
from test_storage_faults import (
    CHECK_DEADLINE,
    CHECK_INTERVAL,
    DRIVE,
    FAULT_IMAGE_SIZE,
    IMAGE,
    LOST_MESSAGE,
    OVERDUE_MESSAGE,
    REFUSED_STATUS,
    RESUMED_MESSAGE,
    Figures,
    Outcome,
    Rig,
    Rival,
    VmHolder,
    a_writes,
    check_run,
    lines_saying,
    measure,
    run_fault,
    settle,
)
from wrapped_vm import WrappedVMs

pytestmark = [pytest.mark.cephfs, pytest.mark.qemu]

#: The shortest session timeouts CephFS allows: a dead client's session
#: (and its locks) closes some 33 s after it died.
SHORT_SESSIONS = {"session_timeout": "30", "session_autoclose": "30"}
#: Seconds after a client's death at least before its session is autoclosed:
#: session_autoclose after its last renewal, which comes every third of
#: session_timeout.
AUTOCLOSED_AFTER = 30.0 - 30.0 / 3
#: Seconds to wait for anything here: the longest is an MDS restart waiting
#: 45 s (mds_reconnect_timeout) for a dead session, or a session autoclosed.
TIMEOUT = 90.0
#: How long the MDS waits for a session that does not come back (mds_reconnect_timeout).
MDS_RECONNECT_TIMEOUT = 45.0
RECONNECT_STALE = "--client_reconnect_stale=true"
#: Seconds a pause may take past its check's deadline: a QMP stop, and
#: scheduling on a busy machine (0.4 s at worst measured on an idle one).
PAUSE_SLACK = 2.0
#: What host A writes through a descriptor opened after its client reconnected.
STALE_BYTE = b"\xa5"
#: Seconds for a restarted MDS to be active again, with no session missing (some 4 s).
MDS_RESTART = 15.0


# -- the faults ----------------------------------------------------------------


@dataclass
class Scene:
    """What a fault acts on: the fault filesystem's hosts, host A's own client, the MDS."""

    store: Datastore
    a: Host
    #: A host of the test's own whose client died, its session left open.
    dead: Host | None = None
    mds: str | None = None
    #: When A's client was killed, if the fault killed it.
    killed_at: float | None = None

    def heal(self) -> None:
        """Whatever a fault left broken, mended for the tests after this one."""
        if self.mds is not None and mds_pid(self.mds) is None:
            start_mds(self.mds)
        wait_until(
            lambda: active_mds() is not None, what="the MDS to be active again", timeout=TIMEOUT
        )


def crash_client(scene: Scene) -> None:
    scene.killed_at = scene.a.crash()


def crash_and_evict_client(scene: Scene) -> None:
    scene.killed_at = scene.a.crash()
    scene.store.release_crashed(scene.a)


def evict_client(scene: Scene) -> None:
    assert scene.a.session is not None
    evict(scene.a.session, FAULT_FILESYSTEM)


def restart_crashed_mds(scene: Scene) -> None:
    """The MDS crashes and is started again at once (as a supervisor would)."""
    scene.mds = kill_mds()
    start_mds(scene.mds)


def no_dead_session(scene: Scene) -> None:
    """No session of a client gone before this test: the MDS would wait for it."""
    evict_dead_sessions()


def leave_dead_session(scene: Scene) -> None:
    """Another host dies with a session open: the next MDS start waits for it."""
    no_dead_session(scene)
    scene.dead = scene.store.own_host("host-d")
    scene.dead.crash()


FaultStep = Callable[[Scene], None]


@dataclass(frozen=True)
class Fault:
    name: str
    #: What happens, from its first step to its last: its time is measured from there.
    cause: FaultStep
    outcome: Outcome
    #: Seconds after the fault, at least and at most: until B first writes
    #: (a lost claim), or until A's guest is resumed (a paused one).
    after: tuple[float, float] = (0.0, 10.0)
    #: Filesystem settings for the case (``ceph fs set``), put back afterwards.
    settings: Mapping[str, str] = field(default_factory=dict)
    #: More ceph-fuse options for host A's client.
    client_options: tuple[str, ...] = ()
    #: Done before the fault, outside its measured time.
    prepare: FaultStep | None = None


CLIENT_KILLED = Fault(
    "client-of-a-killed-session-autoclosed-30s", crash_client, Outcome.LOST,
    (AUTOCLOSED_AFTER, TIMEOUT), settings=SHORT_SESSIONS,
)  # fmt: skip
CLIENT_KILLED_EVICTED = Fault(
    "client-of-a-killed-and-evicted", crash_and_evict_client, Outcome.LOST
)
CLIENT_EVICTED = Fault("client-of-a-evicted-while-running", evict_client, Outcome.LOST)
CLIENT_EVICTED_RECONNECT_STALE = Fault(
    "client-of-a-evicted-with-client-reconnect-stale", evict_client, Outcome.LOST,
    client_options=(RECONNECT_STALE,),
)  # fmt: skip
MDS_RESTARTED = Fault(
    "mds-killed-restarted", restart_crashed_mds, Outcome.PAUSED, (0.0, MDS_RESTART),
    prepare=no_dead_session,
)  # fmt: skip
MDS_RESTARTED_DEAD_SESSION = Fault(
    "mds-killed-restarted-with-a-dead-session", restart_crashed_mds, Outcome.PAUSED,
    (MDS_RECONNECT_TIMEOUT, TIMEOUT), prepare=leave_dead_session,
)  # fmt: skip


@dataclass(frozen=True)
class Case:
    fault: Fault
    rival: str  # "imglock-run", "qemu" or "qemu-io"
    #: Whether A's QEMU is asked to write all along: never through a stalled MDS.
    probe: bool = False

    @property
    def id(self) -> str:
        return f"{self.fault.name}-vs-{self.rival}"


CASES = [
    Case(CLIENT_KILLED, "qemu-io"),
    Case(CLIENT_KILLED_EVICTED, "imglock-run"),
    Case(CLIENT_EVICTED, "qemu", probe=True),
    Case(CLIENT_EVICTED_RECONNECT_STALE, "imglock-run", probe=True),
    Case(MDS_RESTARTED, "imglock-run"),
    Case(MDS_RESTARTED_DEAD_SESSION, "qemu"),
]


# -- fixtures ------------------------------------------------------------------


@pytest.fixture
def fault_store() -> Iterator[Datastore]:
    """Hosts A, B and C on the fault filesystem, in a directory of the test's own."""
    reason = unavailable_reason(faults=True)
    if reason is not None and REQUIRE_CEPHFS:
        pytest.fail(f"CephFS fault tests are required (IMGLOCK_REQUIRE_CEPHFS=1): {reason}")
    if reason is not None:
        pytest.skip(reason)
    with contextlib.closing(Datastore(faults=True)) as store:
        yield store


@pytest.fixture
def rig(
    request: pytest.FixtureRequest,
    fault_store: Datastore,
    qemu_img: QemuImg,
    qemu_system_path: str,
) -> Iterator[Rig]:
    """Host A (a client of its own, mounted once the case's settings are made) and the image."""
    case: Case = request.node.callspec.params["case"]
    with settings(case.fault.settings):
        a = fault_store.own_host("host-a", *case.fault.client_options)
        image = a.path(IMAGE)
        qemu_img("create", "-q", "-f", "qcow2", image, FAULT_IMAGE_SIZE)
        with WrappedVMs(qemu_system_path, prefix="imglock-cephfs-") as vms:
            # Rig names GlusterFS's hosts; it uses only what every shared filesystem's have.
            rig = Rig(fault_store, vms, qemu_system_path, a, image)  # type: ignore[arg-type]
            try:
                yield rig
            finally:
                rig.close()


# -- the suite -------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_cephfs_fault_never_lets_two_hosts_write_and_never_goes_unreported(
    rig: Rig, fault_store: Datastore, case: Case
) -> None:
    fault = case.fault
    holder, _inside, monitors = rig.holder("run", CHECK_INTERVAL)
    assert isinstance(holder, VmHolder) and isinstance(rig.a, Host)
    scene = Scene(fault_store, rig.a)
    if fault.prepare is not None:
        fault.prepare(scene)
    rival = rig.rival(case.rival)
    probes = {"a": DRIVE} if case.probe else {}
    sampler = Sampler(
        rig.store.c.path(IMAGE),
        {**monitors, "b": rival.sampler_monitor},
        {"client-a": rig.a.client_pid()},
        probes,
    )

    def cause(_fault_at: float) -> None:
        fault.cause(scene)
        if fault.outcome is Outcome.PAUSED:
            # Lock calls block until the MDS is active again: the deadline pauses A.
            wait_until(holder.stopped, what="the deadline to pause A", timeout=TIMEOUT)

    def settled() -> None:
        settle(fault.outcome, holder, rival, rig, TIMEOUT)

    run = run_fault(holder, rival, sampler, cause, settled, scene.heal)
    samples, fault_at = run.samples, run.fault_at
    writes = a_writes(samples, holder, case.probe, scene.killed_at)
    figures = measure(samples, writes, holder, rival, fault_at, run.fault_end)
    ended = ended_at(fault, holder, rival, samples, fault_at, figures)
    said = "B first wrote" if fault.outcome is Outcome.LOST else "A resumed"
    shown = f"{figures}, {said} {'-' if ended is None else f'{ended - fault_at:.3f} s'} after"
    print(f"\n{case.id}: {shown}")

    # A's guest quit at the end: its imglock run exited with QEMU's status, 0.
    check_run(run, writes, holder, rival)
    bound = 0.0 if case.probe else CHECK_INTERVAL + CHECK_DEADLINE
    assert figures.window <= bound, f"A and B could both write for {shown}: {rival.attempts()}"
    check_outcome(case, rig, holder, rival, samples, figures)
    low, high = fault.after
    assert ended is not None and low <= ended - fault_at <= high, (
        f"{said} outside [{low:g} s, {high:g} s]: {shown}"
    )


def ended_at(
    fault: Fault,
    holder: VmHolder,
    rival: Rival,
    samples: Samples,
    fault_at: float,
    figures: Figures,
) -> float | None:
    """When the fault came to its end: B's first write (a lost claim), A's guest resumed."""
    if fault.outcome is Outcome.LOST:
        return rival.first_write(samples)
    if figures.pause is None:
        return None
    return first(holder.guest(samples), True, fault_at + figures.pause + 1e-6)


def check_outcome(
    case: Case, rig: Rig, holder: VmHolder, rival: Rival, samples: Samples, figures: Figures
) -> None:
    messages = holder.messages()
    lost = lines_saying(messages, LOST_MESSAGE)
    # Paused by A's next check, however long the MDS keeps the session: a
    # check interval and its deadline.
    assert figures.pause is not None, f"A's guest was never paused: {figures}: {messages}"
    assert figures.pause <= CHECK_INTERVAL + CHECK_DEADLINE + PAUSE_SLACK, f"paused late: {figures}"
    if case.fault.outcome is Outcome.LOST:
        # One line that names the file: "imglock: FILE: lock lost: ...".
        assert len(lost) == 1, f"not one loss reported: {messages}"
        assert lost[0].startswith(f"imglock: {rig.image}: {LOST_MESSAGE}"), lost[0]
        assert not lines_saying(messages, RESUMED_MESSAGE), f"A was resumed: {messages}"
        return
    assert not lost, f"a false alarm: {figures}: {messages}"
    assert rival.first_write(samples) is None, f"B got in, A holding: {rival.attempts()}"
    # Every try of B's was refused as a conflict, with its documented exit status.
    assert {attempt["status"] for attempt in rival.attempts()} == {REFUSED_STATUS[rival.kind]}, (
        rival.attempts()
    )
    for words in (OVERDUE_MESSAGE, RESUMED_MESSAGE):
        (line,) = lines_saying(messages, words)
        assert line.startswith(f"imglock: {rig.image}: "), line


# -- the fencing hole ----------------------------------------------------------------


def write_anew(path: Path) -> bool:
    """Whether a descriptor opened now writes a byte at offset 0 of *path*."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.pwrite(fd, STALE_BYTE, 0)
        os.fsync(fd)
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return True


def run_sleep(host: Host, image: Path, log: Path) -> subprocess.Popen[str]:
    """``imglock -v run --image IMAGE -- sleep`` on *host*, checking its claim every second."""
    with log.open("w") as err:
        return host.popen(
            [sys.executable, "-m", "imglock", "-v", "run", "--check-interval", str(CHECK_INTERVAL),
             "--image", image, "--", "sleep", "600"],
            stderr=err,
        )  # fmt: skip


def command_of(proc: subprocess.Popen[str], name: str) -> int | None:
    """The pid of the process called *name* among *proc* and its descendants, once there is one."""
    for pid in process_tree(proc.pid):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
            if f.read().strip() == name:
                return pid
    return None


def claimed(log: Path) -> bool:
    return "claimed" in log.read_text()


#: What A says when its command is stopped: its loss seen, or a check hung.
STOPPED_MESSAGES = (LOST_MESSAGE, "lock check has not completed")


def test_with_client_reconnect_stale_an_evicted_host_writes_anew_while_its_claim_stays_lost(
    fault_store: Datastore, started: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    """What imglock guarantees when client_reconnect_stale is on: the loss
    reported and the command stopped for good.  Not what another program
    on A does: a descriptor opened after the reconnect writes, B holding
    the image.  The safe setting is the default, off."""
    a, b = fault_store.own_host("host-a", RECONNECT_STALE), fault_store.b
    image = a.path("disk.raw")
    with image.open("wb") as f:
        f.truncate(1 << 20)
    a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"
    started.append(run_sleep(a, image, a_log))
    wait_until(lambda: claimed(a_log), what="A's claim", timeout=TIMEOUT)
    refused = b.imglock("run", "--image", b.path("disk.raw"), "--", "true")
    assert refused.returncode == REFUSED_STATUS["imglock-run"], refused.stderr
    sleeper = wait_until(lambda: command_of(started[0], "sleep"), what="A's command")
    assert sleeper is not None
    assert a.session is not None
    evict(a.session, FAULT_FILESYSTEM)
    # A sees the loss, or a check hangs on the evicted client past its
    # deadline: either way its command is stopped, and never resumed below.
    wait_until(
        lambda: lines_saying(a_log.read_text().splitlines(), *STOPPED_MESSAGES),
        what="A to see its loss", timeout=TIMEOUT,
    )  # fmt: skip
    wait_until(lambda: state(sleeper) == "T", what="A's command stopped", timeout=TIMEOUT)
    started.append(run_sleep(b, b.path("disk.raw"), b_log))
    wait_until(lambda: claimed(b_log), what=f"B's claim: {b_log.read_text()}", timeout=TIMEOUT)
    # The hole: A's client reconnected, and a descriptor opened anew writes.
    wait_until(lambda: write_anew(image), what="A to write anew", timeout=TIMEOUT)
    assert fault_store.c.path("disk.raw").read_bytes()[:1] == STALE_BYTE
    # Some checks later, imglock on A has neither taken the claim back nor
    # resumed its command: B still holds the image.

    def a_stopped_b_holding() -> bool:
        assert state(sleeper) == "T", "A's command was resumed"
        assert started[1].poll() is None, b_log.read_text()
        return True

    holds_for(a_stopped_b_holding, 2 * CHECK_INTERVAL, what="A stopped, B holding")
    lines = a_log.read_text().splitlines()
    (stopped, *_) = lines_saying(lines, *STOPPED_MESSAGES)
    assert stopped.startswith(f"imglock: {image}: "), lines
    assert not lines_saying(lines, "claim intact: guest resumed"), lines
    assert not lines_saying(lines, "Traceback"), lines
