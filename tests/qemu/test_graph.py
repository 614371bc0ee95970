"""The claim follows QEMU's block graph through a VM's whole life.

Each test runs a real QEMU under the real ``imglock run`` and changes the
VM's disks through a QMP monitor of its own, as libvirt or a script would:
hot-plug and unplug, snapshots, mirrors, commits, streams, media changes.
After each step it checks, as an operator on another host would, that the
files QEMU writes are claimed exclusive, the files it only reads shared,
and the files it dropped free: with ``imglock status --json`` and with a
rival ``imglock.claim(..., qemu_locks=False)`` in a process of its own.
Every test runs twice: with the locks on the images, and in a lockspace.

The wrapper reads the graph every ``--graph-interval`` seconds (0.1 here)
and at once on block job, tray and device events; the checks poll, up to
a deadline far beyond that bound.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ENV, SpawnRival
from processes import alive, holds_for, wait_until
from qemu_vm import TINY_PC
from wrapped_vm import TIMEOUT, WrappedVM, WrappedVMs

import imglock
from imglock.lock.protocol import Mode
from imglock.run.graph import open_files, unused_nodes

pytestmark = pytest.mark.qemu

EXCLUSIVE, SHARED, SHARED_WRITE, FREE = "exclusive", "shared", "shared-write", None

#: A PC with the guest frozen (-S): enough for devices, no guest code runs.
FROZEN_PC = (*TINY_PC, "-S")


@dataclass
class Lab:
    """Images in a directory, wrapped VMs, and how to look at the images from outside."""

    dir: Path
    vms: WrappedVMs
    qemu_img: str
    rival: SpawnRival
    lockspace: Path | None

    def image(self, name: str, *args: str, size: str = "1M") -> Path:
        """``qemu-img create -f qcow2 ARGS NAME SIZE`` in the lab's directory."""
        path = self.dir / name
        subprocess.run(
            [self.qemu_img, "create", "-q", "-f", "qcow2", *args, path, size],
            check=True, cwd=self.dir, timeout=30,
        )  # fmt: skip
        return path

    def raw(self, name: str) -> Path:
        path = self.dir / name
        with path.open("wb") as f:
            f.truncate(1 << 20)
        return path

    @property
    def space(self) -> list[str]:
        return [] if self.lockspace is None else ["--lockspace", str(self.lockspace)]

    def start(self, *qemu_args: str | Path, machine: tuple[str, ...] = ()) -> WrappedVM:
        options = ["--graph-interval", "0.1", *self.space]
        if machine:
            return self.vms.start(*qemu_args, options=options, machine=machine)
        return self.vms.start(*qemu_args, options=options)

    def modes(self, path: Path) -> dict[int | None, str | None]:
        """pid -> mode of every imglock holder of *path*."""
        space = None if self.lockspace is None else str(self.lockspace)
        return {
            h.pid: h.mode for h in imglock.holders(path, lockspace=space) if h.layer == "imglock"
        }

    def holder_pids(self, path: Path) -> set[int]:
        """Every local process that holds *path*'s imglock claim (its descriptor)."""
        space = None if self.lockspace is None else str(self.lockspace)
        return {
            pid
            for h in imglock.holders(path, lockspace=space)
            if h.layer == "imglock"
            for pid in h.local_pids
        }

    def expect(self, vm: WrappedVM, wanted: Mapping[Path, str | None]) -> None:
        """Wait until every file is held by *vm* as *wanted*, then check it from outside."""

        def reached() -> bool:
            return all(
                self.modes(path) == ({} if mode is None else {vm.qemu_pid: mode})
                for path, mode in wanted.items()
            )

        wait_until(reached, what=f"{wanted} ({vm.stderr()})", timeout=15)
        self._check_status(vm, wanted)
        for path, mode in wanted.items():
            self._check_rival(vm, path, mode)

    def _check_status(self, vm: WrappedVM, wanted: Mapping[Path, str | None]) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "imglock", "status", "--json", *self.space, *wanted],
            capture_output=True, text=True, timeout=30, env=ENV,
        )  # fmt: skip
        assert proc.returncode in (0, 1), proc.stderr
        reports = json.loads(proc.stdout)
        for report, (path, mode) in zip(reports, wanted.items(), strict=True):
            assert report["filename"] == str(path)
            held = [(h["pid"], h["mode"]) for h in report["holders"] if h["layer"] == "imglock"]
            assert held == ([] if mode is None else [(vm.qemu_pid, mode)]), report

    def _check_rival(self, vm: WrappedVM, path: Path, mode: str | None) -> None:
        # A reader conflicts with a writer, a writer with anyone: the
        # weakest claim that must fail shows the mode from outside.
        probe = SHARED if mode in (EXCLUSIVE, SHARED_WRITE) else EXCLUSIVE
        space = [] if self.lockspace is None else ["--lockspace", self.lockspace]
        other = self.rival("--mode", probe, "--no-qemu", "--no-chain", *space, path)
        if mode is None:
            assert other.ok, other.reply
            other.stop()
        else:
            assert not other.ok
            assert f"held imglock {mode} by pid {vm.qemu_pid}" in str(other.reply["error"])


