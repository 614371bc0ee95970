"""What ``imglock run`` claims for a command, and how it watches a QEMU.

This is the policy between the CLI and the runner: which images a command
uses (named with --image/--shared, or read from a QEMU command line), which
lock layers to hold (``--qemu-locks``), and, for QEMU, the private QMP
monitor through which a live migration hands the claim over.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence

from imglock.api import Claim, ClaimSpec
from imglock.errors import EX_TEMPFAIL, UsageError
from imglock.lock.protocol import Layer, Mode
from imglock.qemu.names import is_qemu
from imglock.run.runner import RunConfig, Runner, Say, run_command


class Launch:
    """The options of ``imglock run``."""

    def __init__(
        self,
        argv: list[str],
        images: Sequence[str] = (),
        shared: Sequence[str] = (),
        wait: float = 0.0,
        conflict_exit: int = EX_TEMPFAIL,
        qemu_locks: str = "auto",
        handoff_timeout: float = 30.0,
        lockspace: str | None = None,
        check_interval: float = 5.0,
        lock_lost_signal: int = signal.SIGSTOP,
        say: Say | None = None,
        note: Say | None = None,
    ) -> None:
        self.argv = argv
        self.images = list(images)
        self.shared = list(shared)
        self.wait = wait
        self.conflict_exit = conflict_exit
        self.qemu_locks = qemu_locks
        self.handoff_timeout = handoff_timeout
        self.lockspace = lockspace
        self.check_interval = check_interval
        self.lock_lost_signal = lock_lost_signal
        #: How the runner reports errors and notes (default: errors on stderr, no notes).
        self.say = say
        self.note = note


#: QEMU's tools that take QEMU's lock bytes themselves (besides qemu-system-*).
QEMU_LOCKING_TOOLS = frozenset({"qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon"})


def takes_qemu_locks(argv: list[str]) -> bool:
    """Whether the command is QEMU or one of its tools, which lock QEMU's bytes themselves."""
    return is_qemu(argv) or os.path.basename(argv[0]) in QEMU_LOCKING_TOOLS


def layers_for(qemu_locks: str, speaks_qemu: bool) -> Layer:
    """The lock layers to hold for a command (see ``--qemu-locks``)."""
    if qemu_locks == "off":
        return Layer.IMGLOCK
    if qemu_locks == "on":
        if speaks_qemu:
            raise UsageError(
                None,
                "--qemu-locks on with a QEMU command would make QEMU refuse its own images; "
                "use auto (QEMU takes its own lock bytes)",
            )
        return Layer.IMGLOCK | Layer.QEMU
    # auto: QEMU holds its own bytes once it runs; test them before it starts.
    return Layer.IMGLOCK | (Layer.QEMU_TEST if speaks_qemu else Layer.QEMU)


def specs_for(plan: Launch, command_is_qemu: bool) -> list[ClaimSpec]:
    """The images to claim: named ones, else those of a QEMU command line."""
    specs = [ClaimSpec(p, Mode.EXCLUSIVE) for p in plan.images]
    specs += [ClaimSpec(p, Mode.SHARED) for p in plan.shared]
    if specs:
        return specs
    if not command_is_qemu:
        raise UsageError(
            plan.argv[0],
            "not a QEMU command line; name the images to claim with --image or --shared",
        )
    # The command-line parser is needed only to read a QEMU command's images.
    from imglock.qemu.cmdline import ROLE_BACKING, ROLE_DATA_FILE, find_images

    for drive in find_images(plan.argv):
        if not drive.local:
            continue  # nbd:, iscsi:, /dev/fdset...: their servers do the locking
        shared = drive.shared or drive.role == ROLE_BACKING
        # A data file is read as raw data, never probed (it may hold anything).
        fmt = "raw" if drive.role == ROLE_DATA_FILE else drive.format
        specs.append(ClaimSpec(drive.filename, Mode.SHARED if shared else Mode.EXCLUSIVE, fmt))
    if not specs:
        raise UsageError(plan.argv[0], "the QEMU command line opens no local image to claim")
    return specs


def launch(plan: Launch) -> int:
    """Run *plan*; return the wrapper's exit status."""
    command_is_qemu = is_qemu(plan.argv)
    claim = Claim(
        specs_for(plan, command_is_qemu),
        wait=plan.wait,
        layers=layers_for(plan.qemu_locks, takes_qemu_locks(plan.argv)),
        lockspace=plan.lockspace,
    )
    config = RunConfig(
        argv=plan.argv,
        claim=claim,
        conflict_exit=plan.conflict_exit,
        check_interval=plan.check_interval,
        lock_lost_signal=plan.lock_lost_signal,
    )
    config.say = plan.say or config.say
    config.note = plan.note or config.note
    if not command_is_qemu:
        return run_command(config)
    return _launch_qemu(plan, config)


def _launch_qemu(plan: Launch, config: RunConfig) -> int:
    """Run QEMU with a private QMP monitor that hands the claim over on migration."""
    # Only a QEMU command gets a monitor, and so a private directory for its socket.
    import shutil
    import tempfile

    from imglock.run.handoff import Handoff

    private = tempfile.mkdtemp(prefix="imglock-")  # mode 0700: only we can reach the socket
    try:
        handoff = Handoff.for_command(plan.argv, private, plan.handoff_timeout)
        config.argv = handoff.argv
        config.claim_at_start = not handoff.incoming
        runner = Runner(config)
        handoff.attach(runner)
        try:
            return run_command(config, runner)
        finally:
            handoff.close()
    finally:
        shutil.rmtree(private, ignore_errors=True)
