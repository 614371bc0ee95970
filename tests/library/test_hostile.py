"""Hostile images: each command answers in one line, with its documented status, leaving nothing.

Each case (tests/support/hostile_cases.py) builds its files from nothing: truncated
headers, header fields at their extremes, hostile backing file names, loops,
chains thousands deep, backing files and images that are FIFOs, sockets,
directories, devices, dangling links or unreadable.  For each, the real
commands run as subprocesses with a timeout (``info``, ``status``, ``run
--image IMAGE -- true``, and ``info --backing-chain`` where the chain is at
fault) and must:

* exit with the status imglock(1) documents for the fault (65 malformed
  image or chain, 66 cannot open; 0 for an image that is odd but usable),
* print exactly one line on standard error, naming the file at fault and
  saying what is wrong (no traceback, no line split by a hostile name),
* leave no lock and no holder record on any file the case made.

The library calls behind them (``inspect``, ``claim``, ``open_chain``) raise
the matching ImglockError and leave no descriptor open.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ENV
from hostile_cases import (
    ALL,
    DEFAULT,
    PROBE_BYTES,
    V3_FIELDS_BYTES,
    Built,
    Hostile,
    no_descriptor_leaked,
)
from qcow2_builder import QemuImg, build, open_fd_count

import imglock
from imglock.chain import open_chain
from imglock.errors import EX_DATAERR, EX_OK, ImglockError
from imglock.formats import open_image
from imglock.lock.records import RECORD_DIR

#: Seconds any command may take on any hostile image (it takes well under
#: one; the margin is for a loaded machine): none may hang.
TIMEOUT = 10.0

#: The tests run as root, and root reads any file whatever its mode.  For the
#: permission cases the commands run as root without that power (no
#: CAP_DAC_OVERRIDE or CAP_DAC_READ_SEARCH, inherited or regained on exec),
#: so the mode bits count as they do for any user.  (A switch to nobody
#: cannot even start the interpreter here: it lives under /root, mode 0700.)
WITHOUT_READ_OVERRIDE = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
]


@dataclass(frozen=True)
class Answer:
    """How one command answered: exit status, stderr lines, stdout."""

    command: str
    status: int
    errors: list[str]
    stdout: str

    def __str__(self) -> str:
        return f"`imglock {self.command}` exited {self.status}, stderr {self.errors!r}"


def _prefix(case: Hostile) -> list[str]:
    if case.unprivileged and os.geteuid() == 0:
        assert shutil.which("setpriv"), "setpriv (util-linux) is needed to test as root"
        return WITHOUT_READ_OVERRIDE
    return []


def _limits(case: Hostile) -> Callable[[], None] | None:
    limit = case.max_files
    if limit is None:
        return None
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def start(case: Hostile, args: Sequence[str | bytes | os.PathLike[str]]) -> subprocess.Popen[bytes]:
    """Start ``python -m imglock ARGS`` as the case asks (privileges, limits)."""
    return subprocess.Popen(
        [*_prefix(case), sys.executable, "-m", "imglock", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_limits(case),
        env=ENV,  # this tree's imglock, wherever the installed one points
    )


def finish(command: str, proc: subprocess.Popen[bytes]) -> Answer:
    """Wait (at most TIMEOUT seconds) for *proc*; a command still running has hung."""
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"`imglock {command}` still running after {TIMEOUT} s: it hangs")
    return Answer(command, proc.returncode, _text(err).splitlines(), _text(out))


def _text(raw: bytes) -> str:
    # Names that are not UTF-8 come out as the bytes they are.
    return raw.decode("utf-8", "surrogateescape")


def run_commands(case: Hostile, image: Path) -> list[tuple[Answer, int]]:
    """Every command on *image*, each with the exit status it must give."""
    target = os.fsencode(image)
    commands: dict[str, tuple[list[str | bytes], int]] = {
        "info": (["info", target], case.top_status),
        "info --backing-chain": (["info", "--backing-chain", target], case.status),
        "status": (["status", target], case.top_status),
        "run --image IMAGE -- true": (["run", "--image", target, "--", "true"], case.status),
    }
    if case.top is None:
        del commands["info --backing-chain"]  # the top image is at fault: info says it
    for name in case.not_for:
        del commands[name]
    # All side by side, except that a run which claims goes alone, after the
    # others: status would see its lock.
    run = "run --image IMAGE -- true"
    readers = {name: command for name, command in commands.items() if name != run}
    rounds = [readers, {run: commands[run]}] if case.status == EX_OK else [commands]
    answers = []
    for batch in rounds:
        started = {name: start(case, args) for name, (args, _) in batch.items()}
        answers += [(finish(name, proc), commands[name][1]) for name, proc in started.items()]
    return answers


def answer_faults(case: Hostile, built: Built, answer: Answer, expected: int) -> list[str]:
    """What is wrong with *answer*: its status, or its error not one line that names
    the files and says the case's words."""
    if answer.status != expected:
        return [f"{answer}: status {answer.status}, not {expected}"]
    if expected == EX_OK:
        return [f"{answer}: errors from a success"] if answer.errors else []
    if len(answer.errors) != 1:
        return [f"{answer}: not exactly one line"]
    (line,) = answer.errors
    return [
        f"{answer}: {fault}"
        for fault, wrong in [
            ("not from imglock", not line.startswith("imglock: ")),
            (f"does not name {built.names!r}", built.names not in line),
            (f"does not say {case.words!r}", case.words not in line),
        ]
        if wrong
    ]


