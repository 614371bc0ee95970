"""imglock(7), THE FLOCK LAYER, across hosts: a VMM that takes flock(2) and an imglock claim
on another host exclude each other, on every shared filesystem.

How differs: on CephFS flock is a lock of its own, apart from fcntl locks,
so a claim takes a flock too (``--flock auto``); on GlusterFS (as on NFS)
the client turns a flock into a whole-file fcntl lock, which meets the
claim's byte locks, so a claim takes none.  The flock side is util-linux's
``flock(1)``, as crosvm or cloud-hypervisor lock a disk.
"""

from __future__ import annotations

import json
import subprocess

from processes import wait_until
from shared_fs import Datastore, Host

EX_TEMPFAIL = 75
#: flock(1)'s status when -n finds the file locked (its -E default).
FLOCK_CONFLICT = 1


def raw(datastore: Datastore, name: str) -> str:
    path = datastore.a.path(name)
    with path.open("wb") as f:
        f.truncate(1 << 20)
    return name


def held_by_imglock(host: Host, name: str) -> bool:
    proc = host.imglock("status", "--json", host.path(name))
    (report,) = json.loads(proc.stdout)
    return any(h["layer"] == "imglock" for h in report["holders"])


def test_a_claim_on_one_host_keeps_a_flock_user_on_the_other_out(datastore: Datastore) -> None:
    name = raw(datastore, "disk.raw")
    a, b, _c = datastore.hosts
    holder = a.popen(
        ["python3", "-m", "imglock", "run", "--image", a.path(name), "--", "sleep", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        # The holder byte is the last a claim takes (after its flock).
        wait_until(lambda: held_by_imglock(b, name), what="the claim on A, seen from B")
        # A writable disk's flock.  (A read-only disk's shared flock meets
        # the claim only where flock is a lock of its own: on GlusterFS and
        # NFS it becomes a whole-file read lock, which read locks let in.)
        proc = b.run(["flock", "-n", "-x", b.path(name), "true"])
        assert proc.returncode == FLOCK_CONFLICT, (
            proc.stderr,
            a.imglock("status", a.path(name)).stdout,
        )
    finally:
        holder.kill()
        holder.wait()


def test_a_flock_user_on_one_host_keeps_a_claim_on_the_other_out(datastore: Datastore) -> None:
    name = raw(datastore, "disk.raw")
    a, b, _c = datastore.hosts
    vmm = b.popen(["flock", "-x", b.path(name), "sleep", "60"])
    try:
        wait_until(
            lambda: a.run(["flock", "-n", "-s", a.path(name), "true"]).returncode == FLOCK_CONFLICT,
            what="B's flock, seen from A",
        )
        proc = a.imglock("run", "--image", a.path(name), "--", "true")
        assert proc.returncode == EX_TEMPFAIL, proc.stderr
        assert str(a.path(name)) in proc.stderr
    finally:
        vmm.kill()
        vmm.wait()
