"""``imglock run`` on two hosts of a GlusterFS volume: migration, host crash, hung host.

The VMs are real QEMUs (a tiny PC under TCG), each under the real
``imglock run`` on its own host (UTS and PID namespaces, its own mount of
the volume).  Host C watches the image's exclusive holders through its own
mount, as an operator's ``imglock status`` would, sample after sample.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import CLAIMER, QemuImg
from gluster_hosts import HOST_NAMES, Datastore, Host
from lock_sampler import owner_names
from qemu_vm import TINY_PC

from imglock.lock.identity import host_tag
from imglock.qemu.monitor import MonitorThread

pytestmark = [pytest.mark.gluster, pytest.mark.qemu]

RUNNING = "running"
#: How often the wrappers re-check their locks here.
CHECK_INTERVAL = 0.2


def _until(predicate: Callable[[], object], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what or predicate}")


HOST_BY_TAG = {f"{host_tag(name):x}": name for name in HOST_NAMES}


def hosts_of(owners: list[str]) -> list[str]:
    """The host names of holders as tests/lock_sampler.py --owners names them (TAG:PID)."""
    return sorted(HOST_BY_TAG.get(o.split(":")[0], o) for o in owners)


@dataclass
class HostVM:
    """``imglock run -- qemu-system-x86_64 ...`` on a host, with a QMP monitor of the test's."""

    host: Host
    process: subprocess.Popen[str]
    qmp_path: str
    log_path: Path
    monitor: MonitorThread | None = None

    def connect(self) -> None:
        self.monitor = MonitorThread.connect(self.qmp_path, timeout=30, process=self.process)

    def execute(self, command: str, arguments: dict[str, object] | None = None) -> object:
        assert self.monitor is not None
        return self.monitor.call(self.monitor.monitor.execute(command, arguments))

    def status(self) -> str:
        assert self.monitor is not None
        return self.monitor.query_status().status

    def migration(self) -> str | None:
        reply = self.execute("query-migrate")
        assert isinstance(reply, dict)
        return reply.get("status")

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Cluster:
    """The datastore's hosts, a qcow2 chain on it, a private socket directory, the VMs."""

    store: Datastore
    qemu: str
    sockets: Path
    vms: list[HostVM] = field(default_factory=list)

    def image(self, host: Host) -> Path:
        return host.path("top.qcow2")

    def start(
        self,
        name: str,
        host: Host,
        *extra: str,
        env: dict[str, str] | None = None,
        as_init: bool = True,
    ) -> HostVM:
        qmp = str(self.sockets / f"{name}.qmp")
        argv = [
            sys.executable, "-m", "imglock", "-v", "run", "--check-interval", str(CHECK_INTERVAL),
            "--", self.qemu, *TINY_PC, "-drive", f"file={self.image(host)},if=virtio",
            "-qmp", f"unix:{qmp},server=on,wait=off", *extra,
        ]  # fmt: skip
        log_path = self.sockets / f"{name}.log"
        with log_path.open("w") as log:
            process = host.popen(
                argv,
                as_init, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), **(env or {})},
            )  # fmt: skip
        vm = HostVM(host, process, qmp, log_path)
        self.vms.append(vm)
        vm.connect()
        return vm

    def migrate(self, source: HostVM, name: str, host: Host) -> HostVM:
        """Start a destination on *host* and migrate *source* to it."""
        sock = self.sockets / f"{name}.migrate"
        dest = self.start(name, host, "-incoming", f"unix:{sock}")
        _until(sock.exists, what="the incoming socket")
        source.execute("migrate", {"uri": f"unix:{sock}"})
        return dest

    def holders(self) -> list[str]:
        """The hosts of the image's exclusive imglock holders, as host C sees them now."""
        image = str(self.image(self.store.c))
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return hosts_of(owner_names(fd, image))
        finally:
            os.close(fd)

    def stop(self, vm: HostVM) -> None:
        if vm.monitor is not None:
            vm.monitor.close()
            vm.monitor = None
        # unshare --kill-child: the host's whole PID namespace goes with it.
        vm.process.kill()
        vm.process.wait()

    def close(self) -> None:
        for vm in self.vms:
            self.stop(vm)


SAMPLER = str(Path(__file__).with_name("lock_sampler.py"))


