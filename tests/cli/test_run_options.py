"""``imglock run``'s numeric options: what a user can type, checked before anything starts.

imglock(1), VALUES: every number of seconds takes a decimal number or
``inf`` where that means forever; ``nan``, negative numbers and values past
about 31 years are refused with exit status 2 and one line on standard
error, before any process is started and before any image is opened.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import ImglockCli

import imglock
from imglock.errors import EX_NOTFOUND, EX_USAGE
from imglock.lock.records import RECORD_DIR

SECONDS_OPTIONS = ["--wait", "--check-interval", "--handoff-timeout", "--graph-interval"]
BAD_SECONDS = ["nan", "NaN", "-1", "-inf", "1e300", "1e10", "soon", ""]


def run_touching(
    imglock_cli: ImglockCli, image: Path, marker: Path, *options: str
) -> tuple[int, str]:
    """``imglock run OPTIONS --image IMAGE -- touch MARKER``: (status, stderr)."""
    proc = imglock_cli("run", *options, "--image", image, "--", "touch", marker)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("value", BAD_SECONDS)
@pytest.mark.parametrize("option", SECONDS_OPTIONS)
def test_a_bad_number_of_seconds_exits_2_with_one_line_before_anything_runs(
    raw_image: Path, tmp_path: Path, imglock_cli: ImglockCli, option: str, value: str
) -> None:
    marker = tmp_path / "ran"
    status, stderr = run_touching(imglock_cli, raw_image, marker, f"{option}={value}")
    assert status == EX_USAGE
    (line,) = stderr.splitlines()
    assert line.startswith("imglock run: ") and option in line
    assert not marker.exists()
    assert imglock.holders(raw_image) == []


@pytest.mark.parametrize("value", ["inf", "Infinity", "0", "0.25", "1e9", " 7 "])
@pytest.mark.parametrize("option", SECONDS_OPTIONS)
def test_a_reasonable_number_of_seconds_runs_the_command(
    raw_image: Path, tmp_path: Path, imglock_cli: ImglockCli, option: str, value: str
) -> None:
    marker = tmp_path / "ran"
    status, stderr = run_touching(imglock_cli, raw_image, marker, f"{option}={value}")
    assert (status, stderr) == (0, "")
    assert marker.exists()
    assert imglock.holders(raw_image) == []


def test_check_interval_inf_never_checks_and_the_command_keeps_running(
    raw_image: Path, imglock_cli: ImglockCli
) -> None:
    # With checks on, every lock call failing would pause the command; with
    # inf there is no check, so it runs to its end (the old traceback case).
    proc = imglock_cli(
        "run",
        "--check-interval",
        "inf",
        "--image",
        raw_image,
        "--",
        "sh",
        "-c",
        "sleep 0.3; exit 4",
    )
    assert (proc.returncode, proc.stderr) == (4, "")


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "256", "1e3", "x"])
def test_a_conflict_exit_code_outside_0_to_255_exits_2_with_one_line(
    raw_image: Path, tmp_path: Path, imglock_cli: ImglockCli, value: str
) -> None:
    marker = tmp_path / "ran"
    status, stderr = run_touching(imglock_cli, raw_image, marker, f"-E{value}")
    assert status == EX_USAGE and len(stderr.splitlines()) == 1
    assert not marker.exists()


def test_the_conflict_exit_code_is_used_on_a_conflict(
    raw_image: Path, tmp_path: Path, imglock_cli: ImglockCli
) -> None:
    with imglock.claim(raw_image):
        status, _stderr = run_touching(imglock_cli, raw_image, tmp_path / "ran", "-E", "0")
    assert status == 0 and not (tmp_path / "ran").exists()


#: A command that writes the number of the first SIGTERM it gets, then exits 0.
REPORT_TERM = """
import signal, sys, time
def report(signo, _frame):
    open(sys.argv[1], "w").write(str(signo))
    sys.exit(0)
signal.signal(signal.SIGTERM, report)
time.sleep(30)
"""


@pytest.mark.parametrize(
    ("value", "signo"),
    [
        ("9", signal.SIGKILL),
        ("KILL", signal.SIGKILL),
        ("sigterm", signal.SIGTERM),
        ("15", 15),
        (str(int(signal.SIGRTMIN)), int(signal.SIGRTMIN)),  # no name of its own
    ],
)
def test_the_lock_lost_signal_is_a_name_or_a_number_as_kill_takes_it(
    raw_image: Path, tmp_path: Path, imglock_cli: ImglockCli, value: str, signo: int
) -> None:
    # The signal is sent when the lock is lost (the fault seam makes every
    # lock call fail once the command runs).
    got = tmp_path / "got"
    proc = imglock_cli(
        "run",
        "--check-interval",
        "0.05",
        "--lock-lost-signal",
        value,
        "--image",
        raw_image,
        "--",
        sys.executable,
        "-c",
        REPORT_TERM,
        got,
        env={**os.environ, "IMGLOCK_FAULTS": "fcntl=EIO,after=0.5"},
    )
    assert "lock lost" in proc.stderr and "Traceback" not in proc.stderr
    if signo != signal.SIGTERM:  # the default action: the command is killed by it
        assert proc.returncode == 128 + signo
    else:
        assert proc.returncode == 0 and got.read_text() == str(int(signal.SIGTERM))


@pytest.mark.parametrize("value", ["0", "65", "-9", "NOSUCH", "1.5"])
def test_an_unknown_lock_lost_signal_exits_2_with_one_line(
    raw_image: Path, tmp_path: Path, imglock_cli: ImglockCli, value: str
) -> None:
    marker = tmp_path / "ran"
    status, stderr = run_touching(imglock_cli, raw_image, marker, f"--lock-lost-signal={value}")
    assert status == EX_USAGE and len(stderr.splitlines()) == 1
    assert "--lock-lost-signal" in stderr
    assert not marker.exists()


@pytest.mark.parametrize("command", [[""], ["", "-m", "pc"]], ids=["empty", "empty with arguments"])
def test_an_empty_command_name_is_one_line_and_127_and_claims_nothing(
    raw_image: Path, imglock_cli: ImglockCli, command: list[str]
) -> None:
    for named in (["--image", str(raw_image)], []):
        proc = imglock_cli("run", *named, "--", *command)
        assert proc.returncode == EX_NOTFOUND, proc.stderr
        assert proc.stderr.splitlines() == [
            "imglock: '': No such file or directory (the command name is empty)"
        ]
    assert not (raw_image.parent / RECORD_DIR).exists()


def test_no_command_at_all_is_a_usage_error_in_one_line(imglock_cli: ImglockCli) -> None:
    proc = imglock_cli("run", "--")
    assert proc.returncode == EX_USAGE
    (line,) = proc.stderr.splitlines()
    assert line.startswith("imglock run: ") and "COMMAND" in line
