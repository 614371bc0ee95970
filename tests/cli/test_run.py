"""``imglock run``: wrapping any command, as flock(1) wraps one.

Each test runs the real ``imglock`` command around real commands.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ImglockCli, imglock_holders
from processes import state, wait_until

import imglock

IMGLOCK = [sys.executable, "-m", "imglock"]


def _background(
    started: list[subprocess.Popen[str]], *args: str | os.PathLike[str], **kw: object
) -> subprocess.Popen[str]:
    proc = subprocess.Popen(  # type: ignore[call-overload]
        [*IMGLOCK, *(os.fspath(arg) for arg in args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )
    started.append(proc)
    return proc  # type: ignore[no-any-return]


def test_exit_status_is_the_commands(raw_image: Path, imglock_cli: ImglockCli) -> None:
    proc = imglock_cli("run", "--image", raw_image, "--", "sh", "-c", "exit 3")
    assert proc.returncode == 3, proc.stderr


def test_exit_status_of_a_command_killed_by_a_signal_is_128_plus_n(
    raw_image: Path, imglock_cli: ImglockCli
) -> None:
    proc = imglock_cli("run", "--image", raw_image, "--", "sh", "-c", "kill -TERM $$")
    assert proc.returncode == 128 + signal.SIGTERM


def test_the_command_holds_the_image_while_it_runs_and_not_after(
    raw_image: Path, imglock_cli: ImglockCli
) -> None:
    script = f"{sys.executable} -m imglock status --json {raw_image}"
    proc = imglock_cli("run", "--image", raw_image, "--", "sh", "-c", script)
    assert proc.returncode == 1, proc.stderr  # status: held
    (report,) = json.loads(proc.stdout)
    (holder,) = [h for h in report["holders"] if h["layer"] == "imglock"]
    assert holder["mode"] == "exclusive"
    assert holder["command"].startswith("sh -c")  # the command, not the wrapper
    assert "write" in holder["perms"]  # QEMU's bytes held for a non-QEMU command
    assert imglock.holders(raw_image) == []


def test_a_second_run_fails_with_the_conflict_status_and_names_the_holder(
    raw_image: Path, imglock_cli: ImglockCli, started: list[subprocess.Popen[str]]
) -> None:
    first = _background(started, "run", "--image", raw_image, "--", "sleep", "30")
    (holder,) = wait_until(lambda: imglock_holders(raw_image), what="the command holds the image")
    proc = imglock_cli("run", "--image", raw_image, "--", "true")
    assert proc.returncode == 75
    (line,) = proc.stderr.splitlines()
    assert str(raw_image) in line and f"pid {holder.pid}" in line and "sleep 30" in line
    assert imglock_cli("run", "-E", "9", "--image", raw_image, "--", "true").returncode == 9
    assert first.poll() is None


def test_wait_gets_the_image_when_the_first_holder_exits(
    raw_image: Path, imglock_cli: ImglockCli, started: list[subprocess.Popen[str]]
) -> None:
    _background(started, "run", "--image", raw_image, "--", "sleep", "1")
    wait_until(lambda: imglock_holders(raw_image), what="the command holds the image")
    proc = imglock_cli("run", "-w", "20", "--image", raw_image, "--", "true")
    assert proc.returncode == 0, proc.stderr


def test_wait_that_runs_out_exits_with_the_conflict_status(
    raw_image: Path, imglock_cli: ImglockCli, started: list[subprocess.Popen[str]]
) -> None:
    _background(started, "run", "--image", raw_image, "--", "sleep", "30")
    wait_until(lambda: imglock_holders(raw_image), what="the command holds the image")
    began = time.monotonic()
    proc = imglock_cli("run", "-w", "0.5", "--image", raw_image, "--", "true")
    assert proc.returncode == 75
    assert time.monotonic() - began >= 0.5


def test_kill_9_of_the_wrapper_leaves_the_command_holding_the_lock(
    raw_image: Path, started: list[subprocess.Popen[str]]
) -> None:
    wrapper = _background(started, "run", "--image", raw_image, "--", "sleep", "30")
    (holder,) = wait_until(lambda: imglock_holders(raw_image), what="the command holds the image")
    pid = holder.pid
    assert pid is not None
    wrapper.kill()
    wrapper.wait()
    try:
        (still,) = imglock_holders(raw_image)
        assert still.pid == pid
        with pytest.raises(imglock.LockConflict):
            imglock.claim(raw_image)
    finally:
        os.kill(pid, signal.SIGKILL)


def test_kill_9_of_the_command_frees_the_image(
    raw_image: Path, started: list[subprocess.Popen[str]]
) -> None:
    wrapper = _background(started, "run", "--image", raw_image, "--", "sleep", "30")
    (holder,) = wait_until(lambda: imglock_holders(raw_image), what="the command holds the image")
    assert holder.pid is not None
    os.kill(holder.pid, signal.SIGKILL)
    assert wrapper.wait(timeout=10) == 128 + signal.SIGKILL
    assert imglock.holders(raw_image) == []


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_are_forwarded_to_the_command(
    raw_image: Path, tmp_path: Path, started: list[subprocess.Popen[str]], signo: int
) -> None:
    got, trapped = tmp_path / "got", tmp_path / "trapped"
    script = (
        f"trap 'echo {signo} > {got}; exit 7' {signo}; touch {trapped}; "
        "while :; do sleep 0.05; done"
    )
    wrapper = _background(started, "run", "--image", raw_image, "--", "sh", "-c", script)
    wait_until(lambda: imglock_holders(raw_image), what="the command holds the image")
    wait_until(trapped.exists, what="the shell to install its trap")
    wrapper.send_signal(signo)
    assert wrapper.wait(timeout=10) == 7
    assert got.read_text().strip() == str(signo)


LIST_FDS = """
import os
for name in sorted(os.listdir("/proc/self/fd"), key=int):
    if int(name) > 2:
        try:
            print(os.readlink(f"/proc/self/fd/{name}"))
        except OSError:
            pass  # the descriptor listdir itself used
