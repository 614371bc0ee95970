"""``imglock doctor`` on two hosts of a shared filesystem: the locks are shown shared.

On each filesystem (tests/support/shared_fs.py), from the mount alone (its type,
fuse.glusterfs or fuse.ceph-fuse), and from the probe run on host A and
host B at once: each sees the other's probe lock through the lock manager,
names the other host, and does not find that lock in its own kernel.

Then, on GlusterFS alone, what a brick restart would do to a lost lock: on the fault tests'
volume (imglock-faults), ``client.strict-locks`` on makes the datastore
pass, off makes ``doctor`` refuse it (exit 78) and print the command that
fixes it, which does.  The setting comes from ``gluster volume get`` where
this host's gluster tool answers, else from the client's own ``.meta`` tree.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REQUIRE_GLUSTER, ImglockCli
from gluster_hosts import DEFAULT_STATE_DIR, answers
from shared_fs import Datastore

#: The volume that fault tests (and these) may reconfigure; see tests/gluster/up.
FAULTS_VOLUME = "imglock-faults"
EX_SHARED = 0
#: doctor's status for a datastore that shares locks but may lose one silently.
EX_CONFIG = 78


def gluster(*args: str) -> None:
    subprocess.run(["gluster", "--mode=script", *args], check=True, capture_output=True,
                   timeout=60)  # fmt: skip


@pytest.fixture
def faults_mount() -> Path:
    """Host A's mount of the imglock-faults volume, as tests/gluster/up made it."""
    state = os.environ.get("IMGLOCK_GLUSTER_DIR", DEFAULT_STATE_DIR)
    mount = Path(os.environ.get("IMGLOCK_GLUSTER_FAULTS_A", f"{state}/mnt/fa"))
    if os.geteuid() != 0 or not answers(mount):
        reason = f"no GlusterFS mount of {FAULTS_VOLUME} at {mount} as root (run tests/gluster/up)"
        if REQUIRE_GLUSTER:
            pytest.fail(f"two-host tests are required (IMGLOCK_REQUIRE_GLUSTER=1): {reason}")
        pytest.skip(reason)
    return mount


@pytest.fixture
def strict_locks_off(faults_mount: Path) -> Iterator[Path]:
    """The faults volume with client.strict-locks off; on again afterwards."""
    gluster("volume", "set", FAULTS_VOLUME, "client.strict-locks", "off")
    try:
        yield faults_mount
    finally:
        gluster("volume", "set", FAULTS_VOLUME, "client.strict-locks", "on")


def settings_of(report: dict[str, object]) -> dict[str, dict[str, object]]:
    settings = report["settings"]
    assert isinstance(settings, list)
    return {setting["name"]: setting for setting in settings}


def test_the_mount_says_the_locks_are_shared(datastore: Datastore) -> None:
    for host in (datastore.a, datastore.b):
        proc = host.imglock("doctor", "--json", host.dir)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["shared"] is True
        assert report["mount"]["fstype"] == datastore.fstype
        assert report["mount"]["mount-point"] == str(host.mount)
        assert report["mount"]["verdict"] == "shared"


