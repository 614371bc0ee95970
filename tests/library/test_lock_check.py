"""imglock(7), LOCK CHECK: a held claim is checked without ever taking a byte again.

A network lock manager can forget a claim's locks (a GlusterFS brick or an
NFS server restarted) while the holder's descriptors go on working.  What
the holder then sees is exactly what these tests make locally: its bytes
no longer held by its own open file description.  A check must report
that, never quietly take the bytes back; a rival's lock outside the
protocol is no loss; a replaced image is.  Faults of a real server are in
tests/faults/test_storage_faults.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SpawnRival, imglock_holders
from processes import state, wait_until

import imglock
from imglock.lock import fcntl_locks, protocol
from imglock.lock.identity import Owner
from imglock.lockcheck import LockWatch

IMGLOCK = [sys.executable, "-m", "imglock"]
#: A process that read-locks one byte of a file through an OFD lock of its
#: own, outside imglock's protocol, and holds it until its stdin closes.
BYTE_LOCKER = """
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.fcntl(fd, 37, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, int(sys.argv[2]), 1, 0))
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def byte_locker() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def lock_one_byte(procs: list[subprocess.Popen[str]], path: Path, offset: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", BYTE_LOCKER, str(path), str(offset)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"


def forget_locks(claim: imglock.Claim) -> None:
    """What a lock manager that restarted leaves: the claim's bytes no longer held."""
    for fd, ranges in claim_ranges(claim):
        for start, length in ranges:
            fcntl_locks.unlock(fd, start, length, "image")


def claim_ranges(claim: imglock.Claim) -> list[tuple[int, tuple[tuple[int, int], ...]]]:
    """(lock descriptor, byte ranges held) of every file of *claim*."""
    return [
        (m.image.lock_target[0], m.image.held.ranges)
        for m in claim.members
        if m.image.held is not None
    ]


def test_a_lost_lock_is_reported_naming_the_file_and_the_bytes(raw_image: Path) -> None:
    with imglock.claim(raw_image) as claim:
        forget_locks(claim)
        with pytest.raises(imglock.LockLost) as lost:
            claim.verify()
    message = str(lost.value)
    assert message.startswith(f"{raw_image}: lock lost: ")
    assert "QEMU's lock bytes 100-101" in message and "imglock holder byte" in message


def test_a_check_never_takes_a_lost_byte_back(raw_image: Path, rival: SpawnRival) -> None:
    with imglock.claim(raw_image) as claim:
        forget_locks(claim)
        for _ in range(3):
            with pytest.raises(imglock.LockLost):
                claim.verify()
        # Nothing was taken again: another claimer gets the image.
        other = rival(raw_image)
        assert other.ok, other.reply
        assert [m.image.held is not None for m in claim.members] == [True]


def test_an_intact_claim_passes_its_check(raw_image: Path, rival: SpawnRival) -> None:
    with imglock.claim(raw_image) as claim:
        assert claim.verify() == []
        assert not rival(raw_image, "--no-qemu").ok


def test_a_lock_outside_the_protocol_is_reported_and_is_no_loss(
    raw_image: Path, byte_locker: list[subprocess.Popen[str]]
) -> None:
    # A reader of the image locks a byte where shared holders' bytes lie.
    with imglock.claim(raw_image) as claim:
        shared_holder = protocol.imglock_byte(protocol.Mode.SHARED, Owner(0x1234, 4242))
        lock_one_byte(byte_locker, raw_image, shared_holder)
        (notice,) = claim.verify()
        assert notice.startswith(f"{raw_image}: a lock outside imglock's protocol is in the way")
        assert "the claim's own locks are intact" in notice


def test_a_replaced_image_is_a_loss(raw_image: Path) -> None:
    with imglock.claim(raw_image) as claim:
        replace(raw_image)
        with pytest.raises(imglock.LockLost, match="image replaced: the path now leads to another"):
            claim.verify()


def test_a_removed_lockspace_lock_file_is_a_loss(raw_image: Path, space: Path) -> None:
    with imglock.claim(raw_image, lockspace=str(space)) as claim:
        assert claim.verify() == []
        (lock_file,) = [p for p in space.iterdir() if p.is_file()]
        lock_file.unlink()
        with pytest.raises(imglock.LockLost, match="its lock file was removed"):
            claim.verify()


def test_a_watch_calls_back_once_on_loss_and_ends(raw_image: Path) -> None:
    losses: list[imglock.LockLost] = []
    with imglock.claim(raw_image) as claim:
        watch = claim.watch(losses.append, interval=0.02)
        forget_locks(claim)
        wait_until(lambda: not watch.running, what="the watch to end on the loss")
    assert len(losses) == 1 and "lock lost" in str(losses[0])


def test_a_stalled_check_is_told_then_its_intact_result_then_a_loss() -> None:
    answer = threading.Event()
    heard: list[tuple[str, object]] = []
    checks = 0

    def check() -> list[str]:
        nonlocal checks
        checks += 1
        if checks == 1:
            answer.wait()  # the storage hangs, then answers: the claim is intact
            return []
        raise imglock.LockLost("vm.qcow2", "lock lost: gone")

    watch = LockWatch(
        check,
        0.01,
        lambda exc: heard.append(("loss", str(exc))),
        deadline=0.05,
        on_stall=lambda deadline: heard.append(("stall", deadline)),
        on_intact=lambda: heard.append(("intact", None)),
    ).start()
    wait_until(lambda: heard == [("stall", 0.05)], what="the stall")
    answer.set()
    wait_until(lambda: not watch.running, what="the watch to end on the loss")
    assert heard == [("stall", 0.05), ("intact", None), ("loss", "vm.qcow2: lock lost: gone")]


def test_run_reports_a_lock_outside_the_protocol_once_and_does_not_pause(
    raw_image: Path, byte_locker: list[subprocess.Popen[str]], started: list[subprocess.Popen[str]]
) -> None:
    wrapper = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "imglock",
            "run",
            "--check-interval",
            "0.05",
            "--image",
            raw_image,
            "--",
            "sleep",
            "30",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    started.append(wrapper)
    (holder,) = wait_until(lambda: imglock_holders(raw_image), what="the claim")
    pid = holder.pid
    assert pid is not None
    lock_one_byte(byte_locker, raw_image, protocol.HOLDER_BASE[protocol.Mode.SHARED] + 2)
    assert wrapper.stderr is not None
    line = wrapper.stderr.readline()
    assert "a lock outside imglock's protocol is in the way" in line
    assert state(pid) in ("S", "R")  # the check that saw it did not stop the command
    os.kill(pid, 15)
    wrapper.wait(timeout=10)
    assert "lock outside" not in wrapper.stderr.read()  # said once only


def test_status_says_an_image_replaced_while_held_is_replaced_not_free(raw_image: Path) -> None:
    with imglock.claim(raw_image):
        replace(raw_image)
        proc = subprocess.run(
            [*IMGLOCK, "status", "--json", raw_image], capture_output=True, text=True, check=False
        )
    (report,) = json.loads(proc.stdout)
    assert report["replaced"] is True and report["holders"] == []
    assert proc.returncode == 1, "a replaced image must not read as free"


@pytest.fixture
def space(tmp_path: Path) -> Path:
    """An empty lockspace directory."""
    directory = tmp_path / "space"
    directory.mkdir()
    return directory


def replace(image: Path) -> None:
    """Put a new file at *image*'s path, as a restore does (``mv new.img vm.img``)."""
    image.rename(image.with_suffix(".old"))
    image.write_bytes(b"\0" * 4096)


def status_in(space: Path, image: Path) -> tuple[int, dict[str, object]]:
    proc = subprocess.run(
        [*IMGLOCK, "status", "--json", "--lockspace", space, image],
        capture_output=True,
        text=True,
        check=False,
    )
    (report,) = json.loads(proc.stdout)
    return proc.returncode, report


def test_status_in_a_lockspace_says_an_image_replaced_while_held_is_replaced(
    raw_image: Path, space: Path
) -> None:
    with imglock.claim(raw_image, lockspace=str(space)):
        assert status_in(space, raw_image)[0] == 1  # held
        replace(raw_image)
        code, report = status_in(space, raw_image)
    assert report["replaced"] is True and report["holders"] == []
    assert code == 1, "a replaced image must not read as free"


def test_status_in_a_lockspace_says_an_image_whose_lock_file_was_removed_is_replaced(
    raw_image: Path, space: Path
) -> None:
    with imglock.claim(raw_image, lockspace=str(space)):
        (lock_file,) = [p for p in space.iterdir() if p.is_file()]
        lock_file.unlink()
        code, report = status_in(space, raw_image)
    assert report["replaced"] is True and report["holders"] == []
    assert code == 1, "an image whose lock file was removed under its holder must not read as free"


def test_status_in_a_lockspace_of_an_image_released_and_replaced_is_free(
    raw_image: Path, space: Path
) -> None:
    with imglock.claim(raw_image, lockspace=str(space)):
        pass
    replace(raw_image)
    code, report = status_in(space, raw_image)
    assert (code, report["replaced"], report["stale-records"]) == (0, False, [])
