"""Hostile neighbours, and answers that are exact.

No one gains power over an image through imglock's files that they do not
already have over the image: a second, unprivileged user (a real uid,
made with useradd if there is none) who cannot read an image can neither
block a claim on it, nor appear as its holder, nor pause the VM that uses
it, through any file imglock creates, beside the image or in a lockspace.
Lockspace lock files and holder records take the owner, group and mode
that follow from the image's, and a file that would hand out more is
refused (imglock(7), OWNERSHIP; SECURITY.md).

Besides: two images on two filesystems without a shared identity (tmpfs, overlay)
never share a lock file; a Claim cannot be copied; and a wait for a busy
image ends at SIGTERM, SIGINT or SIGHUP without starting the command.
"""

from __future__ import annotations

import copy
import errno
import grp
import json
import os
import pickle
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ENV, SpawnRival, imglock_holders
from processes import holds_for, state, wait_until
from wrapped_vm import TIMEOUT, WrappedVMs

import imglock
from imglock.errors import EX_NOINPUT
from imglock.lock import ownership
from imglock.lock.identity import Owner
from imglock.lock.lockspace import lock_file_name
from imglock.lock.protocol import HOLDER_BASE, Mode
from imglock.lock.records import RECORD_DIR, record_name

IMGLOCK = [sys.executable, "-m", "imglock"]
#: A command that holds until its standard input closes.
HOLD = ("sh", "-c", "read x")


#: The neighbour: an unprivileged user of its own, made if this host has none.
NEIGHBOUR = "imglock-neighbour"
#: The interpreter the neighbour runs (the tests' own may live where it may not read).
SYSTEM_PYTHON = "/usr/bin/python3"
#: What the neighbour runs: open FILE as it may, read-lock one byte (OFD),
#: say how that went ("locked", or the errno of the open or the lock), and
#: hold the lock until its standard input closes.
LOCK_A_BYTE = """
import fcntl, os, struct, sys
try:
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_NONBLOCK)
    lock = struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, int(sys.argv[2]), 1, 0)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, lock)
except OSError as exc:
    print(exc.errno, flush=True)
    sys.exit(0)
print("locked", flush=True)
sys.stdin.read()
"""
#: Seconds between the lock checks of the neighbour's victim.
CHECK_INTERVAL = 0.1
#: A byte a rival shared holder would lock: a reader's way to pose as a shared holder.
SHARED_HOLDER_BYTE = HOLDER_BASE[Mode.SHARED] + 2 * Owner(0x2A, 4242).id


