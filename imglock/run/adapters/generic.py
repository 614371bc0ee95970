"""The generic adapter: any command, its files named on the wrapper, paused by a signal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from imglock.errors import UsageError
from imglock.qemu.names import names_qemu
from imglock.run.adapters.base import Adapter, Command, FilePlan, named_files
from imglock.run.options import RunOptions

#: What to do about a QEMU behind a prefix that imglock cannot see through.
PREFIX_ADVICE: Final = (
    "run QEMU directly, or name its images with --image, --shared or --shared-write "
    "and add --qemu-locks off, so that QEMU keeps its own lock bytes"
)


@dataclass(frozen=True)
class GenericAdapter(Adapter):
    """Any command no other adapter recognizes: only files named on the wrapper are claimed."""

    name: str = "generic"

    def recognizes(self, command: Command) -> bool:
        return True

    def plan_files(self, options: RunOptions, command: Command) -> FilePlan:
        files = named_files(options)
        if files.specs:
            return files
        if names_qemu(command.argv[1:]):
            why = command.problem or f"{command.argv[0]}: a prefix imglock does not see through"
            raise UsageError(None, f"{why}; {PREFIX_ADVICE}")
        raise UsageError(
            command.argv[0],
            "not a QEMU command line; name the images to claim with --image, --shared "
            "or --shared-write",
        )


GENERIC: Final = GenericAdapter()
