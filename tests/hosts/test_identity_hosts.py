"""Seen from another host, an imglock holder's QEMU bytes are its own, a plain QEMU's are QEMU's.

"Another host" is a process in its own UTS, PID and mount namespaces with
its own /proc: it has a different host name, and /proc names none of the
holders, so all it knows is what lock tests read back, as on a second
machine (where GlusterFS, say, reports l_pid -1 and /proc shows nothing).
A holder that carries QEMU's bytes marks its holder range (two bytes
instead of one), which is how the two are told apart (imglock(7)).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLAIMER, ENV, QemuImg, SpawnRival
from processes import wait_until
from qemu_vm import NONE_MACHINE, QemuVMs

ELSEWHERE = ["unshare", "--uts", "--pid", "--mount-proc", "--fork"]


def _status_elsewhere(image: Path) -> list[dict[str, object]]:
    return _report_elsewhere(image)["holders"]


@pytest.mark.parametrize("mode", ["exclusive", "shared", "shared-write"])
def test_an_imglock_holder_with_qemu_bytes_is_one_holder_from_another_host(
    raw_image: Path, rival: SpawnRival, mode: str
) -> None:
    holder = rival("--mode", mode, raw_image)
    assert holder.ok
    (seen,) = _status_elsewhere(raw_image)
    assert (seen["layer"], seen["mode"], seen["pid"]) == ("imglock", mode, holder.reply["pid"])
    assert seen["perms"], "its QEMU permissions are shown as its own"

    refused = rival("--mode", "exclusive", raw_image, prefix=ELSEWHERE)
    assert not refused.ok
    assert " more" not in str(refused.reply["error"])
    assert f"pid {holder.reply['pid']}" in str(refused.reply["error"])


def test_a_plain_qemu_is_still_a_qemu_holder_from_another_host(
    qemu_vms: QemuVMs, qemu_img: QemuImg, tmp_path: Path
) -> None:
    image = tmp_path / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "16M")
    vm = qemu_vms.start([*NONE_MACHINE, "-drive", f"file={image},if=none,id=d0"])

    def holders_seen() -> list[dict[str, object]]:
        assert vm.alive(), "QEMU exited"
        return _status_elsewhere(image)

    (holder,) = wait_until(holders_seen, what="QEMU's lock on the image", timeout=20)
    assert holder["layer"] == "qemu" and holder["pid"] is None
    assert "write" in holder["perms"]  # type: ignore[operator]


def test_imglock_without_qemu_bytes_beside_a_qemu_reader_stays_two_holders(
    qemu_vms: QemuVMs, rival: SpawnRival, raw_image: Path
) -> None:
    """An unmarked holder (no QEMU layer) never takes a QEMU's bytes for its own."""
    holder = rival("--mode", "shared", "--no-qemu", raw_image)
    assert holder.ok
    vm = qemu_vms.start(
        [*NONE_MACHINE, "-drive", f"file={raw_image},format=raw,if=none,id=d0,readonly=on"]
    )

    def both_seen() -> list[dict[str, object]] | None:
        assert vm.alive(), "QEMU exited"
        seen = _status_elsewhere(raw_image)
        return seen if len(seen) >= 2 else None

    seen = wait_until(both_seen, what="imglock's holder and QEMU's", timeout=20)
    assert sorted(str(h["layer"]) for h in seen) == ["imglock", "qemu"]
    (mine,) = [h for h in seen if h["layer"] == "imglock"]
    assert mine["perms"] == []


def test_waiters_on_two_hosts_with_the_same_pid_are_told_apart_from_a_third(
    raw_image: Path, rival: SpawnRival, started: list[subprocess.Popen[str]]
) -> None:
    """Each waiter is pid 1 of its own host: the queue still holds both, in order."""
    from soak_worker import on_host

    holder = rival(raw_image)
    assert holder.ok
    for host in ("host-a", "host-b"):
        waiter = subprocess.Popen(
            [*on_host(host), sys.executable, CLAIMER, "--wait", "300", str(raw_image)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        started.append(waiter)

        def queued(waiter: subprocess.Popen[str] = waiter, host: str = host) -> bool:
            assert waiter.poll() is None, f"the waiter on {host} exited"
            return len(_report_elsewhere(raw_image)["waiting"]) >= 1 + (host == "host-b")

        wait_until(queued, what=f"the waiter on {host} in the queue", timeout=30)
    report = _report_elsewhere(raw_image)
    waiting = report["waiting"]
    assert [w["pid"] for w in waiting] == [1, 1]
    assert len({w["host"] for w in waiting}) == 2
    assert all(str(w["host"]).startswith("host#") for w in waiting)
    assert [h["pid"] for h in report["holders"]] == [holder.reply["pid"]]
    holder.stop()
    for waiter in started:
        assert waiter.stdout is not None
        assert '"ok": true' in waiter.stdout.readline()  # each gets the image in turn
        assert waiter.stdin is not None
        waiter.stdin.close()
        assert waiter.wait(30) == 0


def _report_elsewhere(image: Path) -> dict[str, list[dict[str, object]]]:
    proc = subprocess.run(
        [*ELSEWHERE, sys.executable, "-m", "imglock", "status", "--json", str(image)],
        capture_output=True,
        text=True,
        timeout=30,
        env=ENV,
    )
    assert proc.returncode in (0, 1), proc.stderr
    (report,) = json.loads(proc.stdout)
    return report  # type: ignore[no-any-return]