class Watcher:
    """tests/lock_sampler.py on host C's mount, sampling the exclusive holders."""

    def __init__(self, cluster: Cluster) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, SAMPLER, "--owners", cluster.image(cluster.store.c)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"

    def stop(self) -> list[tuple[float, list[str]]]:
        out, _ = self.proc.communicate(timeout=30)
        return [(t, hosts_of(owners)) for t, owners in json.loads(out)]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def cluster(datastore: Datastore, qemu_img: QemuImg, qemu_system_path: str) -> Iterator[Cluster]:
    directory = datastore.a.dir
    qemu_img("create", "-q", "-f", "qcow2", directory / "base.qcow2", "64M")
    qemu_img(
        "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", directory / "top.qcow2"
    )
    # Unix socket paths are short: keep them in a 0700 directory under /tmp.
    sockets = Path(tempfile.mkdtemp(prefix="imglock-2h-", dir="/tmp"))
    cluster = Cluster(datastore, qemu_system_path, sockets)
    try:
        yield cluster
    finally:
        cluster.close()
        for entry in sockets.iterdir():
            entry.unlink()
        sockets.rmdir()


def _exclusive_from_c(cluster: Cluster) -> dict[str, object]:
    """The image's exclusive imglock holder as ``imglock status --json`` on host C shows it."""
    c = cluster.store.c
    proc = c.imglock("status", "--json", cluster.image(c))
    (report,) = json.loads(proc.stdout)
    (holder,) = [h for h in report["holders"] if h["mode"] == "exclusive"]
    return holder  # type: ignore[no-any-return]


def _the_owners(samples: list[tuple[float, list[str]]]) -> list[str]:
    """The succession of exclusive holders, each named once per uninterrupted stretch."""
    assert max(len(holders) for _t, holders in samples) == 1, "two exclusive holders at once"
    seen = [holders[0] for _t, holders in samples if holders]
    return [who for who, _run in itertools.groupby(seen)]


def test_a_vm_migrates_from_a_to_b_and_back_and_the_claim_follows_it(cluster: Cluster) -> None:
    a, b, _c = cluster.store.hosts
    on_a = cluster.start("a1", a)
    _until(lambda: cluster.holders() == ["host-a"], what="host A's claim")
    watcher = Watcher(cluster)
    try:
        on_b = cluster.migrate(on_a, "b1", b)
        _until(lambda: on_b.status() == RUNNING, what="the guest to run on B")
        _until(lambda: cluster.holders() == ["host-b"], what="host B's claim")
        assert on_a.status() == "postmigrate"
        # B writes its holder record once the guest runs: C then names its command.
        _until(lambda: "qemu-system" in str(_exclusive_from_c(cluster)), what="B's record")
        assert _exclusive_from_c(cluster)["host"] == "host-b"
        cluster.stop(on_a)

        back = cluster.migrate(on_b, "a2", a)
        _until(lambda: back.status() == RUNNING, what="the guest to run on A again")
        _until(lambda: cluster.holders() == ["host-a"], what="host A's claim again")
        samples = watcher.stop()
    finally:
        watcher.kill()
    # Never two at once; the claim moved A -> B -> A, each move once.
    assert _the_owners(samples) == ["host-a", "host-b", "host-a"]
    assert on_b.status() == "postmigrate"


def test_the_destination_host_resumes_the_guest_only_once_it_holds_the_claim(
    cluster: Cluster,
) -> None:
    a, b, _c = cluster.store.hosts
    on_a = cluster.start("a1", a)
    _until(lambda: cluster.holders() == ["host-a"], what="host A's claim")
    # Freeze B's wrapper right after it has claimed, before it lets the guest
    # run (not as host B's pid 1, which would ignore its own SIGSTOP).
    on_b = cluster.start(
        "b1", b, "-incoming", f"unix:{cluster.sockets / 'b1.migrate'}",
        env={"IMGLOCK_FAULTS": "stop=handoff:claimed"}, as_init=False,
    )  # fmt: skip
    _until((cluster.sockets / "b1.migrate").exists, what="the incoming socket")
    on_a.execute("migrate", {"uri": f"unix:{cluster.sockets / 'b1.migrate'}"})
    wrapper = _wrapper_of(on_b)
    _until(lambda: _stopped(wrapper), what="B's wrapper to stop at the claimed step")
    assert cluster.holders() == ["host-b"]
    assert on_b.status() != RUNNING
    os.kill(wrapper, signal.SIGCONT)
    _until(lambda: on_b.status() == RUNNING, what="the guest to run on B")


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _wrapper_of(vm: HostVM) -> int:
    """The wrapper's pid (as this test's PID namespace numbers it): unshare -> sh -> wrapper."""
    (shell,) = _children(vm.process.pid)
    _until(lambda: len(_children(shell)) == 1, what="the host's shell to start the wrapper")
    (wrapper,) = _children(shell)
    return wrapper


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_a_cancelled_migration_leaves_the_claim_on_the_source_host(cluster: Cluster) -> None:
    a, b, _c = cluster.store.hosts
    on_a = cluster.start("a1", a)
    _until(lambda: cluster.holders() == ["host-a"], what="host A's claim")
    on_a.execute("migrate-set-parameters", {"max-bandwidth": 1 << 20})  # still going at cancel
    on_b = cluster.migrate(on_a, "b1", b)
    _until(lambda: on_a.migration() == "active", what="the migration to be active")
    on_a.execute("migrate_cancel")
    _until(lambda: on_a.migration() == "cancelled", what="the cancellation")
    assert on_b.process.wait(timeout=30) != 0  # the destination QEMU gave up
    assert on_a.status() == RUNNING
    assert cluster.holders() == ["host-a"]


