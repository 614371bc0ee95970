"""The qcow2 driver against real images made by qemu-img, compared key by key."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from qcow2_builder import (
    Qcow2Spec,
    QemuImg,
    assert_matches_qemu,
    build,
    header_bytes,
    qemu_differences,
)

from imglock.formats import DRIVERS, FORMAT_NAMES, driver_for, open_image, probe
from imglock.formats.qcow2 import (
    QCOW2_EXT_BACKING_FORMAT,
    QCOW2_INCOMPAT_CORRUPT,
    QCOW2_INCOMPAT_DIRTY,
    Qcow2Driver,
    Qcow2Header,
    parse_header,
    parse_header_bytes,
    path_has_protocol,
    resolve_backing_name,
    resolve_data_file_name,
)

SECRET = ("--object", "secret,id=sec0,data=123456")
# SHA-512 rounds are slow enough for qemu-img's PBKDF timing loop to see CPU
# time: with the default SHA-256 a fast machine finishes the first round
# before getrusage() has accounted for it, and qemu-img (7.2 to 9.2) fails
# with "Unable to get accurate CPU usage".
LUKS = (
    *SECRET,
    "-o",
    "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.hash-alg=sha512,encrypt.iter-time=10",
)

# (test id, qemu-img create options, size); each is created, then compared.
CREATE_CASES: list[tuple[str, tuple[str, ...], str]] = [
    ("default", (), "1G"),
    ("compat-0.10", ("-o", "compat=0.10"), "1G"),
    ("compat-1.1", ("-o", "compat=1.1"), "10M"),
    ("odd-size", (), "1000"),
    ("zero-size", (), "0"),
    ("huge", (), "64T"),
    *[
        (f"cluster-{cs}", ("-o", f"cluster_size={cs}"), "100M")
        for cs in ("512", "1k", "4k", "64k", "256k", "2M")
    ],
    ("v2-cluster-512", ("-o", "compat=0.10,cluster_size=512"), "16M"),
    ("v2-cluster-2M", ("-o", "compat=0.10,cluster_size=2M"), "16G"),
    *[
        (f"refcount-{bits}", ("-o", f"refcount_bits={bits}"), "1G")
        for bits in (1, 2, 4, 8, 16, 32, 64)
    ],
    ("lazy-refcounts", ("-o", "lazy_refcounts=on"), "1G"),
    ("extended-l2", ("-o", "extended_l2=on"), "1G"),
    ("extended-l2-16k", ("-o", "extended_l2=on,cluster_size=16k"), "1G"),
    ("extended-l2-2M", ("-o", "extended_l2=on,cluster_size=2M"), "1G"),
    ("zstd", ("-o", "compression_type=zstd"), "1G"),
    (
        "everything",
        (
            "-o",
            "compression_type=zstd,extended_l2=on,lazy_refcounts=on,refcount_bits=8,cluster_size=128k",
        ),
        "5G",
    ),
    ("prealloc-metadata", ("-o", "preallocation=metadata"), "8M"),
    ("prealloc-full", ("-o", "preallocation=full"), "2M"),
]


def create(qemu_img: QemuImg, path: Path, *options: str, size: str = "1M") -> Path:
    qemu_img("create", "-q", "-f", "qcow2", *options, path, size)
    return path


def create_luks(qemu_img: QemuImg, path: Path, *options: str, size: str = "4M") -> Path:
    """A LUKS-encrypted qcow2 image.

    qemu-img times its key derivation with getrusage and, on a busy or
    coarse-clocked machine, now and then gives up with "Unable to get
    accurate CPU usage"; that (and only that) is retried.
    """
    opts = f"{LUKS[-1]},{','.join(options)}" if options else LUKS[-1]
    for _ in range(4):
        proc = qemu_img("create", "-q", "-f", "qcow2", *LUKS[:-1], opts, path, size, check=False)
        if proc.returncode == 0:
            return path
        assert "accurate CPU usage" in proc.stderr, proc.stderr
    raise AssertionError("qemu-img could not time the LUKS key derivation")


def qemu_info(qemu_img: QemuImg, path: str | Path, *extra: str) -> Any:
    proc = qemu_img("info", "-U", "--output=json", *extra, path)
    return json.loads(proc.stdout)


def imglock_info(path: str | Path) -> dict[str, Any]:
    image = open_image(path)
    try:
        return image.driver.info(image)
    finally:
        image.close()


def assert_same_as_qemu(qemu_img: QemuImg, path: str | Path) -> dict[str, Any]:
    ours = imglock_info(path)
    assert_matches_qemu(ours, qemu_info(qemu_img, path))
    return ours


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("options", "size"), [case[1:] for case in CREATE_CASES], ids=[c[0] for c in CREATE_CASES]
)
def test_created_image_matches_qemu_img(
    qemu_img: QemuImg, tmp_path: Path, options: tuple[str, ...], size: str
) -> None:
    path = create(qemu_img, tmp_path / "disk.qcow2", *options, size=size)
    ours = assert_same_as_qemu(qemu_img, path)
    assert ours["format"] == "qcow2"


@pytest.mark.qemu
@pytest.mark.parametrize("count", [1, 3])
def test_snapshots_are_counted(qemu_img: QemuImg, tmp_path: Path, count: int) -> None:
    path = create(qemu_img, tmp_path / "snap.qcow2")
    for n in range(count):
        qemu_img("snapshot", "-c", f"snap{n}", path)
    ours = assert_same_as_qemu(qemu_img, path)
    assert ours["snapshot-count"] == count


@pytest.mark.qemu
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_snapshots_on_both_versions(qemu_img: QemuImg, tmp_path: Path, compat: str) -> None:
    path = create(qemu_img, tmp_path / "snap.qcow2", "-o", f"compat={compat}")
    qemu_img("snapshot", "-c", "s", path)
    assert assert_same_as_qemu(qemu_img, path)["snapshot-count"] == 1


@pytest.mark.qemu
@pytest.mark.parametrize(
    "bitmaps", [[("b0", ())], [("b0", ()), ("b1", ("--disable", "-g", "128k")), ("b2", ())]]
)
def test_persistent_bitmaps(
    qemu_img: QemuImg, tmp_path: Path, bitmaps: list[tuple[str, tuple[str, ...]]]
) -> None:
    path = create(qemu_img, tmp_path / "bm.qcow2")
    for name, extra in bitmaps:
        qemu_img("bitmap", "--add", *extra, path, name)
    ours = assert_same_as_qemu(qemu_img, path)
    header = open_header(path)
    assert header.bitmaps is not None
    assert header.bitmaps.nb_bitmaps == len(bitmaps)
    assert ours["format-specific"]["data"]["bitmap-count"] == len(bitmaps)


@pytest.mark.qemu
@pytest.mark.parametrize("raw", [False, True], ids=["data-file", "data-file-raw"])
def test_external_data_file(
    qemu_img: QemuImg, tmp_path: Path, raw: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # QEMU creates (and opens) a relative data file name from its working directory.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    opts = f"data_file=sub/data.raw,data_file_raw={'on' if raw else 'off'}"
    path = create(qemu_img, Path("sub/top.qcow2"), "-o", opts, size="8M")
    ours = assert_same_as_qemu(qemu_img, path)
    data = ours["format-specific"]["data"]
    assert data["data-file"] == "sub/data.raw"
    assert data["data-file-raw"] is raw
    image = open_image(path)
    try:
        (child,) = image.children()
    finally:
        image.close()
    assert (child.role, child.name, child.filename) == ("data-file", "sub/data.raw", "sub/data.raw")


@pytest.mark.qemu
def test_data_file_with_absolute_name(qemu_img: QemuImg, tmp_path: Path) -> None:
    data = tmp_path / "elsewhere" / "data.raw"
    data.parent.mkdir()
    path = create(qemu_img, tmp_path / "top.qcow2", "-o", f"data_file={data}")
    assert_same_as_qemu(qemu_img, path)
    image = open_image(path)
    try:
        assert [c.filename for c in image.children()] == [str(data)]
    finally:
        image.close()


@pytest.mark.qemu
@pytest.mark.parametrize("cluster_size", ["64k", "4k"])
def test_luks_encryption(qemu_img: QemuImg, tmp_path: Path, cluster_size: str) -> None:
    path = create_luks(qemu_img, tmp_path / "luks.qcow2", f"cluster_size={cluster_size}")
    ours = assert_same_as_qemu(qemu_img, path)
    header = open_header(path)
    assert header.encryption is not None
    assert header.encryption.offset % header.cluster_size == 0
    assert header.encryption.length > 0
    assert ours["encrypted"] is True


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("layout", "backing_arg"),
    [
        ("same-dir", "base.qcow2"),
        ("relative-up", "../b/base.qcow2"),
        ("relative-down", "b/base.qcow2"),
        ("absolute", "ABS"),
    ],
)
@pytest.mark.parametrize("backing_format", ["qcow2", "raw"])
def test_backing_file_names(
    qemu_img: QemuImg,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    layout: str,
    backing_arg: str,
    backing_format: str,
) -> None:
    top_dir = {"same-dir": "b", "relative-up": "a", "relative-down": ".", "absolute": "a"}[layout]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    base = tmp_path / "b" / "base.qcow2"
    qemu_img("create", "-q", "-f", backing_format, base, "1M")
    monkeypatch.chdir(tmp_path)
    name = str(base) if backing_arg == "ABS" else backing_arg
    top = f"{top_dir}/top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", name, "-F", backing_format, top)
    ours = assert_same_as_qemu(qemu_img, top)
    assert ours["backing-filename"] == name
    assert ours["backing-filename-format"] == backing_format
    # The resolved name opens the very file qemu-img created.
    assert os.path.samefile(str(ours["full-backing-filename"]), base)


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("bit", "key"), [(QCOW2_INCOMPAT_DIRTY, "dirty-flag"), (QCOW2_INCOMPAT_CORRUPT, "corrupt")]
)
def test_dirty_and_corrupt_bits(qemu_img: QemuImg, tmp_path: Path, bit: int, key: str) -> None:
    path = create(qemu_img, tmp_path / "bits.qcow2")
    with path.open("r+b") as f:
        f.seek(72)
        (incompat,) = struct.unpack(">Q", f.read(8))
        f.seek(72)
        f.write(struct.pack(">Q", incompat | bit))
    ours = assert_same_as_qemu(qemu_img, path)
    flat = {**ours, **ours["format-specific"]["data"]}
    assert flat[key] is True


@pytest.mark.qemu
def test_handbuilt_valid_images_match_qemu(qemu_img: QemuImg, tmp_path: Path) -> None:
    """Headers qemu-img never writes, but accepts: imglock must accept them too."""
    specs = {
        "header-length-105": Qcow2Spec(header_length=105),
        "header-length-104": Qcow2Spec(header_length=104),
        "header-length-4096": Qcow2Spec(header_length=4096),
        "backing-before-extensions": Qcow2Spec(backing_name=b"base.img", backing_file_offset=80),
        "empty-backing-name": Qcow2Spec(backing_file_offset=600, backing_file_size=0),
        "unknown-extension": Qcow2Spec(extensions=[(0x12345678, b"abcdefghijk")]),
        "stray-data-file-name": Qcow2Spec(extensions=[(0x44415441, b"ignored.raw")]),
        "bitmaps-without-autoclear": Qcow2Spec(extensions=[(0x23852875, bytes(24))]),
        "aes": Qcow2Spec(crypt_method=1),
        "v2": Qcow2Spec(version=2),
        "size-not-sector-multiple": Qcow2Spec(size=1000),
        "protocol-backing": Qcow2Spec(
            backing_name=b"nbd://localhost/x", extensions=[(QCOW2_EXT_BACKING_FORMAT, b"raw")]
        ),
    }
    differences = {}
    for name, spec in specs.items():
        path = tmp_path / f"{name}.qcow2"
        path.write_bytes(build(spec))
        differences[name] = qemu_differences(imglock_info(path), qemu_info(qemu_img, path))
    assert {name: found for name, found in differences.items() if found} == {}


def open_header(path: str | Path) -> Qcow2Header:
    image = open_image(path)
    try:
        assert isinstance(image.header, Qcow2Header)
        return image.header
    finally:
        image.close()


# --- Without QEMU -----------------------------------------------------------


def test_parse_default_spec() -> None:
    header = parse_header_bytes(header_bytes(Qcow2Spec()), "x.qcow2")
    assert (header.version, header.cluster_size, header.size) == (3, 65536, 1 << 20)
    assert header.refcount_bits == 16
    assert header.backing_file is None
    assert header.unknown_extensions == ()
    assert not (header.dirty or header.corrupt or header.lazy_refcounts or header.extended_l2)


def test_v2_header_gets_implied_fields() -> None:
    header = parse_header_bytes(header_bytes(Qcow2Spec(version=2)), "v2.qcow2")
    assert header.header_length == 72
    assert header.refcount_order == 4
    assert header.compat == "0.10"
    assert (header.incompatible_features, header.compatible_features) == (0, 0)


def test_extensions_are_decoded() -> None:
    from qcow2_builder import EXT_DATA_FILE, bitmaps_ext, crypto_ext, feature_table

    spec = Qcow2Spec(
        crypt_method=2,
        incompatible_features=1 << 2,
        autoclear_features=0b11,
        backing_name=b"base.qcow2",
        extensions=[
            (QCOW2_EXT_BACKING_FORMAT, b"qcow2"),
            (0x6803F857, feature_table((0, 0, "dirty bit"), (1, 0, "lazy refcounts"))),
            (0x23852875, bitmaps_ext(nb_bitmaps=3, size=120, offset=5 << 16)),
            (0x0537BE77, crypto_ext(4 << 16, 2 << 20)),
            (EXT_DATA_FILE, b"data.raw"),
            (0xAAAA0001, b"x"),
            (0xAAAA0002, b""),
        ],
    )
    header = parse_header_bytes(build(spec), "ext.qcow2")
    assert header.backing_file == "base.qcow2"
    assert header.backing_format == "qcow2"
    assert [(f.type, f.bit, f.name) for f in header.feature_names] == [
        (0, 0, "dirty bit"),
        (1, 0, "lazy refcounts"),
    ]
    assert header.bitmaps is not None
    assert (header.bitmaps.nb_bitmaps, header.bitmaps.bitmap_directory_size) == (3, 120)
    assert header.bitmaps.bitmap_directory_offset == 5 << 16
    assert header.encryption is not None
    assert (header.encryption.offset, header.encryption.length) == (4 << 16, 2 << 20)
    assert header.data_file == "data.raw"
    assert header.data_file_raw
    assert header.unknown_extensions == (0xAAAA0001, 0xAAAA0002)


def test_names_that_are_not_utf8_round_trip() -> None:
    raw_name = b"caf\xe9/base.qcow2"
    header = parse_header_bytes(build(Qcow2Spec(backing_name=raw_name)), "x")
    assert header.backing_file is not None
    assert os.fsencode(header.backing_file) == raw_name


def test_name_stops_at_nul_like_a_c_string() -> None:
    header = parse_header_bytes(build(Qcow2Spec(backing_name=b"base\0junk")), "x")
    assert header.backing_file == "base"
    header = parse_header_bytes(build(Qcow2Spec(backing_name=b"\0junk")), "x")
    assert header.backing_file is None


@pytest.mark.parametrize("cluster_bits", [9, 12, 16, 21])
@pytest.mark.parametrize("with_backing", [False, True])
def test_reads_stay_inside_the_header_cluster(cluster_bits: int, with_backing: bool) -> None:
    spec = Qcow2Spec(cluster_bits=cluster_bits, backing_name=b"b.img" if with_backing else b"")
    data = build(spec) + b"\xff" * 4096  # past cluster 0 lies garbage
    asked: list[tuple[int, int]] = []

    def fetch(offset: int, length: int) -> bytes:
        asked.append((offset, length))
        return data[offset : offset + length]

    parse_header(fetch, "x.qcow2")
    assert max(offset + length for offset, length in asked) <= 1 << cluster_bits
    if with_backing:
        # The name sits right after the extensions: no need to read further.
        assert max(offset + length for offset, length in asked) <= 4096


def test_short_file_reads_as_zero_padded() -> None:
    """A v2 header alone (72 bytes) is a complete image, as for QEMU."""
    data = header_bytes(Qcow2Spec(version=2))[:72]
    assert parse_header_bytes(data, "short").version == 2


@pytest.mark.parametrize(
    ("head", "score"),
    [
        (b"QFI\xfb\0\0\0\x02", 100),
        (b"QFI\xfb\0\0\0\x03", 100),
        (b"QFI\xfb\0\0\0\x09", 100),  # a future version probes as qcow2, then is refused
        (b"QFI\xfb\0\0\0\x01", 0),  # qcow version 1
        (b"QFI\xfb\0\0\0", 0),  # too short: the version reads as 0
        (b"QFI", 0),
        (b"", 0),
        (bytes(512), 0),
    ],
)
def test_probe_scores(head: bytes, score: int) -> None:
    assert Qcow2Driver().probe(head, "x") == score


def test_probe_picks_raw_as_fallback() -> None:
    assert probe(bytes(2048), "x").name == "raw"
    assert probe(b"QFI\xfb\0\0\0\x03", "x").name == "qcow2"


def test_there_is_one_driver_per_format_in_probing_order() -> None:
    assert [driver.name for driver in DRIVERS] == list(FORMAT_NAMES) == ["qcow2", "raw"]
    assert driver_for("qcow2") is DRIVERS[0]
    assert driver_for("raw") is DRIVERS[1]
    assert probe(b"QFI\xfb\0\0\0\x03", "x") is DRIVERS[0]


@pytest.mark.parametrize(
    "head",
    [
        b"QFI\xfb\0\0\0\x02",
        b"QFI\xfb\0\0\0\x09",
        b"QFI\xfb\0\0\0",
        b"QFI\xfb",
        b"QFI",
        b"",
        bytes(2048),
        b"\xfbIFQ" + bytes(60),
    ],
)
def test_probing_by_magic_picks_the_driver_with_the_best_score(head: bytes) -> None:
    # Probing asks only the drivers whose magic the file carries: the same
    # winner as asking every driver, first in probing order on a tie.
    best = max(DRIVERS, key=lambda driver: driver.probe(head, "x"))
    assert probe(head, "x") is best


@pytest.mark.parametrize(
    ("name", "protocol"),
    [
        ("nbd://host/export", True),
        ("nbd:localhost:10809", True),
        ("json:{}", True),
        ("rbd:pool/image", True),
        ("foo:bar.img", True),
        ("./foo:bar.img", False),
        ("dir/foo:bar", False),
        ("/abs/x:y", False),
        ("plain.qcow2", False),
    ],
)
def test_path_has_protocol(name: str, protocol: bool) -> None:
    assert path_has_protocol(name) is protocol


@pytest.mark.parametrize(
    ("image", "name", "expected"),
    [
        ("a/top.qcow2", "../b/base.qcow2", "a/../b/base.qcow2"),
        ("top.qcow2", "base.qcow2", "base.qcow2"),
        ("/x/y/top", "base", "/x/y/base"),
        ("/top", "base", "/base"),
        ("a//top", "base", "a//base"),
        ("a/top.qcow2", "/abs/base", "/abs/base"),
        ("a/top.qcow2", "nbd://h/e", None),
        ("a/top.qcow2", 'json:{"file": {}}', None),
        ("a/top.qcow2", "file:/abs/base", "/abs/base"),
    ],
)
def test_resolve_backing_name(image: str, name: str, expected: str | None) -> None:
    assert resolve_backing_name(image, name) == expected


def test_resolve_data_file_name_is_relative_to_the_working_directory() -> None:
    assert resolve_data_file_name("a/top.qcow2", "data.raw") == "data.raw"
    assert resolve_data_file_name("a/top.qcow2", "/d/data.raw") == "/d/data.raw"
    assert resolve_data_file_name("a/top.qcow2", "nbd://h/e") is None
