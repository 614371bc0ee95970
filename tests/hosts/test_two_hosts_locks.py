"""Two hosts on a shared filesystem: every claim a host makes is seen, and refused, on the other.

Host A and host B each mount the datastore through their own client and run
in their own UTS and PID namespaces (tests/support/shared_fs.py); host C only
looks.  The lock manager (GlusterFS's brick, CephFS's MDS) is the only
thing the hosts share, as with NFS, so a conflict seen here crossed it.
Every test runs once on each filesystem.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CLAIMER, QemuImg, Rival
from qemu_vm import NONE_MACHINE
from shared_fs import Datastore, Host

EX_TEMPFAIL = 75
#: ``imglock status``: some image is held.
EX_HELD = 1


class Claimers:
    """tests/support/claimer.py processes on given hosts; all ended afterwards."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, host: Host, *args: str | Path) -> Rival:
        proc = host.popen(
            [sys.executable, CLAIMER, *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"claimer on {host.name} died without a word (status {proc.wait()})"
        return Rival(proc, json.loads(line))

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def claimers() -> Iterator[Claimers]:
    started = Claimers()
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def chain(datastore: Datastore, qemu_img: QemuImg) -> Datastore:
    """base.qcow2 <- top.qcow2 and other.qcow2 (same base) in the test's directory."""
    directory = datastore.a.dir
    qemu_img("create", "-q", "-f", "qcow2", directory / "base.qcow2", "16M")
    for top in ("top.qcow2", "other.qcow2"):
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", directory / top)
    return datastore


def status_json(host: Host, *images: Path) -> list[dict[str, object]]:
    proc = host.imglock("status", "--json", *images)
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def imglock_holders(report: dict[str, object]) -> list[dict[str, object]]:
    holders = report["holders"]
    assert isinstance(holders, list)
    return [h for h in holders if h["layer"] == "imglock"]


@pytest.mark.parametrize("direction", ["A then B", "B then A"])
def test_an_exclusive_claim_on_one_host_is_refused_on_the_other_which_names_it(
    chain: Datastore, claimers: Claimers, direction: str
) -> None:
    first, second = (chain.a, chain.b) if direction == "A then B" else (chain.b, chain.a)
    holder = claimers.start(first, first.path("top.qcow2"))
    assert holder.ok and holder.reply["pid"] == 1

    # The library: LockConflict, naming the first host as the one holder
    # (its QEMU bytes are its own, not a second, anonymous holder's).
    refused = claimers.start(second, second.path("top.qcow2"))
    assert not refused.ok and refused.reply["status"] == EX_TEMPFAIL
    assert first.name in str(refused.reply["error"])
    assert [
        (h["host"], h["pid"], h["mode"], h["perms"])
        for h in refused.reply["holders"]  # type: ignore[attr-defined]
    ] == [(first.name, 1, "exclusive", ["consistent read", "write", "resize"])]

    # The command line: exit 75 and one line naming the holder's host.
    proc = second.imglock("run", "--image", second.path("top.qcow2"), "--", "true")
    assert proc.returncode == EX_TEMPFAIL
    (line,) = proc.stderr.splitlines()
    assert str(second.path("top.qcow2")) in line and f"pid 1 on {first.name}" in line
    assert "more" not in line

    holder.stop()
    proc = second.imglock("run", "--image", second.path("top.qcow2"), "--", "true")
    assert proc.returncode == 0, proc.stderr


def test_shared_claims_on_both_hosts_coexist_and_keep_a_writer_out(
    chain: Datastore, claimers: Claimers
) -> None:
    a, b, c = chain.hosts
    assert claimers.start(a, "--mode", "shared", a.path("base.qcow2")).ok
    assert claimers.start(b, "--mode", "shared", b.path("base.qcow2")).ok
    writer = claimers.start(c, c.path("base.qcow2"))
    assert not writer.ok and writer.reply["status"] == EX_TEMPFAIL
    (report,) = status_json(c, c.path("base.qcow2"))
    assert sorted((h["host"], h["mode"]) for h in imglock_holders(report)) == [
        ("host-a", "shared"),
        ("host-b", "shared"),
    ]


def test_shared_write_claims_on_both_hosts_coexist_and_keep_readers_and_writers_out(
    chain: Datastore, claimers: Claimers
) -> None:
    a, b, c = chain.hosts
    assert claimers.start(a, "--mode", "shared-write", a.path("top.qcow2")).ok
    assert claimers.start(b, "--mode", "shared-write", b.path("top.qcow2")).ok
    for mode in ("exclusive", "shared"):
        refused = claimers.start(c, "--mode", mode, c.path("top.qcow2"))
        assert not refused.ok and refused.reply["status"] == EX_TEMPFAIL, mode
    (report,) = status_json(c, c.path("top.qcow2"))
    assert sorted((h["host"], h["mode"]) for h in imglock_holders(report)) == [
        ("host-a", "shared-write"),
        ("host-b", "shared-write"),
    ]
    # Each holder's QEMU bytes are its own, not a second, anonymous holder's.
    assert len(report["holders"]) == 2  # type: ignore[arg-type]
    assert all(h["perms"] for h in imglock_holders(report))


def test_a_backing_file_is_shared_between_hosts_and_never_writable_under_them(
    chain: Datastore, claimers: Claimers
) -> None:
    a, b, c = chain.hosts
    # Two VMs on two hosts, two top images over one base: both run.
    assert claimers.start(a, a.path("top.qcow2")).ok
    assert claimers.start(b, b.path("other.qcow2")).ok
    reports = status_json(c, c.path("top.qcow2"), c.path("other.qcow2"), c.path("base.qcow2"))
    by_image = {Path(str(r["filename"])).name: imglock_holders(r) for r in reports}
    assert [(h["host"], h["mode"]) for h in by_image["top.qcow2"]] == [("host-a", "exclusive")]
    assert [(h["host"], h["mode"]) for h in by_image["other.qcow2"]] == [("host-b", "exclusive")]
    assert sorted((h["host"], h["mode"]) for h in by_image["base.qcow2"]) == [
        ("host-a", "shared"),
        ("host-b", "shared"),
    ]
    # Nobody may now write the base, from any host.
    proc = c.imglock("run", "--image", c.path("base.qcow2"), "--", "true")
    assert proc.returncode == EX_TEMPFAIL
    assert "host-a" in proc.stderr or "host-b" in proc.stderr


def test_qemu_on_the_other_host_refuses_an_image_imglock_holds(
    chain: Datastore, claimers: Claimers, qemu_system_path: str, qemu_img_path: str
) -> None:
    a, b, _c = chain.hosts
    assert claimers.start(a, a.path("top.qcow2")).ok
    qemu = b.run(
        [qemu_system_path, *NONE_MACHINE, "-drive", f"file={b.path('top.qcow2')},if=none"],
        timeout=30,
    )
    assert qemu.returncode != 0
    assert 'Failed to get "write" lock' in qemu.stderr
    info = b.run([qemu_img_path, "info", b.path("top.qcow2")])
    assert info.returncode != 0 and "Failed to get shared" in info.stderr
    # Reading the backing file is fine: imglock holds it shared, as QEMU would.
    assert b.run([qemu_img_path, "info", "-U", b.path("base.qcow2")]).returncode == 0


def start_qemu(
    host: Host, qemu_system_path: str, drive: str, started: list[subprocess.Popen[str]]
) -> None:
    """Start a plain QEMU (no imglock) on *host* with *drive*; return once it has the image."""
    qemu = host.popen(
        [qemu_system_path, *NONE_MACHINE, "-drive", drive, "-monitor", "stdio"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    started.append(qemu)
    assert qemu.stdout is not None
    assert "monitor" in qemu.stdout.readline()  # its banner: the machine, and image, are up


def test_imglock_on_the_other_host_refuses_an_image_qemu_writes(
    chain: Datastore, qemu_system_path: str, started: list[subprocess.Popen[str]]
) -> None:
    a, b, c = chain.hosts
    start_qemu(a, qemu_system_path, f"file={a.path('top.qcow2')},if=none", started)

    proc = b.imglock("run", "--image", b.path("top.qcow2"), "--", "true")
    assert proc.returncode == EX_TEMPFAIL
    assert "qemu" in proc.stderr and "write" in proc.stderr
    (report,) = status_json(c, c.path("top.qcow2"))
    qemu_rows = [h for h in report["holders"] if h["layer"] == "qemu"]  # type: ignore[attr-defined]
    assert qemu_rows and "write" in qemu_rows[0]["perms"]


def test_a_holder_without_qemu_bytes_and_a_qemu_reader_on_two_hosts_stay_two_holders(
    chain: Datastore,
    claimers: Claimers,
    qemu_system_path: str,
    started: list[subprocess.Popen[str]],
) -> None:
    a, b, c = chain.hosts
    assert claimers.start(a, "--mode", "shared", "--no-qemu", a.path("base.qcow2")).ok
    drive = f"file={b.path('base.qcow2')},if=none,readonly=on"
    start_qemu(b, qemu_system_path, drive, started)
    (report,) = status_json(c, c.path("base.qcow2"))
    holders = report["holders"]
    assert isinstance(holders, list)
    # Seen from C, the lock manager names no pid for either: A's holder
    # range carries no QEMU mark, so the QEMU bytes are not taken for A's.
    assert sorted((h["layer"], h["host"], bool(h["perms"])) for h in holders) == [
        ("imglock", "host-a", False),
        ("qemu", None, True),
    ]


def test_status_from_a_third_host_names_the_holder_from_its_record(
    chain: Datastore, claimers: Claimers
) -> None:
    a, _b, c = chain.hosts
    holder = claimers.start(a, a.path("top.qcow2"))
    (report,) = status_json(c, c.path("top.qcow2"))
    (row,) = [h for h in imglock_holders(report) if h["mode"] == "exclusive"]
    # Written on host A, read on host C: the command names A's path to the image.
    assert row["host"] == "host-a" and row["pid"] == 1
    assert f"claimer.py {a.path('top.qcow2')}" in str(row["command"])
    assert row["since"] is not None
    holder.stop()
    (report,) = status_json(c, c.path("top.qcow2"))
    assert report["holders"] == [] and report["stale-records"] == []


def test_status_from_a_third_host_names_a_command_run_under_imglock_on_the_first(
    chain: Datastore, started: list[subprocess.Popen[str]]
) -> None:
    a, _b, c = chain.hosts
    # The command runs only once the claim is taken: its word says so.
    held = a.popen(
        [sys.executable, "-m", "imglock", "run", "--image", a.path("top.qcow2"), "--",
         "sh", "-c", "echo claimed && exec sleep 300"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    started.append(held)
    assert held.stdout is not None and held.stdout.readline() == "claimed\n"
    proc = c.imglock("status", "--json", c.path("top.qcow2"))
    assert proc.returncode == EX_HELD, proc.stderr
    (report,) = json.loads(proc.stdout)
    (row,) = imglock_holders(report)
    assert (row["host"], row["mode"]) == ("host-a", "exclusive")
    assert "sleep 300" in str(row["command"])


def test_status_of_the_directory_from_a_third_host_lists_every_image_and_who_holds_it(
    chain: Datastore, claimers: Claimers
) -> None:
    a, b, c = chain.hosts
    assert claimers.start(a, a.path("top.qcow2")).ok
    assert claimers.start(b, "--mode", "shared", b.path("other.qcow2")).ok
    proc = c.imglock("status", "--json", c.dir)
    assert proc.returncode == EX_HELD, proc.stderr
    held = {
        Path(str(r["filename"])).name: sorted((h["host"], h["mode"]) for h in imglock_holders(r))
        for r in json.loads(proc.stdout)
    }
    assert held == {
        "base.qcow2": [("host-a", "shared"), ("host-b", "shared")],
        "other.qcow2": [("host-b", "shared")],
        "top.qcow2": [("host-a", "exclusive")],
    }


def test_a_record_left_by_a_killed_holder_is_shown_stale_on_another_host(
    chain: Datastore, claimers: Claimers
) -> None:
    a, b, _c = chain.hosts
    holder = claimers.start(a, a.path("top.qcow2"))
    holder.proc.kill()
    holder.proc.wait()
    (report,) = status_json(b, b.path("top.qcow2"))
    assert report["holders"] == []
    assert report["stale-records"], "the killed holder's record is shown, as stale"
    # ... and never obeyed: host B claims at once.
    assert claimers.start(b, b.path("top.qcow2")).ok


def test_a_lockspace_on_the_shared_volume_keeps_a_local_image_to_one_host(
    datastore: Datastore, claimers: Claimers, tmp_path: Path
) -> None:
    # An image each host reaches at the same path but whose own locks the
    # hosts would not share (a SAN device): its locks go to the lockspace.
    image = tmp_path / "san-disk.raw"
    image.write_bytes(b"\0" * 65536)
    a, b, c = datastore.hosts
    a.path("lockspace").mkdir()
    held = claimers.start(a, "--lockspace", a.path("lockspace"), image)
    assert held.ok
    refused = claimers.start(b, "--lockspace", b.path("lockspace"), image)
    assert not refused.ok and "host-a" in str(refused.reply["error"])
    proc = c.imglock("status", "--json", "--lockspace", c.path("lockspace"), image)
    (report,) = json.loads(proc.stdout)
    assert [(h["host"], h["mode"]) for h in imglock_holders(report)] == [("host-a", "exclusive")]


def test_status_of_a_thousand_images_from_a_third_host_lists_all_and_the_five_held(
    datastore: Datastore, started: list[subprocess.Popen[str]]
) -> None:
    a, _b, c = datastore.hosts
    names = [f"vm{i:04d}.raw" for i in range(1004)]
    for name in names:
        (a.dir / name).write_bytes(b"\0" * 4096)
    held = names[::250][:5]
    for name in held:
        # Held as a VM launch would hold them: the command runs once claimed.
        run = a.popen(
            [sys.executable, "-m", "imglock", "run", "--image", a.path(name), "--",
             "sh", "-c", "echo claimed && exec sleep 300"],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        started.append(run)
        assert run.stdout is not None and run.stdout.readline() == "claimed\n"
    proc = c.imglock("status", "--json", c.dir)
    assert proc.returncode == EX_HELD, proc.stderr
    reports = json.loads(proc.stdout)
    assert sorted(Path(str(r["filename"])).name for r in reports) == names
    holders = {
        Path(str(r["filename"])).name: [(h["host"], h["mode"]) for h in imglock_holders(r)]
        for r in reports
        if r["holders"]
    }
    assert holders == {name: [("host-a", "exclusive")] for name in held}
