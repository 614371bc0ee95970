"""``imglock run`` on two hosts of a shared filesystem: migration, host crash, hung host.

The VMs are real QEMUs (a tiny PC under TCG), each under the real
``imglock run`` on its own host (UTS and PID namespaces, its own mount of
the datastore: tests/support/shared_fs.py), once on each filesystem.  Host C
watches the image's exclusive holders through its own mount, as an
operator's ``imglock status`` would, sample after sample.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import CLAIMER, QemuImg
from lock_sampler import owner_names
from processes import children, state, wait_until
from qemu_vm import TINY_PC
from shared_fs import HOST_NAMES, Datastore, Host
from wrapped_vm import Watcher, WrappedVM, WrappedVMs

from imglock.lock.identity import host_tag

pytestmark = pytest.mark.qemu

RUNNING = "running"
EX_TEMPFAIL = 75
#: How often the wrappers re-check their locks here.
CHECK_INTERVAL = 0.2
#: Seconds to wait for anything here: mounts of a network filesystem get longer.
TIMEOUT = 30.0

#: The wrapper's line when a check misses its deadline (imglock/run/runner.py).
DEADLINE_PAUSE = re.compile(
    r"guest paused \((QMP stop|QMP unavailable: sent SIGSTOP to pid \d+)\) until a check completes"
)

HOST_BY_TAG = {f"{host_tag(name):x}": name for name in HOST_NAMES}


def hosts_of(owners: list[str]) -> list[str]:
    """The host names of holders as tests/support/lock_sampler.py --owners names them (TAG:PID)."""
    return sorted(HOST_BY_TAG.get(o.split(":")[0], o) for o in owners)


@dataclass
class Cluster:
    """The datastore's hosts, a qcow2 chain on it, and VMs on the hosts."""

    store: Datastore
    vms: WrappedVMs

    def image(self, host: Host) -> Path:
        return host.path("top.qcow2")

    def start(
        self,
        name: str,
        host: Host,
        *extra: str,
        env: dict[str, str] | None = None,
        as_init: bool = True,
    ) -> WrappedVM:
        """Start a VM on the image under ``imglock run`` on *host* (its pid 1 with *as_init*)."""
        return self.vms.start(
            "-drive", f"file={self.image(host)},if=virtio", *extra,
            name=name, options=("--check-interval", str(CHECK_INTERVAL)), machine=TINY_PC,
            env=env, popen=functools.partial(host.popen, as_init=as_init),
        )  # fmt: skip

    def migrate(
        self,
        source: WrappedVM,
        name: str,
        host: Host,
        env: dict[str, str] | None = None,
        as_init: bool = True,
    ) -> WrappedVM:
        """Start a destination *name* on *host* and migrate *source* to it."""
        socket = self.vms.path(f"{name}.migrate")
        dest = self.start(name, host, "-incoming", f"unix:{socket}", env=env, as_init=as_init)
        wait_until(socket.exists, what="the incoming socket", timeout=TIMEOUT)
        source.qmp("migrate", {"uri": f"unix:{socket}"})
        return dest

    def holders(self) -> list[str]:
        """The hosts of the image's exclusive imglock holders, as host C sees them now."""
        image = str(self.image(self.store.c))
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return hosts_of(owner_names(fd, image))
        finally:
            os.close(fd)

    def watch(self) -> Watcher:
        """Sample the image's exclusive holders through host C's mount."""
        return Watcher(self.image(self.store.c), owners=True)

    def stop(self, vm: WrappedVM) -> None:
        # unshare --kill-child: the host's whole PID namespace goes with it.
        self.vms.end(vm)


@pytest.fixture
def cluster(datastore: Datastore, qemu_img: QemuImg, qemu_system_path: str) -> Iterator[Cluster]:
    directory = datastore.a.dir
    qemu_img("create", "-q", "-f", "qcow2", directory / "base.qcow2", "64M")
    qemu_img(
        "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", directory / "top.qcow2"
    )
    with WrappedVMs(qemu_system_path, prefix="imglock-2h-") as vms:
        yield Cluster(datastore, vms)


def _exclusive_from_c(cluster: Cluster) -> dict[str, object]:
    """The image's exclusive imglock holder as ``imglock status --json`` on host C shows it."""
    c = cluster.store.c
    proc = c.imglock("status", "--json", cluster.image(c))
    (report,) = json.loads(proc.stdout)
    (holder,) = [h for h in report["holders"] if h["mode"] == "exclusive"]
    return holder  # type: ignore[no-any-return]


def _the_owners(samples: list[tuple[float, list[str]]]) -> list[str]:
    """The succession of exclusive holders' hosts, each named once per uninterrupted stretch."""
    assert max(len(holders) for _t, holders in samples) == 1, "two exclusive holders at once"
    seen = [hosts_of(holders)[0] for _t, holders in samples if holders]
    return [who for who, _run in itertools.groupby(seen)]