@dataclass(frozen=True)
class Neighbour:
    """A real second user, and what it does through the files it may open."""

    uid: int
    gid: int
    processes: list[subprocess.Popen[str]]

    def argv(self, *argv: str | os.PathLike[str]) -> list[str]:
        become = [f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups"]
        return ["setpriv", *become, *[os.fspath(arg) for arg in argv]]

    def run(self, *argv: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*argv), capture_output=True, text=True, timeout=30)

    def lock_a_byte(self, path: Path, offset: int = SHARED_HOLDER_BYTE) -> str:
        """Try to hold one byte of *path*: "locked" (held until the test ends) or the errno."""
        proc = subprocess.Popen(
            self.argv(SYSTEM_PYTHON, "-I", "-c", LOCK_A_BYTE, path, str(offset)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.processes.append(proc)
        assert proc.stdout is not None
        return proc.stdout.readline().strip()

    def write(self, path: Path, text: str) -> None:
        """Write a file of the neighbour's own (it must be allowed to)."""
        proc = self.run(SYSTEM_PYTHON, "-I", "-c", WRITE_FILE, path, text)
        assert proc.returncode == 0, proc.stderr


WRITE_FILE = "import sys; open(sys.argv[1], 'w').write(sys.argv[2])"


@pytest.fixture(scope="session")
def neighbour_user() -> tuple[int, int]:
    """(uid, gid) of the neighbour, made with useradd unless it is there."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None or not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("a second real user needs root, setpriv(1) and a system python3")
    try:
        user = pwd.getpwnam(NEIGHBOUR)
    except KeyError:
        made = subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", NEIGHBOUR],
            capture_output=True,
            text=True,
        )
        assert made.returncode in (0, 9), made.stderr  # 9: made meanwhile
        user = pwd.getpwnam(NEIGHBOUR)
    return user.pw_uid, user.pw_gid


#: A group the neighbour is in as a supplementary member only.
READERS = "imglock-readers"


@pytest.fixture(scope="session")
def readers_group(neighbour_user: tuple[int, int]) -> int:
    """The gid of READERS, made with groupadd unless it is there, the neighbour added."""
    made = subprocess.run(["groupadd", "--system", READERS], capture_output=True, text=True)
    assert made.returncode in (0, 9), made.stderr  # 9: there already
    added = subprocess.run(["usermod", "-a", "-G", READERS, NEIGHBOUR], capture_output=True)
    assert added.returncode == 0, added.stderr
    return grp.getgrnam(READERS).gr_gid


@pytest.fixture
def neighbour(neighbour_user: tuple[int, int]) -> Iterator[Neighbour]:
    """The neighbour; every process it left running is ended afterwards."""
    who = Neighbour(*neighbour_user, processes=[])
    yield who
    for proc in who.processes:
        proc.kill()
        proc.wait()


@pytest.fixture
def shared_dirs() -> Iterator[tuple[Path, Path]]:
    """A datastore and a lockspace that everyone may add files to (sticky, like /tmp),
    the datastore holding root's image, which only root may open (0600)."""
    # Under /tmp itself: pytest's own directories are root's alone.
    root = Path(tempfile.mkdtemp(prefix="imglock-neighbours-", dir="/tmp"))
    try:
        root.chmod(0o755)
        store, space = root / "store", root / "space"
        for directory in (store, space):
            directory.mkdir()
            directory.chmod(0o1777)
        image = store / "vm.raw"
        image.write_bytes(bytes(1 << 20))
        image.chmod(0o600)
        yield store, space
    finally:
        shutil.rmtree(root)


def files_imglock_made(*directories: Path, image: Path) -> list[Path]:
    """Every file under *directories* but the image itself: lock files, records."""
    return sorted(p for d in directories for p in d.rglob("*") if p.is_file() and p != image)


def imglock_run(
    started: list[subprocess.Popen[str]],
    image: Path,
    *options: str | os.PathLike[str],
    command: Sequence[str | os.PathLike[str]] = HOLD,
    nohup: bool = False,
) -> subprocess.Popen[str]:
    """``imglock run OPTIONS --image IMAGE -- COMMAND`` (by default, one that holds
    until its standard input closes), under nohup(1) if asked."""
    prefix = ["nohup"] if nohup else []
    argv = [*prefix, *IMGLOCK, "run", *options, "--image", image, "--", *command]
    proc = subprocess.Popen(
        [os.fspath(arg) for arg in argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    started.append(proc)
    return proc


def finish(wrapper: subprocess.Popen[str]) -> None:
    """Let a wrapper's command end; it must exit 0 and say nothing."""
    _out, err = wrapper.communicate("\n", timeout=20)
    assert (wrapper.returncode, err) == (0, "")


@pytest.mark.parametrize("where", ["beside the image", "in a lockspace"])
def test_a_neighbour_who_cannot_open_an_image_locks_no_file_imglock_makes_for_it(
    shared_dirs: tuple[Path, Path],
    neighbour: Neighbour,
    started: list[subprocess.Popen[str]],
    where: str,
) -> None:
    store, space = shared_dirs
    image = store / "vm.raw"
    lockspace = str(space) if where == "in a lockspace" else None
    options = ["--lockspace", str(space)] if lockspace else []
    assert neighbour.lock_a_byte(image) == str(errno.EACCES)

    wrapper = imglock_run(started, image, *options)
    # Until its record is in place, the claim may be writing it under a temporary name.
    (holder,) = wait_until(
        lambda: [h for h in imglock_holders(image, lockspace) if h.command is not None],
        what="root's claim and its record",
    )
    made = files_imglock_made(store, space, image=image)
    assert made, "the claim made no file to try"
    if lockspace:
        assert any(p.suffix == ".lock" for p in made)
    # While root holds the image, and after: no byte of any of them for the neighbour.
    for path in made:
        assert neighbour.lock_a_byte(path) == str(errno.EACCES), path
    finish(wrapper)
    for path in files_imglock_made(store, space, image=image):
        assert neighbour.lock_a_byte(path) == str(errno.EACCES), path

    # So root's next claim is not blocked, and the only holder shown is root's.
    again = imglock_run(started, image, *options)
    (shown,) = wait_until(lambda: imglock_holders(image, lockspace), what="root's second claim")
    assert shown.pid != holder.pid and shown.host == holder.host
    finish(again)


@pytest.mark.parametrize("where", ["beside the image", "in a lockspace"])
def test_a_record_a_neighbour_forges_is_not_believed(
    shared_dirs: tuple[Path, Path], neighbour: Neighbour, where: str
) -> None:
    store, space = shared_dirs
    image = store / "vm.raw"
    lockspace = str(space) if where == "in a lockspace" else None
    # The neighbour makes the record directory first (root then writes no
    # record there: it is not root's), and fills it with records of root's
    # claim, and of a claim that does not exist.
    record_dir = (space if lockspace else store) / RECORD_DIR
    neighbour.run("mkdir", "-m", "0777", record_dir)
    name = lock_file_name(str(image), image.stat()) if lockspace else image.name
    owner = Owner.current()
    forged = {
        "image": str(image), "mode": "exclusive", "host": "elsewhere", "user": NEIGHBOUR,
        "command": "forged-by-the-neighbour", "since": "2026-01-01T00:00:00Z",
    }  # fmt: skip
    with imglock.claim(image, lockspace=lockspace):
        for who in (owner, Owner(owner.host_tag, 4242)):
            record = {**forged, "owner": who.id, "pid": who.pid}
            neighbour.write(record_dir / record_name(name, who), json.dumps(record))
        in_space = ["--lockspace", lockspace] if lockspace else []
        proc = subprocess.run(
            [*IMGLOCK, "status", "--json", *in_space, image],
            capture_output=True, text=True, env=ENV, timeout=30,
        )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "forged" not in proc.stdout and "elsewhere" not in proc.stdout
    ((holder,),) = [
        [h for h in r["holders"] if h["layer"] == "imglock"] for r in json.loads(proc.stdout)
    ]
    assert (holder["pid"], holder["host"]) == (os.getpid(), owner_host())


def owner_host() -> str:
    return os.uname().nodename


def test_a_member_of_the_images_group_through_a_supplementary_group_may_use_it(
    tmp_path: Path, neighbour_user: tuple[int, int], readers_group: int
) -> None:
    uid, own_group = neighbour_user
    image = tmp_path / "disk.raw"
    image.write_bytes(b"")
    image.chmod(0o640)
    for gid, member in ((readers_group, True), (own_group, True), (0, False)):
        os.chown(image, 0, gid)
        assert ownership.may_use(uid, image.stat()) is member, gid
    image.chmod(0o600)  # the group class may not: membership is no longer enough
    assert not ownership.may_use(uid, image.stat())


def test_the_lock_file_of_an_image_made_private_since_is_made_private_too(
    shared_dirs: tuple[Path, Path], neighbour: Neighbour
) -> None:
    store, space = shared_dirs
    image = store / "vm.raw"
    os.chown(image, neighbour.uid, neighbour.gid)  # the neighbour's own image, 0644
    image.chmod(0o644)
    lock = space / lock_file_name(str(image), image.stat())
    with imglock.claim(image, lockspace=str(space)):
        st = lock.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (neighbour.uid, 0o444)
    image.chmod(0o600)  # its owner makes it private
    with imglock.claim(image, lockspace=str(space)):
        st = lock.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (neighbour.uid, 0o400)


@pytest.mark.qemu
@pytest.mark.parametrize("where", ["beside the image", "in a lockspace"])
def test_a_neighbour_who_may_read_an_image_cannot_pause_the_vm_that_uses_it(
    shared_dirs: tuple[Path, Path], neighbour: Neighbour, vms: WrappedVMs, where: str
) -> None:
    store, space = shared_dirs
    image = store / "vm.raw"
    image.chmod(0o644)  # as qemu-img creates images: anyone may read it, and so lock it
    lockspace = str(space) if where == "in a lockspace" else None
    options = [
        "--check-interval", str(CHECK_INTERVAL), *(["--lockspace", lockspace] if lockspace else [])
    ]  # fmt: skip
    vm = vms.start("-drive", f"file={image},format=raw,if=none,id=d0", options=options)
    wait_until(lambda: imglock_holders(image, lockspace), what="the VM's claim")
    locked = space / lock_file_name(str(image), image.stat()) if lockspace else image

    # One byte of the shared-holder region: a holder that never followed the protocol.
    assert neighbour.lock_a_byte(locked) == "locked"
    said = wait_until(
        lambda: any(words in vm.stderr() for words in ("outside imglock's protocol", "lost")),
        what="a lock check to see the neighbour's byte",
        timeout=TIMEOUT,
    )
    assert said and "guest paused" not in vm.stderr() and "lost" not in vm.stderr()

    def running() -> bool:
        log = vm.stderr()
        return state(vm.qemu_pid) != "T" and "guest paused" not in log and "lost" not in log

    # Ten more checks see the byte still held: none pauses the guest, none says it again.
    holds_for(running, 10 * CHECK_INTERVAL, what="the guest running through later checks")
    assert vm.runstate() == "running", vm.stderr()
    assert vm.stderr().count("outside imglock's protocol") == 1, vm.stderr()


def test_a_lock_file_planted_by_a_neighbour_is_refused_in_one_line(
    shared_dirs: tuple[Path, Path], neighbour: Neighbour
) -> None:
    store, space = shared_dirs
    image = store / "vm.raw"
    lock = space / lock_file_name(str(image), image.stat())
    neighbour.write(lock, "")  # the neighbour's own, 0644: anyone could lock it
    assert neighbour.lock_a_byte(lock) == "locked"
    for command in (["run", "--image", str(image), "--", "true"], ["status", str(image)]):
        proc = subprocess.run(
            [*IMGLOCK, command[0], "--lockspace", str(space), *command[1:]],
            capture_output=True, text=True, env=ENV, timeout=30,
        )  # fmt: skip
        assert proc.returncode == EX_NOINPUT, proc.stderr
        (line,) = proc.stderr.splitlines()
        assert line.startswith(f"imglock: {lock}: lock file belongs to uid {neighbour.uid}")
        assert "4242" not in proc.stdout  # no made-up holder is shown
    assert lock.stat().st_uid == neighbour.uid  # and it was left as it was


def test_a_lock_file_of_ours_that_lets_in_more_than_the_image_is_brought_into_line(
    shared_dirs: tuple[Path, Path],
) -> None:
    store, space = shared_dirs
    image = store / "vm.raw"
    lock = space / lock_file_name(str(image), image.stat())
    lock.touch(mode=0o644)  # as an older imglock made it
    lock.chmod(0o644)
    with imglock.claim(image, lockspace=str(space)):
        assert stat.S_IMODE(lock.stat().st_mode) == 0o400


# --------------------------------------------------------------------------
# Lockspace identity: two filesystems without a shared one


@pytest.fixture(params=["tmpfs", "overlay"])
def two_local_mounts(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Two fresh mounts of one filesystem type that only this host has, each
    holding one raw image with the same inode number: two tmpfs, or two
    overlays each over a tmpfs of its own (a file not copied up keeps the
    tmpfs's inode number)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []
    images = []
    try:
        for name in ("a", "b"):
            point = tmp_path / name
            point.mkdir()
            mount(mounted, point, "-t", "tmpfs", "-o", "size=4m", "tmpfs")
            if request.param == "overlay":
                layers = [point / layer for layer in ("lower", "upper", "work", "merged")]
                for layer in layers:
                    layer.mkdir()
                lower, upper, work, merged = layers
                (lower / "vm.raw").write_bytes(bytes(65536))
                options = f"lowerdir={lower},upperdir={upper},workdir={work}"
                mount(mounted, merged, "-t", "overlay", "-o", options, "overlay")
                point = merged
            else:
                (point / "vm.raw").write_bytes(bytes(65536))
            images.append(point / "vm.raw")
        yield images[0], images[1]
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", "--lazy", point], check=False)


def mount(mounted: list[Path], point: Path, *args: str) -> None:
    """``mount ARGS POINT`` (*args* ending with the source), noted to be undone."""
    subprocess.run(["mount", *args, point], check=True)
    mounted.append(point)


def test_images_with_one_inode_number_on_two_local_mounts_get_two_lock_files(
    two_local_mounts: tuple[Path, Path], tmp_path: Path, rival: SpawnRival
) -> None:
    first, second = two_local_mounts
    assert first.stat().st_ino == second.stat().st_ino  # what the identity used to stop at
    space = tmp_path / "lockspace"
    space.mkdir()
    with imglock.claim(first, lockspace=str(space)):
        other = rival("--lockspace", space, "--no-qemu", second)
        assert other.ok, other.reply
        # Each image names its own holder, never the other's.
        assert [h.pid for h in imglock_holders(second, str(space))] == [other.reply["pid"]]
        assert [h.pid for h in imglock_holders(first, str(space))] == [os.getpid()]
        other.stop()
    assert len(list(space.glob("file-*.lock"))) == 2


# --------------------------------------------------------------------------
# A claim cannot be copied


@pytest.mark.parametrize(
    "duplicate", [copy.copy, copy.deepcopy, pickle.dumps], ids=["copy", "deepcopy", "pickle"]
)
def test_a_claim_cannot_be_copied_or_pickled_and_stays_held(
    raw_image: Path, rival: SpawnRival, duplicate: object
) -> None:
    assert callable(duplicate)
    claim = imglock.claim(raw_image)
    try:
        with pytest.raises(TypeError, match="cannot be copied or pickled"):
            duplicate(claim)
        # Nothing was closed on the way: the claim is held, and still refuses others.
        assert claim.held
        assert not rival(raw_image).ok
    finally:
        claim.release()
    assert rival(raw_image).ok


# --------------------------------------------------------------------------
# Waiting is interruptible


@pytest.mark.parametrize("wait", ["30", "inf"])
@pytest.mark.parametrize(
    ("signo", "status"),
    [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)],
    ids=["TERM", "INT", "HUP"],
)
def test_a_signal_ends_the_wait_leaves_the_queue_and_never_starts_the_command(
    raw_image: Path,
    tmp_path: Path,
    rival: SpawnRival,
    started: list[subprocess.Popen[str]],
    wait: str,
    signo: int,
    status: int,
) -> None:
    holder = rival(raw_image)
    assert holder.ok
    marker = tmp_path / "started"
    wrapper = imglock_run(started, raw_image, "-w", wait, command=["touch", marker])
    wait_until(lambda: imglock.inspect(raw_image).waiting, what="the wrapper queues")

    wrapper.send_signal(signo)
    _out, err = wrapper.communicate(timeout=20)
    assert wrapper.returncode == status, err
    (line,) = err.splitlines()
    assert line.startswith(f"imglock: {signal.Signals(signo).name} ") and "not started" in line
    assert not marker.exists()
    assert imglock.inspect(raw_image).waiting == []
    # The holder is untouched; once it lets go, the image is free for anyone.
    assert [h.pid for h in imglock_holders(raw_image)] == [holder.reply["pid"]]
    holder.stop()
    assert imglock.holders(raw_image) == []


def test_a_hangup_ignored_as_under_nohup_does_not_end_the_wait(
    raw_image: Path, tmp_path: Path, rival: SpawnRival, started: list[subprocess.Popen[str]]
) -> None:
    holder = rival(raw_image)
    assert holder.ok
    marker = tmp_path / "started"
    wrapper = imglock_run(started, raw_image, "-w", "inf", command=["touch", marker], nohup=True)
    wait_until(lambda: imglock.inspect(raw_image).waiting, what="the wrapper queues")

    wrapper.send_signal(signal.SIGHUP)  # ignored, as nohup(1) leaves it: discarded at once
    holder.stop()
    _out, err = wrapper.communicate(timeout=20)
    assert (wrapper.returncode, err) == (0, "")
    assert marker.exists()
