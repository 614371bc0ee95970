"""What a hypervisor adapter is: the seam between ``imglock run`` and one kind of VMM.

An adapter knows one VMM's command line and how to stop its guest:

* :meth:`Adapter.recognizes`: whether a command runs this VMM;
* :meth:`Adapter.plan_files`: the files to claim for the command, each in
  its mode (files named on the wrapper, or read from the command line);
* :meth:`Adapter.prepare`: the command to run (a monitor socket added...),
  as a :class:`VmmRun` that, once the VMM runs, attaches to it:
  :meth:`VmmRun.attach` returns the guest control that pauses, suspends
  and resumes the guest, and starts whatever follows the VMM (a migration
  handoff, a block-graph follower); :class:`Handover` is what a detached
  watcher carries on for a VMM that daemonizes.

The base class is the generic adapter: files named with ``--image``,
``--shared`` or ``--shared-write``, a guest paused by a signal.  Another
VMM's adapter subclasses it and overrides what differs; it is found through
:mod:`imglock.run.adapters` (built in, or an entry point in the
``imglock.hypervisors`` group).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from imglock.api import ClaimSpec
from imglock.errors import UsageError
from imglock.qemu.prefixes import PrefixError, command_start
from imglock.run.guest import GuestControl, SignalGuest
from imglock.run.options import RunOptions
from imglock.run.reporter import Reporter
from imglock.run.session import ClaimSession


@dataclass(frozen=True)
class Command:
    """The command of ``imglock run``, seen through the exec-wrappers in front of it."""

    argv: tuple[str, ...]
    #: Where the wrapped program's own arguments start (0 without a wrapper).
    start: int = 0
    #: Why the wrappers in front could not be seen through, if they could not.
    problem: str | None = None

    @classmethod
    def of(cls, argv: Sequence[str]) -> "Command":
        try:
            start = command_start(argv)
        except PrefixError as exc:
            return cls(tuple(argv), 0, str(exc))
        return cls(tuple(argv), start)

    @property
    def program(self) -> tuple[str, ...]:
        """The wrapped program and its arguments (QEMU's command line, for QEMU)."""
        return self.argv[self.start :]

    @property
    def prefix(self) -> tuple[str, ...]:
        """The exec-wrappers in front of the program, with their arguments."""
        return self.argv[: self.start]


class Remote(NamedTuple):
    """A file the command opens that imglock does not claim: not a local file."""

    filename: str
    #: The protocol driver (``"nbd"``, ``"rbd"``...), or ``"fdset"`` for ``/dev/fdset/N``.
    protocol: str | None
    #: The option that opens it (``"-blockdev"``...).
    source: str
    #: "top", "backing" or "data-file".
    role: str


@dataclass(frozen=True)
class FilePlan:
    """The files to claim for a command, before anything is opened."""

    specs: tuple[ClaimSpec, ...]
    #: The option each claimed path came from (``--image``, ``-drive``...).
    sources: Mapping[str, str] = field(default_factory=dict)
    #: Files the command opens that are not claimed: their servers do the locking.
    remote: tuple[Remote, ...] = ()


def named_files(options: RunOptions) -> FilePlan:
    """The files named with ``--image``, ``--shared`` and ``--shared-write``."""
    named = options.named_modes()
    specs = tuple(ClaimSpec(path, mode) for _option, path, mode in named)
    sources: dict[str, str] = {}
    for option, path, _mode in named:
        sources.setdefault(path, option)
    return FilePlan(specs, sources)


class Handover(Protocol):
    """What a detached watcher (imglock.run.watcher) carries on for a VMM, beyond the locks."""

    def before_fork(self) -> None:
        """In the wrapper, before the watcher is forked: stop any thread."""
        ...

    def in_watcher(self, session: ClaimSession, pid: int) -> None:
        """In the watcher, once it runs: take up the work again, for the VMM *pid*."""
        ...

    def finish(self) -> None:
        """In the watcher, once the claim has ended: clean up."""
        ...


@dataclass(frozen=True)
class Attachment:
    """A running VMM as the wrapper holds on to it."""

    #: How to pause, suspend and resume its guest.
    guest: GuestControl
    #: What a watcher must carry on if the VMM outlives the command (None: nothing).
    handover: Handover | None = None


class VmmRun(Protocol):
    """One run of a VMM: the command to start, and how to attach to it once it runs."""

    @property
    def argv(self) -> Sequence[str]:
        """The command line to exec (the wrappers in front kept)."""
        ...

    @property
    def claim_at_start(self) -> bool:
        """Claim before the command starts (not on a migration destination: the handoff claims)."""
        ...

    @property
    def descriptors(self) -> set[int]:
        """Descriptors that whoever attaches to the command needs (a relayed monitor's)."""
        ...

    def attach(self, session: ClaimSession, pid: int) -> Attachment:
        """The command runs as *pid*: start following it; return its guest control."""
        ...

    def close(self, watched: bool) -> None:
        """The wrapper is done: stop following; *watched*: a watcher carries on for the VMM."""
        ...


@dataclass
class SignalRun:
    """A command run as it is, its guest paused by a signal (see ``--lock-lost-signal``)."""

    argv: Sequence[str]
    signo: int
    claim_at_start: bool = True

    @property
    def descriptors(self) -> set[int]:
        return set()

    def attach(self, session: ClaimSession, pid: int) -> Attachment:
        return Attachment(SignalGuest(pid, self.signo))

    def close(self, watched: bool) -> None:
        """Nothing follows the command."""


@dataclass(frozen=True)
class Adapter:
    """A hypervisor adapter; as it is, the generic one (see the module's docstring)."""

    #: The adapter's name (``imglock run --dry-run --json`` says it).
    name: str = "generic"

    def recognizes(self, command: Command) -> bool:
        """Whether *command* runs this adapter's VMM."""
        return False

    def plan_files(self, options: RunOptions, command: Command) -> FilePlan:
        """The files to claim: those named on the wrapper.

        An adapter that reads its VMM's command line overrides this; it
        raises :class:`~imglock.errors.UsageError` for a command line it
        cannot read.
        """
        files = named_files(options)
        if not files.specs:
            raise UsageError(
                command.argv[0],
                "names no file to claim; name the images to claim with --image, --shared "
                "or --shared-write",
            )
        return files

    def prepare(self, options: RunOptions, command: Command, reporter: Reporter) -> VmmRun:
        """The run of *command*: as it is, its guest paused by ``--lock-lost-signal``."""
        return SignalRun(command.argv, options.lock_lost_signal)