def test_a_vm_migrates_from_a_to_b_and_back_and_the_claim_follows_it(cluster: Cluster) -> None:
    a, b, _c = cluster.store.hosts
    on_a = cluster.start("a1", a)
    wait_until(lambda: cluster.holders() == ["host-a"], what="host A's claim", timeout=TIMEOUT)
    with cluster.watch() as watcher:
        on_b = cluster.migrate(on_a, "b1", b)
        wait_until(
            lambda: on_b.runstate() == RUNNING, what="the guest to run on B", timeout=TIMEOUT
        )
        wait_until(lambda: cluster.holders() == ["host-b"], what="host B's claim", timeout=TIMEOUT)
        assert on_a.runstate() == "postmigrate"
        # B writes its holder record once the guest runs: C then names its command.
        wait_until(
            lambda: "qemu-system" in str(_exclusive_from_c(cluster)),
            what="B's record",
            timeout=TIMEOUT,
        )
        assert _exclusive_from_c(cluster)["host"] == "host-b"
        cluster.stop(on_a)

        back = cluster.migrate(on_b, "a2", a)
        wait_until(
            lambda: back.runstate() == RUNNING, what="the guest to run on A again", timeout=TIMEOUT
        )
        wait_until(
            lambda: cluster.holders() == ["host-a"], what="host A's claim again", timeout=TIMEOUT
        )
        samples = watcher.stop()
    # Never two at once; the claim moved A -> B -> A, each move once.
    assert _the_owners(samples) == ["host-a", "host-b", "host-a"]
    assert on_b.runstate() == "postmigrate"


def test_the_destination_host_resumes_the_guest_only_once_it_holds_the_claim(
    cluster: Cluster,
) -> None:
    a, b, _c = cluster.store.hosts
    on_a = cluster.start("a1", a)
    wait_until(lambda: cluster.holders() == ["host-a"], what="host A's claim", timeout=TIMEOUT)
    # Freeze B's wrapper right after it has claimed, before it lets the guest
    # run (not as host B's pid 1, which would ignore its own SIGSTOP).
    on_b = cluster.migrate(
        on_a, "b1", b, env={"IMGLOCK_FAULTS": "stop=handoff:claimed"}, as_init=False
    )
    wrapper = _wrapper_of(on_b)
    wait_until(
        lambda: state(wrapper) == "T",
        what="B's wrapper to stop at the claimed step",
        timeout=TIMEOUT,
    )
    assert cluster.holders() == ["host-b"]
    assert on_b.runstate() != RUNNING
    os.kill(wrapper, signal.SIGCONT)
    wait_until(lambda: on_b.runstate() == RUNNING, what="the guest to run on B", timeout=TIMEOUT)


def _wrapper_of(vm: WrappedVM) -> int:
    """The wrapper's pid (as this test's PID namespace numbers it): unshare -> sh -> wrapper."""
    (shell,) = children(vm.process.pid)
    wait_until(
        lambda: len(children(shell)) == 1,
        what="the host's shell to start the wrapper",
        timeout=TIMEOUT,
    )
    (wrapper,) = children(shell)
    return wrapper


def test_a_cancelled_migration_leaves_the_claim_on_the_source_host(cluster: Cluster) -> None:
    a, b, _c = cluster.store.hosts
    on_a = cluster.start("a1", a)
    wait_until(lambda: cluster.holders() == ["host-a"], what="host A's claim", timeout=TIMEOUT)
    on_a.qmp("migrate-set-parameters", {"max-bandwidth": 1 << 20})  # still going at cancel
    on_b = cluster.migrate(on_a, "b1", b)
    wait_until(
        lambda: on_a.migration() == "active", what="the migration to be active", timeout=TIMEOUT
    )
    on_a.qmp("migrate_cancel")
    wait_until(lambda: on_a.migration() == "cancelled", what="the cancellation", timeout=TIMEOUT)
    assert on_b.process.wait(timeout=30) != 0  # the destination QEMU gave up
    assert on_a.runstate() == RUNNING
    assert cluster.holders() == ["host-a"]


def test_a_failed_migration_leaves_the_claim_on_the_source_host(cluster: Cluster) -> None:
    a, _b, _c = cluster.store.hosts
    on_a = cluster.start("a1", a)
    wait_until(lambda: cluster.holders() == ["host-a"], what="host A's claim", timeout=TIMEOUT)
    on_a.qmp("migrate", {"uri": f"unix:{cluster.vms.path('nobody-listens.sock')}"})
    wait_until(lambda: on_a.migration() == "failed", what="the failure", timeout=TIMEOUT)
    assert on_a.runstate() == RUNNING
    assert cluster.holders() == ["host-a"]


