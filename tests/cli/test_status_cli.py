"""``imglock status`` as operators and scripts run it: files, directories, table, JSON.

The directory rule: in a walk, a file counts as an image when it is qcow2
by its magic, when its name ends in an image suffix, or when someone locks
it; symlinks are not followed, ``.imglock`` is not entered, and FIFOs and
sockets are never opened.  Exit status: 1 when any image is held, else the
first error's status, else 0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ImglockCli, SpawnRival
from processes import wait_until
from qcow2_builder import Qcow2Spec, build

from imglock.cli.status import COMMAND_WIDTH
from imglock.errors import EX_DATAERR, EX_HELD, EX_NOINPUT, EX_OK, ImageError
from imglock.lock.identity import hostname
from imglock.qemu.guest import guest_name
from imglock.scan import find_images

HEADER = ["IMAGE", "FORMAT", "BACKING", "HOLDER", "MODE", "PERMS", "UNSHARED"]
HEADER += ["PID", "VM", "HOST", "SINCE", "FLAGS", "COMMAND"]


def qcow2(path: Path, **fields: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(build(Qcow2Spec(**fields)))
    return path


def raw(path: Path, size: int = 1 << 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
    return path


def status(imglock_cli: ImglockCli, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return imglock_cli("status", *args, timeout=20)


def status_json(imglock_cli: ImglockCli, *args: str | Path) -> tuple[int, list[dict[str, Any]]]:
    proc = status(imglock_cli, "--json", *args)
    return proc.returncode, json.loads(proc.stdout)


def listed(imglock_cli: ImglockCli, *args: str | Path) -> list[str]:
    return [report["filename"] for report in status_json(imglock_cli, *args)[1]]


def rows(table: str) -> list[dict[str, str]]:
    """The table's rows as dictionaries (no cell here holds two spaces in a row)."""
    header, *lines = table.splitlines()
    assert header.split() == HEADER
    return [dict(zip(HEADER, re.split(r" {2,}", line), strict=True)) for line in lines]


@pytest.fixture
def datastore(tmp_path: Path) -> Path:
    """A tree with images of every kind the rule recognises, and things it must skip."""
    root = tmp_path / "datastore"
    qcow2(root / "vm1.qcow2")
    qcow2(root / "instances" / "abc" / "disk")  # qcow2 without a suffix: by its magic
    raw(root / "instances" / "abc" / "disk.config.img")
    raw(root / "isos" / "INSTALL.ISO")
    raw(root / "instances" / "abc" / "console.log", 4096)
    (root / "libvirt.xml").write_text("<domain/>")
    raw(root / ".imglock" / "vm1.qcow2.00000000000001.raw")  # a record directory
    return root


# --------------------------------------------------------------------------
# What a directory walk lists


def test_a_directory_is_walked_recursively_in_name_order_listing_only_images(
    imglock_cli: ImglockCli, datastore: Path
) -> None:
    assert listed(imglock_cli, datastore) == [
        str(datastore / "instances" / "abc" / "disk"),
        str(datastore / "instances" / "abc" / "disk.config.img"),
        str(datastore / "isos" / "INSTALL.ISO"),
        str(datastore / "vm1.qcow2"),
    ]


def test_a_file_with_neither_magic_nor_suffix_is_listed_while_someone_locks_it(
    imglock_cli: ImglockCli, tmp_path: Path, rival: SpawnRival
) -> None:
    disk = raw(tmp_path / "vms" / "disk")
    assert listed(imglock_cli, tmp_path / "vms") == []
    holder = rival(disk)
    code, (report,) = status_json(imglock_cli, tmp_path / "vms")
    assert (code, report["filename"], report["format"]) == (EX_HELD, str(disk), "raw")
    assert [h["pid"] for h in report["holders"]] == [holder.reply["pid"]]


def test_symlinks_are_not_followed_in_a_walk_so_a_loop_ends_and_nothing_is_listed_twice(
    imglock_cli: ImglockCli, tmp_path: Path
) -> None:
    image = qcow2(tmp_path / "store" / "vm.qcow2")
    (tmp_path / "store" / "loop").symlink_to("..")
    (tmp_path / "store" / "alias.qcow2").symlink_to("vm.qcow2")
    (tmp_path / "store" / "dangling.raw").symlink_to("nowhere.raw")
    assert listed(imglock_cli, tmp_path / "store") == [str(image)]


