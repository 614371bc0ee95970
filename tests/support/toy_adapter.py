"""The adapter of tests/support/toy_vmm: a hypervisor imglock learns of through an entry point.

A whole adapter: which command it runs, and the file it claims (the
``--disk`` argument, exclusive).  Everything else (signals pause it, no
monitor) is the generic adapter's.  Registered as
``[imglock.hypervisors] toy = toy_adapter:ADAPTER`` (see tests/cli/test_adapters.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final

from imglock.api import ClaimSpec
from imglock.errors import UsageError
from imglock.lock.protocol import Mode
from imglock.run.adapters.base import Adapter, Command, FilePlan
from imglock.run.options import RunOptions


@dataclass(frozen=True)
class ToyAdapter(Adapter):
    name: str = "toy"

    def recognizes(self, command: Command) -> bool:
        return os.path.basename(command.program[0]) == "toy_vmm"

    def plan_files(self, options: RunOptions, command: Command) -> FilePlan:
        program = command.program
        if "--disk" not in program[:-1]:
            raise UsageError(program[0], "no --disk to claim")
        disk = program[program.index("--disk") + 1]
        return FilePlan((ClaimSpec(disk, Mode.EXCLUSIVE, "raw"),), {disk: "--disk"})


ADAPTER: Final = ToyAdapter()
