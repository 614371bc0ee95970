"""What ``imglock run`` was asked to do: its options, read once from the command line."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Final

from imglock.errors import EX_TEMPFAIL
from imglock.lock.protocol import Mode
from imglock.lockcheck import DEFAULT_DEADLINE

#: The options that name a file to claim, and the mode each claims it in:
#: each mode's own (see the mode table in imglock.lock.protocol).
NAMED_FILE_OPTIONS: Final[dict[str, Mode]] = {mode.option: mode for mode in Mode}


@dataclass(frozen=True)
class RunOptions:
    """The options of ``imglock run``, as the planning, the claim and the adapters read them."""

    #: The command to run, exec-wrappers included.
    argv: tuple[str, ...]
    #: Files named on the wrapper: (option, path), in the order of NAMED_FILE_OPTIONS.
    named: tuple[tuple[str, str], ...] = ()
    wait: float = 0.0
    conflict_exit: int = EX_TEMPFAIL
    #: ``--qemu-locks``: auto, on or off.
    qemu_locks: str = "auto"
    #: ``--flock``: auto, on or off.
    flock: str = "auto"
    handoff_timeout: float = 30.0
    lockspace: str | None = None
    #: Seconds between lock re-checks while COMMAND runs (0 or inf: never).
    check_interval: float = 5.0
    #: Seconds a lock check may take before the guest is paused (inf: no limit).
    check_deadline: float = DEFAULT_DEADLINE
    lock_lost_signal: int = signal.SIGSTOP
    #: Seconds between readings of a VMM's block graph (0: do not follow it).
    graph_interval: float = 0.5
    #: ``--exec``: the command replaces the wrapper (one pid), a helper beside it.
    exec_in_place: bool = False

    def named_modes(self) -> list[tuple[str, str, Mode]]:
        """(option, path, mode) of every file named on the wrapper."""
        return [(option, path, NAMED_FILE_OPTIONS[option]) for option, path in self.named]
