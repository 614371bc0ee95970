"""The shared-write mode, and changing a claim's mode on its own descriptor.

shared-write is for disks shared on purpose (QEMU's ``share-rw=on``,
libvirt's <shareable/>): shared-write holders admit one another, and
refuse exclusive holders and shared readers.  Its QEMU-layer bytes are the
ones a real QEMU 7.2 holds for a ``share-rw=on`` disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import ImglockCli, SpawnRival
from processes import wait_until
from qemu_vm import TINY_PC, QemuVMs, ofd_lock_bytes

import imglock
from imglock.lock import fcntl_locks, protocol
from imglock.lock.identity import Owner
from imglock.lock.protocol import Layer, Mode, ProtocolConflict

QEMU_RANGE = range(100, 264)


def _shared_disk(image: Path, share_rw: str) -> list[str]:
    return [
        "-blockdev", f"driver=file,filename={image},node-name=f0",
        "-blockdev", "driver=raw,file=f0,node-name=d0",
        "-device", f"virtio-blk-pci,drive=d0,share-rw={share_rw}",
    ]  # fmt: skip


def _qemu_bytes_of(pid: int, image: Path) -> set[int]:
    return {b for b in ofd_lock_bytes(pid, image) if b in QEMU_RANGE}


def _wait_for_qemu_bytes(pid: int, image: Path) -> set[int]:
    return wait_until(
        lambda: _qemu_bytes_of(pid, image), what=f"QEMU {pid} to lock {image}", timeout=20
    )


@pytest.mark.parametrize("mode", ["exclusive", "shared", "shared-write"])
def test_each_mode_admits_exactly_the_modes_it_is_compatible_with(
    rival: SpawnRival, raw_image: Path, mode: str
) -> None:
    first = rival("--mode", mode, raw_image)
    assert first.ok
    admitted = {m.value for m in Mode if rival("--mode", m.value, raw_image).ok}
    expected = {"shared-write": {"shared-write"}, "shared": {"shared"}, "exclusive": set()}
    assert admitted == expected[mode]


def test_two_shared_writers_are_both_listed_as_shared_write(
    rival: SpawnRival, raw_image: Path, imglock_cli: ImglockCli
) -> None:
    pids = {rival("--mode", "shared-write", raw_image).reply["pid"] for _ in range(2)}
    proc = imglock_cli("status", "--json", raw_image)
    assert proc.returncode == 1, proc.stderr
    (report,) = json.loads(proc.stdout)
    found = {(h["pid"], h["mode"]) for h in report["holders"] if h["layer"] == "imglock"}
    assert found == {(pid, "shared-write") for pid in pids}
    assert "shared-write" in imglock_cli("status", raw_image).stdout


def test_the_qemu_bytes_of_shared_write_are_those_of_a_share_rw_qemu(
    qemu_vms: QemuVMs, rival: SpawnRival, raw_image: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.raw"
    other.write_bytes(bytes(1 << 20))
    vm = qemu_vms.start([*TINY_PC, "-S", *_shared_disk(other, "on")])
    qemu_holds = _wait_for_qemu_bytes(vm.pid, other)
    claimer = rival("--mode", "shared-write", raw_image)
    assert claimer.ok
    assert _qemu_bytes_of(int(str(claimer.reply["pid"])), raw_image) == qemu_holds == {100, 101}


def test_a_share_rw_qemu_and_a_shared_write_claim_use_one_disk_together(
    qemu_vms: QemuVMs, rival: SpawnRival, raw_image: Path
) -> None:
    vm = qemu_vms.start([*TINY_PC, "-S", *_shared_disk(raw_image, "on")])
    _wait_for_qemu_bytes(vm.pid, raw_image)
    for mode in ("exclusive", "shared"):
        refused = rival("--mode", mode, raw_image)
        assert not refused.ok and f"pid {vm.pid}" in str(refused.reply["error"])
    assert rival("--mode", "shared-write", raw_image).ok
    for mode in ("exclusive", "shared"):
        assert not rival("--mode", mode, raw_image).ok
    assert vm.alive()


@pytest.mark.parametrize(("mode", "share_rw", "starts"), [
    ("shared-write", "on", True),
    ("shared-write", "off", False),
    ("shared", "on", False),
    ("exclusive", "on", False),
])  # fmt: skip
def test_qemu_starts_beside_a_claim_only_when_their_modes_agree(
    qemu_vms: QemuVMs, rival: SpawnRival, raw_image: Path, mode: str, share_rw: str, starts: bool
) -> None:
    assert rival("--mode", mode, raw_image).ok
    vm = qemu_vms.start([*TINY_PC, "-S", *_shared_disk(raw_image, share_rw)])
    if starts:
        _wait_for_qemu_bytes(vm.pid, raw_image)
        assert vm.alive()
    else:
        assert vm.wait(30) != 0
        assert "Failed to get" in vm.log()


# --- changing mode on one descriptor -------------------------------------------------


class _Recorder:
    """Every lock call a protocol function makes, through the fcntl seam."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[int, int, int, int]] = []
        real = fcntl_locks._fcntl

        def record(fd: int, cmd: int, arg: bytes) -> bytes:
            ltype, _whence, start, length, _pid = fcntl_locks.FLOCK.unpack(arg)
            self.calls.append((cmd, ltype, start, length))
            return real(fd, cmd, arg)

        monkeypatch.setattr(fcntl_locks, "_fcntl", record)

    def holder_bytes_after_each_call(self, before: set[int]) -> list[set[int]]:
        """The imglock holder bytes held after each recorded call, replayed from *before*."""
        held = set(before)
        states = []
        for cmd, ltype, start, length in self.calls:
            if cmd == fcntl_locks.F_OFD_SETLK and protocol.read_holding(start, length):
                if ltype == fcntl_locks.F_RDLCK:
                    held.add(start)
                elif ltype == fcntl_locks.F_UNLCK:
                    held.discard(start)
            states.append(set(held))
        return states


