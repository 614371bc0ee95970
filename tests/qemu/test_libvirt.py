"""libvirt runs its domains through imglock: what a libvirt operator does to a VM.

A domain's ``<emulator>`` is imglock's (``imglock run`` over the real
QEMU); libvirtd 9.0 of ``tests/libvirt/up`` starts it, as root, in a host
of its own (``libvirt-a``).  Each test uses what virsh offers and then
looks at what ``imglock status`` says from outside.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from libvirt_hosts import (
    Disk,
    Domain,
    EventWatch,
    Libvirt,
    VirshError,
    emulator,
    holders,
    required_host,
    restart_libvirtd,
)
from processes import wait_until
from qcow2_builder import QemuImg

pytestmark = [pytest.mark.qemu, pytest.mark.libvirt]

IMGLOCK = [sys.executable, "-m", "imglock"]
SIZE = "16M"

#: Defines a domain on host A with the given disks (the ``new_domain`` fixture).
NewDomain = Callable[..., Domain]


@pytest.fixture(scope="module")
def host() -> Libvirt:
    return required_host("a")


@pytest.fixture
def images(tmp_path: Path, qemu_img: QemuImg) -> tuple[Path, Path]:
    """A qcow2 top on a qcow2 backing file."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, SIZE)
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    return top, base


@pytest.fixture
def domains(host: Libvirt, tmp_path: Path) -> Iterator[list[Domain]]:
    """Domains a test defines; destroyed and undefined afterwards."""
    made: list[Domain] = []
    yield made
    for domain in made:
        domain.remove()


@pytest.fixture
def new_domain(host: Libvirt, tmp_path: Path, domains: list[Domain]) -> NewDomain:
    program = emulator(tmp_path)

    def make(*disks: Disk) -> Domain:
        domain = Domain(host, program, list(disks)).define(tmp_path)
        domains.append(domain)
        return domain

    return make


@dataclass(frozen=True)
class Running:
    """A domain on the images' top, started, and its QEMU's pid."""

    domain: Domain
    qemu: int


@pytest.fixture
def running(images: tuple[Path, Path], new_domain: NewDomain) -> Running:
    domain = new_domain(Disk(images[0]))
    domain.virsh("start")
    [qemu] = wait_until(domain.qemu_pids, what="the domain's QEMU")
    return Running(domain, qemu)


def snapshot_to(domain: Domain, overlay: Path) -> None:
    """A disk-only snapshot of vda onto *overlay*, which becomes the top."""
    domain.virsh("snapshot-create-as", "--name", "s1", "--disk-only", "--no-metadata",
                 "--diskspec", f"vda,file={overlay}")  # fmt: skip


def imglock_holders(path: Path) -> list[dict[str, object]]:
    return [h for h in holders(IMGLOCK, path) if h["layer"] == "imglock"]


def held(path: Path, mode: str) -> bool:
    return [h["mode"] for h in imglock_holders(path)] == [mode]


def free(path: Path) -> bool:
    return not imglock_holders(path)


def test_a_domain_holds_its_top_exclusive_and_its_backing_file_shared_under_its_qemus_pid(
    host: Libvirt, images: tuple[Path, Path], running: Running
) -> None:
    top, base = images
    domain, qemu = running.domain, running.qemu
    [holder] = imglock_holders(top)
    assert (holder["mode"], holder["pid"], holder["host"]) == ("exclusive", qemu, host.hostname)
    assert holder["vm"] == domain.name and f"guest={domain.name}," in str(holder["command"])
    assert [(h["mode"], h["pid"]) for h in imglock_holders(base)] == [("shared", qemu)]


def test_a_second_domain_on_the_same_top_is_refused_with_the_holder_in_virshs_error(
    host: Libvirt, images: tuple[Path, Path], new_domain: NewDomain
) -> None:
    top, _base = images
    first = new_domain(Disk(top))
    first.virsh("start")
    [qemu] = wait_until(first.qemu_pids, what="the first domain's QEMU")
    second = new_domain(Disk(top))
    with pytest.raises(VirshError) as refused:
        second.virsh("start")
    assert str(top) in str(refused.value) and f"pid {qemu}" in str(refused.value)
    assert second.state() == "shut off" and not second.qemu_pids()
    assert held(top, "exclusive") and first.state() == "running"


