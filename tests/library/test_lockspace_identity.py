"""imglock(7), LOCKSPACES: one image is one lock file, whatever name it is reached by.

A symlink, a hard link and a bind mount (made in a mount namespace of its
own, with ``unshare --mount``, as root) each reach the same file: a claim
through one name conflicts with a claim through any other, in a real
process of its own, and ``status`` of any name shows the holder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ENV, SpawnRival

import imglock
from imglock.lock.lockspace import identity, lock_file_name


@pytest.fixture
def space(tmp_path: Path) -> Path:
    path = tmp_path / "lockspace"
    path.mkdir()
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disks" / "vm.raw"
    path.parent.mkdir()
    path.write_bytes(bytes(65536))
    return path


@pytest.fixture
def bind_mount(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """A directory bind-mounted from the image's in a private mount namespace:
    (the mount point, the command prefix that runs a process where it is mounted)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a bind mount needs root and unshare(1)")
    target = tmp_path / "bound"
    target.mkdir()
    prefix = [
        "unshare", "--mount", "--propagation", "private",
        "sh", "-c", 'mount --bind "$0" "$1" && shift && exec "$@"',
        str(tmp_path / "disks"), str(target),
    ]  # fmt: skip
    yield target, prefix


def other_names(image: Path) -> dict[str, Path]:
    """A symlink and a hard link to *image*, beside it."""
    symlink = image.with_name("alias.raw")
    symlink.symlink_to(image.name)
    hardlink = image.parent.parent / "hardlink.raw"
    os.link(image, hardlink)
    return {"symlink": symlink, "hard link": hardlink}


@pytest.mark.parametrize("name", ["symlink", "hard link"])
def test_a_claim_through_another_name_of_the_file_conflicts(
    image: Path, space: Path, rival: SpawnRival, name: str
) -> None:
    alias = other_names(image)[name]
    with imglock.claim(image, lockspace=str(space)):
        other = rival("--lockspace", space, "--no-qemu", alias)
        assert not other.ok and other.reply["status"] == 75, other.reply
    # ... and the other way round, once free.
    with imglock.claim(alias, lockspace=str(space)):
        assert not rival("--lockspace", space, image).ok
    assert len(list(space.glob("*.lock"))) == 1


def test_a_claim_through_a_bind_mount_conflicts(
    image: Path, space: Path, rival: SpawnRival, bind_mount: tuple[Path, list[str]]
) -> None:
    target, prefix = bind_mount
    with imglock.claim(image, lockspace=str(space)):
        other = rival("--lockspace", space, target / image.name, prefix=prefix)
        assert not other.ok and other.reply["status"] == 75, other.reply
        # status, from inside the namespace, through the bind mount: the holder.
        proc = subprocess.run(
            [*prefix, sys.executable, "-m", "imglock", "status", "--json",
             "--lockspace", str(space), str(target / image.name)],
            capture_output=True, text=True, env=ENV, timeout=30,
        )  # fmt: skip
        assert proc.returncode == 1, proc.stderr
        (report,) = json.loads(proc.stdout)
        assert [h["pid"] for h in report["holders"] if h["layer"] == "imglock"] == [os.getpid()]
    # A claim through the bind mount, once free, is refused to the original name.
    holder = rival("--lockspace", space, target / image.name, prefix=prefix)
    assert holder.ok
    with pytest.raises(imglock.LockConflict):
        imglock.claim(image, lockspace=str(space))


@pytest.mark.parametrize("first", ["image", "alias"])
def test_status_of_several_names_of_one_file_shows_the_holder(
    image: Path, space: Path, imglock_cli: object, first: str
) -> None:
    names = other_names(image)
    alias = names["hard link"]
    order = [image, alias] if first == "image" else [alias, image]
    with imglock.claim(alias, lockspace=str(space)):
        proc = imglock_cli("status", "--json", "--lockspace", space, *order)  # type: ignore[operator]
    assert proc.returncode == 1, proc.stderr
    reports = json.loads(proc.stdout)
    assert reports and all(
        [h["pid"] for h in r["holders"] if h["layer"] == "imglock"] == [os.getpid()]
        for r in reports
    )


def test_two_files_get_two_lock_files(image: Path, space: Path, rival: SpawnRival) -> None:
    other = image.with_name("other.raw")
    shutil.copy(image, other)
    with imglock.claim(image, lockspace=str(space)):
        assert rival("--lockspace", space, other).ok


def test_the_lock_file_name_carries_nothing_of_the_path(image: Path) -> None:
    # What every host must share is the filesystem and the inode, not a path.
    names = other_names(image)
    st = image.stat()
    ident = identity(str(image), st)
    assert ident.startswith("file:") and ident.endswith(f":{st.st_ino}")
    assert str(image.parent) not in ident and image.name not in ident
    lock = lock_file_name(str(image), st)
    assert all(lock_file_name(str(p), p.stat()) == lock for p in names.values())
    assert image.name not in lock
