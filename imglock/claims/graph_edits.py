"""Files added to, dropped from, or changed in a held claim, as a VM's block graph changes.

For ``imglock run`` following a running VM (:mod:`imglock.run.graph`):
its block graph lists every file of a chain itself, so no chain is followed.
"""

from __future__ import annotations

from imglock.claims.conflicts import named_conflict
from imglock.claims.member import Member
from imglock.claims.opening import open_file
from imglock.lock.identity import Owner
from imglock.lock.protocol import Layer, Mode, ProtocolConflict


def add_file(
    path: str, mode: Mode, role: str, *, lockspace: str | None, layers: Layer, owner: Owner
) -> Member:
    """Open one more file and claim it in *mode*, alone.

    Raises LockConflict naming the holder (nothing is held then), ImageError
    if the file cannot be opened.
    """
    member = open_file(path, mode, role, lockspace)
    try:
        try:
            member.image.take(mode, layers, owner)
        except ProtocolConflict as exc:
            raise named_conflict(member, exc) from None
    except BaseException:
        member.close()
        raise
    return member


def drop_file(member: Member) -> None:
    """Unclaim one file that the VM has closed, and close its descriptors.

    An explicit unlock (case 4 of the lifetime rule in imglock(7)): the
    VM may still hold a descriptor it inherited at start, but its block
    layer has closed the file and no longer uses it.
    """
    try:
        member.image.drop()
    finally:
        member.close()


def change_file_mode(member: Member, mode: Mode) -> bool:
    """Turn one file's claim into one in *mode* on the same descriptor; whether its locks changed.

    Never unclaimed in between (see protocol.change_mode).  Raises
    LockConflict naming the holder; the old mode is kept then.
    """
    held = member.image.held
    if held is None or held.mode is mode:
        member.mode = mode
        return False
    try:
        member.image.change_mode(mode)
    except ProtocolConflict as exc:
        raise named_conflict(member, exc, mode=mode) from None
    member.mode = mode
    return True
