"""Live migration between two libvirt hosts, each running its domains through imglock.

Host A's and host B's libvirtd (``tests/libvirt/up``) each live in
namespaces of their own; the domain's disk is on the GlusterFS rig, which
each host reaches through its own client at the same path.  ``virsh
migrate`` moves the guest while the image's exclusive holders are sampled
all along from a process of the test's: never two, and the claim moves once.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import waiting_pids
from gluster_hosts import mount_points
from gluster_hosts import unavailable_reason as gluster_missing
from libvirt_hosts import (
    REQUIRE_LIBVIRT,
    Disk,
    Domain,
    Libvirt,
    VirshError,
    bind_in_namespace,
    emulator,
    migrate,
    unavailable_reason,
)
from processes import wait_until
from qcow2_builder import QemuImg
from wrapped_vm import Watcher

import imglock

pytestmark = [pytest.mark.qemu, pytest.mark.libvirt, pytest.mark.gluster]

REQUIRE_GLUSTER = os.environ.get("IMGLOCK_REQUIRE_GLUSTER") == "1"
#: Seconds for a migration of a 64 MiB TCG guest (some 8 s on an idle machine).
MIGRATION_TIMEOUT = 120.0

Samples = list[tuple[float, list[str]]]


def required(reason: str | None, required: bool, what: str) -> None:
    if reason is not None and required:
        pytest.fail(f"{what} is required here: {reason}")
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def hosts() -> tuple[Libvirt, Libvirt]:
    required(unavailable_reason(), REQUIRE_LIBVIRT, "libvirt")
    required(gluster_missing(), REQUIRE_GLUSTER, "GlusterFS")
    a, b = Libvirt.of("a"), Libvirt.of("b")
    mount_a, mount_b, _c = mount_points()
    # Host B's domains reach the volume through B's client, at A's path.
    bind_in_namespace(b, mount_b, mount_a)
    return a, b


@pytest.fixture
def top(qemu_img: QemuImg) -> Iterator[Path]:
    """A qcow2 top on a backing file, in a directory of the test's own on the volume."""
    directory = mount_points()[0] / f"imglock-libvirt-{uuid.uuid4().hex[:10]}"
    directory.mkdir()
    base, top = directory / "base.qcow2", directory / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "16M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    yield top
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def domain(hosts: tuple[Libvirt, Libvirt], top: Path, tmp_path: Path) -> Iterator[Domain]:
    """A domain defined on host A; removed from both hosts afterwards.

    Its handoff waits 3 s for the claim (30 s by default), so that a
    refused handoff ends soon.
    """
    a, b = hosts
    program = emulator(tmp_path, "--handoff-timeout", "3")
    made = Domain(a, program, [Disk(top)]).define(tmp_path)
    try:
        yield made
    finally:
        made.remove()
        on_b(made, b).remove()


def on_b(domain: Domain, b: Libvirt) -> Domain:
    """The same domain as host B's libvirtd knows it (once migrated there)."""
    return Domain(b, domain.emulator, domain.disks, domain.name)


def start_on_a(domain: Domain) -> int:
    """Start *domain* on host A; its QEMU's pid."""
    domain.virsh("start")
    [qemu] = wait_until(domain.qemu_pids, what="host A's QEMU")
    return qemu


def owners(samples: Samples) -> list[str]:
    """Who held the image exclusive (``HOSTTAG:PID``), in the order seen, repeats folded.

    On a network filesystem one sample is several lock tests in a row, each
    a round trip: a handoff in the middle of one shows the leaving and the
    arriving holder in it, although they never held at once.  Two holders
    seen in two samples running are proven to overlap: each held all along
    from its test in the first to its test in the second, and the first
    sample's tests all came before the second's.
    """
    changes = [(t, h) for n, (t, h) in enumerate(samples) if n == 0 or samples[n - 1][1] != h]
    for (_t, first), (_u, second) in itertools.pairwise(samples):
        both = set(first) & set(second)
        assert len(both) <= 1, f"two holders at once: {sorted(both)} in {changes}"
    # A sample caught mid-handoff names both: the succession is in the others.
    seen: list[str] = []
    for _t, holders in changes:
        if len(holders) == 1 and (not seen or seen[-1] != holders[0]):
            seen.append(holders[0])
    return seen


