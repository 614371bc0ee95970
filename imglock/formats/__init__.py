"""The image formats imglock reads, and how an image's format is found.

:data:`DRIVERS` lists one driver per format, in probing order.  Probing
follows QEMU: every driver scores the first bytes of the file and the
highest score wins; raw answers 1 for anything and so is the fallback.
Naming a format turns probing off, as ``qemu-img -f`` does.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import TYPE_CHECKING, Any, Final

from imglock.errors import UnreadableFormat, UsageError
from imglock.formats.base import Child, FormatDriver, OpenImage
from imglock.safeio import close_quietly, open_image_fd, read_at

__all__ = [
    "DATA_FORMATS",
    "DRIVERS",
    "FORMAT_NAMES",
    "PROBE_SIZE",
    "Child",
    "FormatDriver",
    "OpenImage",
    "driver_for",
    "open_claimable",
    "open_for_locks",
    "open_image",
    "open_with",
    "probe",
]

#: Every format imglock reads, in probing order: its driver's module and
#: class, and the magic its files start with.  A driver scores 0 for a file
#: without its magic, so probing imports a driver only for a file that
#: carries its magic, and the fallback (raw, with no magic) only for a file
#: that carries none: reading a raw image never loads the qcow2 parser, nor
#: reading a qcow2 image the raw driver.
_REGISTRY: Final = {
    "qcow2": ("imglock.formats.qcow2", "Qcow2Driver", b"QFI\xfb"),
    "raw": ("imglock.formats.raw", "RawDriver", b""),
}
#: The format of a file that no driver's magic matches (QEMU's raw: it scores 1).
_FALLBACK: Final = "raw"
FORMAT_NAMES: Final = tuple(_REGISTRY)

if TYPE_CHECKING:
    #: One driver per format, in probing order (built on first use: it
    #: imports every driver).
    DRIVERS: tuple[FormatDriver, ...]


def __getattr__(name: str) -> Any:
    if name != "DRIVERS":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    drivers = tuple(_driver(format) for format in FORMAT_NAMES)
    globals()["DRIVERS"] = drivers
    return drivers


@functools.cache
def _driver(name: str) -> FormatDriver:
    """The one driver of format *name* (imported on first use)."""
    module, cls, _magic = _REGISTRY[name]
    driver: FormatDriver = getattr(importlib.import_module(module), cls)()
    return driver


#: How many leading bytes probing looks at (QEMU's probe buffer size).
PROBE_SIZE: Final = 2048
#: How many leading bytes are read at once: the probe's, and enough for
#: most qcow2 headers with their extensions and backing name.
HEAD_SIZE: Final = 4096

# Formats QEMU would recognise but imglock does not parse: (offset, bytes,
# QEMU's name).  Probing one that may name a backing file (qcow, qed, vmdk)
# as raw would claim the image without the files it depends on, so such an
# image is refused instead; one of DATA_FORMATS is opened as plain data.
_FOREIGN_SIGNATURES: Final = (
    (0, b"QFI\xfb\x00\x00\x00\x01", "qcow"),
    (0, b"QED\x00", "qed"),
    (0, b"KDMV", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"conectix", "vpc"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
)


#: Formats QEMU reads whose files name no other file: in QEMU's schema
#: their nodes have a ``file`` and no ``backing`` or ``data-file`` (the
#: tests check this against the installed QEMU).  imglock claims such a
#: file as plain data, and reports its format.  A LUKS volume (libvirt's
#: ``<encryption format='luks'>``) is one.
DATA_FORMATS: Final = frozenset(
    {"bochs", "cloop", "dmg", "luks", "parallels", "vdi", "vhdx", "vpc"}
)


def driver_for(name: str) -> FormatDriver:
    """The driver of format *name*; UsageError for a format imglock does not read.

    A format of :data:`DATA_FORMATS` is read by the raw driver.
    """
    if name in _REGISTRY:
        return _driver(name)
    if name in DATA_FORMATS:
        return _driver("raw")
    raise UsageError(
        None,
        f"unknown image format '{name}' (imglock reads {', '.join(FORMAT_NAMES)}, "
        f"and {', '.join(sorted(DATA_FORMATS))} as plain data)",
    )


def probe(head: bytes, filename: str) -> FormatDriver:
    """The format of the file whose first bytes are *head* (the best score wins).

    Raises UnreadableFormat (a FormatError) for a format QEMU knows but
    imglock does not parse (vmdk, qcow version 1, LUKS...), rather than
    treating it as raw; :func:`open_claimable` then opens one of
    :data:`DATA_FORMATS` as plain data.
    """
    # A driver scores only files with its magic: the others are not even
    # imported, and the fallback only when none of them scores the file.
    best: FormatDriver | None = None
    best_score = 0
    for name, (_module, _cls, magic) in _REGISTRY.items():
        if magic and head.startswith(magic):
            driver = _driver(name)
            score = driver.probe(head, filename)
            if score > best_score:
                best, best_score = driver, score
    if best is None:
        best = _driver(_FALLBACK)
    if best.name == "raw":
        for offset, signature, foreign in _FOREIGN_SIGNATURES:
            if head[offset : offset + len(signature)] == signature:
                raise UnreadableFormat(
                    filename,
                    f"is a {foreign} image; imglock reads only {' and '.join(FORMAT_NAMES)} "
                    "(name the format raw to treat it as plain data)",
                    foreign,
                )
    return best


def open_for_locks(path: str | os.PathLike[str]) -> OpenImage:
    """Open any file to look at its locks.

    Locks do not depend on the format: a vmdk, a vdi or an ISO is opened
    as plain data (its :attr:`~OpenImage.format` still names what it is),
    and only following a backing chain needs its format.
    """
    try:
        return open_image(path)
    except UnreadableFormat as exc:
        return open_image(path, "raw", read_as=exc.format)


def open_image(
    path: str | os.PathLike[str], format: str | None = None, *, read_as: str | None = None
) -> OpenImage:
    """Open the image at *path* read-only and parse its header.

    *format* None (or "auto") probes the file; a format name uses that
    driver without probing; naming one of :data:`DATA_FORMATS` opens the
    file as plain data.  *read_as* names the format of a file opened as
    plain data that imglock cannot read (see :attr:`OpenImage.read_as`).
    Raises ImageError (cannot open), FormatError (bad header) or
    UsageError (unknown format name).  The caller closes the returned image.
    """
    filename = os.fspath(path)
    # An unknown format name is refused before the file is touched.
    named = driver_for(format) if format is not None and format != "auto" else None
    fd, st = open_image_fd(filename)
    try:
        head = read_at(fd, 0, HEAD_SIZE, filename)
        driver = named or probe(head[:PROBE_SIZE], filename)
        return open_with(driver, filename, fd, st, head, read_as or _data_format(format))
    except BaseException:
        close_quietly(fd)
        raise


def _data_format(format: str | None) -> str | None:
    return format if format in DATA_FORMATS else None


def open_with(
    driver: FormatDriver,
    filename: str,
    fd: int,
    st: os.stat_result,
    head: bytes,
    read_as: str | None = None,
) -> OpenImage:
    """The image open as *fd*, its header read by *driver*; *read_as* as for :func:`open_image`."""
    image = driver.open(filename, fd, st, head)
    image.read_as = read_as
    return image


def open_claimable(path: str | os.PathLike[str], format: str | None = None) -> OpenImage:
    """:func:`open_image` for a claim: a file in one of :data:`DATA_FORMATS`, named
    or probed, is opened as plain data (no children; its
    :attr:`~OpenImage.format` the one QEMU reads it as).

    Reading headers (``imglock info``) refuses a probed one instead, since
    its header is one imglock does not read.
    """
    try:
        return open_image(path, format)
    except UnreadableFormat as exc:
        if exc.format not in DATA_FORMATS:
            raise
        return open_image(path, exc.format)
