"""What a live migration needs of a claim: everything settled ahead, and the explicit unlock.

A destination prepares before the switch-over, and announces its claim
(its intent bytes) once the incoming migration has begun, so that the
guest's downtime holds only a test and the holder bytes; a source whose
QEMU has inactivated its images drops its locks but keeps its
descriptors, for the guest may yet be resumed there
(Claim.release(close=False), then acquire).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

from imglock import faults
from imglock.claims.member import Member
from imglock.errors import LockError
from imglock.lock.identity import Owner
from imglock.lock.protocol import Layer


def prepare(members: Iterable[Member], layers: Layer, owner_pid: int | None) -> None:
    """Settle all that taking the locks needs besides the lock calls themselves.

    That is which lock commands the kernel has (one lock test), this host's
    identity, and which lock layers each file takes; each costs a system
    call or a file read, and through a network filesystem a round trip.
    """
    Owner.current(owner_pid)  # hashes the host name, once
    for member in members:
        member.image.prepare(layers)


def unlock(members: Iterable[Member]) -> None:
    """Drop every lock, keep the descriptors and records (case 3 of the lifetime rule)."""
    for member in members:
        with contextlib.suppress(LockError):  # a dead mount: its locks are gone with it
            member.image.drop()
        with contextlib.suppress(LockError):
            member.image.withdraw()  # an intent announced for an arrival still held
        faults.point("release:unlocked")


def announce(members: Sequence[Member], owner: Owner) -> bool:
    """Take every file's intent byte ahead of the switch-over; False (none held) if one fails.

    Without them the arrival is an ordinary claim, only slower.
    """
    try:
        for member in members:
            member.image.announce(member.mode, owner)
    except LockError:
        withdraw(members)
        return False
    return True


def withdraw(members: Iterable[Member]) -> None:
    """Drop the intents :func:`announce` took (one not dropped dies with its descriptor)."""
    for member in members:
        with contextlib.suppress(LockError):
            member.image.withdraw()
