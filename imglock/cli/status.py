"""``imglock status``: who holds images, and how (like lslocks(8), for images)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from imglock.cli.common import reported_errors

if TYPE_CHECKING:
    from imglock.api import ImageReport


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per image.")
@click.option(
    "--lockspace",
    type=click.Path(file_okay=False),
    help="Read the images' locks from their lock files in this directory.",
)
@click.argument("images", nargs=-1, required=True, type=click.Path())
def status(as_json: bool, lockspace: str | None, images: tuple[str, ...]) -> None:
    """Show who holds IMAGE: imglock holders, QEMU and other lockers.

    Exits 0 when no image is held, 1 when any is.
    """
    from imglock.api import inspect
    from imglock.discovery import LocalLocks
    from imglock.errors import EX_HELD, EX_OK, ImglockError

    local = LocalLocks()
    reports: list[ImageReport] = []
    failed: ImglockError | None = None
    for path in images:
        try:
            reports.append(inspect(path, lockspace=lockspace, local=local))
        except ImglockError as exc:
            click.echo(f"imglock: {exc}", err=True)
            failed = failed or exc
    if as_json:
        import json

        click.echo(json.dumps([r.to_json() for r in reports], indent=2))
    else:
        _print_table(reports)
    if failed is not None:
        with reported_errors():
            raise failed
    sys.exit(EX_HELD if any(r.holders for r in reports) else EX_OK)


def _print_table(reports: list[ImageReport]) -> None:
    from imglock.cli.table import render

    rows: list[list[str]] = []
    for report in reports:
        flags = _flags(report)
        if not report.holders:
            rows.append([report.filename, report.format or "-", "-", "free", *"---", flags, "-"])
        for holder in report.holders:
            what = holder.mode or ",".join(holder.perms) or "-"
            if holder.unshared:
                what += " (no " + ",".join(holder.unshared) + ")"
            rows.append(
                [
                    report.filename,
                    report.format or "-",
                    holder.layer,
                    what,
                    "-" if holder.pid is None else str(holder.pid),
                    holder.host or "-",
                    holder.since or "-",
                    flags,
                    holder.command or "-",
                ]
            )
    header = ["IMAGE", "FORMAT", "LAYER", "HOLDS", "PID", "HOST", "SINCE", "FLAGS", "COMMAND"]
    click.echo(render(header, rows))


def _flags(report: ImageReport) -> str:
    flags = []
    if report.corrupt:
        flags.append("corrupt")
    if report.not_closed_cleanly:
        flags.append("not-closed-cleanly")
    elif report.dirty:
        flags.append("dirty")
    if report.stale_records:
        flags.append(f"stale-records={len(report.stale_records)}")
    return ",".join(flags) or "-"
