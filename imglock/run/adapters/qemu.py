"""The QEMU adapter: QEMU's command line read for its images, its guest watched through QMP.

* the files to claim are read from QEMU's command line (:mod:`imglock.qemu.cmdline`),
  unless they are named on the wrapper;
* QEMU gets a QMP monitor of its own, on a socket in a private directory
  (:mod:`imglock.run.private_dir`), through which the live-migration handoff
  (:mod:`imglock.run.handoff`) hands the claim over, the guest is paused,
  and the claim follows QEMU's block graph (:mod:`imglock.run.graph`);
* a daemonizing QEMU's watcher connects to that monitor again;
* a manager's monitor passed as a listening socket (libvirt's) is relayed
  to QEMU (:mod:`imglock.qemu.proxy`), and its ``cont`` held back until
  the claim is held: the guest never runs without it, whoever resumes it.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from imglock.api import ClaimSpec
from imglock.errors import ImglockError
from imglock.lock.discovery import holders
from imglock.lock.identity import hostname
from imglock.lock.protocol import Mode
from imglock.qemu.cmdline import Role, find_images, manager_monitors, with_monitor_fd
from imglock.qemu.drivers import LOCAL_FILE_MEMBERS
from imglock.qemu.names import is_qemu
from imglock.qemu.proxy import MonitorProxy
from imglock.run import private_dir
from imglock.run.adapters.base import (
    Adapter,
    Attachment,
    Command,
    FilePlan,
    Remote,
    named_files,
)
from imglock.run.graph import CHROOTED, FDSET_PREFIX, GraphFollower, qemu_root
from imglock.run.handoff import Handoff
from imglock.run.options import RunOptions
from imglock.run.reporter import Reporter
from imglock.run.session import ClaimSession

#: Commands that let a guest run: held back until the claim is held.
RESUMING_COMMANDS: Final = frozenset({"cont"})
#: Commands that make QEMU open a file: a file another holder has is refused first.
OPENING_COMMANDS: Final = frozenset({"blockdev-add"})
#: Modes of another holder that no new use of the file may meet.
EXCLUDING_MODES: Final = frozenset({Mode.EXCLUSIVE.value, Mode.SHARED_WRITE.value})
#: Seconds a manager's ``cont`` waits beyond the handoff timeout for the claim.
RESUME_MARGIN: Final = 5.0


@dataclass
class Relay:
    """A manager's monitor, relayed: its listening socket, and QEMU's in its place."""

    #: The manager's listening socket (its descriptor, kept from QEMU).
    manager_fd: int
    #: Where QEMU listens now: a socket in the private directory.
    qemu_path: str
    #: QEMU's listening socket, inherited by QEMU.
    qemu_fd: int


@dataclass
class QemuRun:
    """One run of QEMU: its command line with our monitor, and the handoff watching it."""

    argv: tuple[str, ...]
    handoff: Handoff
    #: The private directory of the monitor's socket.
    private: str
    relays: list[Relay] = field(default_factory=list)
    proxies: list[MonitorProxy] = field(default_factory=list)
    #: ``--lockspace``: where the locks of files QEMU opens are looked at.
    lockspace: str | None = None

    @property
    def claim_at_start(self) -> bool:
        """A migration destination claims at the handoff, not before QEMU starts."""
        return not self.handoff.incoming

    @property
    def descriptors(self) -> set[int]:
        """The managers' monitor sockets: whoever attaches to QEMU relays them."""
        return {relay.manager_fd for relay in self.relays}

    def attach(self, session: ClaimSession, pid: int) -> Attachment:
        self.handoff.attach(session, pid)
        timeout = self.handoff.timeout + RESUME_MARGIN

        def gate(command: Mapping[str, Any]) -> str | None:
            if command.get("execute") in OPENING_COMMANDS:
                return held_elsewhere(command.get("arguments"), session, pid, self.lockspace)
            if command.get("execute") not in RESUMING_COMMANDS:
                return None
            why = session.admit_resume(timeout)
            return None if why is None else f"imglock: the guest may not run: {why}"

        for relay in self.relays:
            listener = socket.socket(fileno=relay.manager_fd)
            proxy = MonitorProxy(listener, relay.qemu_path, gate, session.reporter.error)
            self.proxies.append(proxy.start())
        return Attachment(self.handoff, self.handoff)

    def close(self, watched: bool) -> None:
        self.handoff.close()
        for proxy in self.proxies:
            proxy.close()
        # A daemonized QEMU keeps its socket here: its watcher removes the
        # directory once the daemon is gone.
        if not watched:
            shutil.rmtree(self.private, ignore_errors=True)


def files_opened(arguments: object) -> list[str]:
    """The local files a ``blockdev-add`` opens: the filenames of its file nodes, nested too."""
    found: list[str] = []
    if isinstance(arguments, Mapping):
        filename = arguments.get("filename")
        if arguments.get("driver") in LOCAL_FILE_MEMBERS and isinstance(filename, str):
            found.append(filename)
        for value in arguments.values():
            found += files_opened(value)
    elif isinstance(arguments, list):
        for value in arguments:
            found += files_opened(value)
    return found


