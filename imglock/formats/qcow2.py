"""The qcow2 format: its header, its header extensions, and what it depends on.

The layout and the constants' names follow QEMU's ``docs/interop/qcow2.rst``.
The checks follow what QEMU itself refuses when it opens an image
(``qcow2_do_open`` in ``block/qcow2.c``), in the same order, so that
imglock rejects an image exactly when QEMU would and says which field is
wrong; an image QEMU opens is never refused here.

Only the header cluster (cluster 0, at most 2 MiB) is ever read, and only
as far as the header, its extensions and the backing file name reach.
Like QEMU, bytes past the end of a short file read as zeros.
"""

import os
import struct
from collections.abc import Callable
from typing import Any, Final, NamedTuple

from imglock.errors import FormatError
from imglock.formats.base import Child, FormatDriver, OpenImage
from imglock.safeio import SECTOR_SIZE, allocated_bytes, read_at

QCOW2_MAGIC: Final = 0x514649FB  # "QFI\xfb"
QCOW2_MAGIC_BYTES: Final = b"QFI\xfb"

QCOW2_MIN_VERSION: Final = 2
QCOW2_MAX_VERSION: Final = 3
QCOW2_MIN_CLUSTER_BITS: Final = 9
QCOW2_MAX_CLUSTER_BITS: Final = 21

#: Bytes of the fixed header: a version 2 header, a version 3 header without
#: the compression type, and the whole structure QEMU reads.
QCOW2_V2_HEADER_LENGTH: Final = 72
QCOW2_V3_MIN_HEADER_LENGTH: Final = 104
QCOW2_HEADER_STRUCT_SIZE: Final = 112
QCOW2_COMPRESSION_TYPE_OFFSET: Final = 104

QCOW2_MAX_BACKING_FILE_NAME: Final = 1023
QCOW2_MAX_BACKING_FORMAT_NAME: Final = 15  # QEMU keeps it in char[16]

# Table limits QEMU enforces (block/qcow2.h).
QCOW2_MAX_L1_SIZE: Final = 32 << 20
QCOW2_MAX_REFTABLE_SIZE: Final = 8 << 20
QCOW2_MAX_SNAPSHOTS: Final = 65536
QCOW2_SNAPSHOT_HEADER_SIZE: Final = 40
QCOW2_MAX_BITMAPS: Final = 65535
QCOW2_MAX_BITMAP_DIRECTORY_SIZE: Final = 1024 * QCOW2_MAX_BITMAPS
QCOW2_L1_ENTRY_SIZE: Final = 8
QCOW2_EXTL2_SUBCLUSTERS: Final = 32
#: Offsets are int64_t inside QEMU, so no table may reach past this.
QCOW2_MAX_OFFSET: Final = (1 << 63) - 1
#: QEMU keeps the L1 index of the VM state in an int.
QCOW2_MAX_L1_INDEX: Final = (1 << 31) - 1

QCOW2_CRYPT_NONE: Final = 0
QCOW2_CRYPT_AES: Final = 1
QCOW2_CRYPT_LUKS: Final = 2
CRYPT_METHOD_NAMES: Final = {QCOW2_CRYPT_AES: "aes", QCOW2_CRYPT_LUKS: "luks"}

QCOW2_COMPRESSION_ZLIB: Final = 0
QCOW2_COMPRESSION_ZSTD: Final = 1
COMPRESSION_TYPE_NAMES: Final = {QCOW2_COMPRESSION_ZLIB: "zlib", QCOW2_COMPRESSION_ZSTD: "zstd"}

