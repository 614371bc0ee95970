"""The hostile images of test_hostile.py, each built from nothing in an empty directory.

A case pairs a *builder*, which makes its files in a fresh directory and
returns the path to hand to imglock, with what imglock must answer for it:

* ``status``: the exit status of the commands that follow the backing chain
  (``info --backing-chain`` and ``run``), from imglock(1) EXIT STATUS;
* ``top``: for cases about the backing chain, the exit status of the
  commands that read the top image only (``info`` and ``status``);
* ``words``: what the one line on standard error says, which also names the
  file at fault (the builder says how that name shows).

Cases are grouped as the issue lists them: truncated headers, header fields
at their extremes, backing file names, backing loops and depth, backing
files that are not images, and top images that are not images.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from qcow2_builder import (
    EXT_BACKING_FORMAT,
    EXT_DATA_FILE,
    EXT_FEATURE_NAME_TABLE,
    Qcow2Spec,
    build,
    feature_table,
)

from imglock.chain import MAX_CHAIN_DEPTH
from imglock.errors import EX_DATAERR, EX_NOINPUT, EX_OK

#: A valid qcow2 with 512-byte clusters (2 KiB on disk): the members of chains.
SMALL = Qcow2Spec(cluster_bits=9)
#: The builder's valid default (64 KiB clusters, version 3): the base of header cases.
DEFAULT = Qcow2Spec()
#: The first bytes a qcow2 prober needs: magic and version.
PROBE_BYTES = 8
#: The fixed fields of a version 3 header without the compression type byte.
V3_FIELDS_BYTES = 104
#: Where cluster_bits ends: shorter headers read it as 0.
CLUSTER_BITS_END = 24


@dataclass(frozen=True)
class Built:
    """What a builder made: the path for imglock, and how an error line names the culprit."""

    image: Path
    #: Text the stderr line contains to name the file at fault; None: the image's path.
    culprit: str | None = None

    @property
    def names(self) -> str:
        return str(self.image) if self.culprit is None else self.culprit


Builder = Callable[[Path], Built]
#: Makes a backing file (or nothing) in a directory and returns the name the image stores.
Target = Callable[[Path], bytes]


@dataclass(frozen=True)
class Hostile:
    """One hostile image and the answer every command must give for it."""

    id: str
    build: Builder
    #: Exit status of ``info --backing-chain`` and ``run`` (EX_OK: the image is usable).
    status: int
    #: Words of the one stderr line (empty for a usable image).
    words: str = ""
    #: For cases about the backing chain: the exit status of ``info`` and
    #: ``status``, which read the top image only.  None: the top image itself
    #: is the case, and every command answers *status*.
    top: int | None = None
    #: Run the commands without root's power to read any file.
    unprivileged: bool = False
    #: Also wrap QEMU on the image (``run -- qemu-system-x86_64 -drive file=IMAGE``).
    qemu: bool = False
    #: A limit on open files for the commands, or None.
    max_files: int | None = None
    #: Commands for which the case is no fault at all (``status`` walks a
    #: directory, or looks at the locks of a file in any format).
    not_for: frozenset[str] = frozenset()
    #: A format imglock cannot read: ``status`` and inspect() look at its locks all the same.
    unreadable_format: bool = False

    @property
    def top_status(self) -> int:
        return self.status if self.top is None else self.top


# --- Descriptors --------------------------------------------------------------


def descriptors() -> set[tuple[int, str]]:
    """This process's open descriptors and what they lead to."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the one listdir used, closed by now
            found.add((int(name), os.readlink(f"/proc/self/fd/{name}")))
    return found


@contextlib.contextmanager
def no_descriptor_leaked() -> Iterator[None]:
    """Fail if the block leaves a descriptor open that it did not find open.

    Garbage from earlier tests is collected first, so that its descriptors
    closing meanwhile cannot hide a new one.
    """
    gc.collect()
    before = descriptors()
    yield
    leaked = descriptors() - before
    assert not leaked, f"descriptors left open: {sorted(leaked)}"


# --- Builders ---------------------------------------------------------------


