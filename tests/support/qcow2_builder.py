"""A tiny writer of qcow2 images by hand, for headers qemu-img would never make.

:class:`Qcow2Spec` describes the fixed header fields, the header extensions
and the backing file name; :func:`build` turns it into the bytes of a small
but complete image (header cluster, refcount table, one refcount block and
an empty L1 table), so that a valid spec also opens in QEMU and a malformed
one fails for the single reason the test is about.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The ``qemu_img`` fixture's type: run qemu-img with these arguments.
QemuImg = Callable[..., subprocess.CompletedProcess[str]]

MAGIC = 0x514649FB
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAME_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_FULL_DISK_ENCRYPTION = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# The clusters of a built image: header, refcount table, refcount block, L1.
_HEADER_CLUSTER, _REFTABLE_CLUSTER, _REFBLOCK_CLUSTER, _L1_CLUSTER = range(4)
_CLUSTERS = 4


@dataclass
class Qcow2Spec:
    """Every field of a qcow2 header, defaulting to a valid 1 MiB v3 image."""

    magic: int = MAGIC
    version: int = 3
    backing_file_offset: int | None = None  # None: right after the extensions
    backing_file_size: int | None = None  # None: len(backing_name)
    cluster_bits: int = 16
    size: int = 1 << 20
    crypt_method: int = 0
    l1_size: int | None = None  # None: just enough for size
    l1_table_offset: int | None = None  # None: the fourth cluster
    refcount_table_offset: int | None = None  # None: the second cluster
    refcount_table_clusters: int = 1
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int | None = None  # None: 72 for v2, 112 for v3
    compression_type: int = 0
    #: (type, payload) pairs written in order after the header; each payload
    #: is padded to 8 bytes.  An end marker follows unless ``end_marker`` is off.
    extensions: list[tuple[int, bytes]] = field(default_factory=list)
    end_marker: bool = True
    backing_name: bytes = b""
    #: Overrides for the length field of the extension at that index.
    extension_lengths: dict[int, int] = field(default_factory=dict)

    @property
    def cluster_size(self) -> int:
        """The cluster size the image is laid out with (clamped to 512 B..2 MiB,
        so that a spec with an absurd ``cluster_bits`` still builds quickly)."""
        return 1 << min(max(self.cluster_bits, 9), 21)

    def replace(self, **changes: object) -> Qcow2Spec:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def feature_table(*entries: tuple[int, int, str]) -> bytes:
    """The payload of a feature name table: (type, bit, name) entries."""
    return b"".join(struct.pack(">BB46s", t, bit, name.encode()) for t, bit, name in entries)


def bitmaps_ext(nb_bitmaps: int = 1, size: int = 64, offset: int = 0, reserved: int = 0) -> bytes:
    """The payload of a bitmaps extension."""
    return struct.pack(">IIQQ", nb_bitmaps, reserved, size, offset)


def crypto_ext(offset: int, length: int) -> bytes:
    """The payload of a full disk encryption header pointer."""
    return struct.pack(">QQ", offset, length)


def _default_l1_size(spec: Qcow2Spec) -> int:
    """Just enough L1 entries for the virtual size (within what the field holds)."""
    cluster_bits = spec.cluster_size.bit_length() - 1
    extended = spec.incompatible_features & (1 << 4)
    shift = 2 * cluster_bits - (4 if extended else 3)
    return min(max(1, (spec.size + (1 << shift) - 1) >> shift), 0xFFFFFFFF)


def header_bytes(spec: Qcow2Spec) -> bytes:
    """The header cluster (cluster 0) described by *spec*."""
    cs = spec.cluster_size
    header_length = spec.header_length
    if header_length is None:
        header_length = 72 if spec.version == 2 else 112
    ext_area = bytearray()
    for index, (ext_type, payload) in enumerate(spec.extensions):
        length = spec.extension_lengths.get(index, len(payload))
        ext_area += struct.pack(">II", ext_type, length)
        ext_area += payload + b"\0" * (-len(payload) % 8)
    if spec.end_marker:
        ext_area += struct.pack(">II", EXT_END, 0)
    backing_offset = spec.backing_file_offset
    if backing_offset is None:
        backing_offset = header_length + len(ext_area) if spec.backing_name else 0
    backing_size = spec.backing_file_size
    if backing_size is None:
        backing_size = len(spec.backing_name)
    fixed = struct.pack(
        ">IIQIIQIIQQIIQ",
        spec.magic,
        spec.version,
        backing_offset,
        backing_size,
        spec.cluster_bits,
        spec.size,
        spec.crypt_method,
        _default_l1_size(spec) if spec.l1_size is None else spec.l1_size,
        _L1_CLUSTER * cs if spec.l1_table_offset is None else spec.l1_table_offset,
        _REFTABLE_CLUSTER * cs
        if spec.refcount_table_offset is None
        else spec.refcount_table_offset,
        spec.refcount_table_clusters,
        spec.nb_snapshots,
        spec.snapshots_offset,
    )
    if spec.version >= 3:
        fixed += struct.pack(
            ">QQQIIB7x",
            spec.incompatible_features,
            spec.compatible_features,
            spec.autoclear_features,
            spec.refcount_order,
            header_length,
            spec.compression_type,
        )
    # Place the extensions at header_length, as a reader finds them.
    out = bytearray(cs)
    out[: len(fixed)] = fixed
    # A header_length shorter than the fields written cannot move them.
    ext_at = max(header_length, len(fixed))
    out[ext_at : ext_at + len(ext_area)] = ext_area
    if spec.backing_name and 0 < backing_offset < len(out):
        out[backing_offset : backing_offset + len(spec.backing_name)] = spec.backing_name
    return bytes(out[:cs])


def build(spec: Qcow2Spec) -> bytes:
    """A complete small image: header, refcount table and block, empty L1."""
    cs = spec.cluster_size
    image = bytearray(header_bytes(spec).ljust(cs, b"\0"))
    reftable = bytearray(cs)
    struct.pack_into(">Q", reftable, 0, _REFBLOCK_CLUSTER * cs)
    refblock = bytearray(cs)
    width = 1 << spec.refcount_order if 0 <= spec.refcount_order <= 6 else 16
    if width >= 8:
        for cluster in range(_CLUSTERS):
            refblock[cluster * width // 8 + width // 8 - 1] = 1
    else:
        # Sub-byte refcounts are packed from the least significant bit.
        for cluster in range(_CLUSTERS):
            bit = cluster * width
            refblock[bit // 8] |= 1 << (bit % 8)
    image += reftable + refblock + bytes(cs)
    return bytes(image)


def write(path: Path, spec: Qcow2Spec | None = None, **changes: object) -> Path:
    """Write the image for *spec* (with *changes* applied) to *path*."""
    spec = (spec or Qcow2Spec()).replace(**changes)
    path.write_bytes(build(spec))
    return path


# --- Comparing with qemu-img ------------------------------------------------

#: What qemu-img reports that imglock leaves out, because it lies past the
#: header cluster (snapshot table, bitmap directory, LUKS header); imglock
#: reports the counts instead.
QEMU_ONLY = ("snapshots", "format-specific.data.bitmaps", "format-specific.data.encrypt.")
#: imglock's own keys, checked against qemu-img separately.
IMGLOCK_ONLY = ("snapshot-count", "format-specific.data.bitmap-count")


def _flatten(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        flat: dict[str, object] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def qemu_differences(ours: dict[str, Any], qemu: dict[str, Any]) -> list[str]:
    """Where ``imglock info --json`` and ``qemu-img info --output=json`` disagree: a key
    both report with different values, or a key of either not accounted for."""
    mine, theirs = _flatten(ours), _flatten(qemu)
    encrypt_format = "format-specific.data.encrypt.format"
    differences = []
    for key, value in theirs.items():
        if key.startswith(QEMU_ONLY) and key != encrypt_format:
            continue
        if key not in mine:
            differences.append(f"imglock lacks {key!r} (qemu-img: {value!r})")
        elif mine[key] != value:
            differences.append(f"{key}: imglock {mine[key]!r} != qemu-img {value!r}")
    differences += [
        f"imglock reports {key!r}, qemu-img does not"
        for key in mine
        if key not in IMGLOCK_ONLY and key not in theirs
    ]
    snapshots = len(qemu.get("snapshots", []))
    if ours.get("snapshot-count", 0) != snapshots:
        differences.append(f"snapshot-count: imglock {ours.get('snapshot-count')!r}, {snapshots}")
    bitmaps = len(qemu.get("format-specific", {}).get("data", {}).get("bitmaps", []))
    if mine.get("format-specific.data.bitmap-count", 0) != bitmaps:
        counted = mine.get("format-specific.data.bitmap-count")
        differences.append(f"bitmap-count: imglock {counted!r}, {bitmaps} bitmaps")
    return differences


def assert_matches_qemu(ours: dict[str, Any], qemu: dict[str, Any]) -> None:
    """Every key both report agrees, and every key of either is accounted for."""
    differences = qemu_differences(ours, qemu)
    assert not differences, "; ".join(differences)


def open_fd_count() -> int:
    """How many descriptors this process has open (for leak checks)."""
    return len(os.listdir("/proc/self/fd"))
