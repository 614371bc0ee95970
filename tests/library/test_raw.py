"""Raw images, probing, and opening files safely (imglock.safeio)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from qcow2_builder import QemuImg, assert_matches_qemu, open_fd_count

from imglock.errors import EX_IOERR, EX_NOINPUT, FormatError, ImageError
from imglock.formats import open_claimable, open_image, probe
from imglock.safeio import (
    MAX_READ,
    ReadError,
    image_size,
    open_image_fd,
    pread_exact,
    read_at,
)


def raw_info(path: str | Path, format: str | None = None) -> dict[str, Any]:
    image = open_image(path, format)
    try:
        return image.driver.info(image)
    finally:
        image.close()


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail, instead of hanging the suite, if the block takes longer than *seconds*."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- The raw driver against qemu-img ----------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize("size", [0, 512, 1000, 1 << 20, 3 << 30])
@pytest.mark.parametrize("written", [False, True], ids=["sparse", "written"])
def test_raw_matches_qemu_img(qemu_img: QemuImg, tmp_path: Path, size: int, written: bool) -> None:
    path = tmp_path / "disk.raw"
    with path.open("wb") as f:
        f.truncate(size)
        if written and size:
            f.write(b"\x5a" * min(size, 65536))
    ours = raw_info(path)
    proc = qemu_img("info", "-U", "--output=json", path)
    assert_matches_qemu(ours, json.loads(proc.stdout))
    # QEMU sizes disks in whole sectors, rounding a raw file up.
    assert ours["virtual-size"] == -(-size // 512) * 512


@pytest.mark.qemu
def test_qcow2_read_as_raw_when_told(qemu_img: QemuImg, tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "1G")
    ours = raw_info(path, "raw")
    assert ours["format"] == "raw"
    proc = qemu_img("info", "-U", "-f", "raw", "--output=json", path)
    assert_matches_qemu(ours, json.loads(proc.stdout))


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Callable[[Path], str]]:
    """Attach files to loop devices (root and a working losetup needed)."""
    attached: list[str] = []

    def attach(backing: Path) -> str:
        if os.geteuid() != 0:
            pytest.skip("loop devices need root")
        try:
            proc = subprocess.run(
                ["losetup", "--find", "--show", "--read-only", str(backing)],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except FileNotFoundError:
            pytest.skip("losetup is not installed")
        if proc.returncode != 0:
            pytest.skip(f"cannot attach a loop device here: {proc.stderr.strip()}")
        attached.append(proc.stdout.strip())
        return attached[-1]

    yield attach
    for device in attached:
        subprocess.run(["losetup", "--detach", device], capture_output=True, timeout=30)


@pytest.mark.qemu
def test_block_devices(qemu_img: QemuImg, tmp_path: Path, loop_device: Any) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * (3 << 20))
    device = loop_device(raw)
    fd, st = open_image_fd(device)
    try:
        assert stat.S_ISBLK(st.st_mode)
        assert image_size(fd, st, device) == 3 << 20
    finally:
        os.close(fd)
    proc = qemu_img("info", "-U", "--output=json", device)
    assert_matches_qemu(raw_info(device), json.loads(proc.stdout))
    # A qcow2 image on a block device is read through the device.
    qcow = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", qcow, "5G")
    device = loop_device(qcow)
    proc = qemu_img("info", "-U", "--output=json", device)
    assert_matches_qemu(raw_info(device), json.loads(proc.stdout))


# --- Probing ----------------------------------------------------------------


@pytest.mark.parametrize(
    "head", [b"", b"\0" * 2048, os.urandom(2048), b"QFI", b"QFI\xfb\0\0\0"], ids=str
)
def test_anything_else_probes_raw(tmp_path: Path, head: bytes) -> None:
    path = tmp_path / "x"
    path.write_bytes(head)
    assert probe(head, str(path)).name == "raw"
    assert raw_info(path)["format"] == "raw"


@pytest.mark.parametrize(
    ("head", "name"),
    [
        (b"QFI\xfb\0\0\0\x01" + bytes(100), "qcow"),
        (b"KDMV" + bytes(100), "vmdk"),
        (b"# Disk DescriptorFile\n", "vmdk"),
        (b"QED\0" + bytes(100), "qed"),
        (b"conectix" + bytes(100), "vpc"),
        (b"vhdxfile" + bytes(100), "vhdx"),
        (b"LUKS\xba\xbe" + bytes(100), "luks"),
        (bytes(0x40) + b"\x7f\x10\xda\xbe" + bytes(100), "vdi"),
    ],
)
def test_formats_qemu_knows_are_not_taken_for_raw(tmp_path: Path, head: bytes, name: str) -> None:
    path = tmp_path / "x.img"
    path.write_bytes(head)
    with pytest.raises(FormatError, match=f"is a {name} image; imglock reads only qcow2 and raw"):
        open_image(path)
    assert raw_info(path, "raw")["format"] == "raw"  # naming the format overrides


@pytest.mark.parametrize(
    ("head", "name"),
    [
        (b"conectix" + bytes(100), "vpc"),
        (b"vhdxfile" + bytes(100), "vhdx"),
        (b"LUKS\xba\xbe" + bytes(100), "luks"),
        (bytes(0x40) + b"\x7f\x10\xda\xbe" + bytes(100), "vdi"),
    ],
)
def test_formats_without_backing_files_are_claimed_as_plain_data(
    tmp_path: Path, head: bytes, name: str
) -> None:
    path = tmp_path / "x.img"
    path.write_bytes(head)
    for named in (None, name):
        image = open_claimable(path, named)
        try:
            assert (image.format, image.children()) == (name, [])
        finally:
            image.close()


@pytest.mark.parametrize("head", [b"KDMV" + bytes(100), b"QED\0" + bytes(100)])
def test_formats_that_may_have_backing_files_are_not_claimed_as_data(
    tmp_path: Path, head: bytes
) -> None:
    path = tmp_path / "x.img"
    path.write_bytes(head)
    with pytest.raises(FormatError, match="name the format raw"):
        open_claimable(path)


@pytest.mark.qemu
@pytest.mark.parametrize("fmt", ["vmdk", "vdi", "vpc", "vhdx", "qed", "qcow"])
def test_foreign_formats_made_by_qemu_img_are_refused(
    qemu_img: QemuImg, tmp_path: Path, fmt: str
) -> None:
    path = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-q", "-f", fmt, path, "64M")
    with pytest.raises(FormatError, match=f"is a {fmt} image"):
        open_image(path)


def test_unknown_format_name_is_a_usage_error(raw_image: Path) -> None:
    from imglock.errors import UsageError

    before = open_fd_count()
    with pytest.raises(UsageError, match="unknown image format 'vmdk'"):
        open_image(raw_image, "vmdk")
    assert open_fd_count() == before


# --- Opening safely ---------------------------------------------------------


def make_fifo(d: Path) -> Path:
    os.mkfifo(d / "fifo")
    return d / "fifo"


def make_socket(d: Path) -> Path:
    path = d / "sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))  # the socket file outlives the socket
    return path


def make_dir(d: Path) -> Path:
    (d / "dir").mkdir()
    return d / "dir"


def make_dangling_link(d: Path) -> Path:
    (d / "link").symlink_to(d / "absent")
    return d / "link"


def make_link_loop(d: Path) -> Path:
    (d / "loop").symlink_to(d / "loop")
    return d / "loop"


def make_file_as_directory(d: Path) -> Path:
    (d / "file").touch()
    return d / "file" / "x"


def device(path: str) -> Callable[[Path], str]:
    def make(d: Path) -> str:
        if not os.path.exists(path):
            pytest.skip(f"{path} does not exist here")
        return path

    return make


REFUSED: dict[str, tuple[Callable[[Path], Path | str], str]] = {
    "fifo": (make_fifo, "is a FIFO, not an image"),
    "socket": (make_socket, "is a socket, not an image"),
    "directory": (make_dir, "is a directory, not an image"),
    "dev-zero": (device("/dev/zero"), "is a character device, not an image"),
    "dev-null": (device("/dev/null"), "is a character device, not an image"),
    "dev-tty": (device("/dev/tty"), "is a character device, not an image"),
    "missing": (lambda d: d / "absent", "No such file or directory"),
    "dangling-link": (make_dangling_link, "No such file or directory"),
    "link-loop": (make_link_loop, "Too many levels of symbolic links"),
    "file-as-directory": (make_file_as_directory, "Not a directory"),
    "nul-byte": (lambda d: f"{d}/a\0b", "file name contains a NUL byte"),
}


@pytest.mark.parametrize(("make", "complaint"), REFUSED.values(), ids=REFUSED.keys())
def test_refused_fast(tmp_path: Path, make: Callable[[Path], Path | str], complaint: str) -> None:
    path = make(tmp_path)
    before = open_fd_count()
    with deadline(5), pytest.raises(ImageError) as info:
        open_image_fd(path)
    assert type(info.value) is ImageError
    # Control characters in a name are shown escaped, so the message stays one line.
    shown = str(path).replace("\0", "\\x00")
    assert str(info.value) == f"{shown}: {complaint}"
    assert info.value.exit_status == EX_NOINPUT
    assert open_fd_count() == before


def test_fifo_swapped_in_after_the_check_cannot_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FIFO appearing between stat and open is opened non-blocking, then refused."""
    regular_file = tmp_path / "regular"
    regular_file.write_bytes(b"x")
    regular = os.stat(regular_file)
    fifo = make_fifo(tmp_path)
    real_stat = os.stat
    # The check sees a regular file; the open meets the FIFO.
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: regular if p == str(fifo) else real_stat(p))
    before = open_fd_count()
    with deadline(5), pytest.raises(ImageError, match="is a FIFO, not an image"):
        open_image_fd(fifo)
    assert open_fd_count() == before


