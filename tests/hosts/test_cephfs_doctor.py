"""``imglock doctor`` on CephFS: what a client eviction or a dead host does to locks.

Read on a real one-node cluster through ceph-fuse (tests/cephfs/up): the
client's ``client_reconnect_stale`` from its admin socket (the ceph-fuse
process serving the mount, found by its mount point), and the filesystem's
``session_timeout`` and ``session_autoclose`` from ``ceph fs get``, with
the client's own configuration file.  The rig's defaults are safe; a
client that reconnects stale (an evicted client writing again through a
new descriptor) makes ``doctor`` refuse the datastore (exit 78) and print
the command that fixes it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cephfs_hosts import Datastore

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
