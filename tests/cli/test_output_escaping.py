"""No control character, and no byte that is not UTF-8, reaches a terminal.

Names that imglock prints come from others: file names in a datastore,
backing file names and formats in image headers, command lines in holder
records.  Every text output (``info``, ``info --backing-chain``, ``status``,
``doctor``, ``run --dry-run``) and every error line shows C0 and C1 controls
and undecodable bytes as ``\\xNN``: what is written is valid UTF-8 with no
control character but the newlines that end its own lines.  JSON output
stays JSON, and gives the names back exactly.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ENV, ImglockCli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qcow2_builder import EXT_BACKING_FORMAT, EXT_DATA_FILE, write

from imglock.cli import cli
from imglock.lock import records
from imglock.lock.fcntl_locks import F_OFD_SETLK
from imglock.lock.identity import Owner
from imglock.lock.protocol import Mode, holder_range
from imglock.lock.records import Record
from imglock.text import visible

#: An OSC that retitles the window, a screen clear, and a newline that forges a line.
HOSTILE_NAME = "/gone\x1b]0;owned\x07\x1b[2J\nimage: forged"
#: A byte that is not UTF-8 and is an 8-bit CSI to a terminal taking C1 codes.
CSI_8BIT = b"\x9b"


def controls_in(raw: bytes) -> list[str]:
    """The control characters in *raw*, taken as UTF-8, other than line ends.

    Decoding is strict: a byte that is not UTF-8 (0x9b...) would reach the
    terminal as it is, and fails the test here.
    """
    text = raw.decode("utf-8")
    return [c for c in text if c != "\n" and (ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0)]


def run_real(*args: str | bytes | os.PathLike[str]) -> subprocess.CompletedProcess[bytes]:
    """The real ``imglock`` in a process of its own, output as bytes."""
    return subprocess.run(
        [sys.executable, "-m", "imglock", *args], capture_output=True, timeout=30, env=ENV
    )


def test_info_shows_a_hostile_backing_file_name_escaped_on_one_line(tmp_path: Path) -> None:
    image = write(tmp_path / "top.qcow2", backing_name=HOSTILE_NAME.encode())
    for args in (["info"], ["info", "--backing-chain"]):
        proc = run_real(*args, image)
        for stream in (proc.stdout, proc.stderr):
            assert controls_in(stream) == [], (args, stream)
        text = (proc.stdout + proc.stderr).decode()
        assert "image: forged" not in text.splitlines(), args
        assert "\\x1b]0;owned\\x07\\x1b[2J\\x0aimage: forged" in text or "\\x1b[2J" in text, args
    # JSON gives the name back exactly.
    proc = run_real("info", "--json", image)
    assert json.loads(proc.stdout)["backing-filename"] == HOSTILE_NAME


def test_status_shows_a_file_name_that_is_not_utf8_as_escapes(
    tmp_path: Path, imglock_cli: ImglockCli
) -> None:
    image = os.fsencode(tmp_path) + b"/disk-" + CSI_8BIT + b"2J.raw"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    proc = run_real("status", image)
    assert proc.returncode == 0, proc.stderr
    assert controls_in(proc.stdout) == []
    assert "disk-\\x9b2J.raw" in proc.stdout.decode()
    missing = run_real("status", image + b".gone")
    assert missing.returncode == 66
    assert controls_in(missing.stderr) == [] and "disk-\\x9b2J.raw.gone" in missing.stderr.decode()


def test_status_json_escapes_c1_controls_and_stays_json(tmp_path: Path) -> None:
    name = f"{tmp_path}/disk-\x9b-\x85.raw"
    with open(name, "wb") as f:
        f.truncate(1 << 20)
    proc = run_real("status", "--json", name)
    assert controls_in(proc.stdout) == []
    (report,) = json.loads(proc.stdout)
    assert report["filename"] == name


# -- the property: random bytes in names and header strings -----------------

#: A file name's bytes: anything but "/" and NUL (and not "." or "..").
NAME = st.binary(min_size=1, max_size=24).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
)
#: A header string's bytes: anything but NUL, which ends it for QEMU too.
HEADER_STRING = st.binary(min_size=1, max_size=48).filter(lambda b: b"\0" not in b)
#: A string in a holder record: any text, or any bytes as a name holds them.
RECORD_TEXT = st.text(max_size=24) | st.binary(max_size=24).map(os.fsdecode)
#: A holder on another host, as its lock offset names it.
ELSEWHERE = Owner(host_tag=0x2A, pid=4242)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """One directory for every example (hypothesis gives no per-example tmp_path)."""
    with tempfile.TemporaryDirectory(prefix="imglock-escaping-") as path:
        yield Path(path)


def invoke(*args: str) -> tuple[bytes, bytes]:
    """The real CLI, in this process: (stdout, stderr) as the bytes written."""
    result = CliRunner().invoke(cli, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.stdout_bytes, result.stderr_bytes


@contextlib.contextmanager
def held_elsewhere(path: str, host: str, command: str) -> Iterator[None]:
    """*path* held by another host's holder: its lock byte, and its record beside *path*."""
    record = Record(
        image=path, owner=ELSEWHERE.id, mode=Mode.EXCLUSIVE.value, host=host,
        pid=ELSEWHERE.pid, user=host, command=command, since=command,
    )  # fmt: skip
    assert records.write(os.path.dirname(path), os.path.basename(path), record) is None
    start, length = holder_range(Mode.EXCLUSIVE, ELSEWHERE)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, start, length, 0))
        yield
    finally:
        os.close(fd)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    file_name=NAME,
    backing=HEADER_STRING,
    backing_format=HEADER_STRING,
    data_file=HEADER_STRING,
    host=RECORD_TEXT,
    command=RECORD_TEXT,
)
def test_no_control_character_reaches_any_text_output(
    scratch: Path,
    file_name: bytes,
    backing: bytes,
    backing_format: bytes,
    data_file: bytes,
    host: str,
    command: str,
) -> None:
    with tempfile.TemporaryDirectory(dir=scratch) as where:
        directory = os.fsencode(where) + b"/" + file_name
        os.mkdir(directory)
        image = os.fsdecode(directory + b"/" + file_name)
        write(
            Path(image),
            backing_name=backing,
            extensions=[(EXT_BACKING_FORMAT, backing_format), (EXT_DATA_FILE, data_file)],
            incompatible_features=0b100,  # an external data file
        )
        plain = os.fsdecode(directory + b"/plain-" + file_name)
        with open(plain, "wb") as f:
            f.truncate(1 << 16)
        outputs = {
            "info": invoke("info", image),
            "info --backing-chain": invoke("info", "--backing-chain", image),
            "error line": invoke("info", image + "-missing"),
            "run error line": invoke("run", "--image", image + "-missing", "--", "true"),
            "doctor": invoke("doctor", os.fsdecode(directory)),
            "run --dry-run": invoke("run", "--dry-run", "--image", image, "--", "true"),
            "run --dry-run (plain)": invoke("run", "--dry-run", "--image", plain, "--", "true"),
        }
        # A holder on another host, named by its lock and its record (which
        # status shows for a holder not on this host).
        with held_elsewhere(plain, host, command):
            outputs["status"] = invoke("status", image, plain)
            # The directory's walk finds the names itself.
            outputs["status DIR"] = invoke("status", os.fsdecode(directory))
        # The record was read: the host it names is in the table, escaped.
        for table in ("status", "status DIR"):
            assert visible(host or "-") in outputs[table][0].decode(), table
        assert outputs["run error line"][1], "run said nothing of the missing image"
        for what, (out, err) in outputs.items():
            assert controls_in(out) == [], (what, out)
            assert controls_in(err) == [], (what, err)
