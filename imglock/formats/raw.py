"""The raw format: the file's bytes are the disk, with no header at all."""

from __future__ import annotations

import os
from typing import Any

from imglock.formats.base import Child, FormatDriver, OpenImage
from imglock.safeio import SECTOR_SIZE, allocated_bytes, image_size


class RawDriver(FormatDriver):
    """Raw images: regular files and block devices, used as they are."""

    name = "raw"

    def probe(self, head: bytes, filename: str) -> int:
        # Anything is a raw image; every other format outbids this.
        return 1

    def open(self, filename: str, fd: int, st: os.stat_result, head: bytes = b"") -> OpenImage:
        return OpenImage(filename=filename, fd=fd, st=st, driver=self, header=None)

    def children(self, image: OpenImage) -> list[Child]:
        return []

    def virtual_size(self, image: OpenImage) -> int:
        """The disk size QEMU gives the guest: the file size, rounded up to a sector."""
        size = image_size(image.fd, image.st, image.filename)
        return -(-size // SECTOR_SIZE) * SECTOR_SIZE

    def info(self, image: OpenImage) -> dict[str, Any]:
        return {
            "filename": image.filename,
            "format": image.format,
            "virtual-size": self.virtual_size(image),
            "actual-size": allocated_bytes(image.st),
            "dirty-flag": False,
        }
