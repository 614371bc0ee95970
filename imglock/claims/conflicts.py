"""Naming who is in a claim's way: the holder, the waiters ahead, a lock outside the protocol."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from imglock.claims.member import Member
from imglock.errors import LockConflict
from imglock.lock.fcntl_locks import RangeLock
from imglock.lock.holder import Holder
from imglock.lock.identity import Owner
from imglock.lock.protocol import (
    IMGLOCK_START,
    Mode,
    Place,
    ProtocolConflict,
    conflicts,
    holder_range,
)

#: How many holders a conflict message names (the others are counted).
NAMED_HOLDERS: Final = 4


class Contended(Exception):
    """One member lost to a holder.  Named only once the wait runs out: naming
    surveys the image (every lock, /proc, the records), far dearer than a retry."""

    def __init__(self, member: Member, conflict: ProtocolConflict) -> None:
        super().__init__(member, conflict)
        self.member = member
        self.conflict = conflict


def refuses(holder: Holder, mode: Mode) -> bool:
    """Whether *holder* is in the way of a claim in *mode* (by its mode or QEMU's perms)."""
    if mode.alone:
        return True
    if holder.layer == "imglock" and holder.mode is not None:
        return conflicts(mode, Mode(holder.mode))
    if holder.layer == "qemu":
        return "write" in holder.perms or "write" in holder.unshared
    return holder.mode == "exclusive"


def holders_refusing(holders: Sequence[Holder], filename: str, mode: Mode) -> LockConflict | None:
    """The conflict of a claim in *mode* with those of *holders* that refuse it, if any do."""
    rivals = [h for h in holders if refuses(h, mode)]
    if not rivals:
        return None
    text = f"cannot claim {mode.value}: held " + ", ".join(
        h.describe() for h in rivals[:NAMED_HOLDERS]
    )
    return LockConflict(filename, text, rivals)


def named_conflict(
    member: Member, exc: ProtocolConflict, place: Place | None = None, mode: Mode | None = None
) -> LockConflict:
    """Turn a bare conflict into one that names who holds the image, and who waits ahead.

    *mode* is the mode asked for, when not the member's own (a mode change).
    """
    mode = mode or member.mode
    found = member.image.survey()
    holders = _others(member, found.holders)
    # Ahead: conflicting waiters before the claimer's place, or all of them
    # for a claimer that never queued (any of them would go first).
    ahead = [
        w
        for w in found.waiting
        if conflicts(mode, Mode(w.mode or mode))
        and (place is None or (w.place is not None and w.place < place.offset))
    ]
    text = f"cannot claim {mode.value}"
    if holders:
        first = blocking_holder(holders, exc.lock)
        # Several imglock holders (shared readers, shared writers) are all in
        # the way: name each of them, up to a few.
        named = [first]
        if first.layer == "imglock":
            named += [h for h in holders if h is not first and h.layer == "imglock"]
            named = named[:NAMED_HOLDERS]
        text += ": held " + ", ".join(h.describe() for h in named)
        if len(holders) > len(named):
            text += f" and {len(holders) - len(named)} more"
    elif not ahead:
        text += ": held by another process"
    if ahead:
        text += f"; {len(ahead)} waiting ahead, first {ahead[0].describe()}"
    return LockConflict(member.image.filename, text, holders, ahead)


def intruder(member: Member, lock: RangeLock) -> str:
    """One line on a lock in *member*'s way that is held outside imglock's protocol."""
    others = _others(member, member.image.survey().holders)
    who = blocking_holder(others, lock).describe() if others else "by another process"
    return (
        f"{member.image.filename}: a lock outside imglock's protocol is in the way at byte "
        f"{lock.start:#x}, held {who}; the claim's own locks are intact"
    )


def _others(member: Member, holders: list[Holder]) -> list[Holder]:
    """*holders* without the claim itself, when it holds the file (a mode change, a check)."""
    held = member.image.held
    if held is None:
        return holders
    return [h for h in holders if h.owner != held.owner.id]


def blocking_holder(found: Sequence[Holder], lock: RangeLock) -> Holder:
    """The holder worth naming: the one whose lock was in the way, else a writer."""
    for holder in found:
        if holder.owner is not None and holder.mode is not None:
            byte, _length = holder_range(Mode(holder.mode), Owner.from_id(holder.owner))
            if lock.start <= byte < lock.end:
                return holder
    if lock.end <= IMGLOCK_START:  # QEMU's bytes, or a foreign lock
        for holder in found:
            if holder.range is not None and holder.range == (lock.start, lock.end):
                return holder
        for holder in found:
            if holder.layer == "qemu":
                return holder
    for holder in found:
        if holder.mode == Mode.EXCLUSIVE.value or "write" in holder.perms:
            return holder
    return found[0]