def _open(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _own_bytes(path: Path) -> set[int]:
    return ofd_lock_bytes(os.getpid(), path)


ALL_LAYERS = Layer.IMGLOCK | Layer.QEMU


@pytest.mark.parametrize("old", list(Mode))
@pytest.mark.parametrize("new", list(Mode))
def test_a_mode_change_alone_holds_the_new_mode_bytes_and_never_lets_go_between(
    raw_image: Path, monkeypatch: pytest.MonkeyPatch, old: Mode, new: Mode
) -> None:
    fd = _open(raw_image)
    try:
        held = protocol.acquire(fd, str(raw_image), old, ALL_LAYERS)
        before = _own_bytes(raw_image)
        recorder = _Recorder(monkeypatch)
        changed = protocol.change_mode(fd, str(raw_image), held, new)
        assert changed.mode is new
        take, _test = protocol.qemu_bytes(new)
        owner = Owner.current()
        start, length = protocol.holder_range(new, owner, ALL_LAYERS)
        assert _own_bytes(raw_image) == {*range(start, start + length), *take}
        states = recorder.holder_bytes_after_each_call(
            {b for b in before if protocol.mode_at(b) is not None and b % 2 == 0}
        )
        assert all(states), "the claim was let go of during the change"
        monkeypatch.undo()
        # what the kernel holds is what the returned Held says it holds
        protocol.release(fd, str(raw_image), changed)
        assert _own_bytes(raw_image) == set()
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("mine", "theirs", "new"),
    [
        (Mode.SHARED, Mode.SHARED, Mode.EXCLUSIVE),
        (Mode.SHARED_WRITE, Mode.SHARED_WRITE, Mode.EXCLUSIVE),
        (Mode.SHARED, Mode.SHARED, Mode.SHARED_WRITE),
        (Mode.SHARED_WRITE, Mode.SHARED_WRITE, Mode.SHARED),
    ],
)
def test_a_refused_mode_change_keeps_the_old_claim_exactly(
    raw_image: Path, mine: Mode, theirs: Mode, new: Mode
) -> None:
    """Two descriptors of one file in one process: each is the other's rival."""
    fd, other = _open(raw_image), _open(raw_image)
    try:
        held = protocol.acquire(fd, str(raw_image), mine, ALL_LAYERS)
        protocol.acquire(other, str(raw_image), theirs, ALL_LAYERS)
        before = _own_bytes(raw_image)
        with pytest.raises(ProtocolConflict):
            protocol.change_mode(fd, str(raw_image), held, new)
        assert _own_bytes(raw_image) == before
        observer = _open(raw_image)
        try:
            assert protocol.verify(fd, str(raw_image), held, observer) == []
        finally:
            os.close(observer)
    finally:
        os.close(fd)
        os.close(other)


def test_a_downgrade_from_exclusive_lets_readers_in_and_an_upgrade_back_is_refused(
    raw_image: Path, rival: SpawnRival
) -> None:
    fd = _open(raw_image)
    try:
        held = protocol.acquire(fd, str(raw_image), Mode.EXCLUSIVE, ALL_LAYERS)
        assert not rival("--mode", "shared", raw_image).ok
        held = protocol.change_mode(fd, str(raw_image), held, Mode.SHARED)
        reader = rival("--mode", "shared", raw_image)
        assert reader.ok
        with pytest.raises(imglock.LockConflict):
            protocol.change_mode(fd, str(raw_image), held, Mode.EXCLUSIVE)
        reader.stop()
        held = protocol.change_mode(fd, str(raw_image), held, Mode.EXCLUSIVE)
        assert not rival("--mode", "shared", raw_image).ok
    finally:
        os.close(fd)


def test_one_file_asked_for_as_shared_and_shared_write_is_claimed_exclusive(
    raw_image: Path,
) -> None:
    from imglock.api import Claim, ClaimSpec

    specs = [ClaimSpec(str(raw_image), Mode.SHARED), ClaimSpec(str(raw_image), Mode.SHARED_WRITE)]
    with Claim(specs) as claim:
        assert claim.images == [(str(raw_image), Mode.EXCLUSIVE)]


def test_an_unknown_mode_is_a_usage_error_naming_the_modes(raw_image: Path) -> None:
    with pytest.raises(imglock.UsageError, match="shared-write"):
        imglock.claim(raw_image, mode="shared-rw")


def test_conflicts_are_checked_by_a_lock_test_not_by_mode_names(raw_image: Path) -> None:
    """The regions really are disjoint: a shared-write byte is seen only by its rivals."""
    fd, probe = _open(raw_image), _open(raw_image)
    try:
        protocol.acquire(fd, str(raw_image), Mode.SHARED_WRITE)
        start, length = protocol.holder_range(Mode.SHARED_WRITE, Owner.current())
        lock = fcntl_locks.conflicting(probe, start, length, str(raw_image))
        assert lock is not None
        assert protocol.read_holding(lock.start, lock.length) == protocol.Holding(
            Mode.SHARED_WRITE, Owner.current(), with_qemu=False
        )
    finally:
        os.close(fd)
        os.close(probe)