def test_permission_denied(tmp_path: Path) -> None:
    path = tmp_path / "secret.raw"
    path.write_bytes(bytes(512))
    path.chmod(0)
    if os.geteuid() != 0:
        with pytest.raises(ImageError) as info:
            open_image_fd(path)
        assert str(info.value) == f"{path}: Permission denied"
        return
    # root reads anything: ask in a child that has given up root.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            try:
                open_image_fd(path)
                result = "opened"
            except ImageError as exc:
                result = str(exc)
            os.write(write_end, result.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        result = pipe.read().decode()
    os.waitpid(pid, 0)
    # The pytest directory itself is private, so the refusal comes from stat.
    assert result == f"{path}: Permission denied"


def test_symlinks_are_followed_for_reading(raw_image: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.raw"
    link.symlink_to(raw_image)
    fd, st = open_image_fd(link)
    try:
        assert st.st_ino == os.stat(raw_image).st_ino
        assert os.get_blocking(fd)  # O_NONBLOCK was only for the open
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    finally:
        os.close(fd)


# --- Reading ----------------------------------------------------------------


@pytest.fixture
def numbered(tmp_path: Path) -> Iterator[tuple[int, str]]:
    path = tmp_path / "numbers"
    path.write_bytes(bytes(range(256)) * 4)  # 1024 bytes
    fd = os.open(path, os.O_RDONLY)
    yield fd, str(path)
    os.close(fd)


def test_read_at_reads_what_is_asked(numbered: tuple[int, str]) -> None:
    fd, name = numbered
    assert read_at(fd, 10, 5, name) == bytes(range(10, 15))
    assert read_at(fd, 1020, 100, name) == bytes(range(252, 256))  # short only at EOF
    assert read_at(fd, 5000, 10, name) == b""
    assert read_at(fd, 0, 0, name) == b""
    assert pread_exact(fd, 256, 3, name) == b"\0\1\2"


def test_pread_exact_names_the_shortfall(numbered: tuple[int, str]) -> None:
    fd, name = numbered
    with pytest.raises(FormatError) as info:
        pread_exact(fd, 1000, 100, name)
    assert str(info.value) == (
        f"{name}: file ends at offset 1024, but 100 bytes are needed at offset 1000"
    )


def test_read_at_loops_over_short_reads(
    numbered: tuple[int, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, name = numbered
    real = os.pread
    asked: list[tuple[int, int]] = []

    def dribble(fd: int, length: int, offset: int) -> bytes:
        asked.append((length, offset))
        return real(fd, min(length, 7), offset)

    monkeypatch.setattr(os, "pread", dribble)
    assert read_at(fd, 100, 30, name) == bytes(range(100, 130))
    assert all(offset + length <= 130 for length, offset in asked)  # never past the request


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (0, -1), (0, MAX_READ + 1)])
def test_read_at_rejects_bad_requests(numbered: tuple[int, str], offset: int, length: int) -> None:
    fd, name = numbered
    with pytest.raises(ValueError):
        read_at(fd, offset, length, name)


def test_io_error_is_a_read_error(
    numbered: tuple[int, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, name = numbered

    def broken(*args: object) -> bytes:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "pread", broken)
    with pytest.raises(ReadError) as info:
        read_at(fd, 0, 512, name)
    assert str(info.value) == f"{name}: read of 512 bytes at offset 0 failed: Input/output error"
    assert info.value.exit_status == EX_IOERR
