"""Following an image's backing chain, and its data files, to the last file.

:func:`open_chain` opens the top image, then the backing file it names,
then that file's backing file, and so on, each read-only and through the
same checks as the top.  A qcow2 external data file is opened (as raw) right
after the image that owns it: it holds that image's data, so a claim on the
image must cover it too.

The chain ends with an error, and with every descriptor it opened closed,
when a backing file is missing, malformed, not a local file (``nbd://``,
``json:{...}``), a format imglock does not read, when the chain loops back
on a file it already holds (compared by device and inode, so hard links
and different spellings of one path count as the same file), or when it
is deeper than ``max_depth`` images.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final, Literal

from imglock.errors import ChainError, ImageError, ImglockError, UsageError
from imglock.formats import DATA_FORMATS, FORMAT_NAMES, Child, OpenImage, open_claimable

ChainRole = Literal["top", "backing", "data-file"]

#: The deepest backing chain followed: the top image and 255 backing files.
#: QEMU itself sets no limit, but every image of a claimed chain keeps a
#: descriptor open for its locks; 256 leaves room for data files under the
#: usual limit of 1024 open files, far beyond chains seen in practice.
MAX_CHAIN_DEPTH: Final = 256


@dataclass(eq=False)
class ChainLink:
    """One file of a chain, and how it got there."""

    role: ChainRole
    image: OpenImage
    #: The image that names this file; None for the top image.
    parent: OpenImage | None = None
    #: The name as the parent stores it; None for the top image.
    name: str | None = None
    #: Backing steps from the top: 0 for the top image and its data file,
    #: 1 for its backing file and that file's data file, and so on.
    depth: int = 0


class Chain:
    """The open files of a backing chain, top first, each data file after its owner.

    Closing the chain (or leaving its ``with`` block) closes every file.
    """

    def __init__(self, links: list[ChainLink]) -> None:
        if not links or links[0].role != "top":
            raise ValueError("a chain starts with its top image")
        self.links: list[ChainLink] = links

    @property
    def top(self) -> OpenImage:
        return self.links[0].image

    @property
    def images(self) -> list[OpenImage]:
        """Every open file: images and data files, top first."""
        return [link.image for link in self.links]

    @property
    def backing_chain(self) -> list[OpenImage]:
        """The top image and its backing files, without data files (qemu-img's chain)."""
        return [link.image for link in self.links if link.role != "data-file"]

    def data_file_of(self, image: OpenImage) -> OpenImage | None:
        """The external data file opened for *image*, if it has one."""
        for link in self.links:
            if link.role == "data-file" and link.parent is image:
                return link.image
        return None

    def close(self) -> None:
        """Close every file of the chain (dropping any locks on them).  Idempotent."""
        for link in self.links:
            link.image.close()

    def __enter__(self) -> Chain:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[ChainLink]:
        return iter(self.links)

    def __len__(self) -> int:
        return len(self.links)


@dataclass(eq=False)
class ChainProblem:
    """A file a chain names that cannot be opened or followed, and why.

    What :func:`open_chain` reports instead of raising, when asked to.
    """

    role: ChainRole
    #: The local path the parent names, or the name as stored when it has none.
    filename: str
    parent: OpenImage
    depth: int
    error: ImglockError


@dataclass
class _Opener:
    """The state of one :func:`open_chain` call: what is open, and where."""

    links: list[ChainLink] = field(default_factory=list)
    #: The filename of each file opened, by (st_dev, st_ino).
    seen: dict[tuple[int, int], str] = field(default_factory=dict)

    def add(self, link: ChainLink) -> None:
        """Record *link*, or close it and raise if its file is already in the chain."""
        key = (link.image.st.st_dev, link.image.st.st_ino)
        earlier = self.seen.get(key)
        if earlier is not None:
            link.image.close()
            assert link.parent is not None  # the top image cannot repeat anything
            what = "backing file" if link.role == "backing" else "data file"
            raise ChainError(
                link.parent.filename,
                f"{what} '{link.name}' creates a loop: it is '{earlier}' again",
            )
        self.seen[key] = link.image.filename
        self.links.append(link)

    def open_child(self, parent: OpenImage, child: Child, format: str | None) -> OpenImage:
        what = "backing file" if child.role == "backing" else "data file"
        if child.filename is None:
            raise ChainError(parent.filename, f"{what} '{child.name}' is not a local file")
        if format is not None and format not in FORMAT_NAMES and format not in DATA_FORMATS:
            raise ChainError(
                parent.filename,
                f"{what} '{child.name}' has format '{format}', which imglock cannot read",
            )
        try:
            return open_claimable(child.filename, format)
        except ImageError as exc:
            if type(exc) is not ImageError:
                raise  # a malformed backing file, or a read error: say so as it is
            raise ChainError(
                parent.filename, f"cannot open {what} '{child.filename}': {exc.message}"
            ) from None

    def close_all(self) -> None:
        for link in self.links:
            link.image.close()


def open_chain(
    path: str | os.PathLike[str],
    format: str | None = None,
    max_depth: int = MAX_CHAIN_DEPTH,
    *,
    backing: bool = True,
    data_file: bool = True,
    problems: list[ChainProblem] | None = None,
) -> Chain:
    """Open the image at *path* and everything it depends on, read-only.

    *format* applies to the top image only (None or "auto" probes it); each
    backing file is opened with the format its parent records for it, or
    probed when none is recorded, as QEMU does.  At most *max_depth* images
    (the top included) are followed.  Raises ImageError, FormatError or
    ChainError with every file it opened closed again.

    *backing* and *data_file* false leave out the top image's backing file
    or data file as its header names them: QEMU does so when its command
    line names that node itself (``"backing": "node"``) or none
    (``"backing": null``).

    With a *problems* list, a backing or data file that cannot be opened
    or followed is appended to it as a :class:`ChainProblem` instead
    (the chain then ends there; a data file's problem does not end it),
    so that every file can be listed (``imglock run --dry-run``); only a
    problem with the top image is raised.
    """
    if max_depth < 1:
        raise UsageError(None, f"max_depth must be at least 1, not {max_depth}")
    opener = _Opener()

    def follow(parent: OpenImage, child: Child, depth: int, format: str | None) -> OpenImage | None:
        """Open and add *child* of *parent*; a problem is raised, or noted when asked."""
        try:
            if child.role == "backing" and depth >= max_depth:
                raise ChainError(
                    opener.links[0].image.filename,
                    f"backing chain is deeper than {max_depth} images "
                    f"(at backing file '{child.name}' of '{parent.filename}')",
                )
            image = opener.open_child(parent, child, format)
            link_depth = depth if child.role == "backing" else depth - 1
            opener.add(ChainLink(child.role, image, parent, child.name, link_depth))
        except ImglockError as exc:
            if problems is None:
                raise
            at = depth if child.role == "backing" else depth - 1
            problems.append(ChainProblem(child.role, child.filename or child.name, parent, at, exc))
            return None
        return image

    try:
        top_image = open_claimable(path, format)
        opener.add(ChainLink("top", top_image))
        current: OpenImage | None = top_image
        depth = 1
        while current is not None:
            found: Child | None = None
            top = depth == 1
            for child in current.children():
                if top and not (backing if child.role == "backing" else data_file):
                    continue  # the command line said otherwise
                if child.role == "data-file":
                    # A data file holds raw guest data whatever its contents look like.
                    follow(current, child, depth, "raw")
                else:
                    found = child
            if found is None:
                break
            current = follow(current, found, depth, found.format)
            depth += 1
    except BaseException:
        opener.close_all()
        raise
    return Chain(opener.links)