def test_a_probe_on_two_hosts_at_once_names_the_other_host(datastore: Datastore) -> None:
    a, b, _c = datastore.hosts
    argv = [sys.executable, "-m", "imglock", "doctor", "--probe", "--wait", "30"]
    on_a = a.popen([*argv, a.dir], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        on_b = b.imglock(*argv[3:], b.dir)
        out_a, err_a = on_a.communicate(timeout=60)
    finally:
        if on_a.poll() is None:
            on_a.kill()
            on_a.wait()
    assert (on_a.returncode, on_b.returncode) == (0, 0), err_a + on_b.stderr
    assert f"{a.dir}: probe: host-b seen from host-a: locks on this filesystem are shared" in out_a
    assert f"{b.dir}: probe: host-a seen from host-b: locks on this filesystem are shared" in (
        on_b.stdout
    )


def test_a_probe_alone_shows_nothing_and_says_so(datastore: Datastore) -> None:
    proc = datastore.a.imglock("doctor", "--json", "--probe", "--wait", "0.3", datastore.a.dir)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["shared"] is False and report["mount"]["verdict"] == "shared"
    assert report["probe"] == {"host": "host-a", "verdict": "unknown", "peers": []}


@pytest.mark.gluster
def test_strict_locks_on_pass_with_the_settings_named(
    faults_mount: Path, imglock_cli: ImglockCli
) -> None:
    proc = imglock_cli("doctor", faults_mount)
    assert proc.returncode == EX_SHARED, proc.stdout + proc.stderr
    assert f"{faults_mount}: client.strict-locks on (gluster volume get {FAULTS_VOLUME} " in (
        proc.stdout
    )
    assert "UNSAFE" not in proc.stdout and "refused" not in proc.stdout
    report = json.loads(imglock_cli("doctor", "--json", faults_mount).stdout)
    assert report["shared"] is True and report["silent-loss"] is False
    settings = settings_of(report)
    strict = settings["client.strict-locks"]
    assert (strict["value"], strict["safe"], strict["fix"], strict["check"]) == (
        "on", True, None, None,
    )  # fmt: skip
    ping = settings["network.ping-timeout"]
    assert (ping["value"], ping["safe"]) == ("42", True)
    assert ping["source"] == f"{faults_mount}/.meta/graphs/active/{FAULTS_VOLUME}-client-0/private"


@pytest.mark.gluster
def test_strict_locks_off_is_refused_with_the_command_that_fixes_it(
    strict_locks_off: Path, imglock_cli: ImglockCli
) -> None:
    fix = f"gluster volume set {FAULTS_VOLUME} client.strict-locks on"
    proc = imglock_cli("doctor", strict_locks_off)
    assert proc.returncode == EX_CONFIG, proc.stdout + proc.stderr
    assert proc.stderr == ""
    (line,) = [line for line in proc.stdout.splitlines() if "client.strict-locks" in line]
    assert line.startswith(f"{strict_locks_off}: client.strict-locks off (")
    assert "UNSAFE: off: a brick restart erases every lock" in line
    assert line.endswith(f"; fix: {fix}")
    assert proc.stdout.splitlines()[-1].startswith(f"{strict_locks_off}: refused: ")

    proc = imglock_cli("doctor", "--json", strict_locks_off)
    assert proc.returncode == EX_CONFIG
    report = json.loads(proc.stdout)
    assert report["shared"] is True and report["silent-loss"] is True
    strict = settings_of(report)["client.strict-locks"]
    assert (strict["value"], strict["safe"], strict["fix"]) == ("off", False, fix)

    subprocess.run(shlex.split(fix), check=True, capture_output=True, timeout=60)
    assert imglock_cli("doctor", strict_locks_off).returncode == EX_SHARED


@pytest.mark.gluster
def test_a_deadline_past_the_ping_timeout_is_refused(
    faults_mount: Path, imglock_cli: ImglockCli
) -> None:
    proc = imglock_cli("doctor", "--json", "--check-deadline", "60", faults_mount)
    assert proc.returncode == EX_CONFIG, proc.stderr
    ping = settings_of(json.loads(proc.stdout))["network.ping-timeout"]
    assert (ping["value"], ping["safe"]) == ("42", False)
    assert ping["fix"] == (
        f"gluster volume set {FAULTS_VOLUME} network.ping-timeout 120 "
        "(or a lock-check deadline under 42 s)"
    )


@pytest.mark.gluster
def test_a_host_whose_gluster_tool_cannot_reach_glusterd_reads_the_mounts_meta_tree(
    faults_mount: Path,
) -> None:
    # A network namespace of its own and an empty /run: glusterd is neither
    # at 127.0.0.1 nor behind its socket, as on a host that only mounts.
    isolated = 'mount -t tmpfs tmpfs /run && exec "$@"'
    proc = subprocess.run(
        ["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", isolated, "sh",
         sys.executable, "-m", "imglock", "doctor", "--json", str(faults_mount)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode in (EX_SHARED, EX_CONFIG), proc.stderr
    strict = settings_of(json.loads(proc.stdout))["client.strict-locks"]
    xlator = faults_mount / f".meta/graphs/active/{FAULTS_VOLUME}-client-0"
    assert strict["value"] == (xlator / "options/strict-locks").read_text().strip()
    source = str(strict["source"])
    assert source.startswith(f"{xlator}/options/strict-locks, as the mount was made")
    assert f"`gluster volume get {FAULTS_VOLUME} client.strict-locks` on a server" in source
