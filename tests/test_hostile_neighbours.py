"""Hostile neighbours, and answers that are exact.

No one gains power over an image through imglock's files that they do not
already have over the image: a second, unprivileged user (a real uid,
made with useradd if there is none) who cannot read an image can neither
block a claim on it, nor appear as its holder, nor pause the VM that uses
it, through any file imglock creates, beside the image or in a lockspace.
Lockspace lock files and holder records take the owner, group and mode
that follow from the image's, and a file that would hand out more is
refused (imglock(7), OWNERSHIP; SECURITY.md).

Besides: two images on two filesystems without a shared identity (tmpfs)
never share a lock file; a Claim cannot be copied; and a wait for a busy
image ends at SIGTERM, SIGINT or SIGHUP without starting the command.
"""

from __future__ import annotations

import copy
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ENV, SpawnRival, imglock_holders
from processes import wait_until

import imglock

IMGLOCK = [sys.executable, "-m", "imglock"]


# --------------------------------------------------------------------------
# Lockspace identity: two filesystems without a shared one


@pytest.fixture
def two_tmpfs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Two fresh tmpfs mounts, each holding one raw image with the same inode number."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    images = []
    for name in ("a", "b"):
        point = tmp_path / name
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", point], check=True)
        images.append(point / "vm.raw")
    try:
        for image in images:
            image.write_bytes(bytes(65536))
        yield images[0], images[1]
    finally:
        for image in images:
            subprocess.run(["umount", "--lazy", image.parent], check=False)


def test_images_with_one_inode_number_on_two_tmpfs_mounts_get_two_lock_files(
    two_tmpfs: tuple[Path, Path], tmp_path: Path, rival: SpawnRival
) -> None:
    first, second = two_tmpfs
    assert first.stat().st_ino == second.stat().st_ino  # what the identity used to stop at
    space = tmp_path / "lockspace"
    space.mkdir()
    with imglock.claim(first, lockspace=str(space)):
        other = rival("--lockspace", space, "--no-qemu", second)
        assert other.ok, other.reply
        # Each image names its own holder, never the other's.
        assert [h.pid for h in imglock_holders(second, str(space))] == [other.reply["pid"]]
        assert [h.pid for h in imglock_holders(first, str(space))] == [os.getpid()]
        other.stop()
    assert len(list(space.glob("file-*.lock"))) == 2


# --------------------------------------------------------------------------
# A claim cannot be copied


@pytest.mark.parametrize(
    "duplicate", [copy.copy, copy.deepcopy, pickle.dumps], ids=["copy", "deepcopy", "pickle"]
)
def test_a_claim_cannot_be_copied_or_pickled_and_stays_held(
    raw_image: Path, rival: SpawnRival, duplicate: object
) -> None:
    assert callable(duplicate)
    claim = imglock.claim(raw_image)
    try:
        with pytest.raises(TypeError, match="cannot be copied or pickled"):
            duplicate(claim)
        # Nothing was closed on the way: the claim is held, and still refuses others.
        assert claim.held
        assert not rival(raw_image).ok
    finally:
        claim.release()
    assert rival(raw_image).ok


# --------------------------------------------------------------------------
# Waiting is interruptible


@pytest.mark.parametrize("wait", ["30", "inf"])
@pytest.mark.parametrize(
    ("signo", "status"),
    [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)],
    ids=["TERM", "INT", "HUP"],
)
def test_a_signal_ends_the_wait_leaves_the_queue_and_never_starts_the_command(
    raw_image: Path,
    tmp_path: Path,
    rival: SpawnRival,
    started: list[subprocess.Popen[str]],
    wait: str,
    signo: int,
    status: int,
) -> None:
    holder = rival(raw_image)
    assert holder.ok
    marker = tmp_path / "started"
    wrapper = subprocess.Popen(
        [*IMGLOCK, "run", "-w", wait, "--image", str(raw_image), "--", "touch", str(marker)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    started.append(wrapper)
    wait_until(lambda: imglock.inspect(raw_image).waiting, what="the wrapper queues")

    wrapper.send_signal(signo)
    _out, err = wrapper.communicate(timeout=20)
    assert wrapper.returncode == status, err
    (line,) = err.splitlines()
    assert line.startswith(f"imglock: {signal.Signals(signo).name} ") and "not started" in line
    assert not marker.exists()
    assert imglock.inspect(raw_image).waiting == []
    # The holder is untouched; once it lets go, the image is free for anyone.
    assert [h.pid for h in imglock_holders(raw_image)] == [holder.reply["pid"]]
    holder.stop()
    assert imglock.holders(raw_image) == []
