"""The crash matrix: kill -9 at every step of a claim, a release and ``imglock run``'s start.

imglock(7) CRASHES: "A holder killed at any point leaves either a lock held
by a live process or no lock".  For every named step (``faults.point``
calls in the library) a real process runs into it with
``IMGLOCK_FAULTS=crash=POINT`` (it SIGKILLs itself there) or
``stop=POINT`` (it freezes there: the image must then be held by that live
process or free, and the test kills it with SIGKILL).  Afterwards:

* every lock still on the image belongs to a live process: the command of
  a ``run`` killed after it started, never an orphan;
* a ``run`` killed before its command started leaves no process behind:
  the child waiting at the gate sees the gate close and exits;
* once those are gone, the next claim of the image succeeds.

The image is a qcow2 with a raw backing file, so a claim has two members
and a crash can fall between them.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
from conftest import CLAIMER, ENV
from hostile_cases import SMALL, qcow2
from processes import TIMEOUT, alive, state, wait_until

import imglock

LIBRARY = Path(imglock.__file__).parent


@dataclass(frozen=True)
class Step:
    """A named step, the process that goes through it, and what outlives a crash there."""

    point: str
    #: "claim": tests/support/claimer.py claims and holds with the library; "run": ``imglock run``.
    via: Literal["claim", "run"]
    #: What still holds the image once the crashed process is gone.
    survivor: Literal["nothing", "command"] = "nothing"

    @property
    def id(self) -> str:
        return f"{self.via}-{self.point}"


#: The steps of a claim, in order (protocol.acquire runs once per file of the chain).
CLAIM_POINTS = [
    "acquire:own-byte",  # the imglock byte taken, QEMU's bytes not yet
    "acquire:qemu-byte",  # some of QEMU's bytes taken
    "acquire:untested",  # every byte taken, not yet tested for rivals
    "claim:member",  # one file of the chain claimed, the next not yet
    "claim:taken",  # every file claimed, no holder record yet
    "claim:recorded",  # holder records written
]

STEPS = [
    *(Step(point, "claim") for point in CLAIM_POINTS),
    Step("release:unlocked", "claim"),  # one file let go, its record not yet removed
    Step("run:forked", "run"),  # the child waits at the gate, nothing claimed
    *(Step(point, "run") for point in CLAIM_POINTS),
    Step("run:claimed", "run"),  # claimed for the child, the gate still closed
    Step("run:started", "run", survivor="command"),  # the command runs, holding the lock
    Step("release:unlocked", "run"),  # the command exited, the wrapper lets go
]

#: Steps of a migration handoff: reaching them takes a live migration
#: between two real QEMUs, so their crash cases live beside the other
#: migration tests, in tests/qemu/test_run_migration.py.
HANDOFF_POINTS_WITHOUT_CASES = {"handoff:claimed", "handoff:released"}

MATRIX = STEPS

#: The steps of handing a claim to the processes a command left behind (a
#: daemon, a background job), in order: in the wrapper, then in the watcher.
HANDOVER_POINTS = [
    "run:survivors",  # the command exited, survivors found, the lock still names it
    "relabel:both",  # the survivor's byte taken, the command's not yet dropped
    "run:handed-over",  # the watcher forked, the wrapper not yet gone
    "watch:started",  # the watcher runs, the wrapper gone
]


# --- Processes ----------------------------------------------------------------------


@dataclass
class Marked:
    """Processes started by one test, found by a variable in their environment.

    Children inherit it, also after their parent died and they were handed
    to init, so nothing a crash leaves running escapes the test.
    """

    token: str

    @property
    def env(self) -> dict[str, str]:
        return {**ENV, "IMGLOCK_CRASH_TEST": self.token}

    def pids(self) -> set[int]:
        needle = f"IMGLOCK_CRASH_TEST={self.token}\0".encode()
        found = set()
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if needle in f.read() and alive(int(name)):
                        found.add(int(name))
            except OSError:
                continue  # gone meanwhile
        return found

    def kill_all(self) -> None:
        for pid in self.pids():
            kill_quietly(pid)


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


@pytest.fixture
def marked() -> Iterator[Marked]:
    processes = Marked(secrets.token_hex(8))
    yield processes
    processes.kill_all()


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, Path]:
    """A qcow2 image and its raw backing file."""
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(4096))
    top = qcow2(tmp_path / "top.qcow2", SMALL, backing_name=b"base.raw")
    return top, base


def start(step: Step, mode: str, top: Path, marked: Marked) -> subprocess.Popen[bytes]:
    """Start the process that goes through *step*, with the fault for *mode* installed."""
    env = {**marked.env, "IMGLOCK_FAULTS": f"{mode}={step.point}"}
    if step.via == "claim":
        argv = [sys.executable, CLAIMER, str(top)]
    else:
        command = ["true"] if step.point.startswith("release:") else ["sleep", "30"]
        argv = [sys.executable, "-m", "imglock", "run", "--image", str(top), "--", *command]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    )
    if step.via == "claim" and step.point.startswith("release:"):
        assert proc.stdin is not None and proc.stdout is not None
        assert b'"ok": true' in proc.stdout.readline()  # it holds the image
        proc.stdin.close()  # now it releases
    return proc


# --- What must hold ----------------------------------------------------------------


def holders_without_a_live_process(files: tuple[Path, ...]) -> list[str]:
    """The locks on *files* that no live local process holds, described."""
    orphaned = []
    for path in files:
        for holder in imglock.holders(path):
            if not any(alive(pid) for pid in holder.local_pids):
                orphaned.append(f"{path}: {holder}")
    return orphaned


def assert_held_by_live_processes_or_free(files: tuple[Path, ...]) -> set[int]:
    """Every lock on *files* belongs to a live local process; return those processes.

    A process that exits between the look at the locks and the look at it
    takes its locks along: such a lock must be gone when looked at again.
    """
    wait_until(
        lambda: not holders_without_a_live_process(files),
        what="every lock belongs to a live process",
    )
    return {pid for path in files for h in imglock.holders(path) for pid in h.local_pids}


def assert_free(files: tuple[Path, ...]) -> None:
    for path in files:
        assert imglock.holders(path) == [], f"{path} is still held"


def crash_at(step: Step, mode: str, top: Path, files: tuple[Path, ...], marked: Marked) -> None:
    """Run into *step* and die there by SIGKILL (from itself, or from the test once frozen)."""
    proc = start(step, mode, top, marked)
    if mode == "stop":
        wait_until(lambda: state(proc.pid) in ("T", None), what=f"{step.id} stops at {step.point}")
        assert proc.poll() is None, f"exited ({proc.returncode}) without reaching {step.point}"
        # A run has forked its child (which waits at the gate or runs the
        # command) at every step but its release, by when the command is gone.
        forked = step.via == "run" and not step.point.startswith("release:")
        assert len(marked.pids()) == (2 if forked else 1)
        assert_held_by_live_processes_or_free(files)  # frozen half-way
        proc.kill()
    try:
        status = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{step.id} never reached {step.point}")
    assert status == -signal.SIGKILL, f"{step.id} exited {status} instead of dying at the step"


@pytest.mark.parametrize("mode", ["crash", "stop"])
@pytest.mark.parametrize("step", MATRIX, ids=[step.id for step in MATRIX])
def test_a_holder_killed_at_any_step_leaves_the_image_held_by_a_live_process_or_free(
    step: Step, mode: str, image: tuple[Path, Path], marked: Marked
) -> None:
    top, _base = files = image
    crash_at(step, mode, top, files, marked)

    holding = assert_held_by_live_processes_or_free(files)
    if step.survivor == "command":
        # The command inherited the locks and runs on: it holds the image.
        survivors = marked.pids()
        assert holding and holding <= survivors, (holding, survivors)
        assert imglock.holders(top) != []
        for pid in survivors:
            kill_quietly(pid)
    # Nothing else is left running: a child at the gate exits once it closes.
    wait_until(lambda: not marked.pids(), what=f"no process of {step.id} is left")

    assert_free(files)
    with imglock.claim(top):  # the next claim works
        pass
    assert_free(files)


def points_in_the_library() -> set[str]:
    """Every step name the library passes to faults.point()."""
    calls = re.compile(r"faults\.point\(([^)]*)\)")
    names: set[str] = set()
    for path in LIBRARY.rglob("*.py"):
        for call in calls.findall(path.read_text()):
            names.update(re.findall(r'"([\w-]+:[\w-]+)"', call))
    return names


def test_every_step_of_the_library_is_in_the_crash_matrix() -> None:
    named = points_in_the_library()
    missing = (
        named
        - {step.point for step in MATRIX}
        - set(HANDOVER_POINTS)
        - HANDOFF_POINTS_WITHOUT_CASES
    )
    assert not missing, f"add these steps to STEPS: {sorted(missing)}"
    gone = HANDOFF_POINTS_WITHOUT_CASES - named
    assert not gone, f"no longer in the library: {sorted(gone)}"


# --- A command that leaves processes behind: the wrapper or the watcher killed -------

#: Commands that exit leaving a process that uses the image: a shell's
#: background job, and a QEMU that daemonizes.
LEAVERS = {
    "background": lambda top: [
        "--image", str(top), "--", "sh", "-c", "sleep 30 >/dev/null 2>&1 &",
    ],
    "qemu-daemonize": lambda top: [
        "--", "qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none",
        "-daemonize", "-drive", f"file={top},format=qcow2,if=none",
    ],
}  # fmt: skip


def assert_status_names_only_live_holders(files: tuple[Path, ...]) -> None:
    """``status`` never names a holder that does not hold the image."""
    for path in files:
        for holder in imglock.holders(path):
            if holder.layer == "imglock":
                assert holder.pid in holder.local_pids and alive(holder.pid), holder


@pytest.mark.parametrize("mode", ["crash", "stop"])
@pytest.mark.parametrize("leaver", sorted(LEAVERS))
@pytest.mark.parametrize("point", HANDOVER_POINTS)
def test_a_wrapper_or_watcher_killed_while_a_daemon_runs_leaves_the_image_held_by_it(
    point: str, leaver: str, mode: str, image: tuple[Path, Path], marked: Marked,
    qemu_system_path: str,
) -> None:  # fmt: skip
    top, _base = files = image
    env = {**marked.env, "IMGLOCK_FAULTS": f"{mode}={point}"}
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "imglock", "run", *LEAVERS[leaver](top)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    in_wrapper = not point.startswith("watch:")
    if mode == "stop":
        wait_until(
            lambda: any(state(pid) == "T" for pid in marked.pids()),
            what=f"a process stops at {point}",
        )
        (frozen,) = [pid for pid in marked.pids() if state(pid) == "T"]
        assert (frozen == wrapper.pid) == in_wrapper
        assert_held_by_live_processes_or_free(files)
        assert_status_names_only_live_holders(files)
        kill_quietly(frozen)
    else:
        wait_until(
            lambda: (
                wrapper.poll() is not None
                and (
                    in_wrapper
                    or not [p for p in marked.pids() if argv(p)[1:3] == ["-m", "imglock"]]
                )
            ),
            what=f"the process at {point} kills itself",
        )
    status = wrapper.wait(timeout=TIMEOUT)
    assert status == (-signal.SIGKILL if in_wrapper else 0)

    # The daemon (or the background job) still uses the image, and holds it.
    holding = assert_held_by_live_processes_or_free(files)
    assert_status_names_only_live_holders(files)
    survivors = marked.pids()
    assert holding and holding <= survivors, (holding, survivors)
    with pytest.raises(imglock.LockConflict):
        imglock.claim(top, qemu_locks=False)
    # A daemon's private QMP directory, left behind when no watcher outlived the crash.
    private = {
        os.path.dirname(arg.split("path=", 1)[1].split(",", 1)[0])
        for pid in survivors
        for arg in argv(pid)
        if "path=" in arg and "qmp.sock" in arg
    }
    for pid in survivors:
        kill_quietly(pid)
    wait_until(lambda: not marked.pids(), what=f"no process of {point} is left")
    # A process being torn down hides its environment before it closes its files.
    wait_until(lambda: not any(imglock.holders(p) for p in files), what="the image is free")
    with imglock.claim(top):
        pass
    for directory in private:
        shutil.rmtree(directory, ignore_errors=True)


def argv(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []
