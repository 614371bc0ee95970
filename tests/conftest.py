"""Fixtures shared by the whole suite.

QEMU-dependent tests ask for the ``qemu_img`` or ``qemu_system`` fixture.
On a machine without QEMU they are skipped with a reason, except where
``IMGLOCK_REQUIRE_QEMU=1`` is set (as ``.ci/run`` does): there a missing
QEMU is an error, so a CI run can never pass by skipping them.

Two-host tests ask for the ``datastore`` fixture: hosts A, B and C on a
shared filesystem (tests/support/shared_fs.py), once on GlusterFS
(tests/support/gluster_hosts.py, marked ``gluster``) and once on CephFS
(tests/support/cephfs_hosts.py, marked ``cephfs``).  Likewise each is skipped with a
reason where that filesystem is not mounted, and fails instead under
``IMGLOCK_REQUIRE_GLUSTER=1`` or ``IMGLOCK_REQUIRE_CEPHFS=1``.

The tests are grouped by what they specify (library/, cli/, qemu/, hosts/,
faults/); the helpers they share, and the scripts they run, are in support/,
which pytest's ``pythonpath`` (pyproject.toml) puts on the import path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cephfs_hosts
import gluster_hosts
import pytest
from qemu_vm import QemuVMs
from shared_fs import Datastore
from wrapped_vm import WrappedVMs

import imglock

REQUIRE_QEMU = os.environ.get("IMGLOCK_REQUIRE_QEMU") == "1"
REQUIRE_GLUSTER = os.environ.get("IMGLOCK_REQUIRE_GLUSTER") == "1"
REQUIRE_CEPHFS = os.environ.get("IMGLOCK_REQUIRE_CEPHFS") == "1"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if REQUIRE_QEMU:
            pytest.fail(f"{name} is required (IMGLOCK_REQUIRE_QEMU=1) but not installed")
        pytest.skip(f"{name} is not installed")
    return path


@pytest.fixture(scope="session")
def qemu_img_path() -> str:
    return _tool("qemu-img")


@pytest.fixture(scope="session")
def qemu_system_path() -> str:
    return _tool("qemu-system-x86_64")


QemuImg = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def qemu_img(qemu_img_path: str) -> QemuImg:
    """Run qemu-img with the given arguments; raise with its stderr if it fails."""

    def run(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [qemu_img_path, *(os.fspath(arg) for arg in args)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"qemu-img {' '.join(map(str, args))} failed: {proc.stderr}")
        return proc

    return run


ImglockCli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def imglock_cli() -> ImglockCli:
    """Run the real ``imglock`` command in a subprocess (``python -m imglock``)."""

    def run(
        *args: str | os.PathLike[str], timeout: float = 30, **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            [sys.executable, "-m", "imglock", *(os.fspath(arg) for arg in args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,
        )

    return run


@pytest.fixture
def raw_image(tmp_path: Path) -> Path:
    """A 1 MiB raw image."""
    path = tmp_path / "disk.raw"
    with path.open("wb") as f:
        f.truncate(1 << 20)
    return path


CLAIMER = str(Path(__file__).with_name("support") / "claimer.py")
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}


def imglock_holders(image: Path, lockspace: str | None = None) -> list[imglock.Holder]:
    """The image's holders that hold it through imglock (not QEMU's own lock bytes)."""
    return [h for h in imglock.holders(image, lockspace=lockspace) if h.layer == "imglock"]


def waiting_pids(image: Path) -> list[int | None]:
    """The pids in the image's queue, first come first (None: a waiter another host names)."""
    return [w.pid for w in imglock.inspect(image).waiting]


@dataclass
class Rival:
    proc: subprocess.Popen[str]
    reply: dict[str, object]

    @property
    def ok(self) -> bool:
        return bool(self.reply["ok"])

    def stop(self) -> None:
        """Close its stdin: it releases and exits."""
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=10)


SpawnRival = Callable[..., Rival]


@pytest.fixture
def rival() -> Iterator[SpawnRival]:
    """Start claimer processes; every one still alive is killed afterwards."""
    procs: list[subprocess.Popen[str]] = []

    def spawn(*args: str | os.PathLike[str], prefix: list[str] | None = None) -> Rival:
        proc = subprocess.Popen(
            [*(prefix or []), sys.executable, CLAIMER, *(os.fspath(arg) for arg in args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"claimer died without a word (status {proc.wait()})"
        return Rival(proc, json.loads(line))

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def qemu_vms(qemu_system_path: str) -> Iterator[QemuVMs]:
    """Plain QEMUs (no ``imglock run``): all of them ended afterwards."""
    with QemuVMs(qemu_system_path) as vms:
        yield vms


@pytest.fixture
def vms(qemu_system_path: str) -> Iterator[WrappedVMs]:
    """QEMUs under ``imglock run``: all of them, and their wrappers, ended afterwards."""
    with WrappedVMs(qemu_system_path) as wrapped:
        yield wrapped


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """Background processes a test starts (it appends them): all ended and reaped afterwards."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@dataclass(frozen=True)
class SharedFilesystem:
    """A filesystem the two-host suite runs on: how to tell it is there, and how to use it."""

    #: The variable that makes a missing rig a failure rather than a skip.
    required_by: str
    required: bool
    unavailable_reason: Callable[[], str | None]
    open: Callable[[], Datastore]


SHARED_FILESYSTEMS = {
    "glusterfs": SharedFilesystem(
        "IMGLOCK_REQUIRE_GLUSTER",
        REQUIRE_GLUSTER,
        gluster_hosts.unavailable_reason,
        gluster_hosts.Datastore,
    ),
    "cephfs": SharedFilesystem(
        "IMGLOCK_REQUIRE_CEPHFS",
        REQUIRE_CEPHFS,
        cephfs_hosts.unavailable_reason,
        cephfs_hosts.Datastore,
    ),
}


@pytest.fixture(
    params=[
        pytest.param("glusterfs", marks=pytest.mark.gluster),
        pytest.param("cephfs", marks=pytest.mark.cephfs),
    ]
)
def datastore(request: pytest.FixtureRequest) -> Iterator[Datastore]:
    """Hosts A, B and C on one shared filesystem, in a directory of the test's own.

    Hosts a test crashes or hangs are mounted for it alone, and unmounted
    afterwards; the shared mounts are left as they were.
    """
    filesystem = SHARED_FILESYSTEMS[request.param]
    reason = filesystem.unavailable_reason()
    if reason is not None:
        if filesystem.required:
            pytest.fail(f"two-host tests are required ({filesystem.required_by}=1): {reason}")
        pytest.skip(reason)
    store = filesystem.open()
    try:
        yield store
    finally:
        store.close()
