"""One plan of ``imglock run``: what a run claims, in which layers, through which adapter.

A real run and ``--dry-run`` build the same :class:`RunPlan`; the dry run
only renders it (:mod:`imglock.run.dry_run`), the run takes it
(:mod:`imglock.run.launch`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final

from imglock.api import Claim
from imglock.errors import UsageError
from imglock.lock.protocol import Layer, flock_layer
from imglock.qemu.names import is_qemu
from imglock.run.adapters import adapter_for
from imglock.run.adapters.base import Adapter, Command, FilePlan
from imglock.run.options import RunOptions

#: QEMU's tools that take QEMU's lock bytes themselves (besides qemu-system-*).
QEMU_LOCKING_TOOLS: Final = frozenset({"qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon"})


def takes_qemu_locks(command: Command) -> bool:
    """Whether the command is QEMU or one of its tools, which lock QEMU's bytes themselves.

    Seen through the exec-wrappers in front of it (``nice qemu-img ...``).
    """
    program = command.program
    return is_qemu(program) or os.path.basename(program[0]) in QEMU_LOCKING_TOOLS


def layers_for(qemu_locks: str, speaks_qemu: bool) -> Layer:
    """The lock layers to hold for a command (see ``--qemu-locks``), flock aside."""
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


@dataclass(frozen=True)
class RunPlan:
    """What ``imglock run`` claims for a command, before anything is opened."""

    options: RunOptions
    command: Command
    #: The adapter that runs the command.
    adapter: Adapter
    files: FilePlan
    #: Every lock layer the claim takes, the flock layer included.
    layers: Layer

    def claim(self) -> Claim:
        """The claim this plan makes (unopened, untaken)."""
        return Claim(
            self.files.specs,
            wait=self.options.wait,
            layers=self.layers,
            lockspace=self.options.lockspace,
        )


def plan_run(options: RunOptions) -> RunPlan:
    """The plan of a run of *options*: raises UsageError for a command it cannot plan."""
    command = Command.of(options.argv)
    adapter = adapter_for(options, command)
    files = adapter.plan_files(options, command)
    layers = layers_for(options.qemu_locks, takes_qemu_locks(command)) | flock_layer(options.flock)
    return RunPlan(options, command, adapter, files, layers)
