"""imglock(7), LIFETIME: a claim lives exactly as long as the processes that use the image.

An OFD lock belongs to the open file description, shared by every process
that inherited it.  These tests fork real processes and start real
commands that leave children behind, and check from outside (a rival in
another process, ``imglock status``) that the image stays claimed while
any of them still holds the descriptors, and is free once the last is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ENV, ImglockCli, SpawnRival, imglock_holders
from processes import alive, state, wait_until

import imglock
from imglock.errors import UsageError
from imglock.lock.identity import Owner


def imglock_pids(image: Path) -> set[int]:
    """The local processes holding *image*'s imglock layer, as ``status`` sees them."""
    return {pid for h in imglock.holders(image) if h.layer == "imglock" for pid in h.local_pids}


def assert_refused(image: Path, rival: SpawnRival) -> None:
    """A rival in another process, which does not even take QEMU's bytes, is refused."""
    other = rival(image, "--no-qemu")
    assert not other.ok, "a rival got the image"
    assert other.reply["status"] == 75


@pytest.fixture
def forked() -> Iterator[list[int]]:
    """Children forked by a test (it appends their pids): killed and reaped afterwards."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def fork_then(action: Callable[[], None], forked: list[int]) -> int:
    """Fork a child that runs *action* and then exits; return its pid, once it has exited."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 0
        try:
            action()
        except BaseException:
            status = 1
        os._exit(status)
    forked.append(pid)
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child's action failed"
    return pid


# --- Forked library users -----------------------------------------------------------


def test_a_release_in_a_forked_child_leaves_the_parents_claim_intact(
    raw_image: Path, rival: SpawnRival, forked: list[int]
) -> None:
    claim = imglock.claim(raw_image)
    try:
        fork_then(claim.release, forked)
        assert claim.held
        claim.verify()  # still ours, unchallenged
        assert_refused(raw_image, rival)
        assert imglock_pids(raw_image) == {os.getpid()}
    finally:
        claim.release()
    assert imglock.holders(raw_image) == []


def test_leaving_a_with_block_in_a_forked_child_leaves_the_parents_claim_intact(
    raw_image: Path, rival: SpawnRival, forked: list[int]
) -> None:
    with imglock.claim(raw_image) as claim:

        def child_leaves_the_block() -> None:
            with claim:
                pass

        fork_then(child_leaves_the_block, forked)
        claim.verify()
        assert_refused(raw_image, rival)
    assert imglock.holders(raw_image) == []


def test_a_forked_child_still_holding_the_descriptors_keeps_the_image_after_the_parent_releases(
    raw_image: Path, rival: SpawnRival, forked: list[int]
) -> None:
    claim = imglock.claim(raw_image)
    gate_r, gate_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child holds the inherited descriptors
        os.close(gate_w)
        os.read(gate_r, 1)
        os._exit(0)
    forked.append(child)
    os.close(gate_r)
    claim.release()  # the parent lets go; the child still has the descriptors
    try:
        assert_refused(raw_image, rival)
        assert imglock_pids(raw_image) == {child}  # status names who holds it
    finally:
        os.close(gate_w)  # the child exits
        os.waitpid(child, 0)
    assert imglock.holders(raw_image) == []
    assert rival(raw_image).ok


# --- Commands that leave children behind ---------------------------------------------


