"""``status`` of any file, waiters in ``status`` and in conflicts, and JSON that is UTF-8.

Locks do not depend on an image's format: a vmdk, a vdi or an ISO that
QEMU (or anyone) holds is listed with its holders; only following a
backing chain needs the format.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ENV, ImglockCli, QemuImg, SpawnRival
from processes import wait_until
from qemu_vm import NONE_MACHINE, QemuVMs

import imglock


def _held_by(imglock_cli: ImglockCli, path: Path, pid: int) -> dict[str, object]:
    """``status --json`` of *path* once it names *pid* as a holder: its report."""

    def report() -> dict[str, object] | None:
        proc = imglock_cli("status", "--json", path)
        (report,) = json.loads(proc.stdout)
        if not any(h["pid"] == pid for h in report["holders"]):
            return None
        assert proc.returncode == 1, proc.stderr
        return report  # type: ignore[no-any-return]

    return wait_until(report, what=f"status to name pid {pid} as a holder", timeout=20)


@pytest.mark.parametrize("fmt", ["vmdk", "vdi"])
def test_status_lists_the_qemu_that_holds_an_image_in_a_format_imglock_cannot_read(
    qemu_vms: QemuVMs, qemu_img: QemuImg, imglock_cli: ImglockCli, tmp_path: Path, fmt: str
) -> None:
    image = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-q", "-f", fmt, image, "16M")
    vm = qemu_vms.start([*NONE_MACHINE, "-drive", f"file={image},format={fmt},if=none,id=d0"])
    report = _held_by(imglock_cli, image, vm.pid)
    assert report["format"] == fmt
    holders = report["holders"]
    assert isinstance(holders, list)
    (holder,) = holders
    assert holder["layer"] == "qemu" and holder["pid"] == vm.pid
    assert "write" in holder["perms"]
    # The table says the same; a claim is refused naming the QEMU that holds
    # it (a vdi is claimed as plain data; a vmdk, whose chain imglock cannot
    # follow, is refused for its holder first).
    table = imglock_cli("status", image)
    assert table.returncode == 1 and f"{vm.pid}" in table.stdout and fmt in table.stdout
    with pytest.raises(imglock.LockConflict, match=f"held qemu .* by pid {vm.pid}"):
        imglock.claim(image)


def test_status_lists_who_holds_an_iso(
    imglock_cli: ImglockCli, rival: SpawnRival, tmp_path: Path
) -> None:
    iso = tmp_path / "install.iso"
    iso.write_bytes(b"\0" * 32768 + b"\x01CD001\x01" + bytes(2041))  # an ISO 9660 volume descriptor
    reader = rival("--mode", "shared", iso)
    report = _held_by(imglock_cli, iso, int(reader.reply["pid"]))  # type: ignore[call-overload]
    assert [(h["layer"], h["mode"]) for h in report["holders"]] == [("imglock", "shared")]  # type: ignore[attr-defined]


def test_status_json_is_utf8_for_a_name_that_is_not(
    imglock_cli: ImglockCli, rival: SpawnRival, tmp_path: Path
) -> None:
    name = os.fsencode(tmp_path) + b"/disk-\xff\xfe-\xc3\xa9.raw"  # two stray bytes, then an é
    with open(name, "wb") as f:
        f.truncate(1 << 20)
    path = os.fsdecode(name)
    assert rival(path).ok
    proc = subprocess.run(
        [sys.executable, "-m", "imglock", "status", "--json", name],
        capture_output=True,
        env=ENV,
        timeout=30,
    )
    assert proc.returncode == 1, proc.stderr
    text = proc.stdout.decode("utf-8")  # strict: raises on anything that is not UTF-8
    (report,) = json.loads(text)
    assert report["filename"] == os.fsdecode(tmp_path) + "/disk-\\xff\\xfe-é.raw"
    assert "\\udc" not in text  # no lone surrogates, escaped or not
    assert report["holders"][0]["command"].endswith("-é.raw")


def test_status_and_a_conflict_name_the_waiters_apart_from_the_holder(
    raw_image: Path,
    rival: SpawnRival,
    started: list[subprocess.Popen[str]],
    imglock_cli: ImglockCli,
) -> None:
    holder = rival(raw_image)
    waiter = subprocess.Popen(
        [sys.executable, "-m", "imglock", "run", "-w", "300", "--image", raw_image, "--", "true"],
        env=ENV,
        text=True,
    )
    started.append(waiter)
    wait_until(lambda: imglock.inspect(raw_image).waiting, what="the waiter queued", timeout=30)

    proc = imglock_cli("status", "--json", raw_image)
    (report,) = json.loads(proc.stdout)
    assert [h["pid"] for h in report["holders"] if h["layer"] == "imglock"] == [holder.reply["pid"]]
    (waiting,) = report["waiting"]
    assert waiting["mode"] == "exclusive" and waiting["host"] == os.uname().nodename
    assert "imglock run -w 300" in waiting["command"] and waiting["since"] is not None
    rows = imglock_cli("status", raw_image).stdout.splitlines()
    assert [row.split()[3] for row in rows[1:]] == ["imglock", "waiting"]

    with pytest.raises(imglock.LockConflict) as info:
        imglock.claim(raw_image, mode="shared")
    conflict = info.value
    assert [h.pid for h in conflict.holders if h.layer == "imglock"] == [holder.reply["pid"]]
    assert [w.pid for w in conflict.waiting] == [waiting["pid"]]
    assert "1 waiting ahead" in str(conflict)
    holder.stop()
    assert waiter.wait(30) == 0