def at(d: Path, name: bytes) -> bytes:
    """The path of *name* (bytes, as an image stores it) in directory *d*."""
    return name if name.startswith(b"/") else os.fsencode(d) + b"/" + name


def qcow2(path: Path, spec: Qcow2Spec = SMALL, **changes: object) -> Path:
    """Write a qcow2 image for *spec* with *changes* applied."""
    path.write_bytes(build(spec.replace(**changes)))
    return path


def header(**changes: object) -> Builder:
    """A qcow2 image whose header has *changes* from the valid default."""
    return lambda d: Built(qcow2(d / "hostile.qcow2", DEFAULT, **changes))


def truncated(length: int) -> Builder:
    """The first *length* bytes of a valid version 3 image, and nothing else."""

    def make(d: Path) -> Built:
        path = d / f"first-{length}-bytes.qcow2"
        path.write_bytes(build(DEFAULT)[:length])
        return Built(path)

    return make


def backed_by(target: Target, **changes: object) -> Builder:
    """A sound top image whose backing file is whatever *target* makes (or names)."""

    def make(d: Path) -> Built:
        return Built(qcow2(d / "top.qcow2", SMALL, backing_name=target(d), **changes))

    return make


def with_data_file(target: Target) -> Builder:
    """A sound top image whose external data file is whatever *target* makes."""

    def make(d: Path) -> Built:
        name = at(d, target(d))  # data file names resolve from the cwd: make it absolute
        return Built(
            qcow2(d / "top.qcow2", incompatible_features=1 << 2, extensions=[(EXT_DATA_FILE, name)])
        )

    return make


def chain_of(depth: int) -> Builder:
    """00000.qcow2 backed by 00001.qcow2 ... backed by the last: *depth* images."""

    def name(level: int) -> bytes:
        return f"{level:05d}.qcow2".encode()

    def make(d: Path) -> Built:
        # Names of one width: every image but the last is the same bytes
        # with another backing file name.
        template = build(SMALL.replace(backing_name=name(0)))
        for level in range(depth - 1):
            Path(os.fsdecode(at(d, name(level)))).write_bytes(
                template.replace(name(0), name(level + 1))
            )
        qcow2(Path(os.fsdecode(at(d, name(depth - 1)))))
        return Built(Path(os.fsdecode(at(d, name(0)))))

    return make


def culprit_is(name: bytes, builder: Builder) -> Builder:
    """*builder*, with the error line naming the file called *name* in the directory."""

    def make(d: Path) -> Built:
        built = builder(d)
        return Built(built.image, os.fsdecode(at(d, name)))

    return make


def culprit_anywhere_in(builder: Builder) -> Builder:
    """*builder*, with the error line naming some file of the directory (which one varies)."""

    def make(d: Path) -> Built:
        return Built(builder(d).image, f"{d}/")

    return make


def top_is(target: Target) -> Builder:
    """The image handed to imglock is whatever *target* makes: no image at all."""
    return lambda d: Built(Path(os.fsdecode(at(d, target(d)))))


# --- Backing files and top images that are not images ------------------------

BASE = b"base"


def fifo(d: Path) -> bytes:
    os.mkfifo(d / os.fsdecode(BASE))
    return BASE


def unix_socket(d: Path) -> bytes:
    path = str(d / os.fsdecode(BASE))
    assert len(path) < 108, f"{path} is too long for a socket address"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(path)  # the socket file stays behind once closed
    return BASE


def directory(d: Path) -> bytes:
    (d / os.fsdecode(BASE)).mkdir()
    return BASE


def dangling_symlink(d: Path) -> bytes:
    (d / os.fsdecode(BASE)).symlink_to("nowhere")
    return BASE


def symlink_to_itself(d: Path) -> bytes:
    (d / os.fsdecode(BASE)).symlink_to(os.fsdecode(BASE))
    return BASE


def unreadable(d: Path) -> bytes:
    """A raw image that only root's override of the mode bits could read."""
    path = d / os.fsdecode(BASE)
    path.write_bytes(bytes(4096))
    path.chmod(0)
    return BASE


def followed_by(target: Target, tail: bytes) -> Target:
    """The name *target* makes, with *tail* appended to the name stored."""
    return lambda d: target(d) + tail


