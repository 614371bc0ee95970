"""``imglock doctor``: whether a directory's locks are shared between hosts.

The mount rules are checked on mountinfo lines as the kernel writes them
(NFS with and without nolock/local_lock, FUSE, local filesystems); the probe
on a real local directory, from two "hosts" that are namespaces of this
one machine: each sees the other's probe lock, and each knows it proves
nothing, because the other's lock is in its own kernel's /proc/locks.
(tests/hosts/test_two_hosts_doctor.py runs the probe across GlusterFS mounts.)
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

from imglock.lock.datastore import (
    Reading,
    Setting,
    ceph_settings,
    cluster_settings,
    gluster_settings,
    nfs_settings,
    parse_lease_time,
    read_gluster_meta,
)
from imglock.lock.mounts import Mount, parse_mountinfo
from imglock.lock.sharing import PROBE_FILE, Verdict, assess, mount_of, slot_offsets

EX_NOT_SHOWN = 1
EX_NOINPUT = 66
#: The deadline the judgements below are made against (imglock run's default).
DEADLINE = 2.0


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


def mount(fstype: str, source: str, options: str) -> Mount:
    (parsed,) = parse_mountinfo([mount_line(fstype, source, options)])
    return parsed


def by_name(settings: list[Setting]) -> dict[str, Setting]:
    return {setting.name: setting for setting in settings}


READ = "read here"
UNREAD = Reading(None, "how to check it")


@pytest.mark.parametrize(
    ("value", "safe", "fix"),
    [
        ("on", True, None),
        ("off", False, "gluster volume set vmstore client.strict-locks on"),
    ],
)
def test_gluster_strict_locks_off_is_unsafe_and_the_fix_names_the_volume(
    value: str, safe: bool, fix: str | None
) -> None:
    strict = by_name(gluster_settings("vmstore", Reading(value, READ), UNREAD, DEADLINE))[
        "client.strict-locks"
    ]
    assert (strict.value, strict.safe, strict.fix, strict.source) == (value, safe, fix, READ)


def test_a_setting_not_read_is_not_judged_and_says_how_to_check_it() -> None:
    strict, ping = gluster_settings("vmstore", UNREAD, UNREAD, DEADLINE)
    for setting in (strict, ping):
        assert (setting.value, setting.safe, setting.fix) == (None, None, None)
        assert setting.check == "how to check it"
    assert "a brick restart erases every lock" in strict.why


@pytest.mark.parametrize(
    ("seconds", "safe"),
    [("42", True), ("3", True), ("2", False), ("1", False), ("0", True)],
)
def test_gluster_ping_timeout_must_outlast_the_lock_check_deadline(
    seconds: str, safe: bool
) -> None:
    _strict, ping = gluster_settings("vmstore", UNREAD, Reading(seconds, READ), DEADLINE)
    assert ping.safe is safe
    if seconds == "0":
        assert "never gives up" in ping.why
    if not safe:
        assert ping.fix == (
            f"gluster volume set vmstore network.ping-timeout 42 "
            f"(or a lock-check deadline under {seconds} s)"
        )


def test_a_fix_asks_for_more_than_the_default_when_the_deadline_does() -> None:
    _strict, ping = gluster_settings("vmstore", UNREAD, Reading("42", READ), 60.0)
    assert ping.safe is False and ping.fix is not None
    assert ping.fix.startswith("gluster volume set vmstore network.ping-timeout 120 ")


def test_no_timeout_outlasts_a_deadline_of_forever() -> None:
    _strict, ping = gluster_settings("vmstore", UNREAD, Reading("42", READ), float("inf"))
    assert (ping.safe, ping.fix) == (False, "a lock-check deadline under 42 s")


@pytest.mark.parametrize(
    ("options", "name", "value", "safe", "fix"),
    [
        ("rw,vers=3", "nolock", "unset", True, None),
        ("rw,vers=3,nolock", "nolock", "set", False,
         "umount /mnt/store && mount -t nfs -o lock srv:/export /mnt/store"),
        ("rw,vers=3", "local_lock", "none", True, None),
        ("rw,vers=3,local_lock=posix", "local_lock", "posix", False,
         "umount /mnt/store && mount -t nfs -o local_lock=none srv:/export /mnt/store"),
        ("rw,vers=3,local_lock=flock", "local_lock", "flock", True, None),
    ],
)  # fmt: skip
def test_nfs_mount_options_that_keep_locks_local_are_unsafe(
    options: str, name: str, value: str, safe: bool, fix: str | None
) -> None:
    settings = by_name(nfs_settings(mount("nfs", "srv:/export", options), UNREAD, UNREAD, DEADLINE))
    assert (settings[name].value, settings[name].safe, settings[name].fix) == (value, safe, fix)


def test_nfsv3_has_no_lease_and_does_not_re_take_lost_locks() -> None:
    settings = nfs_settings(mount("nfs", "srv:/export", "rw,vers=3"), UNREAD, UNREAD, DEADLINE)
    assert [s.name for s in settings] == ["nolock", "local_lock"]


@pytest.mark.parametrize(("recover", "safe"), [("N", True), ("Y", False), (None, None)])
def test_nfsv4_recover_lost_locks_y_makes_a_lost_lock_silent(
    recover: str | None, safe: bool | None
) -> None:
    nfs4 = mount("nfs4", "srv:/export", "rw,vers=4.2")
    reading = Reading(recover, READ) if recover else UNREAD
    setting = by_name(nfs_settings(nfs4, UNREAD, reading, DEADLINE))["recover_lost_locks"]
    assert setting.safe is safe
    if safe is False:
        assert "re-takes the locks it lost" in setting.why
        assert setting.fix is not None
        assert setting.fix.startswith("echo N > /sys/module/nfs/parameters/recover_lost_locks")
    if safe is None:
        assert setting.check == "how to check it"


@pytest.mark.parametrize(("lease", "safe"), [("90", True), ("2", False), (None, None)])
def test_nfsv4_lease_time_must_outlast_the_lock_check_deadline(
    lease: str | None, safe: bool | None
) -> None:
    nfs4 = mount("nfs4", "srv:/export", "rw,vers=4.2")
    reading = Reading(lease, READ) if lease else UNREAD
    setting = by_name(nfs_settings(nfs4, reading, UNREAD, DEADLINE))["lease_time"]
    assert setting.safe is safe
    assert "keeps its locks" in setting.why and "deadline (2 s) must be shorter" in setting.why


MOUNTSTATS = """\
device proc mounted on /proc with fstype proc
device srv:/export mounted on /srv/vm\\040store with fstype nfs4 statvers=1.1
\topts:\trw,vers=4.2,rsize=1048576,local_lock=none
\tage:\t4217
\tcaps:\tcaps=0x3ffbffff,wtmult=512,dtsize=1048576,bsize=0,namlen=255
\tnfsv4:\tbm0=0xfdffbfff,acl=0x3,sessions,pnfs=not configured,lease_time=45,lease_expired=0
\tsec:\tflavor=1,pseudoflavor=1
device other:/x mounted on /mnt/other with fstype nfs4 statvers=1.1
\tnfsv4:\tbm0=0xfdffbfff,lease_time=90,lease_expired=0
"""


def test_the_lease_time_is_read_from_the_mounts_own_nfs_statistics() -> None:
    assert parse_lease_time(MOUNTSTATS, "/srv/vm store") == "45"
    assert parse_lease_time(MOUNTSTATS, "/mnt/other") == "90"
    assert parse_lease_time(MOUNTSTATS, "/proc") is None


@pytest.mark.parametrize(
    ("options", "value", "safe"),
    [
        ("rw,name=admin", "no", True),
        ("rw,name=admin,recover_session=no", "no", True),
        ("rw,name=admin,recover_session=clean", "clean", False),
    ],
)
def test_cephfs_kernel_recover_session_clean_reconnects_without_the_locks(
    options: str, value: str, safe: bool
) -> None:
    ceph = mount("ceph", "10.0.0.1:6789:/", options)
    setting = by_name(ceph_settings(ceph, UNREAD, UNREAD, UNREAD, DEADLINE))["recover_session"]
    assert (setting.value, setting.safe, setting.source) == (value, safe, "mount options")
    if not safe:
        assert "reconnects by itself without its locks" in setting.why
        assert setting.fix == (
            "umount /mnt/store && mount -t ceph -o recover_session=no 10.0.0.1:6789:/ /mnt/store"
        )


@pytest.mark.parametrize(("value", "safe"), [("false", True), ("true", False), (None, None)])
def test_ceph_fuse_client_reconnect_stale_true_reconnects_without_the_locks(
    value: str | None, safe: bool | None
) -> None:
    fuse = mount("fuse.ceph-fuse", "ceph-fuse", "rw,user_id=0")
    reading = Reading(value, READ) if value else UNREAD
    settings = by_name(ceph_settings(fuse, reading, UNREAD, UNREAD, DEADLINE))
    assert "recover_session" not in settings
    assert settings["client_reconnect_stale"].safe is safe


def test_cephfs_session_timeouts_say_how_long_a_dead_hosts_locks_stay() -> None:
    ceph = mount("ceph", "admin@fsid.vmfs=/", "rw,name=admin")
    settings = by_name(
        ceph_settings(ceph, UNREAD, Reading("60", READ), Reading("1", READ), DEADLINE)
    )
    assert settings["session_timeout"].safe is True
    autoclose = settings["session_autoclose"]
    assert autoclose.safe is False
    assert "locks stay held 1 s" in autoclose.why
    assert autoclose.fix is not None and autoclose.fix.startswith(
        "ceph fs set vmfs session_autoclose 300 "
    )


@pytest.mark.parametrize(("options", "safe"), [("rw", True), ("rw,localflocks", False)])
def test_gfs2_localflocks_keeps_locks_on_this_host(options: str, safe: bool) -> None:
    (setting,) = cluster_settings(mount("gfs2", "/dev/mapper/shared", options))
    assert (setting.name, setting.safe) == ("localflocks", safe)


def test_a_gluster_clients_meta_tree_gives_its_volume_and_settings(tmp_path: Path) -> None:
    graph = tmp_path / ".meta/graphs/active"
    for brick, strict in (("0", "on"), ("1", "off")):
        options = graph / f"vmstore-client-{brick}" / "options"
        options.mkdir(parents=True)
        (options / "strict-locks").write_text(f"{strict}\n")
        (options.parent / "private").write_text(
            f"[xlator.protocol.client.vmstore-client-{brick}.priv]\nconnected = 1\n"
            "ping_timeout = 20\n"
        )
    (graph / "vmstore-dht").mkdir()
    meta = read_gluster_meta(str(tmp_path))
    assert meta is not None
    assert (meta.volume, meta.strict_locks, meta.ping_timeout) == ("vmstore", ("on", "off"), "20")
    assert meta.xlator == str(graph / "vmstore-client-0")
    assert read_gluster_meta(str(tmp_path / "nowhere")) is None


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
    assert (report["settings"], report["silent-loss"]) == ([], False)


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


def test_a_probe_file_is_created_new_and_readable_by_others_at_most(
    tmp_path: Path, imglock_cli: ImglockCli
) -> None:
    proc = imglock_cli("doctor", "--probe", "--wait", "0", tmp_path, preexec_fn=lambda: os.umask(0))
    assert proc.returncode == EX_NOT_SHOWN, proc.stderr
    st = (tmp_path / PROBE_FILE).lstat()
    assert (st.st_size, st.st_mode & 0o7777) == (0, 0o644)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file away")
def test_a_probe_file_planted_by_another_user_is_refused(
    tmp_path: Path, imglock_cli: ImglockCli
) -> None:
    planted = tmp_path / PROBE_FILE
    planted.touch(mode=0o644)
    os.chown(planted, 4242, 4242)
    proc = imglock_cli("doctor", "--probe", "--wait", "0", tmp_path)
    assert proc.returncode == EX_NOINPUT
    (line,) = proc.stderr.splitlines()
    assert f"{planted}: the probe file belongs to uid 4242" in line


def test_a_fifo_planted_as_the_probe_file_is_refused_without_blocking(
    tmp_path: Path, imglock_cli: ImglockCli
) -> None:
    os.mkfifo(tmp_path / PROBE_FILE)
    proc = imglock_cli("doctor", "--probe", "--wait", "0", tmp_path, timeout=20)
    assert proc.returncode == EX_NOINPUT
    (line,) = proc.stderr.splitlines()
    assert "the probe file is not a regular file" in line


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
