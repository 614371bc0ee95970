"""``imglock info`` as users and scripts run it: a real subprocess each time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import wait_until
from qcow2_builder import Qcow2Spec, QemuImg, assert_matches_qemu, build, qemu_differences

from imglock import holders
from imglock.errors import EX_DATAERR, EX_NOINPUT, EX_USAGE

REPO = Path(__file__).resolve().parents[2]
# Subprocesses started from another directory still find the package.
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
}


def info_json(imglock_cli: Any, *args: str | Path, **kwargs: Any) -> Any:
    proc = imglock_cli("info", "--json", *args, env=ENV, **kwargs)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return json.loads(proc.stdout)


def qemu_img_in(qemu_img_path: str, cwd: Path, *args: str) -> str:
    """qemu-img's output when run from *cwd*, as the imglock command is."""
    return subprocess.run(
        [qemu_img_path, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=True
    ).stdout


def assert_one_line_error(proc: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    assert proc.returncode == status, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr == f"imglock: {text}\n"


@pytest.fixture
def chain_dir(qemu_img: QemuImg, tmp_path: Path) -> Path:
    """base.raw <- mid.qcow2 (in another directory) <- top.qcow2, with a snapshot."""
    (tmp_path / "images").mkdir()
    (tmp_path / "base").mkdir()
    qemu_img("create", "-q", "-f", "raw", tmp_path / "base" / "base.raw", "64M")
    qemu_img(
        "create", "-q", "-f", "qcow2", "-b", "../base/base.raw", "-F", "raw",
        tmp_path / "images" / "mid.qcow2",
    )  # fmt: skip
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "mid.qcow2", "-F", "qcow2",
        tmp_path / "images" / "top.qcow2",
    )  # fmt: skip
    qemu_img("snapshot", "-c", "first", tmp_path / "images" / "top.qcow2")
    return tmp_path


@pytest.mark.qemu
@pytest.mark.parametrize("name", ["images/top.qcow2", "images/mid.qcow2", "base/base.raw"])
def test_json_matches_qemu_img(
    imglock_cli: Any, qemu_img_path: str, chain_dir: Path, name: str
) -> None:
    ours = info_json(imglock_cli, name, cwd=chain_dir)
    theirs = json.loads(qemu_img_in(qemu_img_path, chain_dir, "info", "-U", "--output=json", name))
    assert qemu_differences(ours, theirs) == []


@pytest.mark.qemu
def test_backing_chain_json_matches_qemu_img(
    imglock_cli: Any, qemu_img_path: str, chain_dir: Path
) -> None:
    args = ("--backing-chain", "images/top.qcow2")
    ours = info_json(imglock_cli, *args, cwd=chain_dir)
    theirs = json.loads(qemu_img_in(qemu_img_path, chain_dir, "info", "-U", "--output=json", *args))
    assert [item["filename"] for item in ours] == [
        "images/top.qcow2",
        "images/mid.qcow2",
        "images/../base/base.raw",
    ]
    assert len(ours) == len(theirs)
    for mine, qemu in zip(ours, theirs, strict=True):
        assert_matches_qemu(mine, qemu)


@pytest.mark.qemu
def test_text_reads_like_qemu_img(imglock_cli: Any, qemu_img_path: str, chain_dir: Path) -> None:
    proc = imglock_cli("info", "images/mid.qcow2", cwd=chain_dir, env=ENV)
    assert proc.returncode == 0, proc.stderr
    ours = proc.stdout.splitlines()
    theirs = qemu_img_in(qemu_img_path, chain_dir, "info", "-U", "images/mid.qcow2").splitlines()
    # Every line imglock prints outside the format-specific block, qemu-img prints too.
    head = ours[: ours.index("Format specific information:")]
    assert head == [line for line in theirs if line in head]
    assert head[:4] == theirs[:4]
    assert "backing file: ../base/base.raw (actual path: images/../base/base.raw)" in head
    specific = ours[len(head) :]
    assert specific == theirs[theirs.index("Format specific information:") :]


@pytest.mark.qemu
def test_text_backing_chain_and_snapshot_count(imglock_cli: Any, chain_dir: Path) -> None:
    proc = imglock_cli("info", "--backing-chain", "images/top.qcow2", cwd=chain_dir, env=ENV)
    assert proc.returncode == 0, proc.stderr
    blocks = proc.stdout.rstrip("\n").split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == [
        "image: images/top.qcow2",
        "image: images/mid.qcow2",
        "image: images/../base/base.raw",
    ]
    assert "snapshot count: 1" in blocks[0].splitlines()
    assert "    compat: 0.10" in blocks[0].splitlines()


@pytest.mark.qemu
def test_format_option_turns_probing_off(imglock_cli: Any, chain_dir: Path) -> None:
    top = chain_dir / "images/top.qcow2"
    ours = info_json(imglock_cli, "--format", "raw", top)
    assert ours["format"] == "raw"
    assert "backing-filename" not in ours
    chain = info_json(imglock_cli, "--format", "raw", "--backing-chain", top)
    assert [item["format"] for item in chain] == ["raw"]


@pytest.fixture
def running_writer(qemu_img: QemuImg, qemu_img_path: str, tmp_path: Path) -> Iterator[Path]:
    """An image held for writing by a QEMU process (qemu-io), with QEMU's locks."""
    image = tmp_path / "busy.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "64M")
    qemu_io = Path(qemu_img_path).with_name("qemu-io")
    if not qemu_io.exists():
        pytest.skip("qemu-io is not installed")
    proc = subprocess.Popen(
        [str(qemu_io), "-f", "qcow2", str(image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # qemu-io holds the image from its first prompt until it quits; on a
        # loaded machine it may take a while to get there.  Its locks are
        # looked at without taking any: a `qemu-img info` here would lock the
        # image itself and could make qemu-io fail to start.

        def writing() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"qemu-io exited ({proc.returncode}) without taking its locks")
            return any(h.layer == "qemu" and "write" in h.perms for h in holders(image))

        wait_until(writing, what="qemu-io to take its locks", timeout=30, interval=0.05)
        yield image
    finally:
        proc.communicate(b"quit\n", timeout=30)


@pytest.mark.qemu
def test_works_while_qemu_writes_the_image(
    imglock_cli: Any, qemu_img: QemuImg, running_writer: Path
) -> None:
    # qemu-img without -U refuses: QEMU holds the write lock ...
    refused = qemu_img("info", running_writer, check=False)
    assert refused.returncode != 0
    assert "lock" in refused.stderr
    # ... imglock takes none and reads the header all the same.
    ours = info_json(imglock_cli, running_writer)
    theirs = json.loads(qemu_img("info", "-U", "--output=json", running_writer).stdout)
    assert_matches_qemu(ours, theirs)


# --- Errors -----------------------------------------------------------------


def _fifo(directory: Path) -> Path:
    fifo = directory / "fifo"
    os.mkfifo(fifo)
    return fifo


@pytest.mark.parametrize(
    ("make", "complaint"),
    [
        (_fifo, "is a FIFO, not an image"),
        (lambda d: d, "is a directory, not an image"),
        (lambda d: Path("/dev/zero"), "is a character device, not an image"),
        (lambda d: Path("/dev/null"), "is a character device, not an image"),
        (lambda d: d / "absent.qcow2", "No such file or directory"),
    ],
    ids=["fifo", "directory", "dev-zero", "dev-null", "missing"],
)
def test_unopenable_paths_fail_fast(
    imglock_cli: Any, tmp_path: Path, make: Any, complaint: str
) -> None:
    path = make(tmp_path)
    started = time.monotonic()
    proc = imglock_cli("info", path, timeout=10, env=ENV)
    assert time.monotonic() - started < 10
    assert_one_line_error(proc, EX_NOINPUT, f"{path}: {complaint}")


def test_socket_is_refused(imglock_cli: Any, tmp_path: Path) -> None:
    import socket

    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        sock.listen(1)
        proc = imglock_cli("info", "--json", path, timeout=10, env=ENV)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        EX_NOINPUT,
        "",
        f"imglock: {path}: is a socket, not an image\n",
    )


def test_chain_errors_exit_65(imglock_cli: Any, tmp_path: Path) -> None:
    top = tmp_path / "top.qcow2"
    top.write_bytes(build(Qcow2Spec(backing_name=b"top.qcow2")))
    proc = imglock_cli("info", "--backing-chain", top, timeout=10, env=ENV)
    assert_one_line_error(
        proc, EX_DATAERR, f"{top}: backing file 'top.qcow2' creates a loop: it is '{top}' again"
    )
    # Without --backing-chain the backing file is only named, not opened.
    assert info_json(imglock_cli, top)["backing-filename"] == "top.qcow2"


def test_missing_backing_file_exit_65(imglock_cli: Any, tmp_path: Path) -> None:
    top = tmp_path / "top.qcow2"
    top.write_bytes(build(Qcow2Spec(backing_name=b"gone.qcow2")))
    proc = imglock_cli("info", "--backing-chain", top, timeout=10, env=ENV)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        EX_DATAERR,
        "",
        f"imglock: {top}: cannot open backing file '{tmp_path}/gone.qcow2': "
        "No such file or directory\n",
    )


@pytest.mark.parametrize(
    "args", [[], ["--format", "vmdk", "x"], ["--bogus", "x"], ["a", "b"]], ids=str
)
def test_usage_errors_exit_2(imglock_cli: Any, args: list[str]) -> None:
    proc = imglock_cli("info", *args, timeout=10, env=ENV)
    assert proc.returncode == EX_USAGE
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr


def test_names_that_are_not_utf8(imglock_cli: Any, tmp_path: Path) -> None:
    name = os.fsdecode(tmp_path) + os.fsdecode(b"/disk\xff.raw")
    with open(name, "wb") as f:
        f.truncate(4096)
    text = subprocess.run(
        [sys.executable, "-m", "imglock", "info", name],
        capture_output=True,
        timeout=30,
        env=ENV,
    )
    assert text.returncode == 0, text.stderr
    # The text shows the stray byte as an escape (a terminal never gets it);
    # JSON gives the name back exactly.
    assert text.stdout.splitlines()[0] == b"image: " + os.fsencode(tmp_path) + b"/disk\\xff.raw"
    assert info_json(imglock_cli, name)["filename"] == name
    missing = imglock_cli("info", name + "x", timeout=10, env=ENV)
    assert missing.returncode == EX_NOINPUT
    assert "Traceback" not in missing.stderr


def test_plain_info_imports_no_json(raw_image: Path) -> None:
    probe = (
        "import sys\n"
        "from imglock.cli import main\n"
        "try:\n"
        f"    main(['info', {str(raw_image)!r}])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('json' in sys.modules, file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, env=ENV
    )
    assert proc.stderr.strip() == "False"
    assert proc.stdout.startswith(f"image: {raw_image}\n")