@pytest.fixture(params=["on-images", "in-lockspace"])
def lab(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    qemu_system_path: str,
    qemu_img_path: str,
    rival: SpawnRival,
) -> Iterator[Lab]:
    lockspace = None
    if request.param == "in-lockspace":
        lockspace = tmp_path / "lockspace"
        lockspace.mkdir()
    images = tmp_path / "images"
    images.mkdir()
    with WrappedVMs(qemu_system_path) as vms:
        yield Lab(images, vms, qemu_img_path, rival, lockspace)


def blockdev(path: Path, name: str, **format_options: object) -> list[str]:
    """-blockdev options for a qcow2 file: a file node NAME-file and a format node NAME,
    as libvirt writes them."""
    storage = {"driver": "file", "filename": str(path), "node-name": f"{name}-file"}
    node = {"driver": "qcow2", "file": f"{name}-file", "node-name": name, **format_options}
    return ["-blockdev", json.dumps(storage), "-blockdev", json.dumps(node)]


def drive(path: Path) -> list[str]:
    """-drive for a qcow2 image with no guest device, its format node named "top"."""
    return ["-drive", f"file={path},format=qcow2,if=none,id=drive0,node-name=top"]


def disk_device(node: str) -> list[str]:
    return ["-device", f"virtio-blk-pci,drive={node},id=disk0"]


def add_qcow2(vm: WrappedVM, path: Path, name: str, **format_options: object) -> None:
    """blockdev-add a file node and a qcow2 node on it, as libvirt does."""
    vm.qmp("blockdev-add", {"driver": "file", "filename": str(path), "node-name": f"{name}-file"})
    vm.qmp("blockdev-add", {"driver": "qcow2", "file": f"{name}-file", "node-name": name,
                            **format_options})  # fmt: skip


def delete_qcow2(vm: WrappedVM, name: str) -> None:
    vm.qmp("blockdev-del", {"node-name": name})
    vm.qmp("blockdev-del", {"node-name": f"{name}-file"})


def job_ready(vm: WrappedVM, job: str) -> bool:
    return any(j["device"] == job and j["ready"] for j in vm.qmp("query-block-jobs"))


def job_gone(vm: WrappedVM, job: str) -> bool:
    return not any(j["device"] == job for j in vm.qmp("query-block-jobs"))


def job_concluded(vm: WrappedVM, job: str, kind: str) -> bool:
    """Whether job *job* of type *kind* has concluded and waits to be dismissed."""
    concluded = {"id": job, "type": kind, "status": "concluded"}
    return any({k: j[k] for k in concluded} == concluded for j in vm.qmp("query-jobs"))


# --------------------------------------------------------------------------
# Reading the graph