def regular_files(directory: Path) -> Iterator[Path]:
    """Every regular file a case made (not through symlinks), records aside."""
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [name for name in dirnames if name != RECORD_DIR]
        for name in filenames:
            path = Path(dirpath, name)
            if stat.S_ISREG(path.lstat().st_mode):
                yield path


def left_behind(directory: Path) -> list[str]:
    """What a case's commands left: files of the case still locked, holder records."""
    locked = [path for path in regular_files(directory) if imglock.holders(path)]
    return [f"{path} is still locked" for path in locked] + [
        f"holder records left in {records}"
        for records in directory.rglob(RECORD_DIR)
        if any(records.iterdir())
    ]


@pytest.fixture
def case_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty directory for one case; made removable again afterwards."""
    directory = tmp_path / "case"
    directory.mkdir()
    yield directory
    for path in directory.rglob("*"):
        if not path.is_symlink():
            path.chmod(0o700)


def _ids(cases: Sequence[Hostile]) -> list[str]:
    return [case.id for case in cases]


@pytest.mark.parametrize("case", ALL, ids=_ids(ALL))
def test_every_command_answers_in_one_line_with_the_documented_status(
    case: Hostile, case_dir: Path
) -> None:
    built = case.build(case_dir)
    for answer, expected in run_commands(case, built.image):
        assert answer_faults(case, built, answer, expected) == []
    assert left_behind(case_dir) == []


@contextlib.contextmanager
def open_files_limited(case: Hostile) -> Iterator[None]:
    """Leave this process only a few more descriptors, as a case's limit does for a command."""
    if case.max_files is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_fd_count() + case.max_files // 2, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def error_of(call: Callable[[], object]) -> ImglockError | None:
    """The ImglockError *call* raised, or None if it returned; any other exception escapes."""
    try:
        call()
    except ImglockError as exc:
        return exc
    return None


def error_faults(case: Hostile, built: Built, status: int, error: ImglockError | None) -> list[str]:
    """What is wrong with how a call ended (*error*, or None): it must succeed when *status*
    is 0, else raise an ImglockError of that status, one line that names the files and
    says the case's words."""
    if status == EX_OK:
        return [] if error is None else [f"raised {error!r}"]
    if error is None:
        return [f"succeeded, not status {status}"]
    message = str(error)
    return [
        f"{message!r}: {fault}"
        for fault, wrong in [
            (f"status {error.exit_status}, not {status}", error.exit_status != status),
            (f"does not name {built.names!r}", built.names not in message),
            (f"does not say {case.words!r}", case.words not in message),
            ("not one line", "\n" in message),
        ]
        if wrong
    ]


def _claim_and_release(image: Path) -> None:
    imglock.claim(image).release()


def _open_chain_and_close(image: Path) -> None:
    open_chain(image).close()


# Root reads any file: the permission cases are for unprivileged commands only.
LIBRARY_CASES = [case for case in ALL if not case.unprivileged]