def test_a_background_child_of_the_command_keeps_the_claim_and_status_names_it(
    raw_image: Path, rival: SpawnRival, imglock_cli: ImglockCli, tmp_path: Path
) -> None:
    pidfile = tmp_path / "bg.pid"
    # The shell leaves `sleep` behind, holding the inherited descriptors (as
    # `flock FILE sh -c 'sleep 30 &'` keeps its lock with the sleep).
    script = f"sleep 30 >/dev/null 2>&1 & echo $! > {pidfile}"
    proc = imglock_cli("run", "--image", raw_image, "--", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    sleeper = int(pidfile.read_text())
    try:
        assert alive(sleeper)
        assert_refused(raw_image, rival)
        (holder,) = imglock_holders(raw_image)
        # The lock names the sleep, on every host (its offset, its record) ...
        assert holder.pid == sleeper and holder.owner is not None
        assert Owner.from_id(holder.owner).pid == sleeper
        assert holder.command is not None and holder.command.startswith("sleep 30")
        # ... and locally the watcher that keeps it for the sleep shares it.
        (watcher,) = set(holder.local_pids) - {sleeper}
    finally:
        os.kill(sleeper, signal.SIGKILL)
    wait_until(
        lambda: not imglock.holders(raw_image),
        what="the image is free once the background child is gone",
    )
    wait_until(lambda: not alive(watcher), what="the watcher is gone")
    assert not (raw_image.parent / ".imglock").exists() or not any(
        (raw_image.parent / ".imglock").iterdir()
    )
    assert rival(raw_image).ok


# --- Library arguments ---------------------------------------------------------------


@pytest.mark.parametrize("spelling", [bytes, Path, str])
def test_claim_takes_str_bytes_and_path_like_objects(
    raw_image: Path, spelling: Callable[[Path], object]
) -> None:
    path = os.fsencode(raw_image) if spelling is bytes else spelling(raw_image)
    with imglock.claim(path) as claim:  # type: ignore[arg-type]
        assert claim.images[0][0] == str(raw_image)
        assert imglock.inspect(path).holders != []  # type: ignore[arg-type]


@pytest.mark.parametrize("wait", ["5", -1, float("nan"), None, True])
def test_a_wait_that_is_not_a_number_of_seconds_is_a_usage_error(
    raw_image: Path, wait: object
) -> None:
    with pytest.raises(UsageError) as info:
        imglock.claim(raw_image, wait=wait)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert "wait must be a number of seconds" in str(info.value)
    assert imglock.holders(raw_image) == []


# --- Signals from a terminal ---------------------------------------------------------

#: Counts the SIGINTs it gets: after the first, it waits a little for a
#: second one, writes the count to argv[1] and exits.
COUNT_SIGINT = """
import signal, sys, time
count = 0
def got(_signo, _frame):
    global count
    count += 1
signal.signal(signal.SIGINT, got)
open(sys.argv[2], "w").close()
while count == 0:
    time.sleep(0.01)
time.sleep(0.5)
open(sys.argv[1], "w").write(str(count))
"""


def on_a_terminal(argv: list[str], forked: list[int]) -> tuple[int, int]:
    """Run ``imglock ARGV`` as the session leader of a new pseudo-terminal: (pid, master fd)."""
    import pty

    pid, master = pty.fork()
    if pid == 0:  # pragma: no cover - the child becomes the wrapper
        os.execve(sys.executable, [sys.executable, "-m", "imglock", *argv], ENV)
    forked.append(pid)
    return pid, master


def exit_status_within(pid: int, master: int | None = None) -> int:
    """Wait (bounded) for child *pid*, draining the terminal meanwhile; its exit status."""

    def exit_status() -> tuple[int] | None:
        if master is not None:
            try:
                os.set_blocking(master, False)
                os.read(master, 4096)
            except OSError:
                pass
        done, status = os.waitpid(pid, os.WNOHANG)
        return (os.waitstatus_to_exitcode(status),) if done == pid else None

    (code,) = wait_until(exit_status, what=f"pid {pid} to exit")
    return code


def test_ctrl_c_on_the_terminal_reaches_the_command_once(
    raw_image: Path, tmp_path: Path, forked: list[int]
) -> None:
    count, ready = tmp_path / "count", tmp_path / "ready"
    wrapper, master = on_a_terminal(
        [
            "run",
            "--image",
            str(raw_image),
            "--",
            sys.executable,
            "-c",
            COUNT_SIGINT,
            str(count),
            str(ready),
        ],
        forked,
    )
    try:
        wait_until(ready.exists, what="the command runs")
        os.write(master, b"\x03")  # ^C: the kernel signals the foreground process group
        assert exit_status_within(wrapper, master) == 0
        assert count.read_text() == "1"
    finally:
        os.close(master)
    assert imglock.holders(raw_image) == []


@pytest.mark.qemu
def test_closing_the_terminal_stops_qemu_and_frees_the_image(
    qemu_system_path: str, raw_image: Path, forked: list[int]
) -> None:
    # A hangup sends SIGHUP to the session leader only (here the wrapper,
    # as under `setsid script -qfc 'imglock run -- qemu...'`): QEMU, in the
    # same session, hears of it only through the wrapper.
    qemu = [qemu_system_path, "-M", "none", "-nodefaults", "-display", "none"]
    drive = f"file={raw_image},format=raw,if=none"
    wrapper, master = on_a_terminal(["run", "--", *qemu, "-drive", drive], forked)
    try:
        wait_until(lambda: bool(imglock.holders(raw_image)), what="QEMU runs and holds the image")
        (vm,) = {h.pid for h in imglock.holders(raw_image) if h.layer == "imglock"}
        assert vm is not None and vm != wrapper
    finally:
        os.close(master)  # the terminal goes away
    exit_status_within(wrapper)
    wait_until(lambda: not alive(vm), what="QEMU is gone")
    assert imglock.holders(raw_image) == []


def test_the_claim_moves_to_the_next_background_child_when_the_one_it_names_exits(
    raw_image: Path, rival: SpawnRival, imglock_cli: ImglockCli, tmp_path: Path
) -> None:
    first, second = tmp_path / "first.pid", tmp_path / "second.pid"
    script = (
        f"sleep 30 >/dev/null 2>&1 & echo $! > {first}; "
        f"sleep 31 >/dev/null 2>&1 & echo $! > {second}"
    )
    proc = imglock_cli("run", "--image", raw_image, "--", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    older, younger = int(first.read_text()), int(second.read_text())

    def named() -> set[int]:
        """The pids the lock offsets name (two for a moment, while the name moves)."""
        return {
            Owner.from_id(h.owner).pid
            for h in imglock.holders(raw_image)
            if h.layer == "imglock" and h.owner is not None
        }

    try:
        assert named() == {older}  # the oldest survivor
        os.kill(older, signal.SIGKILL)
        wait_until(lambda: named() == {younger}, what="the lock names the remaining child")
        assert_refused(raw_image, rival)
    finally:
        for pid in (older, younger):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not imglock.holders(raw_image), what="the image is free")


def test_a_lost_lock_stops_every_background_child_still_using_the_image(
    raw_image: Path, imglock_cli: ImglockCli, tmp_path: Path
) -> None:
    # A lost lock cannot be caused for real here: from 1 s after start-up,
    # every lock call of the wrapper (and so of its watcher) fails with EIO.
    pids = [tmp_path / "first.pid", tmp_path / "second.pid"]
    script = "; ".join(f"sleep 30 >/dev/null 2>&1 & echo $! > {p}" for p in pids)
    proc = imglock_cli(
        "run", "--check-interval", "0.1", "--image", raw_image, "--", "sh", "-c", script,
        env={**ENV, "IMGLOCK_FAULTS": "fcntl=EIO,after=1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    children = [int(p.read_text()) for p in pids]
    try:
        wait_until(
            lambda: all(state(pid) == "T" for pid in children), what=f"pids {children} stopped"
        )
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not imglock.holders(raw_image), what="the image is free")