def test_a_failed_migration_leaves_the_claim_on_the_source_host(cluster: Cluster) -> None:
    a, _b, _c = cluster.store.hosts
    on_a = cluster.start("a1", a)
    _until(lambda: cluster.holders() == ["host-a"], what="host A's claim")
    on_a.execute("migrate", {"uri": f"unix:{cluster.sockets / 'nobody-listens.sock'}"})
    _until(lambda: on_a.migration() == "failed", what="the failure")
    assert on_a.status() == RUNNING
    assert cluster.holders() == ["host-a"]


def test_a_crashed_host_loses_its_claim_its_wrapper_pauses_the_guest_and_b_takes_over(
    cluster: Cluster,
) -> None:
    _a, b, _c = cluster.store.hosts
    a = cluster.store.own_host("host-a")  # a mount of its own, to crash
    on_a = cluster.start("a1", a)
    _until(lambda: on_a.status() == RUNNING, what="the guest to run on A")
    _until(lambda: cluster.holders() == ["host-a"], what="host A's claim")

    a.crash()  # host A's client dies: the lock manager drops all of A's locks
    # The wrapper on A notices at its next check, says so, and pauses the guest
    # (its QMP monitor is a local socket, still there).
    _until(lambda: "lock lost" in on_a.stderr(), timeout=10 * CHECK_INTERVAL + 5, what="the loss")
    _until(lambda: on_a.status() == "paused", what="the guest to be paused")
    (line,) = [x for x in on_a.stderr().splitlines() if "lock lost" in x]
    assert str(cluster.image(a)) in line and "guest paused (QMP stop)" in line
    assert on_a.process.poll() is None  # the wrapper and its QEMU are still there

    # Host B may now start the VM.
    proc = subprocess.run(
        [*b.prefix(), sys.executable, CLAIMER, cluster.image(b)],
        input="", capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )  # fmt: skip
    assert json.loads(proc.stdout.splitlines()[0])["ok"], proc.stdout
    assert cluster.holders() == []


def test_a_hung_host_keeps_its_claim_and_loses_nothing(cluster: Cluster) -> None:
    _a, b, c = cluster.store.hosts
    a = cluster.store.own_host("host-a")  # a mount of its own, to hang
    on_a = cluster.start("a1", a)
    _until(lambda: on_a.status() == RUNNING, what="the guest to run on A")
    _until(lambda: cluster.holders() == ["host-a"], what="host A's claim")

    a.hang()  # host A's client stops: nothing expires its locks
    try:
        proc = b.imglock("run", "--image", cluster.image(b), "--", "true")
        assert proc.returncode == 75 and "on host-a" in proc.stderr
        status = c.imglock("status", "--json", cluster.image(c))
        (report,) = json.loads(status.stdout)
        assert ("host-a", "exclusive") in [(h["host"], h["mode"]) for h in report["holders"]]
        time.sleep(3 * CHECK_INTERVAL)  # several checks come due while A hangs
    finally:
        a.resume()
    assert cluster.holders() == ["host-a"]
    assert on_a.status() == RUNNING
    assert "lock lost" not in on_a.stderr()
    assert on_a.process.poll() is None


def test_status_from_another_host_shows_a_wrapped_qemu_as_one_holder_with_its_perms(
    cluster: Cluster,
) -> None:
    a, b, _c = cluster.store.hosts
    on_a = cluster.start("a1", a)
    _until(lambda: on_a.status() == RUNNING, what="the guest to run on A")
    _until(lambda: cluster.holders() == ["host-a"], what="host A's claim")
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
