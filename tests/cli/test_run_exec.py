"""``imglock run --exec``: the command replaces the wrapper, and a helper keeps watch beside it.

A manager that tracks the pid it started (libvirt, systemd) must reach the
command itself: its signals, its exit status and its end are the
command's, and the claim ends with it, whoever kills it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import ENV, imglock_holders
from processes import alive, state, wait_until

IMGLOCK = [sys.executable, "-m", "imglock"]


def start(image: Path, *command: str, options: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*IMGLOCK, "run", "--exec", *options, "--image", str(image), "--", *command],
        env=ENV, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def helpers_of(image: Path) -> list[int]:
    """Processes other than the command that still hold the image's descriptors."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fds = os.listdir(f"/proc/{entry}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{entry}/fd/{fd}") == str(image):
                        found.append(int(entry))
                        break
                except OSError:
                    continue
    return found


def test_the_command_runs_under_the_wrappers_pid_and_holds_the_claim(
    raw_image: Path, tmp_path: Path
) -> None:
    said = tmp_path / "pid"
    run = start(raw_image, "sh", "-c", f"echo $$ > {said}; exec sleep 30")
    try:
        wait_until(lambda: said.exists() and said.read_text().strip(), what="the command's pid")
        assert int(said.read_text()) == run.pid
        (holder,) = wait_until(lambda: imglock_holders(raw_image), what="the claim")
        assert (holder.pid, holder.mode) == (run.pid, "exclusive")
    finally:
        run.kill()
        run.wait()


def test_a_sigkill_to_the_pid_ends_the_command_and_the_claim_with_it(raw_image: Path) -> None:
    run = start(raw_image, "sleep", "30")
    wait_until(lambda: imglock_holders(raw_image), what="the claim")
    os.kill(run.pid, signal.SIGKILL)
    assert run.wait(10) == -signal.SIGKILL
    wait_until(lambda: not imglock_holders(raw_image), what="the claim to end with the command")
    wait_until(lambda: not helpers_of(raw_image), what="the helper to end")


def test_the_exit_status_is_the_commands_and_the_claim_ends_with_it(raw_image: Path) -> None:
    run = start(raw_image, "sh", "-c", "exit 7")
    assert run.wait(30) == 7
    wait_until(lambda: not imglock_holders(raw_image), what="the claim to end")


def test_a_signal_to_the_pid_reaches_the_command_itself(raw_image: Path, tmp_path: Path) -> None:
    said = tmp_path / "got"
    script = (
        f"trap 'echo TERM > {said}; exit 3' TERM; echo ready > {said}.ready; "
        "while :; do sleep 0.05; done"
    )
    run = start(raw_image, "sh", "-c", script)
    wait_until(Path(f"{said}.ready").exists, what="the command's trap")
    run.send_signal(signal.SIGTERM)
    assert run.wait(10) == 3 and said.read_text() == "TERM\n"


def test_a_command_that_cannot_be_found_exits_127_and_leaves_nothing_held(
    raw_image: Path,
) -> None:
    run = start(raw_image, "/nonexistent/vmm")
    _out, err = run.communicate(timeout=30)
    assert run.returncode == 127
    assert err.strip().splitlines()[-1] == ("imglock: /nonexistent/vmm: No such file or directory")
    wait_until(lambda: not imglock_holders(raw_image), what="the claim to end")
    wait_until(lambda: not helpers_of(raw_image), what="the helper to end")


def test_a_held_image_is_refused_and_the_command_never_runs(
    raw_image: Path, tmp_path: Path
) -> None:
    first = start(raw_image, "sleep", "30")
    try:
        wait_until(lambda: imglock_holders(raw_image), what="the first claim")
        ran = tmp_path / "ran"
        second = start(raw_image, "touch", str(ran))
        _out, err = second.communicate(timeout=30)
        assert second.returncode == 75 and f"pid {first.pid}" in err
        assert not ran.exists()
    finally:
        first.kill()
        first.wait()


def test_a_lost_claim_is_seen_by_the_helper_and_stops_the_command(
    raw_image: Path, tmp_path: Path
) -> None:
    run = start(raw_image, "sleep", "30", options=("--check-interval", "0.2"))
    try:
        wait_until(lambda: imglock_holders(raw_image), what="the claim")
        # The image is replaced under the running command: its claim no longer covers it.
        replacement = tmp_path / "new.raw"
        replacement.write_bytes(b"\0" * 4096)
        os.replace(replacement, raw_image)
        wait_until(lambda: state(run.pid) == "T", what="the command to be stopped")
        assert alive(run.pid)
    finally:
        run.kill()
        run.wait()
    _out, err = run.communicate(timeout=10)
    assert "lock lost" in err or "replaced" in err, err
