"""Property tests: whatever bytes the parser meets, only ImglockError comes out.

Real headers made by qemu-img (and hand-built ones with every extension)
are mutated byte by byte and field by field, and random bytes are thrown in
too.  The parser must either return a header that satisfies its own rules
or raise an ImglockError; any other exception (IndexError, struct.error,
UnicodeDecodeError, OverflowError, a hang...) is a bug.  Going through the
files and the chain code as well checks that no descriptor leaks.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from qcow2_builder import (
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_DATA_FILE,
    EXT_FEATURE_NAME_TABLE,
    EXT_FULL_DISK_ENCRYPTION,
    Qcow2Spec,
    QemuImg,
    bitmaps_ext,
    build,
    crypto_ext,
    feature_table,
    open_fd_count,
)

from imglock.chain import open_chain
from imglock.errors import ImglockError
from imglock.formats.qcow2 import (
    QCOW2_MAX_BACKING_FILE_NAME,
    QCOW2_MAX_CLUSTER_BITS,
    QCOW2_MIN_CLUSTER_BITS,
    Qcow2Header,
    parse_header_bytes,
)

pytestmark = pytest.mark.slow

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,  # no example database written into the source tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Offsets and widths of the fixed header fields, for whole-field mutations.
FIELDS = [
    (4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8), (48, 8),
    (56, 4), (60, 4), (64, 8), (72, 8), (80, 8), (88, 8), (96, 4), (100, 4), (104, 1),
]  # fmt: skip
#: How much of each image the mutations work on: the header cluster's start.
WINDOW = 4096

HANDBUILT = [
    build(
        Qcow2Spec(
            crypt_method=2,
            incompatible_features=1 << 2,
            autoclear_features=0b11,
            backing_name=b"../base/base.qcow2",
            extensions=[
                (EXT_BACKING_FORMAT, b"qcow2"),
                (EXT_FEATURE_NAME_TABLE, feature_table((0, 0, "dirty bit"), (0, 9, "x"))),
                (EXT_BITMAPS, bitmaps_ext(nb_bitmaps=2, size=64, offset=1 << 16)),
                (EXT_FULL_DISK_ENCRYPTION, crypto_ext(1 << 17, 4096)),
                (EXT_DATA_FILE, b"data.raw"),
                (0xDEADBEEF, b"unknown"),
            ],
        )
    )[:WINDOW],
    build(Qcow2Spec(version=2, cluster_bits=9, backing_name=b"b"))[:WINDOW],
]


def parse(data: bytes) -> Qcow2Header | ImglockError:
    """Parse *data*: the header, or the ImglockError that refused it.

    Any other exception escapes, and fails the test: that is the bug looked for.
    """
    try:
        header = parse_header_bytes(data, "fuzz.qcow2")
    except ImglockError as exc:
        event(f"refused: {type(exc).__name__}")
        return exc
    event("parsed")
    return header


def broken_rules(outcome: Qcow2Header | ImglockError) -> list[str]:
    """The rules *outcome* breaks: a refusal is one line naming the file, a header obeys
    the header rules."""
    if isinstance(outcome, ImglockError):
        message = str(outcome)
        return [
            rule
            for rule, kept in [
                ("the refusal names the file", message.startswith("fuzz.qcow2: ")),
                ("the refusal is one line", "\n" not in message),
            ]
            if not kept
        ]
    header = outcome
    raw = (header.backing_file or "x").encode("utf-8", "surrogateescape")
    return [
        rule
        for rule, kept in [
            ("version 2 or 3", header.version in (2, 3)),
            (
                "cluster bits in range",
                QCOW2_MIN_CLUSTER_BITS <= header.cluster_bits <= QCOW2_MAX_CLUSTER_BITS,
            ),
            ("the header fits its cluster", header.header_length <= header.cluster_size),
            ("refcount order at most 6", header.refcount_order <= 6),
            ("a backing name not empty, nor too long", 0 < len(raw) <= QCOW2_MAX_BACKING_FILE_NAME),
            ("no NUL in the backing name", b"\0" not in raw),
        ]
        if not kept
    ]


@st.composite
def mutated(draw: st.DrawFn, bases: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(0, 4))):
        offset, width = draw(st.sampled_from(FIELDS))
        value = draw(
            st.one_of(
                st.integers(0, (1 << (8 * width)) - 1),
                st.sampled_from([0, 1, 2, 3, 8, 9, 16, 21, 22, 64, 104, 112, 0xFFFFFFFF]),
            )
        )
        value &= (1 << (8 * width)) - 1
        data[offset : offset + width] = value.to_bytes(width, "big")
    for _ in range(draw(st.integers(0, 12))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


@pytest.fixture(scope="session")
def qemu_headers(qemu_img: QemuImg, tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """The starts of real images: plain, v2, backed, data file, bitmaps, snapshots."""
    d = tmp_path_factory.mktemp("fuzz-bases")
    qemu_img("create", "-q", "-f", "qcow2", d / "base.qcow2", "1G")
    recipes: dict[str, list[list[str]]] = {
        "plain": [[]],
        "v2": [["-o", "compat=0.10"]],
        "small": [["-o", "cluster_size=512,refcount_bits=1"]],
        "backed": [["-b", "base.qcow2", "-F", "qcow2"]],
        "zstd": [["-o", "compression_type=zstd,extended_l2=on"]],
        "data": [["-o", f"data_file={d / 'data.raw'},data_file_raw=on"]],
    }
    out = []
    for name, (options,) in recipes.items():
        path = d / f"{name}.qcow2"
        size = [] if "-b" in options else ["64M"]
        qemu_img("create", "-q", "-f", "qcow2", *options, path, *size)
        if name == "plain":
            qemu_img("snapshot", "-c", "s1", path)
            qemu_img("bitmap", "--add", path, "b0")
        out.append(path.read_bytes()[:WINDOW])
    return out


@pytest.mark.qemu
@FUZZ
@given(data=st.data())
def test_mutated_qemu_headers(qemu_headers: list[bytes], data: st.DataObject) -> None:
    assert isinstance(parse(qemu_headers[0]), Qcow2Header)  # the unmutated base parses
    assert broken_rules(parse(data.draw(mutated(qemu_headers)))) == []


@FUZZ
@given(blob=mutated(HANDBUILT))
def test_mutated_handbuilt_headers(blob: bytes) -> None:
    assert broken_rules(parse(blob)) == []


@FUZZ
@given(
    prefix=st.sampled_from([b"", b"QFI\xfb\0\0\0\x02", b"QFI\xfb\0\0\0\x03"]),
    body=st.binary(max_size=2048),
)
def test_random_bytes(prefix: bytes, body: bytes) -> None:
    assert broken_rules(parse(prefix + body)) == []


@FUZZ
@given(
    fields=st.tuples(
        st.integers(0, 5),  # version
        st.integers(0, 64),  # cluster_bits
        st.integers(0, 8192),  # header_length
        st.integers(0, (1 << 64) - 1),  # incompatible features
        st.integers(0, 0xFFFF),  # backing_file_offset
        st.integers(0, 0xFFFF),  # backing_file_size
    ),
    tail=st.binary(max_size=512),
)
def test_random_fixed_fields(fields: tuple[int, int, int, int, int, int], tail: bytes) -> None:
    version, cluster_bits, header_length, incompat, bf_offset, bf_size = fields
    head = bytearray(build(Qcow2Spec(cluster_bits=12))[:4096])
    struct.pack_into(">IIQI", head, 0, 0x514649FB, version, bf_offset, bf_size)
    struct.pack_into(">I", head, 20, cluster_bits)
    struct.pack_into(">Q", head, 72, incompat)
    struct.pack_into(">I", head, 100, header_length)
    head[112 : 112 + len(tail)] = tail
    assert broken_rules(parse(bytes(head))) == []


@FUZZ
@given(blob=mutated(HANDBUILT[1:]), backing=st.binary(min_size=1, max_size=64))
def test_chain_over_fuzzed_files_leaks_nothing(blob: bytes, backing: bytes) -> None:
    """Files on disk, backing names included: errors only, and no descriptor left open."""
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp) / "top.qcow2"
        spec = Qcow2Spec(version=2, cluster_bits=9, backing_name=backing)
        # A mutated top image, and one whose backing name is random bytes.
        for content in (blob, build(spec)):
            top.write_bytes(content)
            before = open_fd_count()
            try:
                with open_chain(top, max_depth=4):
                    pass
            except ImglockError:
                pass
            assert open_fd_count() == before