def held_elsewhere(
    arguments: object, session: ClaimSession, pid: int, lockspace: str | None
) -> str | None:
    """Why QEMU must not open the files of *arguments* (a ``blockdev-add``), or None.

    A file someone else holds exclusive or shared-write (another VM, on
    this host or another) is refused before QEMU opens it, naming the
    holder; the graph follower claims the files it may open once it has.
    """
    own = session.file_keys()
    for filename in files_opened(arguments):
        if filename.startswith(FDSET_PREFIX):
            continue
        try:
            st = os.stat(filename)
        except OSError:
            continue  # QEMU says what is wrong with it
        if (st.st_dev, st.st_ino) in own:
            continue
        try:
            found = holders(filename, lockspace=lockspace)
        except ImglockError:
            continue  # not a file imglock can look at: QEMU's own locks decide
        for holder in found:
            if (holder.layer == "imglock" and holder.mode in EXCLUDING_MODES
                    and not (holder.pid == pid and holder.host == hostname())):  # fmt: skip
                return f"imglock: {filename}: held {holder.describe()}"
    return None


def _listening_socket(fd: int) -> bool:
    """Whether *fd* is open here, and a listening stream socket."""
    try:
        probe = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        return bool(probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False
    finally:
        probe.close()


def relay_monitors(argv: list[str], private: str) -> tuple[list[str], list[Relay]]:
    """*argv* with each manager's monitor listening in *private* instead; the relays.

    The manager's socket is kept from QEMU (close-on-exec): only the relay
    answers on it.
    """
    relays: list[Relay] = []
    for monitor in manager_monitors(argv):
        if not _listening_socket(monitor.fd):
            continue  # not a manager's socket here: QEMU says what is wrong with it
        path = os.path.join(private, f"monitor-{len(relays)}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        listener.set_inheritable(True)
        os.set_inheritable(monitor.fd, False)
        qemu_fd = listener.detach()
        argv = with_monitor_fd(argv, monitor, qemu_fd)
        relays.append(Relay(monitor.fd, path, qemu_fd))
    return argv, relays


@dataclass(frozen=True)
class QemuAdapter(Adapter):
    """QEMU system emulators (``qemu-system-*``, ``qemu-kvm``...), behind exec-wrappers too."""

    name: str = "qemu"

    def recognizes(self, command: Command) -> bool:
        return is_qemu(command.program)

    def plan_files(self, options: RunOptions, command: Command) -> FilePlan:
        """Files named on the wrapper, else the local files of QEMU's command line.

        A command line whose files are all remote (``nbd:``, ``rbd``,
        ``iscsi``, ``/dev/fdset/N``...) plans no claim at all.
        """
        named = named_files(options)
        if named.specs:
            return named
        specs: list[ClaimSpec] = []
        sources: dict[str, str] = {}
        remote: list[Remote] = []
        for drive in find_images(command.program):
            if not drive.local:
                # nbd:, iscsi:, rbd, /dev/fdset...: their servers do the locking.
                remote.append(Remote(drive.filename, drive.protocol, drive.source, drive.role))
                continue
            # A data file is read as raw data, never probed (it may hold anything).
            fmt = "raw" if drive.role == Role.DATA_FILE else drive.format
            specs.append(
                ClaimSpec(
                    drive.filename, Mode(drive.mode), fmt,
                    backing=drive.implicit_backing, data_file=drive.implicit_data_file,
                    role=drive.role,
                )
            )  # fmt: skip
            sources.setdefault(drive.filename, drive.source)
        return FilePlan(tuple(specs), sources, tuple(remote))

    def prepare(self, options: RunOptions, command: Command, reporter: Reporter) -> QemuRun:
        """QEMU's command line with a private QMP monitor that hands the claim over on migration."""
        private_dir.sweep()  # those of wrappers that were killed
        private = private_dir.make()  # mode 0700: only we can reach the socket
        try:
            follower = self._follower(options, command, reporter)
            program, relays = relay_monitors(list(command.program), private)
            handoff = Handoff.for_command(program, private, options.handoff_timeout, follower)
        except BaseException:
            shutil.rmtree(private, ignore_errors=True)
            raise
        # The wrappers in front exec QEMU with the options added at its end.
        return QemuRun(
            (*command.prefix, *handoff.argv), handoff, private, relays, lockspace=options.lockspace
        )

    def _follower(
        self, options: RunOptions, command: Command, reporter: Reporter
    ) -> GraphFollower | None:
        """What follows QEMU's block graph (``--graph-interval``), if anything does."""
        if options.graph_interval <= 0:
            return None
        root = qemu_root(command.program)
        if root is not None:
            reporter.warn(CHROOTED.format(root=root))
            return None
        return GraphFollower(options.graph_interval, pin_start=bool(options.named))


ADAPTER: Final = QemuAdapter()