def test_a_live_migration_moves_the_claim_from_host_a_to_host_b_never_to_both(
    hosts: tuple[Libvirt, Libvirt], domain: Domain, top: Path
) -> None:
    _a, b = hosts
    qemu_a = start_on_a(domain)
    with Watcher(top, owners=True) as watcher:
        migrate(domain, b)
        arrived = on_b(domain, b)
        wait_until(lambda: arrived.state() == "running", what="the guest to run on host B")
        [qemu_b] = arrived.qemu_pids()
        wait_until(lambda: not domain.qemu_pids(), what="host A's QEMU to end")
        samples = watcher.stop()
    seen = owners(samples)
    assert len(seen) == 2, seen
    assert seen[0].endswith(f":{qemu_a}") and seen[1].endswith(f":{qemu_b}"), seen
    assert seen[0].split(":")[0] != seen[1].split(":")[0], "the same host tag on both hosts"


def test_an_aborted_migration_leaves_the_claim_and_the_running_guest_on_host_a(
    hosts: tuple[Libvirt, Libvirt], domain: Domain, top: Path
) -> None:
    _a, b = hosts
    qemu_a = start_on_a(domain)
    refused: list[VirshError] = []

    def slow_migration() -> None:
        try:
            migrate(domain, b, "--bandwidth", "1")  # MiB/s: it lasts long enough to abort
        except VirshError as exc:
            refused.append(exc)

    with Watcher(top, owners=True) as watcher:
        mover = threading.Thread(target=slow_migration)
        mover.start()
        wait_until(lambda: "Data processed" in domain.virsh("domjobinfo"),
                   what="the migration to run", timeout=MIGRATION_TIMEOUT)  # fmt: skip
        domain.virsh("domjobabort")
        mover.join(MIGRATION_TIMEOUT)
        samples = watcher.stop()
    assert refused, "the migration was not aborted"
    seen = owners(samples)
    assert len(seen) == 1 and seen[0].endswith(f":{qemu_a}"), seen
    assert domain.state() == "running" and domain.qemu_pids() == [qemu_a]
    assert not on_b(domain, b).qemu_pids()


def test_a_migration_whose_destination_cannot_claim_leaves_no_guest_running_without_its_claim(
    hosts: tuple[Libvirt, Libvirt], domain: Domain, top: Path
) -> None:
    """A claimer queued on host C before the switch-over gets the image: B's claim is refused.

    libvirt then resumes neither side: B's ``cont`` is refused, and so is
    A's, which would have to take the claim back from C.
    """
    _a, b = hosts
    qemu_a = start_on_a(domain)
    on_c = mount_points()[2] / top.parent.name / top.name
    waiter = subprocess.Popen(
        [sys.executable, "-m", "imglock", "run", "--exec", "-w", "60", "--image", str(on_c),
         "--", "sleep", "60"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: waiting_pids(top) == [waiter.pid], what="C to wait in the queue")
        with Watcher(top, owners=True) as watcher:
            with pytest.raises(VirshError):
                migrate(domain, b)
            wait_until(lambda: holder_pids(top) == [waiter.pid], what="C to hold the image")
            samples = watcher.stop()
        seen = owners(samples)
        assert seen[0].endswith(f":{qemu_a}") and seen[-1].endswith(f":{waiter.pid}"), seen
        assert domain.state() != "running"  # A's guest stays paused: its claim is C's now
        # B's QEMU never ran the guest; libvirt ended it once the migration failed.
        wait_until(lambda: not on_b(domain, b).qemu_pids(), what="B's QEMU to end")
    finally:
        waiter.kill()
        waiter.communicate()


def holder_pids(top: Path) -> list[int | None]:
    return [h.pid for h in imglock.holders(top) if h.layer == "imglock"]