def named(name: bytes) -> Target:
    """A backing file name only; nothing is made."""
    return lambda d: name


def raw_file(name: bytes) -> Target:
    """A 4 KiB raw image with this exact (byte) name."""

    def make(d: Path) -> bytes:
        with open(at(d, name), "wb") as f:
            f.truncate(4096)
        return name

    return make


def malformed_file(name: bytes) -> Target:
    """A qcow2 image of version 4 (which no one reads) with this exact name."""

    def make(d: Path) -> bytes:
        with open(at(d, name), "wb") as f:
            f.write(build(SMALL.replace(version=4)))
        return name

    return make


def self_loop(d: Path) -> Built:
    return Built(qcow2(d / "a.qcow2", backing_name=b"a.qcow2"))


def two_image_loop(d: Path) -> Built:
    qcow2(d / "b.qcow2", backing_name=b"a.qcow2")
    return Built(qcow2(d / "a.qcow2", backing_name=b"b.qcow2"), str(d / "b.qcow2"))


def symlink_loop(d: Path) -> Built:
    qcow2(d / "a.qcow2", backing_name=b"link.qcow2")
    (d / "link.qcow2").symlink_to("a.qcow2")
    return Built(d / "a.qcow2")


# --- The cases --------------------------------------------------------------


def _truncation(length: int) -> Hostile:
    if length < PROBE_BYTES or length >= V3_FIELDS_BYTES:
        # Too short to be told from raw data (QEMU probes the same way), or
        # every field is there and the rest reads as zeros: a usable image.
        return Hostile(f"first-{length}-bytes", truncated(length), EX_OK)
    words = "Unsupported cluster size" if length < CLUSTER_BITS_END else "header too short"
    return Hostile(f"first-{length}-bytes", truncated(length), EX_DATAERR, words)


#: Lengths of truncated headers run through the commands (every length from
#: 0 to 104 goes through the library in test_hostile.py).
TRUNCATED_LENGTHS = (0, 4, 7, 8, 20, 24, 60, 72, 103, 104)
TRUNCATED = [_truncation(length) for length in TRUNCATED_LENGTHS]

_PAST_EOF = 1 << 40  # cluster-aligned, far past the end of the file

