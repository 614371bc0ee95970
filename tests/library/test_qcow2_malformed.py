"""Every header rule, broken on purpose in a hand-built image.

Each case checks that imglock raises FormatError naming the file and the
specific fault, that the CLI turns it into one stderr line and exit status
65, and (with QEMU installed) that QEMU refuses the same image when it
opens it for reading, so imglock is never stricter than QEMU.  A control
case shows that the unbroken image opens in both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from qcow2_builder import (
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_DATA_FILE,
    EXT_FEATURE_NAME_TABLE,
    EXT_FULL_DISK_ENCRYPTION,
    Qcow2Spec,
    bitmaps_ext,
    build,
    crypto_ext,
    feature_table,
)

from imglock.errors import EX_DATAERR, FormatError
from imglock.formats import open_image
from imglock.formats.qcow2 import parse_header_bytes

REQUIRE_QEMU = os.environ.get("IMGLOCK_REQUIRE_QEMU") == "1"


@dataclass(frozen=True)
class Case:
    id: str
    #: Changes to the valid default spec that break exactly one rule.
    changes: dict[str, object]
    #: Words the complaint must contain.
    complaint: str
    #: Open with the format named (the fault would stop qcow2 probing).
    forced: bool = False
    #: Bytes to keep of the built image (None: all of it).
    truncate: int | None = None
    extra: dict[str, object] = field(default_factory=dict)


def fde(offset: int = 4 << 16, length: int = 4096) -> tuple[int, bytes]:
    return (EXT_FULL_DISK_ENCRYPTION, crypto_ext(offset, length))


BITMAPS_ON = {"autoclear_features": 1}

CASES = [
    Case("bad-magic", {"magic": 0x12345678}, "not a qcow2 image", forced=True),
    Case("version-1", {"version": 1}, "Unsupported qcow2 version 1", forced=True),
    Case("version-4", {"version": 4}, "Unsupported qcow2 version 4"),
    Case("version-huge", {"version": 0xFFFFFFFF}, "Unsupported qcow2 version 4294967295"),
    Case("cluster-bits-8", {"cluster_bits": 8}, "Unsupported cluster size: 2^8"),
    Case("cluster-bits-22", {"cluster_bits": 22}, "Unsupported cluster size: 2^22"),
    Case("cluster-bits-0", {"cluster_bits": 0}, "Unsupported cluster size: 2^0"),
    Case("header-length-100", {"header_length": 100}, "qcow2 header too short"),
    Case("header-length-0", {"header_length": 0}, "qcow2 header too short"),
    Case("truncated-v3-header", {}, "qcow2 header too short", truncate=90),
    Case(
        "header-exceeds-cluster",
        {"cluster_bits": 9, "header_length": 1024},
        "qcow2 header exceeds cluster size",
    ),
    Case(
        "backing-offset-past-cluster",
        {"backing_name": b"b", "backing_file_offset": (1 << 16) + 8},
        "Invalid backing file offset",
    ),
    Case(
        "compression-type-2",
        {"incompatible_features": 8, "compression_type": 2},
        "unknown compression type: 2",
    ),
    Case(
        "zlib-with-compression-bit",
        {"incompatible_features": 8},
        "Compression type incompatible feature bit must not be set",
    ),
    Case("zstd-without-compression-bit", {"compression_type": 1}, "bit must be set for zstd"),
    Case(
        "unknown-feature-named",
        {
            "incompatible_features": 1 << 10,
            "extensions": [(EXT_FEATURE_NAME_TABLE, feature_table((0, 10, "time travel")))],
        },
        "Unsupported qcow2 feature(s): time travel",
    ),
    Case(
        "unknown-features-mixed",
        {
            "incompatible_features": (1 << 10) | (1 << 40),
            "extensions": [
                (EXT_FEATURE_NAME_TABLE, feature_table((1, 10, "compat, not it"), (0, 10, "warp")))
            ],
        },
        "Unsupported qcow2 feature(s): warp, Unknown incompatible feature: 10000000000",
    ),
    Case(
        "unknown-feature-unnamed",
        {"incompatible_features": 1 << 63},
        "Unknown incompatible feature: 8000000000000000",
    ),
    Case(
        "unknown-feature-broken-table",
        {
            "incompatible_features": 1 << 5,
            "extensions": [(EXT_FEATURE_NAME_TABLE, feature_table((0, 5, "x")))],
            "extension_lengths": {0: 1 << 20},
        },
        "Unknown incompatible feature: 20",
    ),
    Case(
        "extended-l2-small-cluster",
        {"incompatible_features": 16, "cluster_bits": 13},
        "Unsupported subcluster size: 256",
    ),
    Case("refcount-order-7", {"refcount_order": 7}, "Reference count entry width too large"),
    Case(
        "no-refcount-table",
        {"refcount_table_clusters": 0},
        "Image does not contain a reference count table",
    ),
    Case(
        "refcount-table-too-large",
        {"refcount_table_clusters": (8 << 20) // (1 << 16) + 1},
        "Reference count table too large",
    ),
    Case(
        "refcount-table-unaligned",
        {"refcount_table_offset": (1 << 16) + 512},
        "Reference count table offset invalid",
    ),
    Case(
        "refcount-table-past-2^63",
        {"refcount_table_offset": (1 << 63) - (1 << 16)},
        "Reference count table offset invalid",
    ),
    Case("too-many-snapshots", {"nb_snapshots": 65537}, "Snapshot table too large"),
    Case(
        "snapshot-table-unaligned",
        {"nb_snapshots": 1, "snapshots_offset": 12345},
        "Snapshot table offset invalid",
    ),
    Case("l1-too-large", {"l1_size": (32 << 20) // 8 + 1}, "Active L1 table too large"),
    Case("l1-unaligned", {"l1_table_offset": (3 << 16) + 8}, "Active L1 table offset invalid"),
    Case(
        "l1-past-2^63",
        {"l1_table_offset": ((1 << 63) - (1 << 16)), "l1_size": 1 << 14},
        "Active L1 table offset invalid",
    ),
    Case("image-too-big", {"size": 1 << 63, "cluster_bits": 9, "l1_size": 0}, "Image is too big"),
    Case("l1-too-small", {"size": 1 << 40, "l1_size": 1}, "L1 table is too small"),
    Case("crypt-method-3", {"crypt_method": 3}, "Unsupported encryption method 3"),
    Case(
        "extension-overruns",
        {"extensions": [(0x1234, b"12345678")], "extension_lengths": {0: 100000}},
        "Header extension too large",
    ),
    Case(
        "extension-overruns-backing-name",
        {
            "backing_name": b"base.img",
            "extensions": [(EXT_BACKING_FORMAT, b"raw")],
            "extension_lengths": {0: 64},
        },
        "Header extension too large",
    ),
    Case(
        "extension-header-does-not-fit",
        {"cluster_bits": 9, "header_length": 508, "end_marker": False},
        "Header extension too large",
    ),
    Case(
        "backing-format-too-long",
        {"backing_name": b"b.img", "extensions": [(EXT_BACKING_FORMAT, b"q" * 16)]},
        "Backing format name too long",
    ),
    Case(
        "encryption-extension-without-luks",
        {"extensions": [fde()]},
        "encryption header extension found, but the image is not LUKS-encrypted",
    ),
    Case(
        "encryption-extension-bad-length",
        {"crypt_method": 2, "extensions": [(EXT_FULL_DISK_ENCRYPTION, bytes(8))]},
        "encryption header extension has 8 bytes, expected 16",
    ),
    Case(
        "encryption-header-unaligned",
        {"crypt_method": 2, "extensions": [fde(offset=4096)]},
        "Encryption header offset 4096 is not a multiple of the cluster size",
    ),
    Case(
        "luks-without-encryption-extension",
        {"crypt_method": 2},
        "LUKS encryption without the encryption header extension",
    ),
    Case(
        "bitmaps-bad-length",
        {"extensions": [(EXT_BITMAPS, bytes(16))]},
        "bitmaps extension has 16 bytes, expected 24",
    ),
    Case(
        "bitmaps-reserved",
        {**BITMAPS_ON, "extensions": [(EXT_BITMAPS, bitmaps_ext(reserved=1))]},
        "reserved field is not zero",
    ),
    Case(
        "bitmaps-too-many",
        {**BITMAPS_ON, "extensions": [(EXT_BITMAPS, bitmaps_ext(nb_bitmaps=65536))]},
        "65536 bitmaps",
    ),
    Case(
        "bitmaps-zero",
        {**BITMAPS_ON, "extensions": [(EXT_BITMAPS, bitmaps_ext(nb_bitmaps=0))]},
        "bitmaps extension with zero bitmaps",
    ),
    Case(
        "bitmaps-directory-unaligned",
        {**BITMAPS_ON, "extensions": [(EXT_BITMAPS, bitmaps_ext(offset=100))]},
        "bitmap directory offset 100 is not cluster-aligned",
    ),
    Case(
        "bitmaps-directory-too-large",
        {**BITMAPS_ON, "extensions": [(EXT_BITMAPS, bitmaps_ext(size=1 << 30))]},
        "bitmap directory size 1073741824 exceeds",
    ),
    Case(
        "data-file-bit-without-name",
        {"incompatible_features": 4},
        "the image names no data file",
    ),
    Case(
        "data-file-raw-without-data-file",
        {"autoclear_features": 2, "extensions": [(EXT_DATA_FILE, b"d.raw")]},
        "data-file-raw requires a data file",
    ),
    Case(
        "backing-name-too-long",
        {"backing_name": b"n" * 1024},
        "Backing file name too long: 1024 bytes",
    ),
    Case(
        "backing-name-past-cluster",
        {"backing_name": b"n", "backing_file_offset": (1 << 16) - 4, "backing_file_size": 8},
        "Backing file name too long: 8 bytes",
    ),
]


def write_case(directory: Path, case: Case) -> Path:
    data = build(Qcow2Spec().replace(**case.changes))
    if case.truncate is not None:
        data = data[: case.truncate]
    path = directory / f"{case.id}.qcow2"
    path.write_bytes(data)
    return path


@pytest.fixture(scope="session")
def qemu_io(qemu_img_path: str) -> str:
    """qemu-io, which opens an image for I/O as a read-only VM disk would."""
    path = shutil.which("qemu-io") or str(Path(qemu_img_path).with_name("qemu-io"))
    if not os.access(path, os.X_OK):
        if REQUIRE_QEMU:
            pytest.fail("qemu-io is required (IMGLOCK_REQUIRE_QEMU=1) but not installed")
        pytest.skip("qemu-io is not installed")
    return path


def qemu_opens(qemu_io: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [qemu_io, "-r", "-U", "-f", "qcow2", "-c", "read 0 512", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_library_names_file_and_fault(tmp_path: Path, case: Case) -> None:
    path = write_case(tmp_path, case)
    with pytest.raises(FormatError) as info:
        image = open_image(path, "qcow2" if case.forced else None)
        image.close()
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert case.complaint in message
    assert "\n" not in message
    assert info.value.exit_status == EX_DATAERR


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_parser_alone_gives_the_same_fault(tmp_path: Path, case: Case) -> None:
    data = write_case(tmp_path, case).read_bytes()
    with pytest.raises(FormatError, match=r"^mem\.qcow2: ") as info:
        parse_header_bytes(data, "mem.qcow2")
    assert case.complaint in str(info.value)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_one_line_and_status_65(imglock_cli, tmp_path: Path, case: Case) -> None:  # type: ignore[no-untyped-def]
    path = write_case(tmp_path, case)
    args = ["--format", "qcow2"] if case.forced else []
    proc = imglock_cli("info", *args, path, timeout=30)
    assert proc.returncode == EX_DATAERR, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"imglock: {path}: ")
    assert case.complaint in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.qemu
def test_control_image_opens_in_qemu_and_imglock(qemu_io: str, tmp_path: Path) -> None:
    path = tmp_path / "valid.qcow2"
    path.write_bytes(build(Qcow2Spec()))
    assert qemu_opens(qemu_io, path).returncode == 0
    open_image(path).close()


@pytest.mark.qemu
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_qemu_refuses_it_too(qemu_io: str, tmp_path: Path, case: Case) -> None:
    path = write_case(tmp_path, case)
    proc = qemu_opens(qemu_io, path)
    assert proc.returncode != 0, f"QEMU opened an image imglock refuses: {proc.stdout}"
    assert "can't open device" in proc.stderr, proc.stderr
