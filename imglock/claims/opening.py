"""Opening what a claim covers: each image named, its backing chain and data files, once each."""

from __future__ import annotations

from collections.abc import Sequence

from imglock.chain import ChainLink, open_chain
from imglock.claims.conflicts import holders_refusing
from imglock.claims.image import ClaimedImage
from imglock.claims.member import Member
from imglock.claims.spec import ClaimSpec
from imglock.errors import ImglockError, LockConflict
from imglock.formats import open_image
from imglock.lock.protocol import Mode, strongest


def open_members(specs: Sequence[ClaimSpec], lockspace: str | None) -> list[Member]:
    """Open every image of every chain once, with the strongest mode asked of it."""
    by_file: dict[tuple[int, int], Member] = {}
    try:
        for spec in specs:
            chain = open_chain(
                spec.path, spec.format, backing=spec.backing, data_file=spec.data_file
            )
            pending = list(chain.links)
            try:
                while pending:
                    _add(by_file, spec, pending.pop(0), lockspace)
            finally:
                for link in pending:  # left over by a failure
                    link.image.close()
    except BaseException:
        for member in by_file.values():
            member.close()
        raise
    return list(by_file.values())


def _add(
    by_file: dict[tuple[int, int], Member], spec: ClaimSpec, link: ChainLink, lockspace: str | None
) -> None:
    """Add *link*'s file to *by_file*, or, when it is there already, what *spec* asks of it."""
    named = link.role == "top"
    mode = _mode_of(spec, link)
    image = link.image
    key = (image.st.st_dev, image.st.st_ino)
    known = by_file.get(key)
    if known is None:
        role = spec.role if named else link.role
        by_file[key] = Member(ClaimedImage.open(image, lockspace), mode, named, role, link.depth)
        return
    image.close()  # a second open would conflict with the first
    known.named |= named
    known.mode = strongest(known.mode, mode)


def _mode_of(spec: ClaimSpec, link: ChainLink) -> Mode:
    """The mode a file of *spec*'s chain is claimed in.

    The top image is claimed as asked, backing files shared, and an external
    data file like the image it belongs to.  Only the top image is named by
    the caller; the others are named by image headers, which are untrusted.
    """
    if link.role == "backing" or link.depth > 0:
        return Mode.SHARED
    return spec.mode


def open_file(path: str, mode: Mode, role: str, lockspace: str | None) -> Member:
    """One file alone, no chain followed: only its bytes matter, so it is never probed
    (a VM may be writing it)."""
    return Member(ClaimedImage.open(open_image(path, "raw"), lockspace), mode, False, role)


def conflict_at_top(specs: Sequence[ClaimSpec], lockspace: str | None) -> LockConflict | None:
    """Who holds a named image in a way that refuses its claim, if anyone.

    Looked at, never claimed: a claim that is about to fail must not
    show as a holder, even for a moment, to a ``status`` run meanwhile.
    """
    for spec in specs:
        try:
            member = open_file(spec.path, spec.mode, spec.role, lockspace)
        except (ImglockError, OSError):
            continue  # the top itself cannot be opened: the chain's error says so
        try:
            found = member.image.survey()
        except (ImglockError, OSError):
            continue  # no better answer than the chain's error
        finally:
            member.close()
        conflict = holders_refusing(found.holders, member.image.filename, spec.mode)
        if conflict is not None:
            return conflict
    return None
