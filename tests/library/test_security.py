"""Security: root running imglock over a datastore that another user can write.

The tenant here is the real user ``nobody`` (65534), acting through real
files: its shell commands run with ``subprocess.run(user=..., group=...)``,
and ``imglock status`` runs as that user in a forked child that drops root.
Everything root does is the real ``imglock`` command or library.  See
SECURITY.md for the threat model these tests stand for.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import QemuImg, imglock_holders
from processes import wait_until
from qemu_vm import NONE_MACHINE

import imglock
from imglock.lock.identity import Owner
from imglock.lock.lockspace import lock_file_name
from imglock.lock.records import RECORD_DIR, record_name, redact

NOBODY = 65534
IMGLOCK = [sys.executable, "-m", "imglock"]
SECRETS = ("hunter2", "hunter3", "hunter4")
#: A QEMU-like command line carrying secrets in each syntax QEMU accepts.
SECRET_ARGS = [
    "-object",
    "secret,id=sec0,data=hunter2",
    "-object",
    '{"qom-type":"secret","id":"sec1","data":"hunter3"}',
    "-drive",
    "file=https://bob:hunter4@example.com/disk.img,format=raw,if=none",
]

#: A command that holds until its standard input closes, its arguments after.
HOLD = ["sh", "-c", "read x", "sh"]

T = TypeVar("T")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as two users")


def as_tenant(*argv: str | os.PathLike[str]) -> None:
    """Run a command as the tenant (``nobody``); it must succeed."""
    subprocess.run(
        [os.fspath(a) for a in argv], user=NOBODY, group=NOBODY, extra_groups=[], check=True
    )


def in_child_as_tenant(fn: Callable[[], T], *, hide_pids: bool = False) -> T:
    """Call *fn* in a forked child that has become ``nobody``; return its result.

    With *hide_pids*, the child first mounts its own /proc with hidepid=2, so
    it sees only its own processes, as on a host configured that way.  The
    interpreter lives where nobody may not read, so *fn* must only use
    modules already imported (run it once as root first).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            if hide_pids:
                _mount_private_proc()
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            outcome: tuple[bool, Any] = (True, fn())
        except BaseException as exc:
            outcome = (False, f"{type(exc).__name__}: {exc}")
        os.write(w, pickle.dumps(outcome))
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    ok, value = pickle.loads(data)
    assert ok, value
    return value  # type: ignore[no-any-return]


def _mount_private_proc() -> None:  # pragma: no cover - runs in the child
    import ctypes

    clone_newns = 0x00020000
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(clone_newns) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["mount", "-t", "proc", "-o", "hidepid=2", "proc", "/proc"], check=True)


def status_as_tenant(*images: Path, hide_pids: bool = False) -> list[dict[str, Any]]:
    """``imglock status --json IMAGE...`` as the tenant: the real CLI code, in-process."""
    from click.testing import CliRunner

    from imglock.cli import cli

    def status() -> str:
        result = CliRunner().invoke(cli, ["status", "--json", *map(str, images)])
        assert result.exit_code in (0, 1), result.output
        return result.stdout

    status()  # as root first: every module it needs is then imported
    reports: list[dict[str, Any]] = json.loads(in_child_as_tenant(status, hide_pids=hide_pids))
    return reports


