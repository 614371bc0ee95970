"""Faults at the syscall boundary: what a claim does when fcntl or a record write fails.

Faults a test cannot cause for real (EIO from an NFS lock manager, ENOLCK,
a full disk under the holder records) come through the fault seam
(imglock.faults), the only thing not real here: in this process with
:func:`injected`, through the CLI with ``IMGLOCK_FAULTS``.  Lock calls are
numbered from 1; in a fresh ``imglock`` process call 1 is the probe for OFD
locks.  A raw image claimed exclusive with QEMU's bytes takes
:data:`CLAIM_CALLS` calls: its own byte, four runs of QEMU bytes, then five tests.

What must hold, as imglock(7) says: EINTR is retried; EAGAIN/EACCES mean
a conflict; any other error is a LockError (exit 74) in one line naming
the file, after which nothing stays locked (seen from another process)
and no descriptor stays open; a record that cannot be written means a
claim without a record, never a lost lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ENV, QemuImg, SpawnRival, imglock_holders
from hostile_cases import no_descriptor_leaked

import imglock
from imglock import faults
from imglock.api import Claim, ClaimSpec
from imglock.errors import EX_IOERR, EX_OK, EX_TEMPFAIL, LockConflict, LockError
from imglock.lock import fcntl_locks
from imglock.lock.records import RECORD_DIR

#: Lock calls of an exclusive claim of one raw image with both layers:
#: An exclusive claim's lock calls: 1 its own byte, 2-5 QEMU's bytes (100-101,
#: 103, 201, 203: adjacent bytes go in one call), 6 the test of the imglock
#: layer, 7-10 QEMU's tests (101, 103, 200-201, 203).
CLAIM_CALLS = 10
#: Where in a claim a lock call fails: (id, number of the failing call).
CLAIM_STEPS = [("own-byte", 1), ("qemu-byte", 3), ("rival-test", 6), ("last-test", CLAIM_CALLS)]
#: Errors that are neither a conflict nor an interruption.
HARD_ERRNOS = ["ENOLCK", "EIO", "EBADF"]
#: What imglock adds to the system's words for some of them.
HINTS = {"ENOLCK": "lock manager", "EBADF": "descriptor"}


@contextlib.contextmanager
def injected(spec: str) -> Iterator[None]:
    """In this process, faults as ``IMGLOCK_FAULTS=SPEC`` installs them, for the block only.

    Lock calls are counted from the first one made inside the block.
    """
    with tempfile.TemporaryFile() as scratch:  # the probe for OFD locks is not counted
        fcntl_locks.conflicting(scratch.fileno(), 0, 1, "scratch")
    faults.install(spec)
    try:
        yield
    finally:
        faults.reset()


def cli(*args: str | os.PathLike[str], spec: str) -> subprocess.CompletedProcess[str]:
    """``python -m imglock ARGS`` with ``IMGLOCK_FAULTS=SPEC``."""
    return subprocess.run(
        [sys.executable, "-m", "imglock", *(os.fspath(arg) for arg in args)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**ENV, "IMGLOCK_FAULTS": spec},
    )


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of *proc* (and never a traceback)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def assert_free_for_others(image: Path, rival: SpawnRival) -> None:
    """No lock is left on *image*: another process sees none and claims it."""
    assert imglock.holders(image) == []
    other = rival(image)
    assert other.ok, other.reply
    other.stop()


def assert_no_record_left(image: Path) -> None:
    records_dir = image.parent / RECORD_DIR
    assert not records_dir.exists() or list(records_dir.iterdir()) == []


# --- EINTR: retried ---------------------------------------------------------------


def test_interrupted_lock_calls_are_retried_and_the_claim_succeeds(raw_image: Path) -> None:
    with injected("fcntl=EINTR,count=3"), imglock.claim(raw_image):
        (holder,) = imglock_holders(raw_image)
        assert holder.pid == os.getpid()


def test_run_retries_interrupted_lock_calls(raw_image: Path) -> None:
    proc = cli("run", "--image", raw_image, "--", "true", spec="fcntl=EINTR,first=2,count=3")
    assert proc.returncode == EX_OK, proc.stderr


# --- EAGAIN / EACCES: a conflict ----------------------------------------------------


@pytest.mark.parametrize("code", ["EAGAIN", "EACCES"])
def test_a_refused_lock_is_a_conflict_and_holds_nothing(
    raw_image: Path, rival: SpawnRival, code: str
) -> None:
    claim = Claim([ClaimSpec(str(raw_image))])
    with (
        no_descriptor_leaked(),
        injected(f"fcntl={code},count=1"),
        pytest.raises(LockConflict) as info,
    ):
        claim.acquire()
    assert info.value.exit_status == EX_TEMPFAIL
    assert str(info.value).startswith(f"{raw_image}: cannot claim exclusive")
    assert not claim.held and claim.members == []
    assert_free_for_others(raw_image, rival)


@pytest.mark.parametrize("code", ["EAGAIN", "EACCES"])
def test_a_claim_that_waits_gets_past_refused_locks(raw_image: Path, code: str) -> None:
    # Two attempts refused at their first call (1, then 3 after the test of call 2).
    refused_twice = f"fcntl={code},count=1;fcntl={code},first=3,count=1"
    with injected(refused_twice), imglock.claim(raw_image, wait=5):
        assert imglock.holders(raw_image) != []


@pytest.mark.parametrize("code", ["EAGAIN", "EACCES"])
def test_run_exits_with_the_conflict_status_when_a_lock_is_refused(
    raw_image: Path, tmp_path: Path, code: str
) -> None:
    ran = tmp_path / "ran"
    proc = cli(
        "run", "--image", raw_image, "--", "touch", ran, spec=f"fcntl={code},first=2,count=1"
    )
    assert proc.returncode == EX_TEMPFAIL
    assert str(raw_image) in one_line(proc)
    assert not ran.exists()
    assert imglock.holders(raw_image) == []


# --- ENOLCK, EIO, EBADF: a LockError, and nothing held -------------------------------


def assert_lock_error(exc: LockError, image: Path, code: str) -> None:
    text = str(exc)
    assert type(exc) is LockError and exc.exit_status == EX_IOERR
    assert exc.errno == getattr(errno, code)
    assert text.startswith(f"{image}: cannot lock: {os.strerror(getattr(errno, code))}"), text
    assert HINTS.get(code, "") in text and "\n" not in text


@pytest.mark.parametrize(("step", "call"), CLAIM_STEPS, ids=[s for s, _ in CLAIM_STEPS])
@pytest.mark.parametrize("code", HARD_ERRNOS)
def test_a_failing_lock_call_raises_lock_error_and_leaves_nothing_held(
    raw_image: Path, rival: SpawnRival, code: str, step: str, call: int
) -> None:
    claim = Claim([ClaimSpec(str(raw_image))])
    with (
        no_descriptor_leaked(),
        injected(f"fcntl={code},first={call},count=1"),
        pytest.raises(LockError) as info,
    ):
        claim.acquire()
    assert_lock_error(info.value, raw_image, code)
    assert not claim.held and claim.members == []
    assert_free_for_others(raw_image, rival)


@pytest.mark.parametrize("code", HARD_ERRNOS)
def test_when_every_lock_call_fails_even_the_rollback_leaves_nothing_held(
    raw_image: Path, rival: SpawnRival, code: str
) -> None:
    # The unlocks of the rollback fail too: closing the descriptor drops the locks.
    with (
        no_descriptor_leaked(),
        injected(f"fcntl={code},first=2"),
        pytest.raises(LockError) as info,
    ):
        imglock.claim(raw_image)
    assert_lock_error(info.value, raw_image, code)
    assert_free_for_others(raw_image, rival)


@pytest.mark.parametrize("code", HARD_ERRNOS)
def test_a_release_closes_rather_than_unlocks_so_a_failing_lock_manager_cannot_stop_it(
    raw_image: Path, rival: SpawnRival, code: str
) -> None:
    # imglock(7), LIFETIME: a claim ends by closing its descriptors, which
    # drops the locks without a single lock call that could fail.
    with no_descriptor_leaked():
        claim = imglock.claim(raw_image)
        with injected(f"fcntl={code}"):
            claim.release()
    assert not claim.held and claim.members == []
    assert_free_for_others(raw_image, rival)
    assert_no_record_left(raw_image)


#: (id, IMGLOCK_FAULTS calls of a fresh process): the probe, the own byte, a QEMU byte.
CLI_STEPS = [("probe", 1), ("own-byte", 2), ("qemu-byte", 4), ("rival-test", 8)]


@pytest.mark.parametrize(("step", "call"), CLI_STEPS, ids=[s for s, _ in CLI_STEPS])
@pytest.mark.parametrize("code", HARD_ERRNOS)
def test_run_says_which_file_failed_to_lock_exits_74_and_runs_nothing(
    raw_image: Path, tmp_path: Path, rival: SpawnRival, code: str, step: str, call: int
) -> None:
    ran = tmp_path / "ran"
    proc = cli("run", "--image", raw_image, "--", "touch", ran, spec=f"fcntl={code},first={call}")
    assert proc.returncode == EX_IOERR
    line = one_line(proc)
    assert line.startswith(
        f"imglock: {raw_image}: cannot lock: {os.strerror(getattr(errno, code))}"
    )
    assert not ran.exists()
    assert_free_for_others(raw_image, rival)
    assert_no_record_left(raw_image)


@pytest.mark.qemu
@pytest.mark.parametrize("code", HARD_ERRNOS)
def test_a_migration_destination_whose_locks_fail_says_so_before_qemu_starts(
    qemu_img: QemuImg, qemu_system_path: str, tmp_path: Path, rival: SpawnRival, code: str
) -> None:
    # It prepares its claim (one lock test, among other things) before it
    # starts QEMU, so that the switch-over is lock calls only: a filesystem
    # that refuses locks is found out then, not when the guest arrives.
    image, incoming = tmp_path / "disk.qcow2", tmp_path / "incoming.sock"
    qemu_img("create", "-q", "-f", "qcow2", image, "16M")
    proc = cli(
        "run", "--", qemu_system_path, "-M", "none", "-display", "none", "-nodefaults",
        "-drive", f"file={image},if=none", "-incoming", f"unix:{incoming}",
        spec=f"fcntl={code}",
    )  # fmt: skip
    assert proc.returncode == EX_IOERR
    assert one_line(proc).startswith(f"imglock: {image}: cannot lock: ")
    assert not incoming.exists()  # QEMU never ran
    assert_free_for_others(image, rival)


#: The first lock call after the claim in a fresh ``imglock run``: after the probe and the claim.
RUN_RELEASE_CALL = 1 + CLAIM_CALLS + 1


def test_run_ends_its_claim_without_a_lock_call_so_the_commands_status_stands(
    raw_image: Path, rival: SpawnRival
) -> None:
    # Every lock call after the claim fails; ending the claim closes the
    # descriptors, which needs none, so nothing fails and nothing is said.
    spec = f"fcntl=EIO,first={RUN_RELEASE_CALL}"
    proc = cli("run", "--image", raw_image, "--", "sh", "-c", "exit 3", spec=spec)
    assert proc.returncode == 3
    assert proc.stderr == ""
    assert_free_for_others(raw_image, rival)
    assert_no_record_left(raw_image)


@pytest.mark.parametrize("code", HARD_ERRNOS)
def test_status_reports_a_failing_lock_test_in_one_line(raw_image: Path, code: str) -> None:
    proc = cli("status", raw_image, spec=f"fcntl={code}")
    assert proc.returncode == EX_IOERR
    assert str(raw_image) in one_line(proc)


def test_info_makes_no_lock_call_so_lock_faults_do_not_touch_it(raw_image: Path) -> None:
    proc = cli("info", raw_image, spec="fcntl=EIO")
    assert proc.returncode == EX_OK and proc.stderr == ""


# --- ENOSPC, EROFS under the holder records: a claim without a record ----------------


@pytest.mark.parametrize("code", ["ENOSPC", "EROFS"])
def test_a_record_that_cannot_be_written_leaves_a_claim_without_a_record(
    raw_image: Path, rival: SpawnRival, code: str
) -> None:
    with injected(f"record={code}"):
        claim = imglock.claim(raw_image)
    try:
        assert claim.held
        (holder,) = imglock_holders(raw_image)
        assert holder.pid == os.getpid()
        assert_no_record_left(raw_image)  # not even the temporary file
        assert not rival(raw_image).ok  # the lock is there all the same
    finally:
        claim.release()
    assert_free_for_others(raw_image, rival)


@pytest.mark.parametrize("code", ["ENOSPC", "EROFS"])
def test_run_without_a_record_still_holds_the_image(raw_image: Path, code: str) -> None:
    look = f"{sys.executable} -m imglock status --json {raw_image}"
    proc = cli("run", "--image", raw_image, "--", "sh", "-c", look, spec=f"record={code}")
    assert proc.returncode == 1, proc.stderr  # status inside: held
    (report,) = json.loads(proc.stdout)
    (holder,) = [h for h in report["holders"] if h["layer"] == "imglock"]
    assert holder["mode"] == "exclusive"
    assert holder["command"].startswith("sh -c")  # from /proc, as no record says it
    assert imglock.holders(raw_image) == []
    assert_no_record_left(raw_image)