def test_destroy_ends_qemu_and_frees_the_claim(images: tuple[Path, Path], running: Running) -> None:
    top, base = images
    domain = running.domain
    wait_until(domain.qemu_pids, what="the domain's QEMU")
    domain.virsh("destroy")
    assert not domain.qemu_pids()
    wait_until(lambda: free(top) and free(base), what="the claim to be free")


def test_suspend_and_resume_keep_the_claim(images: tuple[Path, Path], running: Running) -> None:
    top, _base = images
    domain = running.domain
    domain.virsh("suspend")
    assert domain.state() == "paused" and held(top, "exclusive")
    domain.virsh("resume")
    assert domain.state() == "running" and held(top, "exclusive")


def test_a_disk_only_snapshot_moves_the_exclusive_claim_to_the_new_overlay(
    tmp_path: Path, images: tuple[Path, Path], running: Running
) -> None:
    top, base = images
    overlay = tmp_path / "overlay.qcow2"
    domain = running.domain
    snapshot_to(domain, overlay)
    wait_until(lambda: held(overlay, "exclusive") and held(top, "shared"),
               what="the overlay claimed exclusive, the old top shared")  # fmt: skip
    assert held(base, "shared") and domain.state() == "running"


def test_attach_and_detach_disk_claim_and_release_the_file(
    tmp_path: Path, images: tuple[Path, Path], running: Running, qemu_img: QemuImg
) -> None:
    top, _base = images
    extra = tmp_path / "extra.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", extra, SIZE)
    domain = running.domain
    domain.virsh("attach-disk", extra, "sdb", "--targetbus", "scsi", "--subdriver", "qcow2")
    wait_until(lambda: held(extra, "exclusive"), what="the attached disk claimed exclusive")
    domain.virsh("detach-disk", "sdb")
    wait_until(lambda: free(extra), what="the detached disk released")
    assert held(top, "exclusive") and domain.state() == "running"


def test_a_libvirtd_restart_leaves_the_domain_and_its_claim(
    host: Libvirt, images: tuple[Path, Path], running: Running
) -> None:
    top, _base = images
    domain, qemu = running.domain, running.qemu
    restart_libvirtd(host)
    assert domain.state() == "running" and domain.qemu_pids() == [qemu]
    assert held(top, "exclusive")
    domain.virsh("destroy")
    wait_until(lambda: free(top), what="the claim to be free after destroy")


def test_save_releases_the_claim_and_restore_takes_it_again(
    tmp_path: Path, images: tuple[Path, Path], running: Running
) -> None:
    top, _base = images
    saved = tmp_path / "saved.state"
    domain = running.domain
    domain.host.virsh("save", domain.name, saved)
    assert domain.state() == "shut off"
    wait_until(lambda: free(top), what="the claim to be free once saved")
    domain.host.virsh("restore", saved)
    assert domain.state() == "running"
    [qemu] = wait_until(domain.qemu_pids, what="the restored QEMU")
    assert [(h["mode"], h["pid"]) for h in imglock_holders(top)] == [("exclusive", qemu)]


@pytest.mark.parametrize("flags", [(), ("--shallow",)], ids=["full", "shallow"])
def test_an_active_blockcommit_with_pivot_leaves_the_base_claimed_exclusive(
    tmp_path: Path, images: tuple[Path, Path], running: Running, flags: tuple[str, ...]
) -> None:
    top, base = images
    overlay = tmp_path / "overlay.qcow2"
    domain = running.domain
    snapshot_to(domain, overlay)
    wait_until(lambda: held(overlay, "exclusive"), what="the overlay claimed")
    domain.virsh("blockcommit", "vda", "--active", "--pivot", "--wait", *flags)
    target = top if flags else base
    wait_until(lambda: held(target, "exclusive"), what=f"{target.name} claimed exclusive")
    assert domain.state() == "running"


def test_blockpull_and_blockcopy_with_pivot_leave_the_claim_on_what_qemu_writes(
    tmp_path: Path, images: tuple[Path, Path], running: Running
) -> None:
    top, base = images
    copy = tmp_path / "copy.qcow2"
    domain = running.domain
    domain.virsh("blockpull", "vda", "--wait")
    wait_until(lambda: free(base), what="the pulled backing file released")
    domain.virsh("blockcopy", "vda", copy, "--pivot", "--wait", "--transient-job")
    wait_until(lambda: held(copy, "exclusive") and free(top),
               what="the copy claimed exclusive, the old top released")  # fmt: skip
    assert domain.state() == "running"


