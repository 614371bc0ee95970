"""Finding the images ``imglock status`` looks at: the files named, and directories walked.

A file named on the command line is taken as an image whatever it holds
(a symlink to it is followed, as by every command).  A directory, named or
met in a walk, is walked recursively, in name order, and in it a regular
file counts as an image when

* probing recognises a format: qcow2 by its magic, or a format imglock
  cannot read (vmdk, vhdx, LUKS...), which is then reported as an error;
* its name ends in an image suffix (:data:`IMAGE_SUFFIXES`, any case); or
* some process holds a byte-range (fcntl) lock on it: a raw disk named
  ``disk`` or a pflash file while QEMU uses it (flock(2) locks are not
  seen: on a local filesystem they are another kind of lock).

Every other file is skipped quietly: any file "probes" as raw, so probing
alone cannot tell a raw disk from a log file.  A walk never follows a
symbolic link (so it cannot loop, and an image linked from two places is
listed once, where it lives), never enters the ``.imglock`` directories
that hold holder records, and never opens a FIFO, socket or device: their
type is known from the directory listing, and the files it does open are
opened with O_NONBLOCK and checked with fstat.  A directory reached twice
(a bind mount over its own parent) is walked once; a file reached twice
(a hard link, or named and also found in a walk) is listed once.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Final

from imglock.errors import ImageError, ImglockError
from imglock.formats import HEAD_SIZE, PROBE_SIZE, OpenImage, open_image, probe
from imglock.lock.records import RECORD_DIR
from imglock.safeio import OPEN_FLAGS, close_quietly, read_at

#: File name endings that make a file an image in a directory walk.
IMAGE_SUFFIXES: Final = (".qcow2", ".raw", ".img", ".iso")

#: Why a walk passes over a file of each type without opening it.
_NOT_OPENED: Final = {
    stat.S_IFLNK: "a symbolic link, not followed",
    stat.S_IFIFO: "a FIFO, not opened",
    stat.S_IFSOCK: "a socket, not opened",
    stat.S_IFCHR: "a character device, not opened",
    stat.S_IFBLK: "a block device, not opened (name it to look at it)",
}

FileKey = tuple[int, int]
#: Told about every file a walk passes over: (path, why).
SkipHook = Callable[[str, str], None]


# A plain class, not a dataclass or NamedTuple: those cost far more to define,
# and every command that looks for images (``status``) loads this module.
class Found:
    """One image: opened (the caller closes it), or the error that stopped it."""

    __slots__ = ("error", "filename", "image")

    def __init__(
        self, filename: str, image: OpenImage | None = None, error: ImglockError | None = None
    ) -> None:
        self.filename = filename
        self.image = image
        self.error = error


def has_image_suffix(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _ignore(_path: str, _why: str) -> None:
    pass


def _why(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


def find_images(paths: Iterable[str], skipped: SkipHook = _ignore) -> Iterator[Found]:
    """Every image among *paths*, in order, directories walked (see the module's rules).

    Images are opened one at a time: the caller should close each before
    asking for the next.
    """
    walk = _Walk(skipped)
    for path in paths:
        try:
            is_dir = stat.S_ISDIR(os.stat(path).st_mode)
        except (OSError, ValueError):
            is_dir = False  # open_image says what is wrong with it
        if is_dir:
            yield from walk.directory(path)
        else:
            yield from walk.named(path)


class _Walk:
    """The state of one search: what was seen already, and whom to tell about skips."""

    def __init__(self, skipped: SkipHook) -> None:
        self.skipped = skipped
        self.files: set[FileKey] = set()
        self.dirs: set[FileKey] = set()

    def _listed_already(self, path: str, st: os.stat_result) -> bool:
        if (st.st_dev, st.st_ino) in self.files:
            self.skipped(path, "the same file as one listed already")
            return True
        return False

    def _listing_now(self, image: OpenImage) -> Found:
        self.files.add((image.st.st_dev, image.st.st_ino))
        return Found(image.filename, image=image)

    def named(self, path: str) -> Iterator[Found]:
        try:
            image = open_image(path)
        except ImglockError as exc:
            yield Found(path, error=exc)
            return
        if self._listed_already(path, image.st):
            image.close()
        else:
            yield self._listing_now(image)

    def directory(self, root: str) -> Iterator[Found]:
        # Depth first, in name order, with a stack of listings instead of
        # recursion: no descriptor stays open and no depth is too deep.
        stack = [iter(self._listing(root))]
        while stack:
            entry = next(stack[-1], None)
            if entry is None:
                stack.pop()
                continue
            if isinstance(entry, Found):
                yield entry
            elif entry.is_dir(follow_symlinks=False):
                if entry.name != RECORD_DIR:
                    stack.append(iter(self._listing(entry.path)))
            elif entry.is_file(follow_symlinks=False):
                found = self._regular(entry.path, entry.name)
                if found is not None:
                    yield found
            else:
                self._skip_special(entry)

    def _listing(self, path: str) -> Sequence[os.DirEntry[str] | Found]:
        """The entries of *path* by name: none if walked already, its error if unreadable."""
        try:
            st = os.stat(path)
            key = (st.st_dev, st.st_ino)
            if key in self.dirs:
                self.skipped(path, "a directory walked already")
                return []
            self.dirs.add(key)
            with os.scandir(path) as it:
                return sorted(it, key=lambda entry: entry.name)
        except OSError as exc:
            return [Found(path, error=ImageError(path, f"cannot read directory: {_why(exc)}"))]

    def _skip_special(self, entry: os.DirEntry[str]) -> None:
        try:
            kind = stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode)
        except OSError:
            kind = 0  # gone meanwhile
        self.skipped(entry.path, _NOT_OPENED.get(kind, "not a regular file"))

    def _regular(self, path: str, name: str) -> Found | None:
        """Open a regular file met in a walk; Found if it is an image, else None (skipped)."""
        suffix = has_image_suffix(name)
        try:
            # O_NOFOLLOW: a file swapped for a symlink since the listing is not followed.
            fd = os.open(path, OPEN_FLAGS | os.O_NOFOLLOW)
        except OSError as exc:
            if suffix:
                return Found(path, error=ImageError(path, _why(exc)))
            self.skipped(path, f"cannot open: {_why(exc)}")
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self.skipped(path, "no longer a regular file")
            elif not self._listed_already(path, st):
                head = read_at(fd, 0, HEAD_SIZE, path)
                # Probing raises FormatError for a format imglock cannot read.
                driver = probe(head[:PROBE_SIZE], path)
                if driver.name != "raw" or suffix or self._locked(fd, path):
                    os.set_blocking(fd, True)
                    return self._listing_now(driver.open(path, fd, st, head))
                self.skipped(path, "not an image (no known format, image suffix or lock)")
        except ImglockError as exc:
            close_quietly(fd)
            return Found(path, error=exc)
        except BaseException:
            close_quietly(fd)
            raise
        close_quietly(fd)
        return None

    def _locked(self, fd: int, path: str) -> bool:
        """Whether anyone holds a lock anywhere on the file open as *fd*."""
        from imglock.lock import fcntl_locks

        try:
            return fcntl_locks.conflicting(fd, 0, 0, path) is not None
        except ImglockError as exc:
            self.skipped(path, f"cannot test its locks: {exc.message}")
            return False
