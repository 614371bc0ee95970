"""VMs that share one disk on purpose (``share-rw=on``) under ``imglock run``.

A cluster filesystem in the guests (GFS2, OCFS2) or a quorum disk needs
several VMs writing one raw image at once; QEMU allows it for devices with
``share-rw=on`` (libvirt's ``<shareable/>``).  imglock claims such an image
shared-write: the VMs run side by side, and an exclusive user or a reader
who needs a consistent image is refused, with the holders named.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ENV, SpawnRival, imglock_holders
from processes import wait_until
from qemu_vm import TINY_PC
from wrapped_vm import TIMEOUT, WrappedVMs

pytestmark = pytest.mark.qemu


def shared_disk(image: Path) -> list[str]:
    return [
        "-S", "-drive", f"file={image},format=raw,if=none,id=shared0",
        "-device", "virtio-blk-pci,drive=shared0,share-rw=on",
    ]  # fmt: skip


def test_two_share_rw_vms_run_side_by_side_and_an_exclusive_user_is_refused(
    vms: WrappedVMs, raw_image: Path, rival: SpawnRival
) -> None:
    first = vms.start(*shared_disk(raw_image), machine=TINY_PC)
    second = vms.start(*shared_disk(raw_image), machine=TINY_PC)
    both = {first.qemu_pid, second.qemu_pid}
    wait_until(
        lambda: {h.pid for h in imglock_holders(raw_image)} == both,
        what="two holders",
        timeout=TIMEOUT,
    )
    assert {h.mode for h in imglock_holders(raw_image)} == {"shared-write"}

    third = subprocess.run(
        [sys.executable, "-m", "imglock", "run", "--image", raw_image, "--", "true"],
        capture_output=True, text=True, timeout=30, env=ENV,
    )  # fmt: skip
    assert third.returncode == 75
    for pid in both:
        assert f"shared-write by pid {pid}" in third.stderr
    reader = rival("--mode", "shared", "--no-qemu", raw_image)
    assert not reader.ok
    assert "shared-write" in str(reader.reply["error"])
    # Another sharer gets in, also from the library.
    sharer = rival("--mode", "shared-write", "--no-qemu", raw_image)
    assert sharer.ok
    sharer.stop()
    assert first.quit() == 0 and second.quit() == 0
    assert imglock_holders(raw_image) == []


def test_a_share_rw_vm_and_a_plain_vm_on_one_disk_exclude_each_other(
    vms: WrappedVMs, raw_image: Path
) -> None:
    vms.start(*shared_disk(raw_image), machine=TINY_PC)
    plain = subprocess.run(
        [sys.executable, "-m", "imglock", "run", "--", "qemu-system-x86_64", *TINY_PC, "-S",
         "-drive", f"file={raw_image},format=raw,if=virtio"],
        capture_output=True, text=True, timeout=30, env=ENV,
    )  # fmt: skip
    assert plain.returncode == 75, plain.stderr
    assert "cannot claim exclusive: held imglock shared-write" in plain.stderr