def status_as_root(*images: Path, table: bool = False) -> str:
    proc = subprocess.run(
        [*IMGLOCK, "status", *([] if table else ["--json"]), *map(str, images)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode in (0, 1), proc.stderr
    return proc.stdout


def fingerprint(path: Path) -> tuple[object, ...]:
    """Everything a write (or chmod, chown, truncate) would change."""
    st = os.lstat(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
    return (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns, digest)


@pytest.fixture
def datastore() -> Iterator[Path]:
    """A directory the tenant owns and writes, holding the tenant's raw image."""
    root = Path(tempfile.mkdtemp(prefix="imglock-datastore-", dir="/tmp"))
    try:
        os.chmod(root, 0o755)
        os.chown(root, NOBODY, NOBODY)
        as_tenant("truncate", "-s", "1M", root / "disk.raw")
        yield root
    finally:
        shutil.rmtree(root)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file of root's that nobody may write (the tenant would love to)."""
    path = tmp_path / "victim.conf"
    path.write_text("root's own content\n")
    return path


def run_in_background(
    started: list[subprocess.Popen[str]], image: Path, *args: str, holder_args: list[str]
) -> tuple[subprocess.Popen[str], imglock.Holder]:
    """``imglock run ARGS --image IMAGE -- sh -c 'read x' sh HOLDER_ARGS``, until stdin closes."""
    proc = subprocess.Popen(
        [*IMGLOCK, "run", *args, "--image", str(image), "--", *HOLD, *holder_args],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    started.append(proc)
    lockspace = args[args.index("--lockspace") + 1] if "--lockspace" in args else None
    (holder,) = wait_until(
        lambda: imglock_holders(image, lockspace), what="the wrapper claims the image"
    )
    # The claim is taken before the gate opens: wait for the command itself,
    # past its start-up (the dynamic loader opens libraries as it starts).
    wait_until(lambda: _argv(holder.pid)[: len(HOLD)] == HOLD, what="the command runs")
    wait_until(lambda: _reads_stdin(holder.pid), what="the command waits for its input")
    return proc, holder


#: read(2)'s number, as /proc/PID/syscall gives it, on the machines the tests run on.
READ_SYSCALL = {"x86_64": "0", "aarch64": "63"}


def _reads_stdin(pid: int | None) -> bool:
    """Whether *pid* is blocked in read(2) on its descriptor 0 (/proc/PID/syscall)."""
    try:
        syscall = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return False
    return syscall[:2] == [READ_SYSCALL[os.uname().machine], "0x0"]


def _argv(pid: int | None) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except OSError:
        return []


# --------------------------------------------------------------------------
# Holder records cannot be redirected


def test_a_record_directory_planted_as_a_symlink_is_never_written_through(
    datastore: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    as_tenant("ln", "-s", elsewhere, datastore / RECORD_DIR)

    with imglock.claim(datastore / "disk.raw"):
        (holder,) = imglock_holders(datastore / "disk.raw")
        assert holder.pid == os.getpid()
        assert list(elsewhere.iterdir()) == []
    assert list(elsewhere.iterdir()) == []
    assert (datastore / RECORD_DIR).is_symlink()


@pytest.mark.parametrize("mode", ["755", "777"])
def test_a_record_directory_of_another_user_gets_no_record_but_the_claim_holds(
    datastore: Path, mode: str
) -> None:
    as_tenant("mkdir", "-m", mode, datastore / RECORD_DIR)

    with imglock.claim(datastore / "disk.raw"):
        (holder,) = imglock_holders(datastore / "disk.raw")
        assert holder.pid == os.getpid() and holder.mode == "exclusive"
        assert list((datastore / RECORD_DIR).iterdir()) == []
        with pytest.raises(imglock.LockConflict):
            imglock.claim(datastore / "disk.raw")


@pytest.mark.parametrize("planted", ["symlink", "file", "fifo"])
def test_a_record_file_planted_under_its_name_is_replaced_never_followed(
    datastore: Path, victim: Path, planted: str
) -> None:
    # A record directory shared by several users, sticky like /tmp.
    records = datastore / RECORD_DIR
    records.mkdir(mode=0o1777)
    records.chmod(0o1777)
    name = records / record_name("disk.raw", Owner.current())
    plant: dict[str, list[str | Path]] = {
        "symlink": ["ln", "-s", victim, name],
        "file": ["sh", "-c", f"echo forged > {name}"],
        "fifo": ["mkfifo", name],
    }
    as_tenant(*plant[planted])
    before = fingerprint(victim)

    with imglock.claim(datastore / "disk.raw"):
        st = os.lstat(name)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == 0
        assert json.loads(name.read_text())["pid"] == os.getpid()
    assert fingerprint(victim) == before
    assert not os.path.lexists(name)


def test_records_planted_by_the_tenant_neither_block_status_nor_lead_it_elsewhere(
    datastore: Path, tmp_path: Path
) -> None:
    # A record-shaped file of root's that the tenant may not read.
    private = tmp_path / "private.json"
    private.write_text(json.dumps({"host": "root-only", "command": "root's secret"}))
    private.chmod(0o600)
    as_tenant("mkdir", datastore / RECORD_DIR)
    owner = Owner.current()
    as_tenant("ln", "-s", private, datastore / RECORD_DIR / record_name("disk.raw", owner))
    as_tenant("mkfifo", datastore / RECORD_DIR / record_name("disk.raw", Owner(owner.host_tag, 1)))

    with imglock.claim(datastore / "disk.raw"):
        shown = status_as_root(datastore / "disk.raw")  # returns: no FIFO is opened to wait
    assert "root-only" not in shown and "secret" not in shown
    ((holder,),) = [[h for h in r["holders"] if h["layer"] == "imglock"] for r in json.loads(shown)]
    assert holder["pid"] == os.getpid()


# --------------------------------------------------------------------------
# What status reveals


def test_secrets_on_a_command_line_reach_neither_the_record_nor_status(
    datastore: Path, started: list[subprocess.Popen[str]]
) -> None:
    image = datastore / "disk.raw"
    _wrapper, holder = run_in_background(started, image, holder_args=SECRET_ARGS)
    # The secrets are there to be found: QEMU does not scrub its argv either.
    assert "hunter2" in Path(f"/proc/{holder.pid}/cmdline").read_text()

    (record,) = (datastore / RECORD_DIR).glob("disk.raw.*.json")
    shown = {
        "record": record.read_text(),
        "status --json as root": status_as_root(image),
        "status as root": status_as_root(image, table=True),
        "status --json as the tenant": json.dumps(status_as_tenant(image)),
    }
    for where, text in shown.items():
        assert "data=***" in text, where
        assert not [s for s in SECRETS if s in text], where


#: How each way of writing a secret on QEMU's command line is shown.
REDACTED = {
    "secret,id=s,data=hunter2": "secret,id=s,data=***",
    "secret,id=s,data=hun,,ter2,format=raw": "secret,id=s,data=***,format=raw",
    '{"qom-type":"secret","data":"hun\\"ter2"}': '{"qom-type":"secret","data":"***"}',
    'file=json:{"driver":"ssh","password":"hunter"}': 'file=json:{"driver":"ssh","password":"***"}',
    "file=https://bob:hunter2@example.com/d.img": "file=https://bob:***@example.com/d.img",
    "file=rbd:pool/vm:key=hunter2:mon_host=m,if=ide": "file=rbd:pool/vm:key=***:mon_host=m,if=ide",
    "port=5900,password=hunter2": "port=5900,password=***",
    "file=vm.qcow2,data-file=vm.data": "file=vm.qcow2,data-file=vm.data",
}  # fmt: skip


@pytest.mark.parametrize(("arg", "shown"), REDACTED.items())
def test_redaction_knows_every_syntax_a_secret_can_be_written_in(arg: str, shown: str) -> None:
    assert redact(["qemu-system-x86_64", "-x", arg]) == f"qemu-system-x86_64 -x {shown}"


def test_status_as_another_user_shows_only_what_that_user_may_read(
    datastore: Path, started: list[subprocess.Popen[str]]
) -> None:
    image = datastore / "disk.raw"
    _wrapper, holder = run_in_background(started, image, holder_args=SECRET_ARGS)
    (record,) = (datastore / RECORD_DIR).glob("disk.raw.*.json")
    published = json.loads(record.read_text())

    def seen() -> dict[str, Any]:
        ((report,),) = [status_as_tenant(image, hide_pids=True)]
        (holder,) = report["holders"]
        return holder  # type: ignore[no-any-return]

    # With /proc hiding root's processes, the tenant learns the locks (anyone
    # who can open the image can test them) and the record (a file it may
    # read), redacted: nothing from /proc.  As from another host, QEMU's
    # bytes are tied to the imglock holder by the mark on its holder range.
    ours = seen()
    assert (ours["layer"], ours["pid"], ours["mode"]) == ("imglock", holder.pid, "exclusive")
    assert "write" in ours["perms"]
    assert (ours["command"], ours["since"]) == (published["command"], published["since"])
    record.unlink()
    ours = seen()
    assert (ours["pid"], ours["command"], ours["since"]) == (holder.pid, None, None)


def test_control_characters_in_a_command_line_do_not_reach_the_terminal(
    datastore: Path, started: list[subprocess.Popen[str]]
) -> None:
    # A tenant's process name is printed on root's terminal by `status`.
    image = datastore / "disk.raw"
    run_in_background(started, image, holder_args=["\x1b]0;owned\x07\x1b[2J", "two\nlines"])
    table = status_as_root(image, table=True)
    assert "\x1b" not in table and "\x07" not in table
    assert len(table.splitlines()) == 2  # the header and one holder


# --------------------------------------------------------------------------
# What the wrapped command inherits


def _descriptors(pid: int) -> dict[int, str]:
    """What each open descriptor of *pid* refers to."""
    return {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}


@pytest.mark.parametrize("where", ["beside the image", "in a lockspace"])
def test_the_command_inherits_the_lock_descriptors_and_nothing_of_the_wrapper(
    tmp_path: Path, qemu_img: QemuImg, started: list[subprocess.Popen[str]], where: str
) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    space = tmp_path / "lockspace"
    space.mkdir()
    args = ["--lockspace", str(space)] if where == "in a lockspace" else []

    _wrapper, holder = run_in_background(started, top, *args, holder_args=[])
    assert holder.pid is not None
    inherited = _descriptors(holder.pid)
    lock_files = (
        [space / lock_file_name(str(image), image.stat()) for image in (top, base)]
        if args
        else [top, base]
    )
    # Its standard streams, and the descriptors carrying the locks: no gate
    # pipe, no record or lockspace directory, nor the images behind lock files.
    assert sorted(inherited)[:3] == [0, 1, 2]
    assert sorted(v for fd, v in inherited.items() if fd > 2) == sorted(map(str, lock_files))


def _qmp_socket_of(qemu_pid: int) -> Path | None:
    """The socket of the monitor ``imglock run`` added to QEMU's command line.

    None until the wrapper's child has become QEMU.
    """
    for arg in _argv(qemu_pid):
        if arg.startswith("socket,id=imglock-qmp,"):
            (path,) = [kv[len("path=") :] for kv in arg.split(",") if kv.startswith("path=")]
            return Path(path)
    return None


@pytest.mark.qemu
def test_the_private_qmp_socket_of_a_wrapped_qemu_is_out_of_other_users_reach(
    datastore: Path, qemu_system_path: str, started: list[subprocess.Popen[str]]
) -> None:
    image = datastore / "disk.raw"
    drive = f"file={image},format=raw,if=none,id=d0"
    wrapper = subprocess.Popen(
        [*IMGLOCK, "run", "--", qemu_system_path, *NONE_MACHINE, "-drive", drive],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    started.append(wrapper)
    (qemu,) = wait_until(lambda: imglock_holders(image), what="QEMU holds the image")
    pid = qemu.pid
    assert pid is not None
    qmp = wait_until(lambda: _qmp_socket_of(pid), what="QEMU's private QMP socket")
    assert qmp is not None
    wait_until(qmp.exists, what="the QMP socket exists")

    st = os.lstat(qmp.parent)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700

    def connect() -> int:
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect(str(qmp))
            except OSError as exc:
                return exc.errno or 0
        return 0

    assert in_child_as_tenant(connect) == errno.EACCES
    wrapper.send_signal(signal.SIGTERM)
    assert wrapper.wait(timeout=20) in (0, 128 + signal.SIGTERM), wrapper.stderr
    assert not qmp.parent.exists()


# --------------------------------------------------------------------------
# Root over a user-writable datastore and lockspace


@pytest.mark.parametrize("planted", ["symlink to a file", "dangling symlink", "fifo"])
def test_a_lock_file_planted_in_the_lockspace_is_refused_and_its_target_untouched(
    datastore: Path, victim: Path, imglock_cli: Any, planted: str
) -> None:
    image = datastore / "disk.raw"
    space = datastore / "lockspace"
    as_tenant("mkdir", space)
    lock = space / lock_file_name(str(image), image.stat())
    missing = victim.with_name("created-by-root")
    plant: dict[str, list[str | Path]] = {
        "symlink to a file": ["ln", "-s", victim, lock],
        "dangling symlink": ["ln", "-s", missing, lock],
        "fifo": ["mkfifo", lock],
    }
    as_tenant(*plant[planted])
    before = fingerprint(victim)

    with pytest.raises(imglock.ImageError):
        imglock.claim(image, lockspace=str(space))
    proc = imglock_cli("run", "--lockspace", space, "--image", image, "--", "true", timeout=10)
    assert proc.returncode == 66 and str(lock) in proc.stderr
    assert fingerprint(victim) == before
    assert not missing.exists()


def test_an_image_linked_to_a_system_file_is_read_and_locked_never_written(
    datastore: Path, imglock_cli: Any
) -> None:
    shadow = Path("/etc/shadow")
    link = datastore / "vm.raw"
    as_tenant("ln", "-s", shadow, link)
    before = fingerprint(shadow)
    had_record_dir = (shadow.parent / RECORD_DIR).exists()

    assert imglock_cli("info", link).returncode == 0
    assert imglock_cli("status", link).returncode == 0
    assert imglock_cli("run", "--image", link, "--", "true").returncode == 0
    with imglock.claim(link) as claim:
        assert claim.held and imglock_holders(shadow)
        assert (datastore / RECORD_DIR).is_dir()  # the record goes beside the link
    assert fingerprint(shadow) == before
    assert (shadow.parent / RECORD_DIR).exists() == had_record_dir