@pytest.mark.parametrize("case", LIBRARY_CASES, ids=_ids(LIBRARY_CASES))
def test_the_library_raises_the_documented_error_and_leaks_no_descriptor(
    case: Hostile, case_dir: Path
) -> None:
    built = case.build(case_dir)
    inspected = EX_OK if case.unreadable_format else case.top_status
    with open_files_limited(case), no_descriptor_leaked():
        faults = {
            "inspect": error_faults(
                case, built, inspected, error_of(lambda: imglock.inspect(built.image))
            ),
            "open_chain": error_faults(
                case, built, case.status, error_of(lambda: _open_chain_and_close(built.image))
            ),
            "claim": error_faults(
                case, built, case.status, error_of(lambda: _claim_and_release(built.image))
            ),
        }
    assert {call: found for call, found in faults.items() if found} == {}
    assert left_behind(case_dir) == []


# --- Truncated headers: every length ------------------------------------------

#: The whole fixed header of a version 3 image, compression type included.
HEADER_STRUCT_BYTES = 112


def truncations(image: bytes) -> Iterator[tuple[int, bytes]]:
    for length in range(HEADER_STRUCT_BYTES + 1):
        yield length, image[:length]


def usable_when_truncated_to(length: int) -> bool:
    """Too short to be told from raw data, or long enough to hold every v3 field."""
    return length < PROBE_BYTES or length >= V3_FIELDS_BYTES


def _open_and_close(path: Path) -> str:
    opened = open_image(path)
    opened.close()
    return opened.format


def wrong_truncations(image: bytes, path: Path) -> list[str]:
    """The lengths *image* cut short to is answered wrongly at: where a header cannot be
    read, anything but a data error naming the file; elsewhere, not raw data below the
    probe's bytes and qcow2 from there."""
    wrong = []
    for length, head in truncations(image):
        path.write_bytes(head)
        if not usable_when_truncated_to(length):
            error = error_of(lambda: _open_and_close(path))
            if not (
                error is not None
                and error.exit_status == EX_DATAERR
                and str(error).startswith(f"{path}: ")
            ):
                wrong.append(f"{length} bytes: {error!r}, not a data error naming the file")
            continue
        opened_as = _open_and_close(path)
        expected = "raw" if length < PROBE_BYTES else "qcow2"
        if opened_as != expected:
            wrong.append(f"{length} bytes: opened as {opened_as}, not {expected}")
    return wrong


def test_every_truncation_of_a_hand_built_header_is_raw_data_an_error_or_a_header(
    tmp_path: Path,
) -> None:
    with no_descriptor_leaked():
        assert wrong_truncations(build(DEFAULT), tmp_path / "truncated.qcow2") == []


@pytest.mark.qemu
def test_every_truncation_of_a_qemu_img_header_is_answered_as_qemu_answers_it(
    qemu_img: QemuImg, tmp_path: Path
) -> None:
    made = tmp_path / "made.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", made, "1M")
    image = made.read_bytes()
    assert wrong_truncations(image, tmp_path / "truncated.qcow2") == []
    path = tmp_path / "truncated.qcow2"
    for length, head in truncations(image):
        path.write_bytes(head)
        qemu = qemu_img("info", "-U", "--output=json", path, check=False)
        assert (qemu.returncode == 0) == usable_when_truncated_to(length), (length, qemu.stderr)


# --- Wrapping QEMU -------------------------------------------------------------

QEMU_CASES = [case for case in ALL if case.qemu]


@pytest.mark.qemu
@pytest.mark.parametrize("case", QEMU_CASES, ids=_ids(QEMU_CASES))
def test_wrapping_qemu_on_a_hostile_image_fails_before_qemu_starts(
    case: Hostile, case_dir: Path, qemu_system_path: str
) -> None:
    assert case.status != EX_OK, "a usable image would start the (paused) VM"
    built = case.build(case_dir)
    assert "," not in str(built.image)  # QEMU would need it doubled
    qemu = [qemu_system_path, "-nodefaults", "-display", "none", "-S"]
    proc = start(case, ["run", "--", *qemu, "-drive", f"file={built.image},if=none"])
    answer = finish("run -- qemu-system-x86_64 ...", proc)
    assert answer_faults(case, built, answer, case.status) == []
    assert left_behind(case_dir) == []
