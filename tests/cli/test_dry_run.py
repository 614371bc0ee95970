"""``imglock run --dry-run``: what a command line would make imglock claim, touching no lock.

The command lines in tests/data/cmdlines are shaped like libvirt's (see the
README there): -blockdev JSON with explicit backing chains and ``null``
backings, data files, rbd, iSCSI and NBD disks, pflash firmware and NVRAM,
floppies, CD-ROMs, legacy -drive options.  Each is checked through the real
``imglock`` command against images that qemu-img creates.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import ENV, ImglockCli, QemuImg, SpawnRival

import imglock

CORPUS = Path(__file__).parents[1] / "data" / "cmdlines"
CASES = sorted(path.stem for path in CORPUS.glob("*.args"))


def read_command_line(name: str, directory: Path) -> list[str]:
    """The command line of a corpus case, with @DIR@ replaced by *directory*."""
    text = (CORPUS / f"{name}.args").read_text().replace("\\\n", " ")
    return shlex.split(text.replace("@DIR@", str(directory)))


def build_case(name: str, directory: Path, qemu_img: str) -> tuple[list[str], list[list[object]]]:
    """Create the images of a corpus case; return its command line and expected entries."""
    spec = json.loads((CORPUS / f"{name}.json").read_text())
    for args in spec["create"]:
        # In the case's directory: the backing names in the cases are relative.
        subprocess.run([qemu_img, "create", "-q", *args], cwd=directory, check=True, timeout=30)
    for removed in spec.get("remove", ()):
        (directory / removed).unlink()
    return read_command_line(name, directory), spec["expect"]


def dry_run(
    imglock_cli: ImglockCli, argv: list[str], *options: str | Path, cwd: Path | None = None
) -> dict[str, object]:
    # QEMU opens relative data file names from its working directory.
    # ENV: this checkout's imglock, from any working directory.
    proc = imglock_cli("run", *options, "--dry-run", "--json", "--", *argv, cwd=cwd, env=ENV)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert isinstance(report, dict)
    return report


def entries(report: dict[str, object], directory: Path) -> list[list[object]]:
    """(filename, role, mode, claimed, protocol) of each file; names relative to *directory*."""
    rows = []
    images = report["images"]
    assert isinstance(images, list)
    for entry in images:
        name = entry["filename"]
        if entry["claimed"] and Path(name).is_absolute():
            name = str(Path(name).relative_to(directory))
        rows.append([name, entry["role"], entry["mode"], entry["claimed"], entry["protocol"]])
    return rows


def matches(found: list[list[object]], expected: list[list[object]]) -> bool:
    if len(found) != len(expected):
        return False
    for got, want in zip(found, expected, strict=True):
        name = want[0]
        if isinstance(name, str) and name.startswith("~"):
            if name[1:] not in str(got[0]) or got[1:] != want[1:]:
                return False
        elif got != want:
            return False
    return True


@pytest.mark.parametrize("name", CASES)
def test_libvirt_style_command_line(
    name: str, tmp_path: Path, qemu_img_path: str, imglock_cli: ImglockCli
) -> None:
    argv, expected = build_case(name, tmp_path, qemu_img_path)
    report = dry_run(imglock_cli, argv, cwd=tmp_path)
    found = entries(report, tmp_path)
    assert matches(found, expected), json.dumps(found, indent=1)
    assert report["qemu"] is True
    assert report["layers"] == ["imglock", "qemu-test"]


def test_the_corpus_covers_what_management_tools_generate() -> None:
    text = "".join(path.read_text() for path in CORPUS.glob("*.args"))
    for needle in ('"driver":"rbd"', '"driver":"iscsi"', '"driver":"nbd"', "file=nbd:",
                   '"backing":null', '"backing":"libvirt-', '"data-file":', "pflash1=",
                   "ide-cd", '"driver":"floppy"', "-fda", "snapshot=on", '"share-rw":true',
                   "share-rw=on"):  # fmt: skip
        assert needle in text, needle


def test_an_explicit_backing_wins_over_a_stale_name_in_the_header(
    tmp_path: Path, qemu_img_path: str, imglock_cli: ImglockCli
) -> None:
    # The header of snap1.qcow2 names a file that has moved away; QEMU opens
    # the node the command line names instead, and so does imglock.
    argv, _expected = build_case("blockdev-chain", tmp_path, qemu_img_path)
    assert not (tmp_path / "moved-away").exists()
    report = dry_run(imglock_cli, argv)
    names = [entry[0] for entry in entries(report, tmp_path)]
    assert "base.qcow2" in names and not any("moved-away" in str(n) for n in names)


def test_a_luks_volume_is_claimed_as_data_in_its_own_format(
    tmp_path: Path, qemu_img_path: str, imglock_cli: ImglockCli
) -> None:
    argv, _expected = build_case("luks-volume", tmp_path, qemu_img_path)
    report = dry_run(imglock_cli, argv)
    images = report["images"]
    assert isinstance(images, list)
    formats = [(Path(e["filename"]).name, e["format"]) for e in images]
    assert formats == [("vault.luks", "luks"), ("scratch.luks", "raw")]


def test_dry_run_takes_no_lock_and_creates_no_lock_file(
    tmp_path: Path, qemu_img_path: str, imglock_cli: ImglockCli, rival: SpawnRival
) -> None:
    argv, expected = build_case("backing-null", tmp_path, qemu_img_path)
    holder = rival(tmp_path / "standalone.qcow2")
    assert holder.ok
    lockspace = tmp_path / "lockspace"
    lockspace.mkdir()
    report = dry_run(imglock_cli, argv, "--lockspace", lockspace)
    assert matches(entries(report, tmp_path), expected)
    images = report["images"]
    assert isinstance(images, list)
    (entry,) = images
    assert Path(entry["lock-file"]).parent == lockspace
    assert list(lockspace.iterdir()) == []
    # The rival still holds the image, alone.
    holders = imglock.holders(tmp_path / "standalone.qcow2")
    assert {h.pid for h in holders} == {holder.proc.pid}
    holder.stop()


def test_dry_run_of_named_images_follows_their_chains(
    tmp_path: Path, qemu_img: QemuImg, imglock_cli: ImglockCli
) -> None:
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             tmp_path / "top.qcow2")  # fmt: skip
    report = dry_run(imglock_cli, ["qemu-img", "check", "top.qcow2"],
                     "--image", tmp_path / "top.qcow2")  # fmt: skip
    assert entries(report, tmp_path) == [
        ["top.qcow2", "top", "exclusive", True, None],
        ["base.qcow2", "backing", "shared", True, None],
    ]
    assert report["images"][0]["source"] == "--image"  # type: ignore[index]
    assert report["images"][1]["source"] == "image header"  # type: ignore[index]
    assert report["layers"] == ["imglock", "qemu-test"]


def test_shared_write_named_on_the_wrapper(
    tmp_path: Path, raw_image: Path, imglock_cli: ImglockCli
) -> None:
    report = dry_run(imglock_cli, ["my-vmm", "--disk", str(raw_image)],
                     "--shared-write", raw_image)  # fmt: skip
    assert entries(report, tmp_path) == [["disk.raw", "top", "shared-write", True, None]]
    assert report["layers"] == ["imglock", "qemu"]  # not QEMU: imglock holds QEMU's bytes


def test_dry_run_table_names_every_file(
    tmp_path: Path, qemu_img_path: str, imglock_cli: ImglockCli
) -> None:
    argv, _expected = build_case("legacy-drives", tmp_path, qemu_img_path)
    proc = imglock_cli("run", "--dry-run", "--", *argv)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["FILE", "ROLE", "MODE", "FORMAT", "FROM"]
    assert any("boot.flp" in line and "exclusive" in line and "-fda" in line for line in lines)
    assert any("nbd:unix:" in line and "not claimed" in line for line in lines)
    assert lines[-1] == "lock layers: imglock, qemu-test"


def test_dry_run_lists_every_file_and_marks_each_problem(
    tmp_path: Path, qemu_img: QemuImg, imglock_cli: ImglockCli
) -> None:
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2",
             tmp_path / "orphan.qcow2", "1M")  # fmt: skip
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\xff" * 100)
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "fine.qcow2", "1M")
    argv = ["qemu-system-x86_64", "-hda", tmp_path / "orphan.qcow2", "-hdb", bad,
            "-hdc", tmp_path / "absent.raw", "-hdd", tmp_path / "fine.qcow2"]  # fmt: skip
    proc = imglock_cli("run", "--dry-run", "--json", "--", *argv)
    # The first problem's status, as a real run would exit: a chain that cannot be followed.
    assert proc.returncode == 65, proc.stderr
    report = json.loads(proc.stdout)
    marks = [(Path(e["filename"]).name, e["role"], e["problem"] is not None)
             for e in report["images"]]  # fmt: skip
    assert marks == [("orphan.qcow2", "top", False), ("gone.qcow2", "backing", True),
                     ("bad.qcow2", "top", True), ("absent.raw", "top", True),
                     ("fine.qcow2", "top", False)]  # fmt: skip
    assert report["status"] == 65
    problems = [e["problem"] for e in report["images"] if e["problem"]]
    assert "cannot open backing file" in problems[0] and str(bad) in problems[1]
    assert problems[2] == f"{tmp_path / 'absent.raw'}: No such file or directory"
    # Each problem is also one error line, as a run would give it.
    assert proc.stderr.splitlines() == [f"imglock: {problem}" for problem in problems]
    table = imglock_cli("run", "--dry-run", "--", *argv)
    assert table.returncode == 65
    lines = table.stdout.splitlines()
    assert lines[0].split()[-1] == "PROBLEM"
    for name, _role, marked in marks:
        (line,) = [line for line in lines if name in line.split()[0]]
        assert line.rstrip().endswith("-") != marked, line
    assert "Traceback" not in table.stderr


def test_json_without_dry_run_is_a_usage_error(imglock_cli: ImglockCli, raw_image: Path) -> None:
    proc = imglock_cli("run", "--json", "--image", raw_image, "--", "true")
    assert proc.returncode == 2
    assert "--dry-run" in proc.stderr
