"""``imglock doctor`` on two hosts of a GlusterFS volume: the locks are shown shared.

From the mount alone (fuse.glusterfs), and from the probe run on host A and
host B at once: each sees the other's probe lock through the lock manager,
names the other host, and does not find that lock in its own kernel.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from gluster_hosts import Datastore

pytestmark = pytest.mark.gluster


def test_the_mount_says_the_locks_are_shared(datastore: Datastore) -> None:
    for host in (datastore.a, datastore.b):
        proc = host.imglock("doctor", "--json", host.dir)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["shared"] is True
        assert report["mount"]["fstype"] == "fuse.glusterfs"
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