#: What QEMU 7.2 answered for a qcow2 disk with a backing file, and a raw
#: drive with no device, as x-debug-query-block-graph (abridged).
DISK_AND_DRIVE_GRAPH: dict[str, list[dict[str, Any]]] = {
    "nodes": [
        {"id": 1, "type": "block-backend", "name": "sh"},
        {"id": 2, "type": "block-driver", "name": "#block380"},
        {"id": 3, "type": "block-driver", "name": "f0"},
        {"id": 4, "type": "block-driver", "name": "d0"},
        {"id": 5, "type": "block-driver", "name": "#block145"},
        {"id": 6, "type": "block-driver", "name": "#block056"},
        {"id": 7, "type": "block-driver", "name": "#block291"},
        {"id": 8, "type": "block-driver", "name": "idle"},
    ],
    "edges": [
        {"parent": 1, "child": 2, "name": "root", "perm": ["consistent-read"],
         "shared-perm": ["resize", "write-unchanged", "write", "consistent-read"]},
        {"parent": 2, "child": 7, "name": "file", "perm": ["consistent-read"],
         "shared-perm": ["resize", "write-unchanged", "write", "consistent-read"]},
        {"parent": 4, "child": 3, "name": "file",
         "perm": ["resize", "write", "consistent-read"],
         "shared-perm": ["write-unchanged", "consistent-read"]},
        {"parent": 4, "child": 5, "name": "backing", "perm": [],
         "shared-perm": ["resize", "write-unchanged", "write", "consistent-read"]},
        {"parent": 5, "child": 6, "name": "file", "perm": ["consistent-read"],
         "shared-perm": ["write-unchanged", "consistent-read"]},
    ],
}  # fmt: skip


def test_modes_come_from_the_permissions_on_each_file() -> None:
    # What query-named-block-nodes answered for the VM of DISK_AND_DRIVE_GRAPH (abridged).
    nodes = [
        {"node-name": "#block380", "drv": "raw", "file": "/vm/shared.raw"},
        {"node-name": "#block291", "drv": "file", "file": "/vm/shared.raw"},
        {"node-name": "#block145", "drv": "qcow2", "file": "/vm/base.qcow2"},
        {"node-name": "#block056", "drv": "file", "file": "/vm/base.qcow2"},
        {"node-name": "d0", "drv": "qcow2", "file": "/vm/top.qcow2"},
        {"node-name": "f0", "drv": "file", "file": "/vm/top.qcow2"},
        {"node-name": "idle", "drv": "file", "file": "/vm/opened-unused.raw"},
    ]
    found = {f.filename: f.mode for f in open_files(DISK_AND_DRIVE_GRAPH, nodes)}
    assert found == {
        "/vm/shared.raw": Mode.SHARED_WRITE,  # read by a drive with no device, which shares
        "/vm/top.qcow2": Mode.EXCLUSIVE,
        "/vm/base.qcow2": Mode.SHARED,
    }


def test_the_nodes_no_parent_uses_are_those_a_create_job_could_write() -> None:
    # d0 here stands for a format node blockdev-add made and no device uses yet.
    assert unused_nodes(DISK_AND_DRIVE_GRAPH) == {"d0", "idle"}


def test_a_file_whose_writers_share_writes_is_shared_write() -> None:
    graph = {
        "nodes": [{"id": 1, "type": "block-driver", "name": "f"}],
        "edges": [{"parent": 2, "child": 1, "name": "file", "perm": ["write", "consistent-read"],
                   "shared-perm": ["write", "consistent-read", "resize", "write-unchanged"]}],
    }  # fmt: skip
    (found,) = open_files(graph, [{"node-name": "f", "drv": "file", "file": "/vm/c.raw"}])
    assert found.mode is Mode.SHARED_WRITE


# --------------------------------------------------------------------------
# Following it, operation by operation


