"""Claiming images: the behaviour two processes (or hosts) can rely on.

Every rival here is a real process (tests/support/claimer.py) holding real locks on
real files; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLAIMER, ENV, SpawnRival, imglock_holders, waiting_pids
from processes import holds_for, wait_until

import imglock
from imglock.api import Claim, ClaimSpec
from imglock.lock.protocol import Layer, Mode


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_second_exclusive_claim_from_another_process_is_refused_and_names_the_holder(
    raw_image: Path, rival: SpawnRival
) -> None:
    first = rival(raw_image)
    assert first.ok
    with pytest.raises(imglock.LockConflict) as info:
        imglock.claim(raw_image)
    assert f"pid {first.reply['pid']}" in str(info.value)
    assert str(raw_image) in str(info.value)
    assert [h.pid for h in info.value.holders if h.layer == "imglock"] == [first.reply["pid"]]
    assert info.value.exit_status == 75


def test_two_opens_in_one_process_conflict(raw_image: Path) -> None:
    with imglock.claim(raw_image), pytest.raises(imglock.LockConflict):
        imglock.claim(raw_image)


@pytest.mark.parametrize(
    ("first", "second", "allowed"),
    [
        ("shared", "shared", True),
        ("shared", "exclusive", False),
        ("exclusive", "shared", False),
        ("exclusive", "exclusive", False),
    ],
)
def test_modes_exclude_each_other_as_readers_and_writers(
    raw_image: Path, rival: SpawnRival, first: str, second: str, allowed: bool
) -> None:
    assert rival(raw_image, "--mode", first).ok
    assert rival(raw_image, "--mode", second).ok is allowed


def test_imglock_layer_alone_also_excludes(raw_image: Path, rival: SpawnRival) -> None:
    assert rival(raw_image, "--no-qemu").ok
    assert not rival(raw_image, "--no-qemu").ok


def test_claim_is_free_again_after_release(raw_image: Path, rival: SpawnRival) -> None:
    first = rival(raw_image)
    assert first.ok
    first.stop()
    assert imglock.holders(raw_image) == []
    with imglock.claim(raw_image):
        assert [h.pid for h in imglock_holders(raw_image)] == [os.getpid()]


def test_release_is_idempotent_and_closes_every_descriptor(raw_image: Path) -> None:
    before = _fd_count()
    held = imglock.claim(raw_image)
    assert _fd_count() > before
    held.release()
    held.release()
    assert _fd_count() == before
    assert imglock.holders(raw_image) == []


@pytest.mark.parametrize("wait", ["20", "inf"])
def test_a_waiter_gets_the_image_once_the_holder_lets_go(
    raw_image: Path, rival: SpawnRival, wait: str
) -> None:
    first = rival(raw_image)
    waiter = subprocess.Popen(
        [sys.executable, CLAIMER, "--wait", wait, os.fspath(raw_image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        wait_until(lambda: waiter.pid in waiting_pids(raw_image), what="the waiter in the queue")
        holds_for(
            lambda: waiter.poll() is None,
            0.3,
            what="the waiter waits while the image is held",
        )
        first.stop()
        assert waiter.stdout is not None
        assert json.loads(waiter.stdout.readline())["ok"]
    finally:
        waiter.kill()
        waiter.wait()


def test_wait_that_runs_out_raises_conflict(raw_image: Path, rival: SpawnRival) -> None:
    assert rival(raw_image).ok
    reply = rival(raw_image, "--wait", "0.3").reply
    assert reply["ok"] is False and reply["status"] == 75


def test_kill_9_of_the_holder_frees_the_image_at_once(raw_image: Path, rival: SpawnRival) -> None:
    first = rival(raw_image)
    assert first.ok
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    assert imglock.holders(raw_image) == []
    with imglock.claim(raw_image):
        assert [h.pid for h in imglock_holders(raw_image)] == [os.getpid()]


def test_child_that_inherited_the_descriptor_keeps_the_lock_after_its_parent_dies(
    raw_image: Path, rival: SpawnRival
) -> None:
    parent = rival(raw_image, "--fork-child")
    child_pid = int(str(parent.reply["pid"]))
    parent.proc.wait(timeout=10)  # the parent is gone
    try:
        with pytest.raises(imglock.LockConflict) as info:
            imglock.claim(raw_image)
        assert child_pid in [h.pid for h in info.value.holders if h.layer == "imglock"]
    finally:
        os.kill(child_pid, signal.SIGKILL)
    wait_until(lambda: not imglock.holders(raw_image), what="the image is free", timeout=5)
    assert imglock.holders(raw_image) == []


def test_a_claim_of_several_images_is_all_or_nothing(tmp_path: Path, rival: SpawnRival) -> None:
    free, taken = tmp_path / "a.raw", tmp_path / "b.raw"
    for path in (free, taken):
        path.write_bytes(b"\0" * 4096)
    assert rival(taken).ok
    claim = Claim([ClaimSpec(str(free)), ClaimSpec(str(taken))])
    with pytest.raises(imglock.LockConflict):
        claim.acquire()
    assert not claim.held
    assert imglock.holders(free) == []


def test_the_same_file_named_twice_is_claimed_once_with_the_stronger_mode(
    raw_image: Path, rival: SpawnRival
) -> None:
    specs = [ClaimSpec(str(raw_image), Mode.SHARED), ClaimSpec(str(raw_image), Mode.EXCLUSIVE)]
    with Claim(specs) as claim:
        assert claim.images == [(str(raw_image), Mode.EXCLUSIVE)]
        assert not rival(raw_image, "--mode", "shared").ok


def test_record_names_the_holder_and_goes_away_on_release(raw_image: Path) -> None:
    with imglock.claim(raw_image):
        report = imglock.inspect(raw_image)
        (holder,) = [h for h in report.holders if h.layer == "imglock"]
        assert holder.pid == os.getpid()
        assert holder.since is not None
        assert list((raw_image.parent / ".imglock").iterdir())
    assert list((raw_image.parent / ".imglock").iterdir()) == []


def test_record_of_a_killed_holder_is_stale_and_blocks_nothing(
    raw_image: Path, rival: SpawnRival
) -> None:
    first = rival(raw_image)
    first.proc.kill()
    first.proc.wait()
    report = imglock.inspect(raw_image)
    assert report.holders == []
    assert [r.pid for r in report.stale_records] == [first.reply["pid"]]
    with imglock.claim(raw_image):
        pass


def test_lockspace_moves_the_locks_to_a_file_in_the_lockspace(
    raw_image: Path, tmp_path: Path, rival: SpawnRival
) -> None:
    space = tmp_path / "lockspace"
    space.mkdir()
    first = rival(raw_image, "--lockspace", space)
    assert first.ok
    assert not rival(raw_image, "--lockspace", space).ok
    assert imglock.holders(raw_image) == []  # the image itself carries no lock
    found = imglock.holders(raw_image, lockspace=str(space))
    (holder,) = [h for h in found if h.layer == "imglock"]
    assert holder.pid == first.reply["pid"]


def test_claimers_with_the_same_pid_on_two_hosts_are_told_apart_by_host(
    raw_image: Path, rival: SpawnRival
) -> None:
    def on_host(name: str) -> list[str]:
        # A new UTS and PID namespace: its own host name, and the claimer is pid 1.
        script = f'hostname {name} && exec "$@"'
        return ["unshare", "--uts", "--pid", "--fork", "sh", "-c", script, "sh"]

    a = rival(raw_image, "--mode", "shared", prefix=on_host("host-a"))
    b = rival(raw_image, "--mode", "shared", prefix=on_host("host-b"))
    assert a.ok and b.ok and a.reply["pid"] == b.reply["pid"] == 1
    found = imglock_holders(raw_image)
    assert sorted((h.host, h.pid) for h in found) == [("host-a", 1), ("host-b", 1)]


def test_holders_of_a_free_image_is_empty(raw_image: Path) -> None:
    assert imglock.holders(raw_image) == []


def test_imglock_layer_never_touches_bytes_of_qemu_or_virtlockd(raw_image: Path) -> None:
    with Claim([ClaimSpec(str(raw_image))], layers=Layer.IMGLOCK):
        held = [h for h in imglock.holders(raw_image)]
        assert [h.layer for h in held] == ["imglock"]


def test_a_backing_file_gets_a_record_only_where_a_record_directory_exists(
    tmp_path: Path, qemu_img: object
) -> None:
    # The backing name comes from the image header, which whoever writes the
    # image controls: it must not make imglock create directories elsewhere.
    (tmp_path / "vms").mkdir()
    (tmp_path / "bases").mkdir()
    base, top = tmp_path / "bases" / "base.qcow2", tmp_path / "vms" / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "16M"], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top], check=True
    )
    with imglock.claim(top):
        assert list((tmp_path / "vms" / ".imglock").iterdir())
        assert not (tmp_path / "bases" / ".imglock").exists()
    (tmp_path / "bases" / ".imglock").mkdir()
    with imglock.claim(top):
        assert list((tmp_path / "bases" / ".imglock").iterdir())