FIELDS = [
    Hostile("cluster-bits-0", header(cluster_bits=0), EX_DATAERR, "cluster size: 2^0"),
    Hostile("cluster-bits-8", header(cluster_bits=8), EX_DATAERR, "cluster size: 2^8"),
    Hostile("cluster-bits-22", header(cluster_bits=22), EX_DATAERR, "cluster size: 2^22"),
    Hostile("cluster-bits-63", header(cluster_bits=63), EX_DATAERR, "cluster size: 2^63"),
    Hostile("l1-size-2^32-1", header(l1_size=0xFFFFFFFF), EX_DATAERR, "L1 table too large"),
    Hostile(
        "size-2^63-512", header(size=(1 << 63) - 512, l1_size=1), EX_DATAERR, "Image is too big"
    ),
    Hostile("size-2^64-1", header(size=(1 << 64) - 1, l1_size=1), EX_DATAERR, "Image is too big"),
    Hostile(
        "header-length-past-cluster-0",
        header(cluster_bits=9, header_length=1024),
        EX_DATAERR,
        "header exceeds cluster size",
    ),
    Hostile(
        "header-length-2^32-1",
        header(header_length=0xFFFFFFFF),
        EX_DATAERR,
        "header exceeds cluster size",
    ),
    Hostile(
        "backing-file-size-2^32-1",
        header(backing_name=b"base", backing_file_size=0xFFFFFFFF),
        EX_DATAERR,
        "Backing file name too long",
    ),
    Hostile(
        "backing-file-offset-2^64-1",
        header(backing_name=b"base", backing_file_offset=(1 << 64) - 1),
        EX_DATAERR,
        "Invalid backing file offset",
    ),
    Hostile(
        "l1-table-ends-past-2^63",
        header(l1_table_offset=(1 << 64) - (1 << 16)),
        EX_DATAERR,
        "Active L1 table offset invalid",
    ),
    # Tables past the end of the file read as zeros in QEMU too: usable.
    Hostile(
        "tables-past-eof",
        header(
            l1_table_offset=_PAST_EOF,
            refcount_table_offset=_PAST_EOF,
            snapshots_offset=_PAST_EOF,
            nb_snapshots=1,
        ),
        EX_OK,
    ),
    Hostile(
        "refcount-table-clusters-2^32-1",
        header(refcount_table_clusters=0xFFFFFFFF),
        EX_DATAERR,
        "Reference count table too large",
    ),
    Hostile(
        "refcount-order-2^32-1",
        header(refcount_order=0xFFFFFFFF),
        EX_DATAERR,
        "Reference count entry width too large",
    ),
    Hostile(
        "snapshots-2^32-1",
        header(nb_snapshots=0xFFFFFFFF),
        EX_DATAERR,
        "Snapshot table too large",
    ),
    Hostile("crypt-method-2^32-1", header(crypt_method=0xFFFFFFFF), EX_DATAERR, "encryption"),
    Hostile("compression-type-255", header(compression_type=255), EX_DATAERR, "compression type"),
    Hostile(
        "unknown-incompatible-bit-5",
        header(incompatible_features=1 << 5),
        EX_DATAERR,
        "Unknown incompatible feature: 20",
    ),
    Hostile(
        "unknown-incompatible-bit-63",
        header(incompatible_features=1 << 63),
        EX_DATAERR,
        "Unknown incompatible feature: 8000000000000000",
    ),
    Hostile(
        "unknown-incompatible-bit-named-with-control-characters",
        header(
            incompatible_features=1 << 40,
            extensions=[(EXT_FEATURE_NAME_TABLE, feature_table((0, 40, "evil\nname\x1b[2J")))],
        ),
        EX_DATAERR,
        "Unsupported qcow2 feature(s): evil name\\x1b[2J",
    ),
    # A format imglock cannot read: claims refuse it; status shows its holders.
    Hostile(
        "qcow-version-1",
        header(version=1),
        EX_DATAERR,
        "is a qcow image",
        qemu=True,
        not_for=frozenset({"status"}),
        unreadable_format=True,
    ),
    Hostile("qcow2-version-4", header(version=4), EX_DATAERR, "Unsupported qcow2 version 4"),
    Hostile(
        "extension-length-2^32-1",
        header(extensions=[(0xDEADBEEF, b"")], extension_lengths={0: 0xFFFFFFFF}),
        EX_DATAERR,
        "Header extension too large",
    ),
    Hostile(
        "extension-overruns-the-backing-name",
        header(
            extensions=[(EXT_BACKING_FORMAT, b"raw")],
            extension_lengths={0: 4096},
            backing_name=b"base",
        ),
        EX_DATAERR,
        "Header extension too large",
    ),
]

_NON_UTF8 = b"\xff\xfe-base"

