"""The holder records of a claim's files: who holds each one, written beside its locks."""

from __future__ import annotations

from imglock.claims.member import Member
from imglock.lock import records
from imglock.lock.identity import Owner


def write(member: Member, owner: Owner, command: list[str] | None, *, lockspace: bool) -> None:
    """Write *member*'s record naming *owner*; a record that cannot be written is noted.

    A file named by an image header only (a backing file), and not in a
    *lockspace*, gets its record only in a record directory that is
    already there, never a new one: anyone who can write the image
    controls what its header names.
    """
    image = member.image
    record = records.make_record(
        image.filename, owner, member.mode.value, command, image.target.st.st_ino
    )
    member.record_problem = records.write(
        image.target.record_dir,
        image.target.record_name,
        record,
        create=member.named or lockspace,
    )
    member.recorded_as = owner if member.record_problem is None else None


def rewrite(member: Member, owner: Owner, command: list[str] | None) -> None:
    """Name *owner* in *member*'s record instead of the owner it names now."""
    image = member.image
    record = records.make_record(
        image.filename, owner, member.mode.value, command, image.target.st.st_ino
    )
    problem = records.write(image.target.record_dir, image.target.record_name, record, create=False)
    remove(member)  # the old owner's
    member.recorded_as = owner if problem is None else None
    member.record_problem = problem


def remove(member: Member) -> None:
    """Remove *member*'s holder record, if it has one."""
    owner, member.recorded_as = member.recorded_as, None
    if owner is not None:
        records.remove(member.image.target.record_dir, member.image.target.record_name, owner)