def test_hot_plug_and_unplug(lab: Lab) -> None:
    disk = lab.image("hotplug.qcow2")
    vm = lab.start("-device", "virtio-scsi-pci,id=scsi0", machine=FROZEN_PC)
    lab.expect(vm, {disk: FREE})
    add_qcow2(vm, disk, "hot")
    vm.qmp("device_add", {"driver": "scsi-hd", "drive": "hot", "bus": "scsi0.0", "id": "disk1"})
    lab.expect(vm, {disk: EXCLUSIVE})
    vm.qmp("device_del", {"id": "disk1"})
    # The node is still open, and writable: QEMU keeps its own locks on it too.
    wait_until(
        lambda: not [d for d in vm.qmp("query-block") if d["device"] == "disk1"],
        what="disk1 to be gone",
        timeout=TIMEOUT,
    )
    lab.expect(vm, {disk: EXCLUSIVE})
    delete_qcow2(vm, "hot")
    lab.expect(vm, {disk: FREE})
    assert vm.quit() == 0


def test_hot_plug_of_a_shared_disk_is_shared_write(lab: Lab) -> None:
    disk = lab.raw("cluster.raw")
    vm = lab.start("-device", "virtio-scsi-pci,id=scsi0", machine=FROZEN_PC)
    vm.qmp("blockdev-add", {"driver": "file", "filename": str(disk), "node-name": "c-file"})
    vm.qmp("blockdev-add", {"driver": "raw", "file": "c-file", "node-name": "c"})
    # A raw node passes on its users' permissions: with none, QEMU uses the
    # file for nothing yet (and locks none of its bytes); the device writes it.
    lab.expect(vm, {disk: FREE})
    vm.qmp("device_add", {"driver": "scsi-hd", "drive": "c", "bus": "scsi0.0", "id": "disk1",
                          "share-rw": True})  # fmt: skip
    lab.expect(vm, {disk: SHARED_WRITE})
    assert vm.quit() == 0


def test_a_read_only_device_that_shares_writes_stays_beside_the_writers(lab: Lab) -> None:
    disk = lab.raw("cluster.raw")
    writer = lab.start(
        "-drive", f"file={disk},format=raw,if=none,id=d0",
        "-device", "virtio-blk-pci,drive=d0,share-rw=on",
        machine=FROZEN_PC,
    )  # fmt: skip
    reader = lab.start(
        "-drive", f"file={disk},format=raw,if=none,id=d0,readonly=on",
        "-device", "virtio-blk-pci,drive=d0,share-rw=on",
        machine=FROZEN_PC,
    )  # fmt: skip
    wanted = {writer.qemu_pid: SHARED_WRITE, reader.qemu_pid: SHARED_WRITE}
    wait_until(
        lambda: lab.modes(disk) == wanted, what="both VMs to share the disk", timeout=TIMEOUT
    )
    # Once the reader's wrapper has surely read its graph (it claimed a disk
    # added after start), the shared disk is as it was, and no guest stopped.
    probe = lab.image("probe.qcow2")
    add_qcow2(reader, probe, "probe")
    wait_until(
        lambda: lab.modes(probe) == {reader.qemu_pid: EXCLUSIVE},
        what="the probe's claim",
        timeout=TIMEOUT,
    )
    assert lab.modes(disk) == wanted
    assert "guest paused" not in reader.stderr() + writer.stderr()


def test_a_file_held_elsewhere_stops_the_guest_and_names_the_holder(lab: Lab) -> None:
    disk = lab.image("taken.qcow2")
    space = [] if lab.lockspace is None else ["--lockspace", lab.lockspace]
    holder = lab.rival("--no-qemu", *space, disk)  # leaves QEMU's bytes free: QEMU gets in
    assert holder.ok
    vm = lab.start("-device", "virtio-scsi-pci,id=scsi0", machine=TINY_PC)
    assert vm.runstate() == "running"
    add_qcow2(vm, disk, "taken")
    wait_until(
        lambda: "guest paused" in vm.stderr(), what="the guest to be stopped", timeout=TIMEOUT
    )
    assert vm.runstate() == "paused"
    assert f"held imglock exclusive by pid {holder.proc.pid}" in vm.stderr()
    assert "guest paused (QMP stop)" in vm.stderr()
    assert lab.modes(disk) == {holder.proc.pid: EXCLUSIVE}
    holder.stop()


