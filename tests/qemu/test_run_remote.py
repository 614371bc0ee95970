"""``imglock run`` around a VM whose disks are all remote: it runs, claiming nothing.

The remote disk is real: qemu-nbd serves a file over a unix socket, and
QEMU opens it as ``nbd:unix:...``.  The NBD server does the locking for
it, so imglock has nothing local to claim, and says so.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import imglock_holders
from processes import wait_until
from wrapped_vm import TIMEOUT, WrappedVMs

pytestmark = pytest.mark.qemu


def test_a_vm_with_only_a_remote_disk_runs_with_a_warning(
    vms: WrappedVMs,
    raw_image: Path,
    qemu_img_path: str,
    started: list[subprocess.Popen[str]],
) -> None:
    socket = vms.dir / "nbd.sock"
    qemu_nbd = str(Path(qemu_img_path).with_name("qemu-nbd"))
    server = [qemu_nbd, "--persistent", "--socket", str(socket), "--format", "raw", str(raw_image)]
    started.append(subprocess.Popen(server, text=True))
    wait_until(socket.exists, what="qemu-nbd's socket", timeout=TIMEOUT)
    vm = vms.start("-drive", f"file=nbd:unix:{socket},format=raw,if=none,id=remote0")
    assert vm.runstate() in ("running", "paused")
    # QEMU reads the file through qemu-nbd, which holds it; imglock holds nothing.
    assert not imglock_holders(raw_image)
    assert vm.quit() == 0
    assert "nothing local is claimed" in vm.stderr()
