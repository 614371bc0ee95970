"""What ``imglock run`` claims for a command, and how it watches a QEMU.

This is the policy between the CLI and the runner: which images a command
uses (named with --image/--shared, or read from a QEMU command line), which
lock layers to hold (``--qemu-locks``), and, for QEMU, the private QMP
monitor through which a live migration hands the claim over.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from imglock.api import Claim, ClaimSpec
from imglock.errors import EX_TEMPFAIL, UsageError
from imglock.lock.protocol import Layer, Mode, flock_layer
from imglock.lockcheck import DEFAULT_DEADLINE
from imglock.qemu.names import is_qemu, names_qemu, qemu_start
from imglock.run.runner import RunConfig, Runner, Say, run_command

if TYPE_CHECKING:
    from imglock.formats.base import OpenImage


class Launch:
    """The options of ``imglock run``."""

    def __init__(
        self,
        argv: list[str],
        images: Sequence[str] = (),
        shared: Sequence[str] = (),
        shared_write: Sequence[str] = (),
        wait: float = 0.0,
        conflict_exit: int = EX_TEMPFAIL,
        qemu_locks: str = "auto",
        handoff_timeout: float = 30.0,
        flock: str = "auto",
        lockspace: str | None = None,
        check_interval: float = 5.0,
        check_deadline: float = DEFAULT_DEADLINE,
        lock_lost_signal: int = signal.SIGSTOP,
        graph_interval: float = 0.5,
        say: Say | None = None,
        note: Say | None = None,
        warn: Say | None = None,
    ) -> None:
        self.argv = argv
        self.images = list(images)
        self.shared = list(shared)
        self.shared_write = list(shared_write)
        self.wait = wait
        self.conflict_exit = conflict_exit
        self.qemu_locks = qemu_locks
        self.flock = flock
        self.handoff_timeout = handoff_timeout
        self.lockspace = lockspace
        self.check_interval = check_interval
        #: Seconds a lock check may take before the guest is paused (inf: no limit).
        self.check_deadline = check_deadline
        self.lock_lost_signal = lock_lost_signal
        #: Seconds between readings of QEMU's block graph (0: do not follow it).
        self.graph_interval = graph_interval
        #: How the runner reports errors and notes (default: errors on stderr, no notes).
        self.say = say
        self.note = note
        #: Warnings (shown unless -q); default: on stderr.
        self.warn = warn


#: QEMU's tools that take QEMU's lock bytes themselves (besides qemu-system-*).
QEMU_LOCKING_TOOLS = frozenset({"qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon"})


def _warn(message: str) -> None:
    print(f"imglock: warning: {message}", file=sys.stderr, flush=True)


class Command(NamedTuple):
    """The command of ``imglock run``, seen through the exec-wrappers in front of it."""

    argv: list[str]
    #: Where the wrapped program's own arguments start (0 without a wrapper).
    start: int
    #: Whether that program is a QEMU system emulator.
    qemu: bool
    #: Why the wrappers in front could not be seen through, if they could not.
    problem: str | None = None

    @classmethod
    def of(cls, argv: list[str]) -> Command:
        from imglock.qemu.prefixes import PrefixError

        try:
            start = qemu_start(argv)
        except PrefixError as exc:
            return cls(argv, 0, False, str(exc))
        return cls(argv, start or 0, start is not None)

    @property
    def program(self) -> list[str]:
        """The wrapped program and its arguments (QEMU's command line, for QEMU)."""
        return self.argv[self.start :]

    @property
    def prefix(self) -> list[str]:
        """The exec-wrappers in front of the program, with their arguments."""
        return self.argv[: self.start]


#: What to do about a QEMU behind a prefix that imglock cannot see through.
PREFIX_ADVICE: Final = (
    "run QEMU directly, or name its images with --image, --shared or --shared-write "
    "and add --qemu-locks off, so that QEMU keeps its own lock bytes"
)


def takes_qemu_locks(argv: list[str]) -> bool:
    """Whether the command is QEMU or one of its tools, which lock QEMU's bytes themselves.

    Seen through the exec-wrappers in front of it (``nice qemu-img ...``).
    """
    from imglock.qemu.prefixes import PrefixError, command_start

    try:
        program = argv[command_start(argv) :]
    except PrefixError:
        program = argv
    return is_qemu(program) or os.path.basename(program[0]) in QEMU_LOCKING_TOOLS


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


class Remote(NamedTuple):
    """A file a QEMU command line opens that imglock does not claim: not a local file."""

    filename: str
    #: The protocol driver (``"nbd"``, ``"rbd"``...), or ``"fdset"`` for ``/dev/fdset/N``.
    protocol: str | None
    #: The option that opens it (``"-blockdev"``...).
    source: str
    #: "top", "backing" or "data-file" (see imglock.qemu.cmdline.DriveImage.role).
    role: str


#: The lock layers by the names ``--dry-run --json`` gives them.
LAYER_NAMES: Final = (
    (Layer.IMGLOCK, "imglock"),
    (Layer.QEMU, "qemu"),
    (Layer.QEMU_TEST, "qemu-test"),
)


class ImagePlan(NamedTuple):
    """What ``imglock run`` claims for a command, before anything is opened."""

    specs: list[ClaimSpec]
    #: The option each claimed path came from (``--image``, ``-drive``...).
    sources: dict[str, str]
    #: Files QEMU opens that are not claimed: their servers do the locking.
    remote: list[Remote]


def plan_images(plan: Launch, command: Command) -> ImagePlan:
    """The images to claim: named ones, else those of a QEMU command line.

    Images named with ``--image``/``--shared``/``--shared-write`` replace
    reading the command line.  A QEMU command line whose files are all remote (``nbd:``,
    ``rbd``, ``iscsi``, ``/dev/fdset/N``...) plans no claim at all.
    """
    named = [
        ("--image", Mode.EXCLUSIVE, plan.images),
        ("--shared", Mode.SHARED, plan.shared),
        ("--shared-write", Mode.SHARED_WRITE, plan.shared_write),
    ]
    specs = [ClaimSpec(p, mode) for _, mode, paths in named for p in paths]
    sources = {p: option for option, _, paths in named for p in paths}
    if specs:
        return ImagePlan(specs, sources, [])
    if not command.qemu and names_qemu(command.argv[1:]):
        why = command.problem or f"{command.argv[0]}: a prefix imglock does not see through"
        raise UsageError(None, f"{why}; {PREFIX_ADVICE}")
    if not command.qemu:
        raise UsageError(
            command.argv[0],
            "not a QEMU command line; name the images to claim with --image, --shared "
            "or --shared-write",
        )
    # The command-line parser is needed only to read a QEMU command's images.
    from imglock.qemu.cmdline import ROLE_DATA_FILE, find_images

    remote: list[Remote] = []
    for drive in find_images(command.program):
        if not drive.local:
            # nbd:, iscsi:, rbd, /dev/fdset...: their servers do the locking.
            remote.append(Remote(drive.filename, drive.protocol, drive.source, drive.role))
            continue
        # A data file is read as raw data, never probed (it may hold anything).
        fmt = "raw" if drive.role == ROLE_DATA_FILE else drive.format
        specs.append(
            ClaimSpec(
                drive.filename, Mode(drive.mode), fmt,
                backing=drive.implicit_backing, data_file=drive.implicit_data_file,
                role=drive.role,
            )
        )  # fmt: skip
        sources.setdefault(drive.filename, drive.source)
    return ImagePlan(specs, sources, remote)


def dry_run(plan: Launch) -> dict[str, Any]:
    """What :func:`launch` would claim for *plan*, as ``imglock run --dry-run --json`` shows it.

    Every image is opened and its chain followed, as for a real run, but
    no lock is taken, no record written and no lock file created.  A file
    that cannot be opened or followed (missing, unreadable, malformed) is
    listed with its ``problem``, said through ``plan.say`` too, and the
    listing goes on; ``status`` is the exit status of the first problem
    (what a real run would exit with), 0 when there is none.
    """
    command = Command.of(plan.argv)
    images = plan_images(plan, command)
    layers = layers_for(plan.qemu_locks, takes_qemu_locks(plan.argv))
    listed = [(spec, _chain_problems(plan, spec, images.sources)) for spec in images.specs]
    # (index of the named image it comes from, entry): listed in command-line order.
    ordered: list[tuple[int, dict[str, Any]]] = []
    # Chains without a problem are opened as the claim opens them (modes merged alike).
    claim = Claim([spec for spec, problems in listed if not problems]).open()
    try:
        tops = {spec.path: n for n, (spec, problems) in reversed(list(enumerate(listed)))
                if not problems}  # fmt: skip
        at = 0
        for member in claim.members:
            # A chain's files follow its named image in the claim's members.
            at = tops.get(member.image.filename, at) if member.named else at
            source = images.sources.get(member.image.filename) if member.named else None
            ordered.append((at, _entry(plan, member.image, member.role, member.depth,
                                       member.mode, source)))  # fmt: skip
    finally:
        claim.close()  # no lockspace attached: attaching one creates lock files
    status = 0
    for n, (_spec, problems) in enumerate(listed):
        ordered += [(n, entry) for entry in problems]
        for entry in problems:
            code = entry.pop("status", 0)
            if entry["problem"] is not None:
                (plan.say or _error)(entry["problem"])
                status = status or code
    entries = [entry for _n, entry in sorted(ordered, key=lambda pair: pair[0])]
    for remote in images.remote:
        entries.append(
            {**_NO_FILE, "filename": remote.filename, "role": remote.role, "claimed": False,
             "source": remote.source, "protocol": remote.protocol}
        )  # fmt: skip
    return {
        "command": list(plan.argv),
        "qemu": command.qemu,
        "layers": [name for layer, name in LAYER_NAMES if layer in layers],
        "lockspace": plan.lockspace,
        "images": entries,
        "status": status,
    }


#: The keys of a dry run's entry for a file that was not opened.
_NO_FILE: Final[dict[str, Any]] = {
    "filename": None, "format": None, "role": None, "depth": None, "mode": None,
    "claimed": True, "source": None, "lock-file": None, "protocol": None, "problem": None,
}  # fmt: skip


def _error(message: str) -> None:
    print(f"imglock: {message}", file=sys.stderr, flush=True)


def _entry(
    plan: Launch, image: OpenImage, role: str, depth: int, mode: Mode, source: str | None
) -> dict[str, Any]:
    """A dry run's entry for a file opened as a claim opens it."""
    lock_file = None
    if plan.lockspace is not None:
        from imglock.lock.lockspace import lock_file_name

        lock_file = os.path.join(plan.lockspace, lock_file_name(image.filename, image.st))
    return {**_NO_FILE, "filename": image.filename, "format": image.format, "role": role,
            "depth": depth, "mode": mode.value, "source": source or "image header",
            "lock-file": lock_file}  # fmt: skip


def _chain_problems(plan: Launch, spec: ClaimSpec, sources: dict[str, str]) -> list[dict[str, Any]]:
    """Entries for every file of *spec*'s chain if one of them has a problem, else none.

    An entry with a problem also carries its exit ``status``.
    """
    from imglock.chain import ChainProblem, open_chain
    from imglock.errors import ImglockError

    problems: list[ChainProblem] = []
    source = sources.get(spec.path)
    try:
        chain = open_chain(spec.path, spec.format, backing=spec.backing,
                           data_file=spec.data_file, problems=problems)  # fmt: skip
    except ImglockError as exc:
        return [{**_NO_FILE, "filename": spec.path, "format": spec.format, "role": spec.role,
                 "depth": 0, "mode": spec.mode.value, "source": source, "problem": str(exc),
                 "status": exc.exit_status}]  # fmt: skip
    with chain:
        if not problems:
            return []
        # Only the named file and its own data file take the mode asked for.
        entries = [
            _entry(plan, link.image, spec.role if link.role == "top" else link.role, link.depth,
                   spec.mode if link.depth == 0 and link.role != "backing" else Mode.SHARED,
                   source if link.role == "top" else None)
            for link in chain
        ]  # fmt: skip
    for problem in problems:
        mode = spec.mode if problem.depth == 0 and problem.role != "backing" else Mode.SHARED
        entries.append({**_NO_FILE, "filename": problem.filename, "role": problem.role,
                        "depth": problem.depth, "mode": mode.value, "source": "image header",
                        "problem": str(problem.error),
                        "status": problem.error.exit_status})  # fmt: skip
    return entries


#: What ``imglock run`` says when a QEMU command line opens no local file.
NOTHING_LOCAL: Final = "the QEMU command line opens no local image: nothing local is claimed"


def launch(plan: Launch) -> int:
    """Run *plan*; return the wrapper's exit status."""
    command = Command.of(plan.argv)
    images = plan_images(plan, command)
    if not images.specs:
        (plan.warn or _warn)(NOTHING_LOCAL)
    claim = Claim(
        images.specs,
        wait=plan.wait,
        layers=layers_for(plan.qemu_locks, takes_qemu_locks(plan.argv)) | flock_layer(plan.flock),
        lockspace=plan.lockspace,
    )
    config = RunConfig(
        argv=plan.argv,
        claim=claim,
        conflict_exit=plan.conflict_exit,
        check_interval=plan.check_interval,
        check_deadline=None if math.isinf(plan.check_deadline) else plan.check_deadline,
        lock_lost_signal=plan.lock_lost_signal,
    )
    config.say = plan.say or config.say
    config.note = plan.note or config.note
    if not command.qemu:
        return run_command(config)
    return _launch_qemu(plan, config, command)


def _launch_qemu(plan: Launch, config: RunConfig, command: Command) -> int:
    """Run QEMU with a private QMP monitor that hands the claim over on migration."""
    # Only a QEMU command gets a monitor, and so a private directory for its socket.
    import shutil

    from imglock.run import private_dir
    from imglock.run.handoff import Handoff

    private_dir.sweep()  # those of wrappers that were killed
    private = private_dir.make()  # mode 0700: only we can reach the socket
    runner: Runner | None = None
    try:
        handoff = Handoff.for_command(command.program, private, plan.handoff_timeout)
        # The wrappers in front exec QEMU with the options added at its end.
        config.argv = command.prefix + handoff.argv
        config.claim_at_start = not handoff.incoming
        runner = Runner(config)
        handoff.attach(runner)
        if plan.graph_interval > 0:
            from imglock.run.graph import CHROOTED, GraphFollower, qemu_root

            named = bool(plan.images or plan.shared or plan.shared_write)
            root = qemu_root(command.program)
            if root is None:
                handoff.follower = GraphFollower(runner, plan.graph_interval, pin_start=named)
            else:
                (plan.warn or _warn)(CHROOTED.format(root=root))
        try:
            return run_command(config, runner)
        finally:
            handoff.close()
    finally:
        # A daemonized QEMU keeps its socket here: its watcher removes the
        # directory once the daemon is gone.
        if runner is None or not runner.watcher:
            shutil.rmtree(private, ignore_errors=True)
