"""The library API: claim images (with their backing chains), release, inspect.

    with imglock.claim("vm.qcow2"):               # exclusive, backing files shared
        ...
    c = imglock.claim("base.qcow2", mode="shared", wait=10)
    c.release()

A claim of several images is all or nothing, like QEMU's old
``bdrv_claim_all``: on any failure everything already taken is released.
:class:`Claim` is put together in :mod:`imglock.claims`; this module is the
way in.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any, Final

from imglock.claims.facade import Claim
from imglock.claims.spec import ClaimSpec, as_mode, as_seconds
from imglock.claims.waiting import BACKOFF_CAP, BACKOFF_FIRST
from imglock.errors import UsageError
from imglock.lock.protocol import Layer, Mode, flock_layer
from imglock.safeio import as_path

if TYPE_CHECKING:
    from imglock.report import ImageReport, inspect, inspect_image

__all__ = [
    "BACKOFF_CAP",
    "BACKOFF_FIRST",
    "Claim",
    "ClaimSpec",
    "ImageReport",
    "as_mode",
    "as_path",
    "as_seconds",
    "claim",
    "inspect",
    "inspect_image",
]


def claim(
    path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
    mode: Mode | str = Mode.EXCLUSIVE,
    *,
    wait: float = 0.0,
    format: str | None = None,
    qemu_locks: bool = True,
    flock: str = "auto",
    lockspace: str | None = None,
    record: bool = True,
) -> Claim:
    """Claim *path* (and its backing chain) and return the held :class:`Claim`.

    *mode* is "exclusive" (one writer), "shared" (readers) or "shared-write"
    (writers that share the disk on purpose, like QEMU's ``share-rw=on``);
    backing files are always claimed shared.  *wait* is how long to keep
    trying while someone else holds it, in seconds (``math.inf``: until it
    is free).  With *qemu_locks*, QEMU's own lock bytes are held too, so
    that qemu-img and qemu-system refuse the image meanwhile.
    With *flock* "auto" (or "on", "off"), a whole-file flock(2) is held
    too where the filesystem keeps flock apart from fcntl locks (or
    everywhere, or nowhere), so that crosvm, hyperkit and alioth see the
    claim.  *path* may be a str, bytes or a path-like object.
    Raises LockConflict (with ``.holders``) if the image stays held,
    FormatError/ImageError/ChainError if it cannot be read, and UsageError
    (also a ValueError) for a bad argument (a *wait* that is not a number of
    seconds >= 0, an unknown *mode*).

    The claim is owned by the calling process; see :class:`Claim` for what
    a forked child may do with it.
    """
    if flock not in ("auto", "on", "off"):
        raise UsageError(None, f"unknown flock policy {flock!r} (auto, on, off)")
    layers = Layer.IMGLOCK | (Layer.QEMU if qemu_locks else Layer(0)) | flock_layer(flock)
    spec = ClaimSpec(as_path(path), as_mode(mode), format)
    return Claim([spec], wait=wait, layers=layers, lockspace=lockspace, record=record).acquire()


#: Names of :mod:`imglock.report`, also reachable from here.  Resolved on
#: first use: a claimer never needs what looking at holders loads.
_FROM_REPORT: Final = frozenset({"ImageReport", "inspect", "inspect_image"})


def __getattr__(name: str) -> Any:
    if name not in _FROM_REPORT:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("imglock.report"), name)