# Incompatible feature bits.
QCOW2_INCOMPAT_DIRTY: Final = 1 << 0
QCOW2_INCOMPAT_CORRUPT: Final = 1 << 1
QCOW2_INCOMPAT_DATA_FILE: Final = 1 << 2
QCOW2_INCOMPAT_COMPRESSION: Final = 1 << 3
QCOW2_INCOMPAT_EXTL2: Final = 1 << 4
QCOW2_INCOMPAT_MASK: Final = (
    QCOW2_INCOMPAT_DIRTY
    | QCOW2_INCOMPAT_CORRUPT
    | QCOW2_INCOMPAT_DATA_FILE
    | QCOW2_INCOMPAT_COMPRESSION
    | QCOW2_INCOMPAT_EXTL2
)
# Compatible feature bits.
QCOW2_COMPAT_LAZY_REFCOUNTS: Final = 1 << 0
# Autoclear feature bits.
QCOW2_AUTOCLEAR_BITMAPS: Final = 1 << 0
QCOW2_AUTOCLEAR_DATA_FILE_RAW: Final = 1 << 1

# Header extension types.
QCOW2_EXT_END: Final = 0x00000000
QCOW2_EXT_BACKING_FORMAT: Final = 0xE2792ACA
QCOW2_EXT_FEATURE_NAME_TABLE: Final = 0x6803F857
QCOW2_EXT_BITMAPS: Final = 0x23852875
QCOW2_EXT_FULL_DISK_ENCRYPTION: Final = 0x0537BE77
QCOW2_EXT_DATA_FILE: Final = 0x44415441

QCOW2_FEATURE_TYPE_INCOMPATIBLE: Final = 0
QCOW2_FEATURE_TYPE_COMPATIBLE: Final = 1
QCOW2_FEATURE_TYPE_AUTOCLEAR: Final = 2
QCOW2_FEATURE_NAME_ENTRY_SIZE: Final = 48
QCOW2_FEATURE_NAME_SIZE: Final = 46

_V2_FIELDS: Final = struct.Struct(">IIQIIQIIQQIIQ")
_V3_FIELDS: Final = struct.Struct(">QQQII")
_EXT_HEADER: Final = struct.Struct(">II")
_BITMAPS_EXT: Final = struct.Struct(">IIQQ")
_FDE_EXT: Final = struct.Struct(">QQ")
_FEATURE_ENTRY: Final = struct.Struct(">BB46s")

#: Local-file protocol prefixes: a name with one of these is still a path.
_LOCAL_PROTOCOLS: Final = ("file:", "host_device:", "host_cdrom:")


# The parsed header is made of NamedTuples: typed and immutable like frozen
# dataclasses, without loading the dataclasses module (and inspect) on every
# command that reads a qcow2 image.


class FeatureName(NamedTuple):
    """One entry of the feature name table extension."""

    type: int  # QCOW2_FEATURE_TYPE_*
    bit: int
    name: str


class BitmapsExtension(NamedTuple):
    """The bitmaps extension: where the persistent dirty bitmaps' directory is."""

    nb_bitmaps: int
    bitmap_directory_size: int
    bitmap_directory_offset: int


class EncryptionHeader(NamedTuple):
    """The full disk encryption header pointer (LUKS): where the LUKS header lives."""

    offset: int
    length: int


class Qcow2Header(NamedTuple):
    """A validated qcow2 header with its extensions and backing file name.

    The first block of fields is the on-disk header; a version 2 image gets
    the values QEMU implies (no features, refcount_order 4, length 72).
    """

    magic: int
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int
    compatible_features: int
    autoclear_features: int
    refcount_order: int
    header_length: int
    compression_type: int
    #: The backing file name as stored (surrogateescape-decoded), or None.
    backing_file: str | None = None
    #: The backing format extension, or None.
    backing_format: str | None = None
    #: The external data file name extension, or None.  Without the data
    #: file feature bit QEMU reports a name but never opens it.
    data_file: str | None = None
    feature_names: tuple[FeatureName, ...] = ()
    #: The bitmaps extension, when the autoclear bit says it is valid.
    bitmaps: BitmapsExtension | None = None
    encryption: EncryptionHeader | None = None
    #: Types of the header extensions QEMU does not know either (skipped).
    unknown_extensions: tuple[int, ...] = ()

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def compat(self) -> str:
        """The ``compat`` level qemu-img reports: "0.10" for v2, "1.1" for v3."""
        return "0.10" if self.version == 2 else "1.1"

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & QCOW2_INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & QCOW2_INCOMPAT_CORRUPT)

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & QCOW2_INCOMPAT_EXTL2)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS)

    @property
    def has_data_file(self) -> bool:
        """Whether guest data lives in an external data file."""
        return bool(self.incompatible_features & QCOW2_INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW)

    @property
    def unknown_incompatible_features(self) -> int:
        """Always 0 in a header that parsed: such images are refused."""
        return self.incompatible_features & ~QCOW2_INCOMPAT_MASK

    @property
    def compression_type_name(self) -> str:
        return COMPRESSION_TYPE_NAMES[self.compression_type]


