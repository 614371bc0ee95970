"""``imglock status``: who holds images, and how (like lslocks(8), for images)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Final

import click

from imglock.cli.common import Voice, verbosity_options, write_output
from imglock.cli.table import cell, render
from imglock.errors import EX_HELD, EX_OK, ImglockError
from imglock.formats import OpenImage
from imglock.lock.discovery import LocalLocks
from imglock.lock.fcntl_locks import OFFSET_MAX
from imglock.lock.holder import Holder
from imglock.lock.proclocks import FlockTable
from imglock.qemu.guest import guest_name
from imglock.report import ImageReport, inspect_image
from imglock.scan import survey
from imglock.text import json_visible

HEADER: Final = (
    "IMAGE",
    "FORMAT",
    "BACKING",
    "HOLDER",
    "MODE",
    "PERMS",
    "UNSHARED",
    "PID",
    "VM",
    "HOST",
    "SINCE",
    "FLAGS",
    "COMMAND",
)
#: The table cuts command lines here; --json gives them whole.
COMMAND_WIDTH: Final = 80


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per image.")
@click.option(
    "--lockspace",
    type=click.Path(file_okay=False),
    help="Read the images' locks from their lock files in this directory.",
)
@verbosity_options
@click.argument(
    "paths", metavar="IMAGE|DIR...", nargs=-1, required=True, type=click.Path(readable=False)
)
def status(as_json: bool, lockspace: str | None, paths: tuple[str, ...]) -> None:
    """Show who holds each IMAGE, and every image under each DIR.

    One row per holder: imglock holders (exclusive, shared or
    shared-write), QEMU with the permissions it holds and refuses to share
    (PERMS, UNSHARED), flock(2) holders on this host (flock), and other
    programs' locks (foreign, with the bytes they lock); HOLDER is "none"
    for a free image.  Then one row per claimer waiting in the image's
    queue (HOLDER "waiting", first first, SINCE when it arrived): waiters
    are never holders.  FLAGS: corrupt, dirty, not-closed-cleanly (a
    dirty qcow2 that no one holds), replaced (a holder record names
    another file that was at this path: the image was replaced, perhaps
    while a VM held and still writes the old one; the status is then 1, as
    for a held image), stale-records=N (holder records whose lock is
    gone).  Commands are cut at 80 characters; --json shows them whole,
    with the same data and qemu-img's key names.

    A named IMAGE is looked at whatever it holds.  A DIR is walked
    recursively, in name order, and in it a file counts as an image when
    its magic names a format (qcow2; vmdk, vdi and other formats imglock
    cannot read are looked at as plain data: locks do not depend on the
    format), when its name ends in .qcow2, .raw, .img
    or .iso (any case), or while a process holds a byte-range lock on it
    (a raw disk named "disk", in use).  Other files are skipped quietly (-v
    says which and why).  A walk does not follow symbolic links (name one
    to look through it), does not enter .imglock record directories, and
    never opens FIFOs, sockets or devices.  A file found twice is listed once.

    Exit status: 1 when any image is held; otherwise, if some image could
    not be read (one line on stderr each), the first such error's status
    (65 malformed, 66 cannot be opened, 74 read error); otherwise 0.
    """
    # Every image is looked up in /proc/locks (lock tests do not show flock
    # holders); the command line starts that read before loading this module
    # (imglock.cli.HEAD_STARTS), and a caller that did not gets it started now.
    started = click.get_current_context().find_object(FlockTable)
    flocks = started if started is not None else FlockTable(background=True)
    voice = Voice.current()
    local = LocalLocks(flocks)  # one /proc scan, and only once some lock is seen
    reports: list[ImageReport] = []
    errors: list[ImglockError] = []
    skipped = 0

    def skip(path: str, why: str) -> None:
        nonlocal skipped
        skipped += 1
        voice.note(f"{path}: skipped: {why}")

    # Images are looked at several at once (each is round trips on NFS and
    # the like), and reported in walk order.
    def look(image: OpenImage) -> ImageReport:
        return inspect_image(image, lockspace=lockspace, local=local)

    for _filename, outcome in survey(paths, look, skip):
        if isinstance(outcome, ImglockError):
            voice.error(str(outcome))
            errors.append(outcome)
        else:
            reports.append(outcome)
    voice.note(f"images read: {len(reports)}, errors: {len(errors)}, files skipped: {skipped}")
    if not reports and not errors:
        voice.warn(f"no images found in {', '.join(paths)}")

    if as_json:
        # The json package costs about 2 ms to load, a twentieth of `import
        # click`, and only --json needs it: loaded here, where JSON is written.
        import json

        listed = [report_json(r) for r in reports]
        text = json.dumps(utf8_clean(listed), indent=2, ensure_ascii=False)
        write_output(json_visible(text))
    elif reports:
        # Every cell is escaped (cell()): the table is valid UTF-8 throughout.
        text = render(HEADER, [row for r in reports for row in table_rows(r)])
        write_output(text)
    sys.exit(exit_status(reports, errors))


def utf8_clean(value: object) -> object:
    """*value* with every string made valid UTF-8 for strict JSON parsers.

    Names are kept as the bytes they are on disk (surrogateescape); a byte
    that is not part of a UTF-8 character comes out as the four characters
    ``\\xHH`` (Python's backslashreplace), never as a lone surrogate.
    """
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(value, list):
        return [utf8_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: utf8_clean(v) for k, v in value.items()}
    return value


def exit_status(reports: Sequence[ImageReport], errors: Sequence[ImglockError]) -> int:
    """1 when any image is held or replaced; else the first error's status; else 0.

    "Held" wins because it is a sure answer about an image that was read,
    and the one that must stop a script; an error still keeps the status
    from saying "all free".
    """
    if any(report.holders or report.replaced for report in reports):
        return EX_HELD
    return errors[0].exit_status if errors else EX_OK


def report_json(report: ImageReport) -> dict[str, Any]:
    """*report* as ``--json`` gives it: each holder and waiter with the ``vm`` it runs."""
    out = report.to_json()
    for who, listed in ((report.holders, out["holders"]), (report.waiting, out["waiting"])):
        for holder, entry in zip(who, listed, strict=True):
            entry["vm"] = guest_name(holder.command)
    return out


def table_rows(report: ImageReport) -> list[list[str]]:
    """The table's rows for one image: one per holder (or one saying it is free), then waiters."""
    image = [cell(report.filename), cell(report.format), cell(report.backing_filename)]
    flags = cell(",".join(flags_of(report)))

    def row(kind: str, who: Holder, locks: str, unshared: str) -> list[str]:
        pid = cell(None if who.pid is None else str(who.pid))
        when = [cell(who.host), cell(who.since), flags, cell(who.command, COMMAND_WIDTH)]
        return [*image, kind, cell(who.mode), locks, unshared, pid, cell(guest_name(who.command)),
                *when]  # fmt: skip

    rows = [
        row(h.layer, h, cell(_locks_held(h)), cell(",".join(h.unshared))) for h in report.holders
    ] or [[*image, "none", *["-"] * 7, flags, "-"]]
    return rows + [row("waiting", w, "-", "-") for w in report.waiting]


def _locks_held(holder: Holder) -> str:
    """QEMU's permission names, or for a foreign lock the bytes it covers."""
    if holder.range is None:
        return ",".join(holder.perms)
    start, end = holder.range
    if end >= OFFSET_MAX:
        return "whole file" if start == 0 else f"bytes {start}-EOF"
    return f"bytes {start}-{end - 1}"


def flags_of(report: ImageReport) -> list[str]:
    """What is worth knowing about an image besides its holders."""
    flags = []
    if report.corrupt:
        flags.append("corrupt")
    if report.not_closed_cleanly:
        flags.append("not-closed-cleanly")
    elif report.dirty:
        flags.append("dirty")
    if report.replaced:
        flags.append("replaced")
    if report.stale_records:
        flags.append(f"stale-records={len(report.stale_records)}")
    return flags