def test_blockdev_snapshot_sync(lab: Lab) -> None:
    base = lab.image("base.qcow2")
    top = lab.image("top.qcow2", "-b", "base.qcow2", "-F", "qcow2")
    overlay = lab.dir / "overlay.qcow2"
    vm = lab.start(*drive(top))
    lab.expect(vm, {top: EXCLUSIVE, base: SHARED})
    snapshot: dict[str, object] = {"node-name": "top", "snapshot-file": str(overlay),
                "snapshot-node-name": "overlay", "format": "qcow2"}  # fmt: skip
    vm.qmp("blockdev-snapshot-sync", snapshot)
    lab.expect(vm, {overlay: EXCLUSIVE, top: SHARED, base: SHARED})
    assert vm.quit() == 0


def test_blockdev_snapshot(lab: Lab) -> None:
    top = lab.image("top.qcow2")
    overlay = lab.image("overlay.qcow2", "-u", "-b", "top.qcow2", "-F", "qcow2")
    vm = lab.start(*drive(top))
    lab.expect(vm, {top: EXCLUSIVE, overlay: FREE})
    add_qcow2(vm, overlay, "overlay", backing=None)
    vm.qmp("blockdev-snapshot", {"node": "top", "overlay": "overlay"})
    lab.expect(vm, {overlay: EXCLUSIVE, top: SHARED})
    assert vm.quit() == 0


def snapshot_as_libvirt_does(vm: WrappedVM, overlay: Path, node: str, name: str) -> None:
    """An external snapshot the way libvirt 9.0 makes one: the overlay made by blockdev-create."""
    overlay.touch()
    file_node = {"driver": "file", "filename": str(overlay), "node-name": f"{name}-file"}
    vm.qmp("blockdev-add", file_node)
    vm.qmp("blockdev-create", {"job-id": f"create-{name}", "options": {
        "driver": "qcow2", "file": f"{name}-file", "size": 1 << 20}})  # fmt: skip
    wait_until(
        lambda: job_concluded(vm, f"create-{name}", "create"),
        what=f"blockdev-create of {overlay.name} to conclude",
        timeout=TIMEOUT,
    )
    vm.qmp("job-dismiss", {"id": f"create-{name}"})
    vm.qmp("blockdev-add", {"driver": "qcow2", "file": f"{name}-file", "node-name": name,
                            "backing": None})  # fmt: skip
    vm.qmp("blockdev-snapshot", {"node": node, "overlay": name})


def test_snapshots_made_with_blockdev_create_never_crash_qemu(lab: Lab) -> None:
    """QEMU 7.2 aborts if asked for its named nodes while blockdev-create opens a qcow2.

    libvirt makes every external snapshot's overlay so (``virsh
    snapshot-create-as --disk-only``); the wrapper's reading of the graph
    must never land inside that job.
    """
    top = lab.image("top.qcow2")
    vm = lab.start(*drive(top))
    lab.expect(vm, {top: EXCLUSIVE})
    overlays = [lab.dir / f"overlay{i}.qcow2" for i in range(8)]
    below = "top"
    for i, overlay in enumerate(overlays):
        snapshot_as_libvirt_does(vm, overlay, below, f"overlay{i}")
        below = f"overlay{i}"
    *backing, active = overlays
    lab.expect(vm, {active: EXCLUSIVE, top: SHARED, **dict.fromkeys(backing, SHARED)})
    assert vm.quit() == 0


