"""``imglock doctor``: whether a directory's locks are shared between hosts.

The mount rules are checked on mountinfo lines as the kernel writes them
(NFS with and without nolock/local_lock, FUSE, local filesystems); the probe
on a real local directory, from two "hosts" that are namespaces of this
one machine: each sees the other's probe lock, and each knows it proves
nothing, because the other's lock is in its own kernel's /proc/locks.
(tests/test_two_hosts_doctor.py runs the probe across GlusterFS mounts.)
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ImglockCli
from soak_worker import REPO, on_host

from imglock.lock.mounts import parse_mountinfo
from imglock.lock.sharing import Verdict, assess, mount_of, slot_offsets

EX_NOT_SHOWN = 1


def mount_line(fstype: str, source: str, options: str, point: str = "/mnt/store") -> str:
    return f"36 25 0:42 / {point} rw,relatime shared:1 - {fstype} {source} {options}\n"


@pytest.mark.parametrize(
    ("fstype", "source", "options", "verdict", "why"),
    [
        ("nfs", "srv:/export", "rw,vers=3,addr=10.0.0.1", Verdict.SHARED, "NLM"),
        ("nfs", "srv:/export", "rw,vers=3,nolock,addr=10.0.0.1", Verdict.LOCAL, "nolock"),
        ("nfs4", "srv:/export", "rw,vers=4.2,local_lock=none", Verdict.SHARED, "NFSv4"),
        ("nfs4", "srv:/export", "rw,vers=4.2,local_lock=posix", Verdict.LOCAL, "local_lock=posix"),
        ("nfs4", "srv:/export", "rw,vers=4.2,local_lock=all", Verdict.LOCAL, "local_lock=all"),
        # local_lock=flock keeps flock(2) local; fcntl locks still go to the server.
        ("nfs4", "srv:/export", "rw,vers=4.2,local_lock=flock", Verdict.SHARED, "NFSv4"),
        ("ceph", "10.0.0.1:6789:/", "rw,name=admin", Verdict.SHARED, "MDS"),
        ("fuse.glusterfs", "vm:imglock", "rw,user_id=0", Verdict.SHARED, "lock translator"),
        ("gfs2", "/dev/mapper/shared", "rw", Verdict.SHARED, "DLM"),
        ("gfs2", "/dev/mapper/shared", "rw,localflocks", Verdict.LOCAL, "localflocks"),
        ("cifs", "//srv/share", "rw,nobrl", Verdict.LOCAL, "nobrl"),
        ("ext4", "/dev/sda1", "rw", Verdict.LOCAL, "local filesystem"),
        ("xfs", "/dev/mapper/san-lun", "rw", Verdict.LOCAL, "lockspace"),
        ("tmpfs", "tmpfs", "rw", Verdict.LOCAL, "this host only"),
        ("fuse.sshfs", "me@srv:", "rw", Verdict.UNKNOWN, "FUSE"),
        ("9p", "share", "rw,trans=virtio", Verdict.UNKNOWN, "probe"),
    ],
)
def test_the_mount_tells_whether_locks_can_be_shared(
    fstype: str, source: str, options: str, verdict: Verdict, why: str
) -> None:
    (mount,) = parse_mountinfo([mount_line(fstype, source, options)])
    assessment = assess(mount)
    assert assessment.verdict == verdict
    assert why in assessment.reason


def test_mountinfo_escapes_and_optional_fields_are_read() -> None:
    line = "40 25 0:50 / /srv/vm\\040store rw shared:3 master:2 - nfs4 srv:/a\\040b rw,vers=4.1\n"
    (mount,) = parse_mountinfo(["garbage\n", line])
    assert (mount.mount_point, mount.fstype, mount.source) == ("/srv/vm store", "nfs4", "srv:/a b")
    assert mount.option("vers") == "4.1" and mount.option("nolock") is None
    assert mount.device == (0, 50)


def test_the_mount_of_a_directory_is_the_innermost_one(tmp_path: Path) -> None:
    mount = mount_of(str(tmp_path))
    assert str(tmp_path).startswith(mount.mount_point)
    st = os.stat(tmp_path)
    assert mount.device == (os.major(st.st_dev), os.minor(st.st_dev))


def test_a_probe_name_is_spelled_in_bytes_no_two_of_which_touch() -> None:
    offsets = slot_offsets(7, "host-a")
    assert len(offsets) == 1 + len("host-a")
    assert all(b - a > 1 for a, b in itertools.pairwise(offsets))


def test_a_local_directory_reports_local_and_exits_1(
    tmp_path: Path, imglock_cli: ImglockCli
) -> None:
    proc = imglock_cli("doctor", tmp_path)
    assert proc.returncode == EX_NOT_SHOWN
    assert "locks stay on this host" in proc.stdout and str(tmp_path) in proc.stdout
    proc = imglock_cli("doctor", "--json", tmp_path)
    report = json.loads(proc.stdout)
    assert report["shared"] is False and report["mount"]["verdict"] == "local"
    assert report["probe"] is None


def test_a_missing_directory_is_one_line_and_status_66(
    tmp_path: Path, imglock_cli: ImglockCli
) -> None:
    proc = imglock_cli("doctor", tmp_path / "nowhere")
    assert proc.returncode == 66, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert str(tmp_path / "nowhere") in line and "Traceback" not in proc.stderr


def test_a_symlink_planted_as_the_probe_file_is_never_followed(
    tmp_path: Path, imglock_cli: ImglockCli
) -> None:
    target = tmp_path / "victim"
    (tmp_path / ".imglock-probe").symlink_to(target)
    proc = imglock_cli("doctor", "--probe", "--wait", "0", tmp_path)
    assert proc.returncode == 66
    (line,) = proc.stderr.splitlines()
    assert ".imglock-probe" in line and "probe file" in line
    assert not target.exists()


def test_two_namespaces_of_one_machine_see_each_other_and_know_it_proves_nothing(
    tmp_path: Path,
) -> None:
    def doctor(host: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*on_host(host), sys.executable, "-m", "imglock", "doctor", "--json",
             "--probe", "--wait", "20", str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": REPO},
        )  # fmt: skip

    first, second = doctor("host-a"), doctor("host-b")
    try:
        out_a, err_a = first.communicate(timeout=60)
        out_b, err_b = second.communicate(timeout=60)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert (first.returncode, second.returncode) == (EX_NOT_SHOWN, EX_NOT_SHOWN), err_a + err_b
    for out, me, other in ((out_a, "host-a", "host-b"), (out_b, "host-b", "host-a")):
        report = json.loads(out)
        assert report["shared"] is False
        assert report["probe"] == {
            "host": me,
            "verdict": "unknown",
            "peers": [{"host": other, "same-kernel": True}],
        }