"""


def test_the_command_inherits_only_the_lock_descriptors(
    raw_image: Path, imglock_cli: ImglockCli
) -> None:
    proc = imglock_cli(
        "run", "--image", raw_image, "--", sys.executable, "-c", LIST_FDS, close_fds=True
    )
    assert proc.stdout.split() == [str(raw_image)]


def test_a_command_that_is_not_qemu_needs_image(imglock_cli: ImglockCli) -> None:
    proc = imglock_cli("run", "--", "true")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--image" in proc.stderr


def test_a_command_that_does_not_exist_exits_127_and_releases(
    raw_image: Path, imglock_cli: ImglockCli
) -> None:
    proc = imglock_cli("run", "--image", raw_image, "--", "/nonexistent/vmm")
    assert proc.returncode == 127
    assert "/nonexistent/vmm" in proc.stderr
    assert imglock.holders(raw_image) == []


def test_a_bad_image_fails_before_anything_runs(tmp_path: Path, imglock_cli: ImglockCli) -> None:
    marker = tmp_path / "ran"
    proc = imglock_cli("run", "--image", tmp_path / "missing.raw", "--", "touch", marker)
    assert proc.returncode == 66
    assert not marker.exists()
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr


def test_lock_loss_stops_the_command_and_says_so(
    raw_image: Path, started: list[subprocess.Popen[str]]
) -> None:
    # EIO from the lock manager is a fault that cannot be caused here for
    # real: the fault seam makes every lock call fail after 0.5 s.
    env = {**os.environ, "IMGLOCK_FAULTS": "fcntl=EIO,after=0.5"}
    wrapper = _background(
        started,
        "run",
        "--check-interval",
        "0.1",
        "--image",
        raw_image,
        "--",
        "sleep",
        "30",
        env=env,
    )
    (holder,) = wait_until(lambda: imglock_holders(raw_image), what="the command holds the image")
    pid = holder.pid
    assert pid is not None
    try:
        wait_until(lambda: state(pid) == "T", what="the command is stopped")
    finally:
        os.kill(pid, signal.SIGKILL)
    wrapper.wait(timeout=10)
    assert wrapper.stderr is not None
    assert "lock lost" in wrapper.stderr.read()


@pytest.mark.qemu
def test_qemu_tools_keep_their_own_lock_bytes_under_run(
    tmp_path: Path, imglock_cli: ImglockCli, qemu_img: object, started: list[subprocess.Popen[str]]
) -> None:
    image = tmp_path / "vm.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "16M"], check=True)
    proc = imglock_cli("run", "--image", image, "--", "qemu-img", "resize", image, "+1M")
    assert proc.returncode == 0, proc.stderr  # qemu-img takes QEMU's bytes itself
    _background(started, "run", "--image", image, "--", "sleep", "30")
    wait_until(lambda: imglock_holders(image), what="the command holds the image")
    proc = imglock_cli("run", "--image", image, "--", "qemu-img", "resize", image, "+1M")
    assert proc.returncode == 75