def test_a_symlink_named_on_the_command_line_is_followed(
    imglock_cli: ImglockCli, tmp_path: Path
) -> None:
    qcow2(tmp_path / "vm.qcow2")
    (tmp_path / "current").symlink_to("vm.qcow2")
    (tmp_path / "tree").symlink_to(tmp_path, target_is_directory=True)
    assert listed(imglock_cli, tmp_path / "current") == [str(tmp_path / "current")]
    assert listed(imglock_cli, tmp_path / "tree") == [str(tmp_path / "tree" / "vm.qcow2")]


def test_a_format_imglock_cannot_read_is_listed_by_its_name_not_skipped(
    imglock_cli: ImglockCli, tmp_path: Path
) -> None:
    (tmp_path / "legacy").write_bytes(b"KDMV" + bytes(508))  # a vmdk, whatever its name
    image = raw(tmp_path / "disk.raw")
    proc = status(imglock_cli, tmp_path)
    assert proc.returncode == EX_OK, proc.stderr
    listed = [(r["IMAGE"], r["FORMAT"]) for r in rows(proc.stdout)]
    assert listed == [(str(image), "raw"), (str(tmp_path / "legacy"), "vmdk")]


def test_a_fifo_or_socket_in_a_directory_is_skipped_without_being_opened(
    imglock_cli: ImglockCli, tmp_path: Path
) -> None:
    image = raw(tmp_path / "disk.raw")
    # Opened for reading, the FIFO would block until a writer came: never.
    os.mkfifo(tmp_path / "pipe.raw")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / "monitor.img"))
        proc = status(imglock_cli, "-v", tmp_path)
    assert proc.returncode == EX_OK, proc.stderr
    assert [r["IMAGE"] for r in rows(proc.stdout)] == [str(image)]
    assert f"{tmp_path / 'pipe.raw'}: skipped: a FIFO, not opened" in proc.stderr
    assert f"{tmp_path / 'monitor.img'}: skipped: a socket, not opened" in proc.stderr


def test_a_fifo_named_on_the_command_line_is_refused_without_hanging(
    imglock_cli: ImglockCli, tmp_path: Path
) -> None:
    os.mkfifo(tmp_path / "pipe")
    proc = status(imglock_cli, tmp_path / "pipe")
    assert proc.returncode == EX_NOINPUT
    assert proc.stderr == f"imglock: {tmp_path / 'pipe'}: is a FIFO, not an image\n"


def test_a_file_found_twice_is_listed_once(imglock_cli: ImglockCli, tmp_path: Path) -> None:
    image = qcow2(tmp_path / "vm.qcow2")
    os.link(image, tmp_path / "hardlink.qcow2")
    assert listed(imglock_cli, tmp_path, image, tmp_path) == [str(tmp_path / "hardlink.qcow2")]


def test_the_walk_tells_why_it_skipped_each_file(datastore: Path) -> None:
    skipped: dict[str, str] = {}
    for found in find_images([str(datastore)], skipped.__setitem__):
        assert found.image is not None
        found.image.close()
    assert skipped == {
        str(datastore / "instances" / "abc" / "console.log"): (
            "not an image (no known format, image suffix or lock)"
        ),
        str(datastore / "libvirt.xml"): "not an image (no known format, image suffix or lock)",
    }


def test_a_directory_that_cannot_be_read_is_an_error_and_the_walk_goes_on(
    tmp_path: Path,
) -> None:
    first, last = qcow2(tmp_path / "a" / "vm.qcow2"), qcow2(tmp_path / "c" / "vm.qcow2")
    (tmp_path / "b").mkdir()
    walk = find_images([str(tmp_path)])
    found = next(walk)
    assert found.filename == str(first) and found.image is not None
    found.image.close()
    (tmp_path / "b").rmdir()  # listed, and gone before the walk reads it
    unreadable, found = list(walk)
    assert isinstance(unreadable.error, ImageError)
    assert str(unreadable.error).endswith("/b: cannot read directory: No such file or directory")
    assert found.filename == str(last) and found.image is not None
    found.image.close()


