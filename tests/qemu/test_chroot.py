"""A QEMU run with ``-chroot``: the file names it reports are not this host's.

QEMU opens the images of its command line before it enters the new root,
and every file after (a hot-plugged disk) inside it.  imglock must never
claim the host's file that happens to have the name QEMU reports.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from conftest import QemuImg
from processes import wait_until
from wrapped_vm import TIMEOUT, WrappedVMs

import imglock
from imglock.run.graph import qemu_root

pytestmark = pytest.mark.qemu


def open_files(pid: int) -> list[str]:
    """What process *pid* has open, as paths from this process's root."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            found.append(os.readlink(fd))
    return found


def test_the_root_directory_of_a_command_line() -> None:
    assert qemu_root(["qemu-system-x86_64", "-chroot", "/srv/jail", "-m", "64"]) == "/srv/jail"
    assert qemu_root(["qemu-system-x86_64", "--run-with", "chroot=/srv/j2"]) == "/srv/j2"
    assert qemu_root(["qemu-system-x86_64", "-hda", "/vm/a.raw"]) is None


def test_a_disk_hot_plugged_into_a_chrooted_qemu_never_claims_the_hosts_file(
    vms: WrappedVMs, tmp_path: Path, qemu_img: QemuImg
) -> None:
    jail = tmp_path / "jail"
    host_file = tmp_path / "d.qcow2"  # the host's file of the name QEMU will report
    jailed_file = jail / str(host_file).lstrip("/")  # the file QEMU really opens
    for path in (host_file, jailed_file):
        path.parent.mkdir(parents=True, exist_ok=True)
        qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    vm = vms.start("-chroot", str(jail))
    # A qcow2 node reads its file's metadata: QEMU uses (and locks) the file.
    vm.qmp("blockdev-add", {"driver": "qcow2", "node-name": "hot", "read-only": True,
                            "file": {"driver": "file", "filename": str(host_file)}})  # fmt: skip
    wait_until(lambda: str(jailed_file) in open_files(vm.qemu_pid),
               what="QEMU to open the file inside its jail", timeout=TIMEOUT)  # fmt: skip
    said = wait_until(
        lambda: [line for line in vm.stderr().splitlines() if "chroot" in line or "opened" in line],
        what="the wrapper to say what it does about the chrooted QEMU's files",
        timeout=TIMEOUT,
    )
    assert "QEMU runs chrooted in" in said[0], said
    assert imglock.holders(host_file) == []
    assert vm.quit() == 0
