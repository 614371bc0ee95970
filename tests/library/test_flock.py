"""The flock layer: imglock and flock(2) users (crosvm, hyperkit, alioth) refuse each other.

On a local filesystem flock and fcntl locks never meet, so without this
layer crosvm could start on an image a wrapped QEMU writes.  The flock
users here are real: flock(1), and a Python process that locks as crosvm
does (shared for a read-only disk, exclusive for a writable one).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ENV, ImglockCli, SpawnRival
from processes import wait_until

import imglock
from imglock.lock import flock

#: Stands in for crosvm: flock(2) the disk, never waiting; say "ok" or "refused";
#: hold the lock until stdin closes.
CROSVM = """
import fcntl, os, sys
path, mode = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR if mode == "exclusive" else os.O_RDONLY)
try:
    fcntl.flock(fd, (fcntl.LOCK_EX if mode == "exclusive" else fcntl.LOCK_SH) | fcntl.LOCK_NB)
except BlockingIOError:
    print("refused", flush=True)
    sys.exit(1)
print("ok", flush=True)
sys.stdin.read()
"""


def crosvm(image: Path, mode: str, started: list[subprocess.Popen[str]]) -> bool:
    """Start a flock(2) user on *image*; whether it got its lock (it then holds it)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CROSVM, str(image), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    started.append(proc)
    assert proc.stdout is not None
    return proc.stdout.readline() == "ok\n"


def flock_holders(imglock_cli: ImglockCli, image: Path) -> list[dict[str, object]]:
    proc = imglock_cli("status", "--json", image)
    (report,) = json.loads(proc.stdout)
    return [h for h in report["holders"] if h["layer"] == "flock"]


def test_this_filesystem_keeps_flock_apart_from_fcntl(raw_image: Path) -> None:
    import os

    fstype = flock.filesystem_type(os.stat(raw_image).st_dev)
    assert fstype is not None and flock.separate_from_fcntl(fstype), fstype
    assert not flock.separate_from_fcntl("nfs4")
    assert not flock.separate_from_fcntl("fuse.glusterfs")
    assert not flock.separate_from_fcntl(None)


@pytest.mark.parametrize(("flag", "claims"), [("-x", set()), ("-s", {"shared"})])
def test_flock1_holding_an_image_refuses_claims_and_status_names_it(
    raw_image: Path,
    imglock_cli: ImglockCli,
    started: list[subprocess.Popen[str]],
    flag: str,
    claims: set[str],
) -> None:
    holder = subprocess.Popen(["flock", flag, str(raw_image), "sleep", "600"], text=True)
    started.append(holder)
    seen = wait_until(
        lambda: flock_holders(imglock_cli, raw_image), what="flock(1) to lock the image", timeout=10
    )
    assert holder.pid in [h["pid"] for h in seen]
    assert {h["mode"] for h in seen} == {"exclusive" if flag == "-x" else "shared"}
    assert "flock" in imglock_cli("status", raw_image).stdout

    got = set()
    for mode in ("exclusive", "shared"):
        try:
            imglock.claim(raw_image, mode=mode).release()
            got.add(mode)
        except imglock.LockConflict as exc:
            assert f"flock {'exclusive' if flag == '-x' else 'shared'} by pid" in str(exc)
    assert got == claims
    # --flock off: imglock no longer sees flock users (as before this layer)
    imglock.claim(raw_image, flock="off").release()
    run = imglock_cli("run", "--image", raw_image, "--", "true")
    assert run.returncode == 75 and "flock" in run.stderr
    assert imglock_cli("run", "--flock", "off", "--image", raw_image, "--", "true").returncode == 0


@pytest.mark.parametrize("mode", ["exclusive", "shared", "shared-write"])
def test_a_crosvm_stand_in_is_refused_while_imglock_holds(
    raw_image: Path, rival: SpawnRival, started: list[subprocess.Popen[str]], mode: str
) -> None:
    assert rival("--mode", mode, "--flock", "auto", raw_image).ok
    assert not crosvm(raw_image, "exclusive", started)
    assert crosvm(raw_image, "shared", started) is (mode != "exclusive")


def test_flock1_is_refused_while_a_wrapped_command_holds(
    raw_image: Path, started: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "imglock", "run", "--image", str(raw_image), "--",
         "sh", "-c", f"touch {ready}; exec sleep 600"],
        env=ENV,
        text=True,
    )  # fmt: skip
    started.append(wrapper)

    def command_started() -> bool:
        assert wrapper.poll() is None, "imglock run exited"
        return ready.exists()

    wait_until(command_started, what="the wrapped command to start", timeout=20)
    assert subprocess.run(["flock", "-n", "-s", str(raw_image), "true"]).returncode == 1
    assert subprocess.run(["flock", "-n", "-x", str(raw_image), "true"]).returncode == 1
    # ...and no separate flock holder is listed: it is the claim's own layer.
    assert [h.layer for h in imglock.holders(raw_image)] == ["imglock"]


def test_a_crosvm_stand_in_holding_a_disk_refuses_an_exclusive_claim_not_a_shared_one(
    raw_image: Path, started: list[subprocess.Popen[str]]
) -> None:
    assert crosvm(raw_image, "shared", started)
    with pytest.raises(imglock.LockConflict, match="flock shared by pid"):
        imglock.claim(raw_image)
    imglock.claim(raw_image, mode="shared").release()


def test_a_refused_upgrade_keeps_the_shared_flock(
    raw_image: Path, started: list[subprocess.Popen[str]]
) -> None:
    """flock(2) converts a lock by dropping it first: a refused upgrade takes it back."""
    import os

    from imglock.lock import protocol
    from imglock.lock.protocol import Layer, Mode

    layers = Layer.IMGLOCK | Layer.QEMU | Layer.FLOCK
    fd = os.open(raw_image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        held = protocol.acquire(fd, str(raw_image), Mode.SHARED, layers)
        assert held.flock
        assert crosvm(raw_image, "shared", started)  # a read-only crosvm disk beside us
        with pytest.raises(imglock.LockConflict):
            protocol.change_mode(fd, str(raw_image), held, Mode.EXCLUSIVE)
        # Still shared: a writable crosvm is refused, as before the attempt.
        assert not crosvm(raw_image, "exclusive", started)
        started[0].stdin.close()  # type: ignore[union-attr]
        started[0].wait(10)
        upgraded = protocol.change_mode(fd, str(raw_image), held, Mode.EXCLUSIVE)
        assert upgraded.flock and upgraded.mode is Mode.EXCLUSIVE
        assert not crosvm(raw_image, "shared", started)
        shared = protocol.change_mode(fd, str(raw_image), upgraded, Mode.SHARED)
        assert shared.flock
        assert crosvm(raw_image, "shared", started)
    finally:
        os.close(fd)
