"""One file of a claim: its image and locks, the mode it is claimed in, and its holder record."""

from __future__ import annotations

from dataclasses import dataclass

from imglock.claims.image import ClaimedImage
from imglock.lock.identity import Owner
from imglock.lock.protocol import Mode


@dataclass(eq=False)
class Member:
    """One file of a claim, as the caller (or an image header) named it."""

    image: ClaimedImage
    mode: Mode
    #: Named by the caller, not only by an image header (see holder_records.write).
    named: bool = False
    #: What the file is to the image the caller named: "top", "backing"
    #: or "data-file", and how many backing steps below it (chain.ChainLink).
    role: str = "top"
    depth: int = 0
    #: The owner this file's holder record names, while there is one.
    recorded_as: Owner | None = None
    #: Why no holder record was written for this file, if none was.
    record_problem: str | None = None

    def close(self) -> None:
        """Close the file's descriptors (dropping its locks); never raises."""
        self.image.close()
