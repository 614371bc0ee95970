"""imglock and a real QEMU see each other's locks, both ways."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SpawnRival
from processes import wait_until
from qemu_vm import NONE_MACHINE, QemuVMs

import imglock
from imglock.lock.holder import Holder

pytestmark = pytest.mark.qemu


@pytest.fixture
def chain(tmp_path: Path, qemu_img_path: str) -> tuple[Path, Path]:
    """top.qcow2 backed by base.qcow2."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    create = [qemu_img_path, "create", "-q", "-f", "qcow2"]
    subprocess.run([*create, base, "64M"], check=True)
    subprocess.run([*create, "-b", base.name, "-F", "qcow2", top], check=True)
    return top, base


def _qemu_holders(path: Path) -> list[Holder]:
    return [h for h in imglock.holders(path) if h.layer == "qemu"]


def _wait_for_locks(path: Path, vm_pid: int) -> None:
    wait_until(
        lambda: any(h.pid == vm_pid for h in _qemu_holders(path)),
        what=f"QEMU {vm_pid} to lock {path}",
        timeout=10,
    )


def test_status_names_qemu_and_its_permissions_on_a_chain(
    qemu_vms: QemuVMs, chain: tuple[Path, Path], imglock_cli: object
) -> None:
    top, base = chain
    vm = qemu_vms.start([*NONE_MACHINE, "-drive", f"file={top},if=none,id=d0"])
    _wait_for_locks(top, vm.pid)
    _wait_for_locks(base, vm.pid)
    proc = subprocess.run(
        [sys.executable, "-m", "imglock", "status", "--json", top, base],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1, proc.stderr
    reports = {r["filename"]: r for r in json.loads(proc.stdout)}
    (on_top,) = reports[str(top)]["holders"]
    (on_base,) = reports[str(base)]["holders"]
    assert on_top["layer"] == on_base["layer"] == "qemu"
    assert on_top["pid"] == on_base["pid"] == vm.pid
    assert "write" in on_top["perms"] and "write" in on_top["unshared"]
    assert on_base["perms"] == ["consistent read"]
    assert "qemu-system" in on_top["command"]


def test_exclusive_claim_on_an_image_qemu_writes_is_refused_naming_its_pid(
    qemu_vms: QemuVMs, chain: tuple[Path, Path]
) -> None:
    top, base = chain
    vm = qemu_vms.start([*NONE_MACHINE, "-drive", f"file={top},if=none,id=d0"])
    _wait_for_locks(top, vm.pid)
    _wait_for_locks(base, vm.pid)
    with pytest.raises(imglock.LockConflict) as info:
        imglock.claim(top)
    assert f"pid {vm.pid}" in str(info.value)
    with pytest.raises(imglock.LockConflict):
        imglock.claim(base)  # the base is read by QEMU, which refuses to share write
    with imglock.claim(base, mode="shared", qemu_locks=False):
        pass  # ...but reading it beside QEMU is fine


def test_qemu_img_refuses_an_image_imglock_holds(
    rival: SpawnRival, chain: tuple[Path, Path], qemu_img_path: str
) -> None:
    top, _base = chain
    assert rival(top).ok
    proc = subprocess.run([qemu_img_path, "info", top], capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert 'Failed to get shared "write" lock' in proc.stderr


def test_a_second_qemu_refuses_an_image_imglock_holds(
    rival: SpawnRival, chain: tuple[Path, Path], qemu_system_path: str
) -> None:
    top, base = chain
    assert rival(top).ok
    proc = subprocess.run(
        [qemu_system_path, *NONE_MACHINE, "-drive", f"file={top},if=none,id=d0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert 'Failed to get "write" lock' in proc.stderr or "Failed to get" in proc.stderr
    # the backing file is claimed shared: QEMU may read it, not write it
    proc = subprocess.run(
        [qemu_system_path, *NONE_MACHINE, "-drive", f"file={base},if=none,id=d0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0 and "Failed to get" in proc.stderr


def test_two_vms_share_a_base_and_a_third_cannot_write_it(
    rival: SpawnRival, tmp_path: Path, qemu_img_path: str
) -> None:
    create = [qemu_img_path, "create", "-q", "-f", "qcow2"]
    base = tmp_path / "base.qcow2"
    subprocess.run([*create, base, "64M"], check=True)
    tops = [tmp_path / f"vm{i}.qcow2" for i in (1, 2)]
    for top in tops:
        subprocess.run([*create, "-b", base.name, "-F", "qcow2", top], check=True)
    assert rival(tops[0]).ok and rival(tops[1]).ok
    third = rival(base)
    assert not third.ok
    assert str(base) in str(third.reply["error"])
    assert {h.mode for h in imglock.holders(base) if h.layer == "imglock"} == {"shared"}
    assert os.path.exists(base)