def test_a_crashed_host_pauses_its_guest_and_b_takes_over_once_its_locks_are_gone(
    cluster: Cluster,
) -> None:
    _a, b, _c = cluster.store.hosts
    a = cluster.store.own_host("host-a")  # a mount of its own, to crash
    on_a = cluster.start("a1", a)
    wait_until(lambda: on_a.runstate() == RUNNING, what="the guest to run on A", timeout=TIMEOUT)
    wait_until(lambda: cluster.holders() == ["host-a"], what="host A's claim", timeout=TIMEOUT)

    a.crash()  # host A's client dies: its lock calls fail from now on
    # The wrapper on A notices at its next check, says so, and pauses the guest
    # (its QMP monitor is a local socket, still there).
    wait_until(
        lambda: "lock lost" in on_a.stderr(), what="the loss", timeout=10 * CHECK_INTERVAL + 5
    )
    wait_until(lambda: on_a.runstate() == "paused", what="the guest to be paused", timeout=TIMEOUT)
    (line,) = [x for x in on_a.stderr().splitlines() if "lock lost" in x]
    assert str(cluster.image(a)) in line and "guest paused (QMP stop)" in line
    assert on_a.process.poll() is None  # the wrapper and its QEMU are still there

    if not cluster.store.crash_drops_locks_at_once:
        # The lock manager keeps A's locks (and capabilities: others cannot
        # even look the image up meanwhile) until the operator frees them.
        cluster.store.release_crashed(a)
    # Host B may now start the VM.
    proc = subprocess.run(
        [*b.prefix(), sys.executable, CLAIMER, cluster.image(b)],
        input="", capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )  # fmt: skip
    assert json.loads(proc.stdout.splitlines()[0])["ok"], proc.stdout
    assert cluster.holders() == []


def test_a_hung_host_keeps_its_claim_and_loses_nothing(
    cluster: Cluster, started: list[subprocess.Popen[str]]
) -> None:
    _a, b, c = cluster.store.hosts
    a = cluster.store.own_host("host-a")  # a mount of its own, to hang
    on_a = cluster.start("a1", a)
    wait_until(lambda: on_a.runstate() == RUNNING, what="the guest to run on A", timeout=TIMEOUT)
    wait_until(lambda: cluster.holders() == ["host-a"], what="host A's claim", timeout=TIMEOUT)

    a.hang()  # host A's client stops: nothing expires its locks
    try:
        on_b = b.popen(
            [sys.executable, "-m", "imglock", "run", "--image", cluster.image(b), "--", "true"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        started.append(on_b)
        if not cluster.store.hung_client_stalls_others:
            # B is refused at once, and C sees A hold the image.
            assert on_b.wait(timeout=60) == EX_TEMPFAIL
            status = c.imglock("status", "--json", cluster.image(c))
            (report,) = json.loads(status.stdout)
            assert ("host-a", "exclusive") in [(h["host"], h["mode"]) for h in report["holders"]]
        # A check comes due while A hangs and cannot complete: past its
        # deadline the guest is paused, before the server could let go.
        # (QEMU's own monitor may not answer meanwhile: the guest's disk
        # requests in flight hang, and QEMU waits for them in its main loop;
        # the wrapper then stops QEMU with SIGSTOP instead.)
        wait_until(
            lambda: DEADLINE_PAUSE.search(on_a.stderr()),
            what="the guest paused by the deadline", timeout=TIMEOUT,
        )  # fmt: skip
        assert on_b.poll() in (None, EX_TEMPFAIL), "B got the image of a host that hangs"
    finally:
        a.resume()
    # B was refused (where it had to wait, once A answered again), naming A.
    _out, err = on_b.communicate(timeout=TIMEOUT)
    assert on_b.returncode == EX_TEMPFAIL and "on host-a" in err, err
    # The check completes with the claim intact: the guest runs again.
    wait_until(
        lambda: "claim intact: guest resumed" in on_a.stderr(),
        what="the wrapper to resume the guest", timeout=TIMEOUT,
    )  # fmt: skip
    wait_until(lambda: on_a.runstate() == RUNNING, what="the guest resumed", timeout=TIMEOUT)
    assert cluster.holders() == ["host-a"]
    assert "has not completed" in on_a.stderr()
    assert "lock lost" not in on_a.stderr()
    assert on_a.process.poll() is None


def test_status_from_another_host_shows_a_wrapped_qemu_as_one_holder_with_its_perms(
    cluster: Cluster,
) -> None:
    a, b, _c = cluster.store.hosts
    on_a = cluster.start("a1", a)
    wait_until(lambda: on_a.runstate() == RUNNING, what="the guest to run on A", timeout=TIMEOUT)
    wait_until(lambda: cluster.holders() == ["host-a"], what="host A's claim", timeout=TIMEOUT)
    proc = b.imglock("status", "--json", cluster.image(b), b.path("base.qcow2"))
    assert proc.returncode == 1, proc.stderr
    top, base = json.loads(proc.stdout)
    # QEMU's own bytes and the wrapper's are one holder: the VM on host A.
    ((layer, mode, host, perms, unshared),) = [
        (h["layer"], h["mode"], h["host"], h["perms"], h["unshared"]) for h in top["holders"]
    ]
    assert (layer, mode, host) == ("imglock", "exclusive", "host-a")
    assert perms == ["consistent read", "write", "resize"] and unshared == ["write", "resize"]
    ((layer, mode, host, perms),) = [
        (h["layer"], h["mode"], h["host"], h["perms"]) for h in base["holders"]
    ]
    assert (layer, mode, host, perms) == ("imglock", "shared", "host-a", ["consistent read"])