# --------------------------------------------------------------------------
# What the table and the JSON say


@pytest.fixture
def held(tmp_path: Path, rival: SpawnRival) -> Iterator[tuple[Path, int]]:
    """A qcow2 with a backing file name, claimed exclusive by a real process."""
    image = qcow2(tmp_path / "vm.qcow2", backing_name=b"base.raw")
    raw(tmp_path / "base.raw")
    holder = rival(image)
    assert holder.ok, holder.reply
    yield image, int(str(holder.reply["pid"]))
    holder.stop()


def test_the_table_names_the_holder_its_host_pid_command_and_qemu_permissions(
    imglock_cli: ImglockCli, held: tuple[Path, int]
) -> None:
    image, pid = held
    proc = status(imglock_cli, image)
    assert proc.returncode == EX_HELD
    (row,) = rows(proc.stdout)
    assert row["IMAGE"] == str(image)
    assert (row["FORMAT"], row["BACKING"]) == ("qcow2", "base.raw")
    assert (row["HOLDER"], row["MODE"]) == ("imglock", "exclusive")
    assert (row["PERMS"], row["UNSHARED"]) == ("consistent read,write,resize", "write,resize")
    assert (row["PID"], row["HOST"]) == (str(pid), hostname())
    assert row["SINCE"].endswith("Z") and row["FLAGS"] == "-"
    # The holder's command line, cut to the table's width: its start, and "..." if longer
    # (how much of it fits depends on where the checkout lives).
    command = " ".join(Path(f"/proc/{pid}/cmdline").read_text().rstrip("\0").split("\0"))
    cut = command if len(command) <= COMMAND_WIDTH else command[: COMMAND_WIDTH - 3] + "..."
    assert row["COMMAND"] == cut
    assert row["VM"] == "-"  # not a QEMU: no guest to name


def test_json_gives_the_same_holder_with_the_design_key_names(
    imglock_cli: ImglockCli, held: tuple[Path, int]
) -> None:
    image, pid = held
    code, (report,) = status_json(imglock_cli, image)
    assert code == EX_HELD
    assert (report["filename"], report["format"]) == (str(image), "qcow2")
    assert report["backing-filename"] == "base.raw"
    (holder,) = report["holders"]
    assert holder["layer"] == "imglock" and holder["mode"] == "exclusive"
    assert holder["perms"] == ["consistent read", "write", "resize"]
    assert holder["unshared"] == ["write", "resize"]
    assert (holder["pid"], holder["host"]) == (pid, hostname())
    assert "claimer.py" in holder["command"] and holder["since"].endswith("Z")


def test_a_free_image_shows_as_held_by_none(imglock_cli: ImglockCli, tmp_path: Path) -> None:
    image = raw(tmp_path / "disk.raw")
    proc = status(imglock_cli, image)
    assert proc.returncode == EX_OK
    (row,) = rows(proc.stdout)
    assert (row["IMAGE"], row["FORMAT"], row["HOLDER"]) == (str(image), "raw", "none")
    assert status_json(imglock_cli, image)[1][0]["holders"] == []


@pytest.mark.parametrize(
    ("fields", "flag"),
    [
        ({"incompatible_features": 1}, "not-closed-cleanly"),  # dirty, and no one holds it
        ({"incompatible_features": 2}, "corrupt"),
    ],
)
def test_flags_show_what_the_header_says(
    imglock_cli: ImglockCli, tmp_path: Path, fields: dict[str, int], flag: str
) -> None:
    image = qcow2(tmp_path / "vm.qcow2", **fields)
    (row,) = rows(status(imglock_cli, image).stdout)
    assert row["FLAGS"] == flag


