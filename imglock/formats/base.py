"""The small interface every format driver implements.

A driver knows one image format: how to recognise it (:meth:`probe`), how
to read its header (:meth:`open`), which other files the image depends on
(:meth:`children`) and what ``imglock info`` reports about it
(:meth:`info`).  Drivers open and parse images; they take no lock: every
format is locked alike, by the claim (see :mod:`imglock.claims`).  Adding a
format is one new module with one subclass, listed with its magic in the
registry of :mod:`imglock.formats`.
"""

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple

ChildRole = Literal["backing", "data-file"]


class Child(NamedTuple):
    """A file an image depends on, as the image names it."""

    role: ChildRole
    #: The name as stored in the image (decoded with surrogateescape).
    name: str
    #: The local path it resolves to, or None when it is not a local file
    #: (``json:``, ``nbd://`` and other protocol names).
    filename: str | None
    #: The format the image records for it (backing format extension), if any.
    format: str | None = None


@dataclass(eq=False)
class OpenImage:
    """An image opened read-only for its header.

    A claim keeps the descriptor open for as long as it holds the image:
    the OFD locks belong to it.
    """

    filename: str
    fd: int
    st: os.stat_result
    driver: "FormatDriver"
    #: The driver's parsed header (for qcow2 a ``Qcow2Header``); None for raw.
    header: Any = None
    #: For a file in a format imglock cannot read (a vmdk, a vdi), opened
    #: as plain data to look at its locks: that format's name.
    read_as: str | None = field(default=None, repr=False)

    @property
    def format(self) -> str:
        return self.read_as or self.driver.name

    def children(self) -> list[Child]:
        return self.driver.children(self)

    def close(self) -> None:
        """Close the descriptor (which also drops every lock taken on it).  Idempotent."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class FormatDriver(ABC):
    """One image format."""

    #: The format's name as qemu-img spells it ("qcow2", "raw").
    name: ClassVar[str]

    @abstractmethod
    def probe(self, head: bytes, filename: str) -> int:
        """Score how likely *head* (the file's first bytes) is this format.

        0 means "not this format"; the highest score wins.  The fallback
        format (raw) answers 1 for anything.
        """

    @abstractmethod
    def open(self, filename: str, fd: int, st: os.stat_result, head: bytes = b"") -> OpenImage:
        """Read and validate the header on *fd*; raise FormatError if it is bad.

        *head*, when given, holds the file's first bytes as already read for
        probing (all of them if the file is shorter): a driver uses it rather
        than reading those bytes again.
        """

    @abstractmethod
    def children(self, image: OpenImage) -> list[Child]:
        """The files *image* depends on: its backing file, its data file."""

    @abstractmethod
    def info(self, image: OpenImage) -> dict[str, Any]:
        """What ``imglock info --json`` reports, with qemu-img's key names."""
