"""``imglock doctor`` on CephFS: what a client eviction or a dead host does to locks.

Read on a real one-node cluster through ceph-fuse (tests/cephfs/up): the
client's ``client_reconnect_stale`` from its admin socket (the ceph-fuse
process serving the mount, found by its mount point), and the filesystem's
``session_timeout`` and ``session_autoclose`` from ``ceph fs get``, with
the client's own configuration file.  The rig's defaults are safe; a
client that reconnects stale (an evicted client writing again through a
new descriptor) makes ``doctor`` refuse the datastore (exit 78) and print
the command that fixes it.  What ``doctor`` tells an operator to do about a
dead host (evict its session, found with the command it names) frees that
host's images at once, rather than after ``session_autoclose``.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from cephfs_hosts import Datastore, ceph
from conftest import imglock_holders
from processes import wait_until

#: The two-host datastore fixture (conftest.py), on CephFS alone.
on_cephfs = pytest.mark.parametrize(
    "datastore", [pytest.param("cephfs", marks=pytest.mark.cephfs)], indirect=True
)

EX_SHARED = 0
#: doctor's status for a datastore that shares locks but may lose one silently.
EX_CONFIG = 78


def doctor(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``imglock doctor`` from the machine's own PID namespace, where the rig's
    ceph-fuse clients run (a host's namespace of the two-host tests shows
    only its own processes)."""
    return subprocess.run(
        [sys.executable, "-m", "imglock", "doctor", *map(str, args)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def settings_of(report: dict[str, object]) -> dict[str, dict[str, object]]:
    settings = report["settings"]
    assert isinstance(settings, list)
    return {setting["name"]: setting for setting in settings}


@on_cephfs
def test_the_rig_s_defaults_are_read_and_judged_safe(datastore: Datastore) -> None:
    cephfs = datastore
    proc = doctor("--json", cephfs.a.dir)
    report = json.loads(proc.stdout)
    assert proc.returncode == EX_SHARED, proc.stderr
    settings = settings_of(report)
    assert settings["client_reconnect_stale"]["value"] == "false"
    assert settings["client_reconnect_stale"]["safe"] is True
    assert str(settings["client_reconnect_stale"]["source"]).endswith(".asok")
    assert (settings["session_timeout"]["value"], settings["session_timeout"]["safe"]) == (
        "60",
        True,
    )
    assert settings["session_autoclose"]["safe"] is True
    assert report["silent-loss"] is False


@on_cephfs
def test_a_client_that_reconnects_stale_is_refused_with_the_fix(datastore: Datastore) -> None:
    stale = datastore.own_host("host-a", "--client_reconnect_stale=true")
    proc = doctor("--json", stale.dir)
    assert proc.returncode == EX_CONFIG, proc.stdout
    setting = settings_of(json.loads(proc.stdout))["client_reconnect_stale"]
    assert (setting["value"], setting["safe"]) == ("true", False)
    assert "client_reconnect_stale false" in str(setting["fix"])
    text = doctor(stale.dir)
    assert text.returncode == EX_CONFIG
    assert "client_reconnect_stale true" in text.stdout + text.stderr


#: The commands doctor's session_autoclose line gives, in backquotes.
QUOTED = re.compile(r"`ceph ([^`]*)`")


@on_cephfs
def test_the_eviction_doctor_names_frees_a_dead_host_s_images_at_once(
    datastore: Datastore, started: list[subprocess.Popen[str]]
) -> None:
    dead = datastore.own_host("host-d")  # a client of its own, to kill
    image = dead.path("vm.raw")
    with image.open("wb") as f:
        f.truncate(1 << 20)
    started.append(
        dead.popen(
            [sys.executable, "-m", "imglock", "run", "--image", image, "--", "sleep", "600"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    )  # fmt: skip
    on_b = datastore.b.path("vm.raw")
    wait_until(lambda: imglock_holders(on_b), what="host D's claim", timeout=30)
    # Asked before the host dies: the dead client's capabilities would stall a look-up.
    autoclose = settings_of(json.loads(doctor("--json", datastore.b.dir).stdout))[
        "session_autoclose"
    ]
    evict, listing = (shlex.split(command) for command in QUOTED.findall(str(autoclose["why"])))
    assert evict[-1] == "id=SESSION", autoclose["why"]

    dead.crash()  # its session, and its locks, stay until session_autoclose (300 s)
    listed = json.loads(ceph(*listing, "--format", "json"))
    assert dead.session in [entry["id"] for entry in listed], listed
    ceph(*evict[:-1], f"id={dead.session}")
    # Host B gets the image now, not minutes later.
    claim = datastore.b.imglock("run", "--image", on_b, "--", "true")
    assert claim.returncode == 0, claim.stderr