#: ``fetch(offset, length)``: up to *length* bytes at *offset*, fewer at end of file.
Fetch = Callable[[int, int], bytes]


class _HeaderCluster:
    """The header cluster, read lazily and never past its end.

    Reads grow a cached prefix in chunks of at least 4 KiB, so a typical
    header costs one ``pread``.  Bytes past the end of the file read as
    zeros, as they do in QEMU.
    """

    _CHUNK = 4096

    def __init__(self, fetch: Fetch, filename: str) -> None:
        self._fetch = fetch
        self._filename = filename
        self._buf = bytearray()
        self._eof = False
        # Until the cluster size is known, only the fixed header may be read
        # (it fits in the smallest cluster).
        self.limit = QCOW2_HEADER_STRUCT_SIZE

    def read(self, offset: int, length: int) -> bytes:
        end = offset + length
        if offset < 0 or length < 0 or end > self.limit:
            # The parser checks every bound first; this is the last guard.
            raise FormatError(self._filename, "qcow2 header reaches past the first cluster")
        if end > len(self._buf):
            # Grow to the next chunk boundary, or further if asked to.
            want = min(self.limit, max(end, (len(self._buf) // self._CHUNK + 1) * self._CHUNK))
            have = len(self._buf)
            data = b"" if self._eof else self._fetch(have, want - have)
            if len(data) < want - have:
                self._eof = True
            self._buf += data
            self._buf += bytes(want - len(self._buf))
        return bytes(self._buf[offset:end])


def _decode(raw: bytes) -> str:
    """A name as QEMU sees it (a C string: up to the first NUL), decoded losslessly."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


class _Extensions:
    """What the header extensions say, gathered as they are walked."""

    def __init__(self) -> None:
        self.backing_format: str | None = None
        self.data_file: str | None = None
        self.feature_names: tuple[FeatureName, ...] = ()
        self.bitmaps: BitmapsExtension | None = None
        self.encryption: EncryptionHeader | None = None
        self.unknown: tuple[int, ...] = ()


class _Parser:
    """One parse of one header; every complaint names the file."""

    def __init__(self, fetch: Fetch, filename: str) -> None:
        self.filename = filename
        self.cluster = _HeaderCluster(fetch, filename)
        self.cluster_size = 0  # known once cluster_bits is validated

    def fail(self, message: str) -> FormatError:
        return FormatError(self.filename, message)

    def parse(self) -> Qcow2Header:
        fixed = self.cluster.read(0, QCOW2_HEADER_STRUCT_SIZE)
        (
            magic,
            version,
            backing_file_offset,
            backing_file_size,
            cluster_bits,
            size,
            crypt_method,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
        ) = _V2_FIELDS.unpack_from(fixed)
        if magic != QCOW2_MAGIC:
            raise self.fail(
                f"not a qcow2 image (magic 0x{magic:08x}, expected 0x{QCOW2_MAGIC:08x})"
            )
        if not QCOW2_MIN_VERSION <= version <= QCOW2_MAX_VERSION:
            raise self.fail(f"Unsupported qcow2 version {version} (imglock reads versions 2 and 3)")
        if not QCOW2_MIN_CLUSTER_BITS <= cluster_bits <= QCOW2_MAX_CLUSTER_BITS:
            raise self.fail(
                f"Unsupported cluster size: 2^{cluster_bits} (cluster_bits must be "
                f"{QCOW2_MIN_CLUSTER_BITS}..{QCOW2_MAX_CLUSTER_BITS})"
            )
        cluster_size = 1 << cluster_bits
        self.cluster_size = self.cluster.limit = cluster_size

        if version == 2:
            incompat = compat = autoclear = 0
            refcount_order = 4
            header_length = QCOW2_V2_HEADER_LENGTH
        else:
            incompat, compat, autoclear, refcount_order, header_length = _V3_FIELDS.unpack_from(
                fixed, QCOW2_V2_HEADER_LENGTH
            )
            if header_length < QCOW2_V3_MIN_HEADER_LENGTH:
                raise self.fail(
                    f"qcow2 header too short: header_length {header_length}, "
                    f"a version 3 header has at least {QCOW2_V3_MIN_HEADER_LENGTH} bytes"
                )
        if header_length > cluster_size:
            raise self.fail(
                f"qcow2 header exceeds cluster size: header_length {header_length} "
                f"> cluster size {cluster_size}"
            )
        if backing_file_offset > cluster_size:
            raise self.fail(
                f"Invalid backing file offset {backing_file_offset}: "
                f"the name must lie in the first cluster ({cluster_size} bytes)"
            )
        # Extensions run from the end of the header to the backing file
        # name, or to the end of the cluster when there is none.
        ext_end = backing_file_offset or cluster_size

        # Images whose header stops before the compression type byte are zlib.
        compression_type = (
            fixed[QCOW2_COMPRESSION_TYPE_OFFSET]
            if header_length > QCOW2_COMPRESSION_TYPE_OFFSET
            else QCOW2_COMPRESSION_ZLIB
        )
        self._check_compression(compression_type, incompat)

        unknown = incompat & ~QCOW2_INCOMPAT_MASK
        if unknown:
            # Name the features from the image's own table where it has one,
            # reading the extensions leniently: the table is a courtesy.
            names = self._extensions(header_length, ext_end, crypt_method, autoclear, strict=False)
            raise self.fail(self._unsupported_features(unknown, names.feature_names))

        if incompat & QCOW2_INCOMPAT_EXTL2:
            subcluster = cluster_size // QCOW2_EXTL2_SUBCLUSTERS
            smallest = QCOW2_EXTL2_SUBCLUSTERS << QCOW2_MIN_CLUSTER_BITS
            if subcluster < 1 << QCOW2_MIN_CLUSTER_BITS:
                raise self.fail(
                    f"Unsupported subcluster size: {subcluster} (extended L2 entries need "
                    f"clusters of at least {smallest} bytes)"
                )
        if refcount_order > 6:
            raise self.fail(
                f"Reference count entry width too large: refcount_order {refcount_order} "
                "(at most 6, 64-bit refcounts)"
            )
        if refcount_table_clusters == 0:
            raise self.fail("Image does not contain a reference count table")
        self._check_table(
            "Reference count table",
            refcount_table_offset,
            refcount_table_clusters,
            cluster_size,
            QCOW2_MAX_REFTABLE_SIZE,
            cluster_size,
        )
        self._check_table(
            "Snapshot table",
            snapshots_offset,
            nb_snapshots,
            QCOW2_SNAPSHOT_HEADER_SIZE,
            QCOW2_SNAPSHOT_HEADER_SIZE * QCOW2_MAX_SNAPSHOTS,
            cluster_size,
        )
        self._check_table(
            "Active L1 table",
            l1_table_offset,
            l1_size,
            QCOW2_L1_ENTRY_SIZE,
            QCOW2_MAX_L1_SIZE,
            cluster_size,
        )
        # The L1 table must map the whole virtual disk.
        # An L2 table is one cluster of 8-byte entries (16 with extended L2).
        l2_bits = cluster_bits - (4 if incompat & QCOW2_INCOMPAT_EXTL2 else 3)
        l1_shift = cluster_bits + l2_bits
        needed = (size + (1 << l1_shift) - 1) >> l1_shift
        if needed > QCOW2_MAX_L1_INDEX:
            raise self.fail(f"Image is too big: virtual size {size} needs {needed} L1 entries")
        if l1_size < needed:
            raise self.fail(
                f"L1 table is too small: {l1_size} entries, virtual size {size} needs {needed}"
            )
        if crypt_method not in (QCOW2_CRYPT_NONE, QCOW2_CRYPT_AES, QCOW2_CRYPT_LUKS):
            raise self.fail(f"Unsupported encryption method {crypt_method}")

        ext = self._extensions(header_length, ext_end, crypt_method, autoclear, strict=True)

        if incompat & QCOW2_INCOMPAT_DATA_FILE:
            if not ext.data_file:
                raise self.fail(
                    "the external data file feature is set but the image names no data file"
                )
        elif autoclear & QCOW2_AUTOCLEAR_DATA_FILE_RAW:
            raise self.fail("data-file-raw requires a data file (the data file bit is not set)")
        if crypt_method == QCOW2_CRYPT_LUKS and ext.encryption is None:
            raise self.fail("LUKS encryption without the encryption header extension")

        backing_file = self._backing_file(backing_file_offset, backing_file_size, cluster_size)
        return Qcow2Header(
            magic=magic,
            version=version,
            backing_file_offset=backing_file_offset,
            backing_file_size=backing_file_size,
            cluster_bits=cluster_bits,
            size=size,
            crypt_method=crypt_method,
            l1_size=l1_size,
            l1_table_offset=l1_table_offset,
            refcount_table_offset=refcount_table_offset,
            refcount_table_clusters=refcount_table_clusters,
            nb_snapshots=nb_snapshots,
            snapshots_offset=snapshots_offset,
            incompatible_features=incompat,
            compatible_features=compat,
            autoclear_features=autoclear,
            refcount_order=refcount_order,
            header_length=header_length,
            compression_type=compression_type,
            backing_file=backing_file,
            backing_format=ext.backing_format,
            data_file=ext.data_file,
            feature_names=ext.feature_names,
            bitmaps=ext.bitmaps,
            encryption=ext.encryption,
            unknown_extensions=ext.unknown,
        )

    def _check_compression(self, compression_type: int, incompat: int) -> None:
        if compression_type not in COMPRESSION_TYPE_NAMES:
            raise self.fail(f"unknown compression type: {compression_type}")
        bit_set = bool(incompat & QCOW2_INCOMPAT_COMPRESSION)
        if compression_type == QCOW2_COMPRESSION_ZLIB and bit_set:
            raise self.fail("Compression type incompatible feature bit must not be set for zlib")
        if compression_type != QCOW2_COMPRESSION_ZLIB and not bit_set:
            raise self.fail(
                f"Compression type incompatible feature bit must be set for "
                f"{COMPRESSION_TYPE_NAMES[compression_type]}"
            )

    @staticmethod
    def _unsupported_features(mask: int, table: tuple[FeatureName, ...]) -> str:
        named: list[str] = []
        for feature in table:
            bit = 1 << feature.bit
            if feature.type == QCOW2_FEATURE_TYPE_INCOMPATIBLE and mask & bit:
                named.append(feature.name)
                mask &= ~bit
        if mask:
            named.append(f"Unknown incompatible feature: {mask:x}")
        return "Unsupported qcow2 feature(s): " + ", ".join(named)

    def _check_table(
        self,
        name: str,
        offset: int,
        entries: int,
        entry_size: int,
        max_bytes: int,
        cluster_size: int,
    ) -> None:
        if entries > max_bytes // entry_size:
            raise self.fail(
                f"{name} too large: {entries} entries of {entry_size} bytes "
                f"(at most {max_bytes} bytes)"
            )
        if offset % cluster_size:
            raise self.fail(f"{name} offset invalid: {offset} is not a multiple of {cluster_size}")
        if offset > QCOW2_MAX_OFFSET - entries * entry_size:
            raise self.fail(f"{name} offset invalid: the table at {offset} ends past 2^63")

    def _extensions(
        self, start: int, end: int, crypt_method: int, autoclear: int, *, strict: bool
    ) -> _Extensions:
        """Walk the header extensions between *start* and *end*.

        With *strict* off, stop quietly at the first problem and return what
        was read so far (QEMU does this to name unknown features).
        """
        found = _Extensions()
        unknown: list[int] = []
        offset = start
        try:
            while offset < end:
                if end - offset < _EXT_HEADER.size:
                    raise self.fail(
                        f"Header extension too large: an extension header at offset {offset} "
                        f"does not fit before offset {end}"
                    )
                ext_type, length = _EXT_HEADER.unpack(self.cluster.read(offset, _EXT_HEADER.size))
                offset += _EXT_HEADER.size
                if length > end - offset:
                    raise self.fail(
                        f"Header extension too large: extension 0x{ext_type:08x} at offset "
                        f"{offset - _EXT_HEADER.size} claims {length} bytes, "
                        f"only {end - offset} are left before offset {end}"
                    )
                if ext_type == QCOW2_EXT_END:
                    break
                payload = self.cluster.read(offset, length)
                self._extension(found, unknown, ext_type, payload, crypt_method, autoclear)
                # Payloads are padded to a multiple of 8 bytes.
                offset += (length + 7) & ~7
        except FormatError:
            if strict:
                raise
        found.unknown = tuple(unknown)
        return found

    def _extension(
        self,
        found: _Extensions,
        unknown: list[int],
        ext_type: int,
        payload: bytes,
        crypt_method: int,
        autoclear: int,
    ) -> None:
        length = len(payload)
        if ext_type == QCOW2_EXT_BACKING_FORMAT:
            if length > QCOW2_MAX_BACKING_FORMAT_NAME:
                raise self.fail(
                    f"Backing format name too long: {length} bytes "
                    f"(at most {QCOW2_MAX_BACKING_FORMAT_NAME})"
                )
            found.backing_format = _decode(payload) or None
        elif ext_type == QCOW2_EXT_FEATURE_NAME_TABLE:
            entries: list[FeatureName] = []
            whole = length - length % QCOW2_FEATURE_NAME_ENTRY_SIZE
            for kind, bit, name in _FEATURE_ENTRY.iter_unpack(payload[:whole]):
                if name[0] == 0:
                    break  # an entry with an empty name ends the table
                entries.append(FeatureName(kind, bit, _decode(name)))
            found.feature_names = tuple(entries)
        elif ext_type == QCOW2_EXT_FULL_DISK_ENCRYPTION:
            if crypt_method != QCOW2_CRYPT_LUKS:
                raise self.fail(
                    "encryption header extension found, but the image is not LUKS-encrypted "
                    f"(crypt_method {crypt_method})"
                )
            if length != _FDE_EXT.size:
                raise self.fail(
                    f"encryption header extension has {length} bytes, expected {_FDE_EXT.size}"
                )
            fde_offset, fde_length = _FDE_EXT.unpack(payload)
            if fde_offset % self.cluster_size:
                raise self.fail(
                    f"Encryption header offset {fde_offset} is not a multiple of the "
                    f"cluster size {self.cluster_size}"
                )
            found.encryption = EncryptionHeader(fde_offset, fde_length)
        elif ext_type == QCOW2_EXT_BITMAPS:
            self._bitmaps(found, payload, autoclear)
        elif ext_type == QCOW2_EXT_DATA_FILE:
            found.data_file = _decode(payload)
        else:
            unknown.append(ext_type)

    def _bitmaps(self, found: _Extensions, payload: bytes, autoclear: int) -> None:
        if len(payload) != _BITMAPS_EXT.size:
            raise self.fail(
                f"bitmaps extension has {len(payload)} bytes, expected {_BITMAPS_EXT.size}"
            )
        if not autoclear & QCOW2_AUTOCLEAR_BITMAPS:
            # A program without bitmap support wrote the image since: QEMU
            # treats every bitmap as inconsistent and drops the extension.
            return
        nb_bitmaps, reserved, dir_size, dir_offset = _BITMAPS_EXT.unpack(payload)
        if reserved:
            raise self.fail("bitmaps extension: reserved field is not zero")
        if nb_bitmaps > QCOW2_MAX_BITMAPS:
            raise self.fail(
                f"bitmaps extension: {nb_bitmaps} bitmaps, more than the {QCOW2_MAX_BITMAPS} "
                "QEMU supports"
            )
        if nb_bitmaps == 0:
            raise self.fail("bitmaps extension with zero bitmaps")
        if dir_offset % self.cluster_size:
            raise self.fail(
                f"bitmaps extension: bitmap directory offset {dir_offset} is not cluster-aligned"
            )
        if dir_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
            raise self.fail(
                f"bitmaps extension: bitmap directory size {dir_size} exceeds "
                f"the maximum of {QCOW2_MAX_BITMAP_DIRECTORY_SIZE}"
            )
        found.bitmaps = BitmapsExtension(nb_bitmaps, dir_size, dir_offset)

    def _backing_file(self, offset: int, size: int, cluster_size: int) -> str | None:
        if offset == 0:
            return None
        limit = min(QCOW2_MAX_BACKING_FILE_NAME, cluster_size - offset)
        if size > limit:
            raise self.fail(
                f"Backing file name too long: {size} bytes at offset {offset} (at most {limit} fit)"
            )
        # An empty name (or one starting with NUL) means no backing file.
        return _decode(self.cluster.read(offset, size)) or None


def parse_header(fetch: Fetch, filename: str) -> Qcow2Header:
    """Parse and validate the qcow2 header that *fetch* reads.

    *fetch(offset, length)* returns up to *length* bytes at *offset* (fewer
    at end of file); it is only ever asked for bytes of the first cluster.
    Raises :class:`FormatError` naming *filename* and the first fault.
    """
    return _Parser(fetch, filename).parse()


def parse_header_bytes(data: bytes, filename: str) -> Qcow2Header:
    """:func:`parse_header` over an in-memory copy of the file's start."""
    return parse_header(lambda offset, length: data[offset : offset + length], filename)


def path_has_protocol(name: str) -> bool:
    """Whether QEMU reads *name* as ``protocol:rest`` (a ':' before any '/')."""
    for char in name:
        if char == "/":
            return False
        if char == ":":
            return True
    return False


def resolve_backing_name(image_filename: str, name: str) -> str | None:
    """The local path QEMU opens for backing file *name* of *image_filename*.

    An absolute name is used as it is; a relative one is appended to the
    directory part of the image's own name, kept as written and not
    normalised (``sub/../base.qcow2``), as QEMU does.  Protocol names
    (``nbd://``, ``json:{...}``, ``rbd:``...) are not local files: None.
    """
    local = _strip_local_protocol(name)
    if local is not None:
        return local
    if path_has_protocol(name):
        return None
    if name.startswith("/"):
        return name
    return image_filename[: image_filename.rfind("/") + 1] + name


def resolve_data_file_name(image_filename: str, name: str) -> str | None:
    """The local path QEMU opens for external data file *name*.

    QEMU (measured with 7.2) opens a relative data file name relative to
    its own working directory, not to the image's directory; imglock
    resolves it the same way, so it locks the file QEMU started from the
    same directory would use.  Protocol names give None.
    """
    del image_filename  # kept for symmetry with resolve_backing_name
    local = _strip_local_protocol(name)
    if local is not None:
        return local
    if path_has_protocol(name):
        return None
    return name


def _strip_local_protocol(name: str) -> str | None:
    for prefix in _LOCAL_PROTOCOLS:
        if name.startswith(prefix) and len(name) > len(prefix):
            return name[len(prefix) :]
    return None


class Qcow2Driver(FormatDriver):
    """QEMU's qcow2 format, versions 2 (compat 0.10) and 3 (compat 1.1)."""

    name = "qcow2"

    def probe(self, head: bytes, filename: str) -> int:
        # QEMU probes a zero-padded buffer: magic and version >= 2 win.
        padded = head[:8].ljust(8, b"\0")
        if padded[:4] == QCOW2_MAGIC_BYTES and int.from_bytes(padded[4:8], "big") >= 2:
            return 100
        return 0

    def open(self, filename: str, fd: int, st: os.stat_result, head: bytes = b"") -> OpenImage:
        def fetch(offset: int, length: int) -> bytes:
            # Most headers lie within the probe's bytes: no second read.
            if offset + length <= len(head):
                return head[offset : offset + length]
            return read_at(fd, offset, length, filename)

        header = parse_header(fetch, filename)
        return OpenImage(filename=filename, fd=fd, st=st, driver=self, header=header)

    def children(self, image: OpenImage) -> list[Child]:
        header = _header_of(image)
        children: list[Child] = []
        if header.backing_file is not None:
            children.append(
                Child(
                    role="backing",
                    name=header.backing_file,
                    filename=resolve_backing_name(image.filename, header.backing_file),
                    format=header.backing_format,
                )
            )
        if header.data_file is not None and header.has_data_file:
            children.append(
                Child(
                    role="data-file",
                    name=header.data_file,
                    filename=resolve_data_file_name(image.filename, header.data_file),
                )
            )
        return children

    def info(self, image: OpenImage) -> dict[str, Any]:
        header = _header_of(image)
        info: dict[str, Any] = {
            "filename": image.filename,
            "format": self.name,
            # QEMU counts the disk in whole 512-byte sectors, rounding down.
            "virtual-size": header.size // SECTOR_SIZE * SECTOR_SIZE,
            "actual-size": allocated_bytes(image.st),
        }
        info["cluster-size"] = header.cluster_size
        if header.crypt_method:
            info["encrypted"] = True
        if header.backing_file is not None:
            info["backing-filename"] = header.backing_file
            full = resolve_backing_name(image.filename, header.backing_file)
            info["full-backing-filename"] = header.backing_file if full is None else full
            if header.backing_format is not None:
                info["backing-filename-format"] = header.backing_format
        info["dirty-flag"] = header.dirty
        info["snapshot-count"] = header.nb_snapshots
        # Keys in the order qemu-img prints them.
        data: dict[str, Any] = {
            "compat": header.compat,
            "compression-type": header.compression_type_name,
        }
        if header.version >= 3:
            data["lazy-refcounts"] = header.lazy_refcounts
        if header.bitmaps is not None:
            # The bitmaps themselves are listed past the header cluster; the
            # extension gives their number.
            data["bitmap-count"] = header.bitmaps.nb_bitmaps
        data["refcount-bits"] = header.refcount_bits
        if header.crypt_method:
            data["encrypt"] = {"format": CRYPT_METHOD_NAMES[header.crypt_method]}
        if header.data_file is not None:
            data["data-file"] = header.data_file
        if header.has_data_file:
            data["data-file-raw"] = header.data_file_raw
        if header.version >= 3:
            data["corrupt"] = header.corrupt
            data["extended-l2"] = header.extended_l2
        info["format-specific"] = {"type": self.name, "data": data}
        return info


def _header_of(image: OpenImage) -> Qcow2Header:
    header = image.header
    if not isinstance(header, Qcow2Header):
        raise TypeError(f"{image.filename} was not opened by the qcow2 driver")
    return header