def drive_mirror_ready(lab: Lab) -> tuple[WrappedVM, Path, Path]:
    """A VM whose disk drive-mirror copies to a new file, the job ready."""
    source = lab.image("source.qcow2")
    target = lab.dir / "target.qcow2"
    vm = lab.start(*drive(source))
    vm.qmp("drive-mirror", {"job-id": "m", "device": "drive0", "target": str(target),
                            "format": "qcow2", "sync": "full"})  # fmt: skip
    wait_until(lambda: job_ready(vm, "m"), what="the mirror to be ready", timeout=TIMEOUT)
    lab.expect(vm, {source: EXCLUSIVE, target: EXCLUSIVE})
    return vm, source, target


def test_drive_mirror_completed(lab: Lab) -> None:
    vm, source, target = drive_mirror_ready(lab)
    vm.qmp("block-job-complete", {"device": "m"})
    wait_until(lambda: job_gone(vm, "m"), what="the mirror to end", timeout=TIMEOUT)
    lab.expect(vm, {source: FREE, target: EXCLUSIVE})
    assert vm.quit() == 0


def test_drive_mirror_cancelled(lab: Lab) -> None:
    vm, source, target = drive_mirror_ready(lab)
    vm.qmp("block-job-cancel", {"device": "m"})
    wait_until(lambda: job_gone(vm, "m"), what="the mirror to end", timeout=TIMEOUT)
    lab.expect(vm, {source: EXCLUSIVE, target: FREE})
    assert vm.quit() == 0


def blockdev_mirror_ready(lab: Lab) -> tuple[WrappedVM, Path, Path]:
    """A VM whose disk blockdev-mirror copies to a node added for it, the job ready."""
    source = lab.image("source.qcow2")
    target = lab.image("target.qcow2")
    vm = lab.start(*blockdev(source, "source"), *disk_device("source"), machine=FROZEN_PC)
    add_qcow2(vm, target, "target")
    vm.qmp("blockdev-mirror", {"job-id": "m", "device": "source", "target": "target",
                               "sync": "full"})  # fmt: skip
    wait_until(lambda: job_ready(vm, "m"), what="the mirror to be ready", timeout=TIMEOUT)
    lab.expect(vm, {source: EXCLUSIVE, target: EXCLUSIVE})
    return vm, source, target


def test_blockdev_mirror_completed(lab: Lab) -> None:
    vm, source, target = blockdev_mirror_ready(lab)
    vm.qmp("block-job-complete", {"device": "m"})
    wait_until(lambda: job_gone(vm, "m"), what="the mirror to end", timeout=TIMEOUT)
    delete_qcow2(vm, "source")  # as libvirt does once the job is done
    lab.expect(vm, {source: FREE, target: EXCLUSIVE})
    assert vm.quit() == 0


def test_blockdev_mirror_cancelled(lab: Lab) -> None:
    vm, source, target = blockdev_mirror_ready(lab)
    vm.qmp("block-job-cancel", {"device": "m"})
    wait_until(lambda: job_gone(vm, "m"), what="the mirror to end", timeout=TIMEOUT)
    delete_qcow2(vm, "target")
    lab.expect(vm, {source: EXCLUSIVE, target: FREE})
    assert vm.quit() == 0


def chain_drive(top: Path) -> list[str]:
    """-drive for a three-image chain, naming its nodes top, mid and base."""
    return ["-drive", f"file={top},format=qcow2,if=none,id=drive0,node-name=top,"
            "backing.node-name=mid,backing.backing.node-name=base"]  # fmt: skip


def make_chain(lab: Lab) -> tuple[Path, Path, Path]:
    base = lab.image("base.qcow2")
    mid = lab.image("mid.qcow2", "-b", "base.qcow2", "-F", "qcow2")
    top = lab.image("top.qcow2", "-b", "mid.qcow2", "-F", "qcow2")
    return base, mid, top


def running_chain(lab: Lab) -> tuple[WrappedVM, tuple[Path, Path, Path]]:
    """A VM on a base <- mid <- top chain, claimed as QEMU uses it: (the VM, the files)."""
    base, mid, top = make_chain(lab)
    vm = lab.start(*chain_drive(top))
    lab.expect(vm, {top: EXCLUSIVE, mid: SHARED, base: SHARED})
    return vm, (base, mid, top)


