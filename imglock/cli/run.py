"""``imglock run``: run a command with its images claimed (flock(1) for VM images)."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any, Final, TypeVar

import click

from imglock.cli.common import Voice, reported_errors, verbosity_options, write_output
from imglock.cli.params import SignalNumber, seconds_option
from imglock.cli.table import cell, render
from imglock.errors import EX_NOTFOUND, EX_TEMPFAIL
from imglock.lock.protocol import Mode
from imglock.lockcheck import DEFAULT_DEADLINE
from imglock.run.dry_run import dry_run
from imglock.run.launch import run_plan
from imglock.run.options import NAMED_FILE_OPTIONS, RunOptions
from imglock.run.plan import plan_run
from imglock.run.reporter import Reporter

Command = TypeVar("Command", bound=Callable[..., Any])
#: The values of an option that turns a lock layer on, off, or on where it applies.
POLICIES: Final = ("auto", "on", "off")


def _named_file_options(command: Command) -> Command:
    """One option per claim mode (``--image``...), naming files to claim in it (repeatable)."""
    for option, mode in reversed(NAMED_FILE_OPTIONS.items()):
        command = click.option(
            option,
            _files_parameter(mode),
            multiple=True,
            type=click.Path(readable=False),
            help=mode.option_help,
        )(command)
    return command


def _files_parameter(mode: Mode) -> str:
    """The name click gives the files named in *mode*'s option."""
    return f"files_{mode.name.lower()}"


def _policy_option(*names: str, help: str) -> Callable[[Command], Command]:
    """An option taking auto, on or off (default auto)."""
    return click.option(
        *names, type=click.Choice(POLICIES), default="auto", show_default=True, help=help
    )


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@_named_file_options
@seconds_option(
    "-w",
    "--wait",
    "--timeout",
    "wait",
    default=0.0,
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
@_policy_option(
    "--qemu-locks",
    help="Also hold QEMU's lock bytes (auto: unless COMMAND is QEMU itself).",
)
@_policy_option(
    "--flock",
    "flock_policy",
    help="Also hold a flock(2) on each image, as crosvm's (auto: where flock is not fcntl).",
)
@seconds_option(
    "--handoff-timeout",
    default=30.0,
    help="On a migration destination, seconds to wait for the source to release (inf: no limit).",
)
@click.option(
    "--lockspace",
    type=click.Path(file_okay=False),
    help="Keep the locks on files in this shared directory instead of the images.",
)
@seconds_option(
    "--check-interval",
    default=5.0,
    help="Seconds between re-checks of the locks while COMMAND runs (0 or inf: never).",
)
@seconds_option(
    "--check-deadline",
    default=DEFAULT_DEADLINE,
    help="Seconds a lock check may hang (the storage not answering) before the guest is "
    "paused until one completes (inf: never).",
)
@click.option(
    "--lock-lost-signal",
    type=SignalNumber(),
    default="STOP",
    show_default=True,
    help="Signal (name or number) sent to a non-QEMU COMMAND when its lock is lost.",
)
@seconds_option(
    "--graph-interval",
    default=0.5,
    help="QEMU: seconds between readings of its block graph, which the claim follows "
    "(0 or inf: never).",
)
@click.option(
    "--exec",
    "exec_in_place",
    is_flag=True,
    help="Exec COMMAND in the wrapper's place, so that its pid is the one a manager "
    "(libvirt, systemd) tracks; a helper beside it checks the claim and follows the VMM.",
)
@click.option(
    "--dry-run",
    "dry_run_only",
    is_flag=True,
    help="Print what would be claimed (every file, role, mode) and exit; take no lock.",
)
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print JSON.")
@verbosity_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(
    wait: float,
    conflict_exit_code: int,
    qemu_locks: str,
    flock_policy: str,
    handoff_timeout: float,
    lockspace: str | None,
    check_interval: float,
    check_deadline: float,
    lock_lost_signal: int,
    graph_interval: float,
    exec_in_place: bool,
    dry_run_only: bool,
    as_json: bool,
    command: tuple[str, ...],
    **named_files: tuple[str, ...],
) -> None:
    """Claim the images, run COMMAND while holding them, release when it exits.

    Without --image/--shared/--shared-write, a QEMU command line is read
    for its images (-drive, -blockdev, -hda..-hdd, -cdrom...).  Exits with COMMAND's status
    (128+N if killed by signal N), or the -E status on a conflict; 127
    when COMMAND is not found (or is empty), 126 when it cannot be run.
    """
    if as_json and not dry_run_only:
        raise click.UsageError("--json needs --dry-run (a run's output is its command's)")
    voice = Voice.current()
    if not command[0]:
        # An unset variable as the command ("$QEMU"): said as env(1) and
        # flock(1) say a command that cannot be found, with their status.
        voice.error("'': No such file or directory (the command name is empty)")
        sys.exit(EX_NOTFOUND)
    options = RunOptions(
        argv=command,
        named=tuple(
            (option, path)
            for option, mode in NAMED_FILE_OPTIONS.items()
            for path in named_files[_files_parameter(mode)]
        ),
        wait=wait,
        conflict_exit=conflict_exit_code,
        qemu_locks=qemu_locks,
        flock=flock_policy,
        handoff_timeout=handoff_timeout,
        lockspace=lockspace,
        check_interval=check_interval,
        check_deadline=check_deadline,
        lock_lost_signal=lock_lost_signal,
        graph_interval=0.0 if math.isinf(graph_interval) else graph_interval,
        exec_in_place=exec_in_place,
    )
    reporter = Reporter(error=voice.error, warn=voice.warn, note=voice.note)
    with reported_errors():
        plan = plan_run(options)
        if dry_run_only:
            sys.exit(_print_dry_run(dry_run(plan, reporter), as_json))
        sys.exit(run_plan(plan, reporter))


def _print_dry_run(report: dict[str, Any], as_json: bool) -> int:
    if as_json:
        # Deliberately lazy: json only for --json (start-up of every run).
        import json

        write_output(json.dumps(report, indent=2))
        return int(report["status"])
    lockspace = report["lockspace"]
    problems = any(entry["problem"] for entry in report["images"])
    rows = []
    for entry in report["images"]:
        mode = entry["mode"] if entry["claimed"] else "not claimed"
        kind = entry["format"] if entry["claimed"] else entry["protocol"]
        row = [cell(entry["filename"]), entry["role"], mode, cell(kind), cell(entry["source"])]
        if lockspace is not None:
            row.append(cell(entry["lock-file"]))
        if problems:
            row.append(cell(entry["problem"] or "-"))
        rows.append(row)
    header = ["FILE", "ROLE", "MODE", "FORMAT", "FROM"]
    if lockspace is not None:
        header.append("LOCK FILE")
    if problems:
        header.append("PROBLEM")
    if rows:
        write_output(render(header, rows))
    layers = ", ".join(report["layers"])
    if not any(entry["claimed"] for entry in report["images"]):
        write_output("nothing local to claim")
    write_output(f"lock layers: {layers}")
    return int(report["status"])