def test_change_media_claims_the_new_cd_shared(
    tmp_path: Path, images: tuple[Path, Path], new_domain: NewDomain
) -> None:
    top, _base = images
    first, second = tmp_path / "first.iso", tmp_path / "second.iso"
    for iso in (first, second):
        iso.write_bytes(b"\0" * 2048 * 16)
    domain = new_domain(Disk(top), Disk(first, "sda", "raw", "cdrom"))
    domain.virsh("start")
    wait_until(lambda: held(first, "shared"), what="the CD claimed shared")
    domain.virsh("change-media", "sda", second, "--update")
    wait_until(lambda: held(second, "shared") and free(first),
               what="the new CD claimed, the old one released")  # fmt: skip


def test_the_pid_libvirt_tracks_is_qemus_and_holds_the_claim(
    images: tuple[Path, Path], running: Running
) -> None:
    top, _base = images
    domain, qemu = running.domain, running.qemu
    assert domain.pid() == qemu
    assert [(h["mode"], h["pid"]) for h in imglock_holders(top)] == [("exclusive", qemu)]


def test_a_sigkill_to_the_pid_libvirt_tracks_leaves_no_qemu_and_no_claim(
    images: tuple[Path, Path], running: Running
) -> None:
    top, _base = images
    domain = running.domain
    pid = domain.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: domain.state() == "shut off", what="libvirt to see the domain gone")
    wait_until(lambda: not domain.qemu_pids(), what="no QEMU left running")
    wait_until(lambda: free(top), what="the claim to be free")


def test_destroy_of_a_stopped_qemu_ends_it_and_frees_the_claim(
    images: tuple[Path, Path], running: Running
) -> None:
    top, _base = images
    domain, qemu = running.domain, running.qemu
    os.kill(qemu, signal.SIGSTOP)  # hung: it answers nothing, not even its monitor
    domain.virsh("destroy")
    assert domain.state() == "shut off"
    wait_until(lambda: not domain.qemu_pids(), what="no QEMU left running")
    wait_until(lambda: free(top), what="the claim to be free")


def test_a_restore_while_another_holds_the_image_never_runs_the_guest(
    host: Libvirt, tmp_path: Path, images: tuple[Path, Path], domains: list[Domain]
) -> None:
    top, _base = images
    watch = EventWatch(tmp_path / "events.sock")
    program = emulator(tmp_path, "--handoff-timeout", "2")
    domain = Domain(host, program, [Disk(top)], qemu_args=watch.args()).define(tmp_path)
    domains.append(domain)
    domain.virsh("start")
    saved = tmp_path / "saved.state"
    host.virsh("save", domain.name, saved)
    wait_until(lambda: free(top), what="the claim to be free once saved")
    other = subprocess.Popen(
        [*IMGLOCK, "run", "--exec", "--image", str(top), "--", "sleep", "60"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: [h["pid"] for h in imglock_holders(top)] == [other.pid],
                   what="another holder")  # fmt: skip
        watch.start()
        with pytest.raises(VirshError) as refused:
            host.virsh("restore", saved)
        assert "may not run" in str(refused.value), refused.value
        assert domain.state() == "shut off" and not domain.qemu_pids()
        assert watch.greeted.is_set(), "the restored QEMU was never watched"
        assert "RESUME" not in watch.stop()  # the guest never ran
        assert [h["pid"] for h in imglock_holders(top)] == [other.pid]
    finally:
        other.kill()
        _out, err = other.communicate()
        assert "imglock" not in err, err


def test_an_intermediate_blockcommit_releases_the_committed_file(
    tmp_path: Path, qemu_img: QemuImg, new_domain: NewDomain
) -> None:
    base, mid, top = tmp_path / "base.qcow2", tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, SIZE)
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
    qemu_img("create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
    domain = new_domain(Disk(top))
    domain.virsh("start")
    wait_until(lambda: held(top, "exclusive") and held(mid, "shared") and held(base, "shared"),
               what="the chain claimed")  # fmt: skip
    domain.virsh("blockcommit", "vda", "--top", mid, "--base", base, "--wait")
    wait_until(lambda: free(mid), what="the committed file released")
    assert held(top, "exclusive") and held(base, "shared") and domain.state() == "running"