def test_block_commit_active(lab: Lab) -> None:
    vm, (base, mid, top) = running_chain(lab)
    vm.qmp("block-commit", {"job-id": "c", "device": "drive0", "base-node": "base"})
    wait_until(lambda: job_ready(vm, "c"), what="the commit to be ready", timeout=TIMEOUT)
    # QEMU now writes the base, and still writes the top.
    lab.expect(vm, {top: EXCLUSIVE, mid: SHARED, base: EXCLUSIVE})
    vm.qmp("block-job-complete", {"device": "c"})
    wait_until(lambda: job_gone(vm, "c"), what="the commit to end", timeout=TIMEOUT)
    lab.expect(vm, {top: FREE, mid: FREE, base: EXCLUSIVE})
    assert vm.quit() == 0


def test_block_commit_intermediate(lab: Lab, qemu_img_path: str) -> None:
    base, mid, top = make_chain(lab)
    # Data in mid, and a commit slowed to a crawl, so that it is seen at work.
    qemu_io = str(Path(qemu_img_path).with_name("qemu-io"))
    subprocess.run([qemu_io, "-c", "write 0 1M", mid], check=True, capture_output=True)
    vm = lab.start(*chain_drive(top))
    vm.qmp("block-commit", {"job-id": "c", "device": "drive0", "top-node": "mid",
                            "base-node": "base", "speed": 1})  # fmt: skip
    lab.expect(vm, {top: EXCLUSIVE, mid: SHARED, base: EXCLUSIVE})
    vm.qmp("block-job-set-speed", {"device": "c", "speed": 0})
    wait_until(lambda: job_gone(vm, "c"), what="the commit to end", timeout=TIMEOUT)
    # The base is only read again, and mid is out of the chain.
    lab.expect(vm, {top: EXCLUSIVE, mid: FREE, base: SHARED})
    assert vm.quit() == 0


def test_block_stream(lab: Lab) -> None:
    vm, (base, mid, top) = running_chain(lab)
    vm.qmp("block-stream", {"job-id": "s", "device": "drive0"})
    wait_until(lambda: job_gone(vm, "s"), what="the stream to end", timeout=TIMEOUT)
    lab.expect(vm, {top: EXCLUSIVE, mid: FREE, base: FREE})
    assert vm.quit() == 0


def test_a_stream_left_for_its_manager_to_dismiss_never_crashes_qemu(lab: Lab) -> None:
    """QEMU 7.2 crashes if asked for its named nodes while the stream waits to be dismissed."""
    vm, (base, mid, top) = running_chain(lab)
    vm.qmp("block-stream", {"job-id": "s", "device": "drive0", "auto-dismiss": False})
    wait_until(
        lambda: job_concluded(vm, "s", "stream"), what="the stream to conclude", timeout=TIMEOUT
    )
    # The wrapper reads the graph at once on the job's event, and every half second.
    holds_for(lambda: alive(vm.qemu_pid), 2.0, what="QEMU to keep running")
    vm.qmp("job-dismiss", {"id": "s"})
    lab.expect(vm, {top: EXCLUSIVE, mid: FREE, base: FREE})
    assert vm.quit() == 0


def test_change_medium_and_eject(lab: Lab) -> None:
    first, second = lab.raw("first.iso"), lab.raw("second.iso")
    vm = lab.start(
        "-drive", f"file={first},format=raw,if=none,id=cd0,media=cdrom",
        "-device", "ide-cd,drive=cd0,id=cdrom0",
        machine=FROZEN_PC,
    )  # fmt: skip
    lab.expect(vm, {first: SHARED, second: FREE})
    vm.qmp("blockdev-change-medium", {"id": "cdrom0", "filename": str(second), "format": "raw"})
    lab.expect(vm, {first: FREE, second: SHARED})
    vm.qmp("eject", {"id": "cdrom0", "force": True})
    lab.expect(vm, {first: FREE, second: FREE})
    assert vm.quit() == 0


