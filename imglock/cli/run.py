"""``imglock run``: run a command with its images claimed (flock(1) for VM images)."""

from __future__ import annotations

import sys

import click

from imglock.cli.common import Seconds, SignalNumber, verbosity_options
from imglock.errors import EX_TEMPFAIL


@click.command(
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@click.option(
    "--image",
    "images",
    multiple=True,
    type=click.Path(readable=False),
    help="Claim PATH exclusive (its backing files shared). Repeatable.",
)
@click.option(
    "--shared",
    "shared",
    multiple=True,
    type=click.Path(readable=False),
    help="Claim PATH shared (read-only use). Repeatable.",
)
@click.option(
    "-w",
    "--wait",
    "--timeout",
    "wait",
    type=Seconds(),
    default=0.0,
    show_default=True,
    help="Seconds to keep trying while another holder has an image (inf: until free).",
)
@click.option(
    "-E",
    "--conflict-exit-code",
    type=click.IntRange(0, 255),
    default=EX_TEMPFAIL,
    show_default=True,
    help="Exit status when an image is held by someone else.",
)
@click.option(
    "--qemu-locks",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Also hold QEMU's lock bytes (auto: unless COMMAND is QEMU itself).",
)
@click.option(
    "--handoff-timeout",
    type=Seconds(),
    default=30.0,
    show_default=True,
    help="On a migration destination, seconds to wait for the source to release (inf: no limit).",
)
@click.option(
    "--lockspace",
    type=click.Path(file_okay=False),
    help="Keep the locks on files in this shared directory instead of the images.",
)
@click.option(
    "--check-interval",
    type=Seconds(),
    default=5.0,
    show_default=True,
    help="Seconds between re-checks of the locks while COMMAND runs (0 or inf: never).",
)
@click.option(
    "--lock-lost-signal",
    type=SignalNumber(),
    default="STOP",
    show_default=True,
    help="Signal (name or number) sent to a non-QEMU COMMAND when its lock is lost.",
)
@verbosity_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(
    images: tuple[str, ...],
    shared: tuple[str, ...],
    wait: float,
    conflict_exit_code: int,
    qemu_locks: str,
    handoff_timeout: float,
    lockspace: str | None,
    check_interval: float,
    lock_lost_signal: int,
    command: tuple[str, ...],
) -> None:
    """Claim the images, run COMMAND while holding them, release when it exits.

    Without --image/--shared, a QEMU command line is read for its images
    (-drive, -blockdev, -hda..-hdd, -cdrom).  Exits with COMMAND's status
    (128+N if killed by signal N), or the -E status on a conflict.
    """
    from imglock.cli.common import Voice, reported_errors
    from imglock.run.launch import Launch, launch

    voice = Voice.current()
    with reported_errors():
        plan = Launch(
            argv=list(command),
            images=list(images),
            shared=list(shared),
            wait=wait,
            conflict_exit=conflict_exit_code,
            qemu_locks=qemu_locks,
            handoff_timeout=handoff_timeout,
            lockspace=lockspace,
            check_interval=check_interval,
            lock_lost_signal=lock_lost_signal,
            say=voice.error,
            note=voice.note,
        )
        sys.exit(launch(plan))
