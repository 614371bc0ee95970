"""What ``imglock status`` reports about one image, and how it is found.

Apart from :mod:`imglock.claims` so that ``status``, which takes no claim,
does not load the claim machinery.
"""

import os
from typing import Any, NamedTuple

from imglock.formats import OpenImage, open_for_locks
from imglock.lock import records
from imglock.lock.discovery import LocalLocks, survey
from imglock.lock.holder import Holder
from imglock.lock.lockspace import open_target
from imglock.safeio import as_path


class ImageReport(NamedTuple):
    """What ``imglock status`` knows about one image."""

    filename: str
    format: str | None
    holders: list[Holder]
    stale_records: list[records.Record]
    #: qcow2's dirty bit (None for formats without one).
    dirty: bool | None = None
    corrupt: bool | None = None
    backing_filename: str | None = None
    #: Claimers waiting in the image's queue, first first: not holders.
    waiting: list[Holder] = []  # noqa: RUF012 - a NamedTuple field default, never mutated
    #: The inode number of the file that carries the locks now (the image, or
    #: its lock file), to tell records of a file since replaced or removed.
    inode: int | None = None

    @property
    def replaced(self) -> bool:
        """A holder record names another file at this path: it was replaced (held, maybe)."""
        return any(
            r.inode is not None and self.inode is not None and r.inode != self.inode
            for r in self.stale_records
        )

    @property
    def not_closed_cleanly(self) -> bool:
        """A dirty qcow2 that no one holds: its last writer died without closing it."""
        return bool(self.dirty) and not self.holders

    def to_json(self) -> dict[str, Any]:
        return {
            "filename": self.filename,
            "format": self.format,
            "backing-filename": self.backing_filename,
            "holders": [h.to_json() for h in self.holders],
            "waiting": [w.to_json() for w in self.waiting],
            "stale-records": [r.to_json() for r in self.stale_records],
            "dirty-flag": self.dirty,
            "corrupt": self.corrupt,
            "not-closed-cleanly": self.not_closed_cleanly,
            "replaced": self.replaced,
        }


def inspect_image(
    image: OpenImage,
    *,
    lockspace: str | None = None,
    local: LocalLocks | None = None,
) -> ImageReport:
    """:func:`inspect` for an image the caller has open (and closes afterwards)."""
    facts = image.driver.info(image)
    local = local or LocalLocks()
    target = open_target(image.fd, image.filename, image.st, lockspace)
    try:
        found = survey(
            target.fd,
            target.filename,
            target.st,
            record_dir=target.record_dir,
            record_name=target.record_name,
            local=local,
        )
    finally:
        target.close()
    stale = found.stale_records
    if target.lock_file and not found.holders:
        # The records of a file replaced at this path lie under its old lock
        # file's name: found by the path they name, they make it "replaced".
        named = local.record_dirs.naming(target.record_dir, image.filename)
        stale = stale + [record for name, record in named if name != target.record_name]
    specific = facts.get("format-specific", {}).get("data", {})
    return ImageReport(
        filename=image.filename,
        format=image.format,
        holders=found.holders,
        stale_records=stale,
        dirty=facts.get("dirty-flag"),
        corrupt=specific.get("corrupt"),
        backing_filename=facts.get("backing-filename"),
        waiting=found.waiting,
        inode=target.st.st_ino,
    )


def inspect(
    path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
    *,
    lockspace: str | None = None,
    local: LocalLocks | None = None,
) -> ImageReport:
    """Who holds *path* (any file), and the header facts that matter for it; takes no lock."""
    image = open_for_locks(as_path(path))
    try:
        return inspect_image(image, lockspace=lockspace, local=local)
    finally:
        image.close()