def test_a_file_claimed_while_running_stays_claimed_when_the_wrapper_is_killed(lab: Lab) -> None:
    # QEMU gets a copy of the claim's descriptor (QMP getfd), as it inherits
    # those of the files claimed at start.
    disk = lab.image("hotplug.qcow2")
    vm = lab.start("-device", "virtio-scsi-pci,id=scsi0", machine=FROZEN_PC)
    add_qcow2(vm, disk, "hot")
    lab.expect(vm, {disk: EXCLUSIVE})
    wait_until(
        lambda: vm.qemu_pid in lab.holder_pids(disk),
        what="QEMU to hold the descriptor",
        timeout=TIMEOUT,
    )
    vm.process.kill()
    vm.process.wait()
    assert lab.modes(disk) == {vm.qemu_pid: EXCLUSIVE}
    assert vm.qmp("query-status")["status"] == "prelaunch"


def test_an_explicit_backing_node_wins_over_a_stale_header(lab: Lab) -> None:
    base = lab.image("base.qcow2")
    top = lab.image("top.qcow2", "-u", "-b", "moved-away/base.qcow2", "-F", "qcow2")
    # As libvirt writes it: every node of the chain named, the backing read-only.
    vm = lab.start(
        *blockdev(base, "base", backing=None, **{"read-only": True}),
        *blockdev(top, "top", backing="base"),
    )
    lab.expect(vm, {top: EXCLUSIVE, base: SHARED})
    assert vm.quit() == 0


def plain_drive(top: Path) -> list[str]:
    """-drive as most users write it: no node names, the chain found from the headers."""
    return ["-drive", f"file={top},format=qcow2,if=none,id=drive0"]


def node_of(vm: WrappedVM, path: Path) -> str:
    """The node name QEMU gave *path*'s qcow2 node."""
    nodes = vm.qmp("query-named-block-nodes")
    (name,) = [n["node-name"] for n in nodes if n["drv"] == "qcow2" and n["file"] == str(path)]
    return str(name)


def test_block_commit_active_on_a_drive_without_node_names(lab: Lab) -> None:
    # The backing files were claimed from the headers at start, with QEMU's
    # bytes tested; once QEMU writes the base itself, its own bytes there
    # are no rival, and the base becomes exclusive without pausing anyone.
    base, mid, top = make_chain(lab)
    vm = lab.start(*plain_drive(top))
    lab.expect(vm, {top: EXCLUSIVE, mid: SHARED, base: SHARED})
    vm.qmp("block-commit", {"job-id": "c", "device": "drive0"})
    wait_until(lambda: job_ready(vm, "c"), what="the commit to be ready", timeout=TIMEOUT)
    lab.expect(vm, {top: EXCLUSIVE, mid: SHARED, base: EXCLUSIVE})
    vm.qmp("block-job-complete", {"device": "c"})
    wait_until(lambda: job_gone(vm, "c"), what="the commit to end", timeout=TIMEOUT)
    lab.expect(vm, {top: FREE, mid: FREE, base: EXCLUSIVE})
    assert vm.runstate() == "running"
    assert "guest paused" not in vm.stderr()
    assert vm.quit() == 0


def test_block_commit_intermediate_on_a_drive_without_node_names(lab: Lab) -> None:
    base, mid, top = make_chain(lab)
    vm = lab.start(*plain_drive(top))
    lab.expect(vm, {top: EXCLUSIVE, mid: SHARED, base: SHARED})
    vm.qmp("block-commit", {"job-id": "c", "device": "drive0", "top-node": node_of(vm, mid),
                            "base-node": node_of(vm, base)})  # fmt: skip
    wait_until(lambda: job_gone(vm, "c"), what="the commit to end", timeout=TIMEOUT)
    lab.expect(vm, {top: EXCLUSIVE, mid: FREE, base: SHARED})
    assert vm.runstate() == "running"
    assert "guest paused" not in vm.stderr()
    assert vm.quit() == 0