NAMES = [
    Hostile(
        "backing-name-not-utf8-missing",
        backed_by(named(_NON_UTF8)),
        EX_DATAERR,
        "No such file or directory",
        top=EX_OK,
    ),
    Hostile("backing-name-not-utf8-present", backed_by(raw_file(_NON_UTF8)), EX_OK, top=EX_OK),
    # A name is a C string: QEMU reads up to the first NUL, and so does imglock.
    Hostile(
        "backing-name-with-nul-present",
        backed_by(followed_by(raw_file(BASE), b"\0junk")),
        EX_OK,
        top=EX_OK,
    ),
    Hostile("backing-name-starting-with-nul", backed_by(named(b"\0base")), EX_OK, top=EX_OK),
    Hostile(
        "backing-name-with-control-characters",
        backed_by(named(b"evil\nname\x1b[2J")),
        EX_DATAERR,
        "evil name\\x1b[2J",
        top=EX_OK,
    ),
    Hostile(
        "malformed-backing-file-named-with-a-newline",
        culprit_is(b"evil\\x0aname", backed_by(malformed_file(b"evil\nname"))),
        EX_DATAERR,
        "Unsupported qcow2 version 4",
        top=EX_OK,
    ),
    Hostile(
        "backing-name-too-long-for-the-filesystem",
        backed_by(named(b"n" * 1000), cluster_bits=16),
        EX_DATAERR,
        "File name too long",
        top=EX_OK,
    ),
    Hostile(
        "backing-json-protocol",
        backed_by(named(b'json:{"file":{"driver":"file","filename":"/etc/passwd"}}')),
        EX_DATAERR,
        "is not a local file",
        top=EX_OK,
        qemu=True,
    ),
    Hostile(
        "backing-nbd-protocol",
        backed_by(named(b"nbd://127.0.0.1:10809/export")),
        EX_DATAERR,
        "is not a local file",
        top=EX_OK,
    ),
    Hostile(
        "backing-format-imglock-cannot-read",
        backed_by(raw_file(BASE), extensions=[(EXT_BACKING_FORMAT, b"vmdk")]),
        EX_DATAERR,
        "format 'vmdk', which imglock cannot read",
        top=EX_OK,
    ),
    Hostile(
        "malformed-backing-file",
        culprit_is(BASE, backed_by(malformed_file(BASE))),
        EX_DATAERR,
        "Unsupported qcow2 version 4",
        top=EX_OK,
    ),
]

CHAINS = [
    Hostile("loop-to-itself", self_loop, EX_DATAERR, "creates a loop", top=EX_OK, qemu=True),
    Hostile("loop-a-b-a", two_image_loop, EX_DATAERR, "creates a loop", top=EX_OK),
    Hostile("loop-through-a-symlink", symlink_loop, EX_DATAERR, "creates a loop", top=EX_OK),
    Hostile("chain-at-the-depth-limit", chain_of(MAX_CHAIN_DEPTH), EX_OK, top=EX_OK),
    Hostile(
        "chain-3000-deep",
        chain_of(3000),
        EX_DATAERR,
        f"deeper than {MAX_CHAIN_DEPTH} images",
        top=EX_OK,
        qemu=True,
    ),
    Hostile(
        "chain-200-deep-with-64-open-files-allowed",
        culprit_anywhere_in(chain_of(200)),
        EX_DATAERR,
        "Too many open files",
        top=EX_OK,
        max_files=64,
    ),
]

NOT_IMAGES = {
    "fifo": (fifo, "is a FIFO"),
    "socket": (unix_socket, "is a socket"),
    "directory": (directory, "is a directory"),
    "dev-zero": (named(b"/dev/zero"), "is a character device"),
    "dangling-symlink": (dangling_symlink, "No such file or directory"),
    "symlink-to-itself": (symlink_to_itself, "Too many levels of symbolic links"),
    "unreadable": (unreadable, "Permission denied"),
}

BACKING_NOT_IMAGES = [
    Hostile(
        f"backing-{kind}",
        backed_by(target),
        EX_DATAERR,
        words,
        top=EX_OK,
        unprivileged=kind == "unreadable",
    )
    for kind, (target, words) in NOT_IMAGES.items()
]
BACKING_NOT_IMAGES.append(
    Hostile("data-file-fifo", with_data_file(fifo), EX_DATAERR, "is a FIFO", top=EX_OK)
)

TOP_NOT_IMAGES = [
    Hostile(
        f"image-{kind}",
        top_is(target),
        EX_NOINPUT,
        words,
        unprivileged=kind == "unreadable",
        qemu=kind == "fifo",
        # status IMAGE|DIR...: a directory is walked for images, not refused.
        not_for=frozenset({"status"} if kind == "directory" else ()),
    )
    for kind, (target, words) in NOT_IMAGES.items()
]
TOP_NOT_IMAGES.append(Hostile("image-missing", top_is(named(b"missing")), EX_NOINPUT, "No such"))

GROUPS = {
    "truncated": TRUNCATED,
    "fields": FIELDS,
    "names": NAMES,
    "chains": CHAINS,
    "backing-not-an-image": BACKING_NOT_IMAGES,
    "image-not-an-image": TOP_NOT_IMAGES,
}
ALL = [case for group in GROUPS.values() for case in group]