def test_a_record_whose_lock_is_gone_is_flagged_stale(
    imglock_cli: ImglockCli, tmp_path: Path, rival: SpawnRival
) -> None:
    image = raw(tmp_path / "disk.raw")
    holder = rival(image, "--fork-child")  # the child holds the lock the record names
    os.kill(int(str(holder.reply["pid"])), signal.SIGKILL)  # the record outlives the lock
    _wait_free(imglock_cli, image)
    (row,) = rows(status(imglock_cli, image).stdout)
    assert (row["HOLDER"], row["FLAGS"]) == ("none", "stale-records=1")
    (report,) = status_json(imglock_cli, image)[1]
    assert len(report["stale-records"]) == 1


def _wait_free(imglock_cli: ImglockCli, image: Path) -> None:
    wait_until(lambda: status(imglock_cli, image).returncode == EX_OK, what=f"{image} to be free")


def test_names_with_control_characters_cannot_break_the_table(
    imglock_cli: ImglockCli, tmp_path: Path
) -> None:
    raw(tmp_path / "new\nline.raw")
    raw(tmp_path / "\x1b[2Jclear.raw")
    proc = status(imglock_cli, tmp_path)
    assert "\x1b" not in proc.stdout
    assert len(proc.stdout.splitlines()) == 3
    assert {r["IMAGE"] for r in rows(proc.stdout)} == {
        f"{tmp_path}/new\\x0aline.raw",
        f"{tmp_path}/\\x1b[2Jclear.raw",
    }


# --------------------------------------------------------------------------
# Exit statuses and errors


def test_exit_status_is_0_when_nothing_is_held_and_1_when_anything_is(
    imglock_cli: ImglockCli, tmp_path: Path, rival: SpawnRival
) -> None:
    free, taken = raw(tmp_path / "free.raw"), raw(tmp_path / "taken.raw")
    assert status(imglock_cli, free, taken).returncode == EX_OK
    rival(taken)
    assert status(imglock_cli, free, taken).returncode == EX_HELD
    assert status(imglock_cli, tmp_path).returncode == EX_HELD


def test_each_bad_image_is_one_line_on_stderr_and_the_others_are_still_shown(
    imglock_cli: ImglockCli, tmp_path: Path
) -> None:
    good = raw(tmp_path / "good.raw")
    bad = qcow2(tmp_path / "bad.qcow2", cluster_bits=40)
    missing = tmp_path / "missing.raw"
    proc = status(imglock_cli, missing, good, bad)
    lines = proc.stderr.splitlines()
    assert len(lines) == 2
    assert lines[0] == f"imglock: {missing}: No such file or directory"
    assert lines[1].startswith(f"imglock: {bad}: ")
    assert [r["IMAGE"] for r in rows(proc.stdout)] == [str(good)]
    assert proc.returncode == EX_NOINPUT  # the first error's status
    assert status(imglock_cli, bad, good).returncode == EX_DATAERR


def test_a_held_image_outweighs_an_error_in_the_exit_status(
    imglock_cli: ImglockCli, tmp_path: Path, rival: SpawnRival
) -> None:
    taken = raw(tmp_path / "taken.raw")
    rival(taken)
    proc = status(imglock_cli, tmp_path / "missing.raw", taken)
    assert proc.returncode == EX_HELD
    assert proc.stderr == f"imglock: {tmp_path / 'missing.raw'}: No such file or directory\n"


def test_a_directory_without_images_warns_unless_quiet(
    imglock_cli: ImglockCli, tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")
    proc = status(imglock_cli, tmp_path)
    assert (proc.returncode, proc.stdout) == (EX_OK, "")
    assert proc.stderr == f"imglock: warning: no images found in {tmp_path}\n"
    assert status(imglock_cli, "-q", tmp_path).stderr == ""
    assert status_json(imglock_cli, "-q", tmp_path) == (EX_OK, [])


@pytest.mark.parametrize(
    ("command", "vm"),
    [
        ("/usr/bin/qemu-system-x86_64 -name guest=web1,debug-threads=on -S", "web1"),
        ("qemu-system-x86_64 -name db", "db"),
        ("qemu-kvm --name debug-threads=on,guest=a,,b", "a,b"),
        ("qemu-system-x86_64 -m 64", None),
        ("sh -c sleep", None),
        (None, None),
    ],
)
def test_a_holders_vm_is_the_guest_its_qemu_command_line_names(
    command: str | None, vm: str | None
) -> None:
    assert guest_name(command) == vm
