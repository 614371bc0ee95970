"""The library API: claim images (with their backing chains), release, inspect.

    with imglock.claim("vm.qcow2"):               # exclusive, backing files shared
        ...
    c = imglock.claim("base.qcow2", mode="shared", wait=10)
    c.release()

A claim of several images is all or nothing, like QEMU's old
``bdrv_claim_all``: on any failure everything already taken is released.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Final, NamedTuple, NoReturn, Self, SupportsIndex

from imglock import faults
from imglock.errors import ImageError, ImglockError, LockConflict, LockError, LockLost, UsageError
from imglock.lock import records
from imglock.lock.fcntl_locks import reason
from imglock.lock.identity import Owner
from imglock.lock.lockspace import attach
from imglock.lock.protocol import (
    IMGLOCK_START,
    Held,
    Layer,
    Mode,
    Place,
    ProtocolConflict,
    conflicts,
    flock_layer_for_file,
    holder_range,
    strongest,
)
from imglock.lockcheck import DEFAULT_DEADLINE, LockWatch
from imglock.report import ImageReport, inspect_image

if TYPE_CHECKING:
    # Discovery (who holds an image) is imported when a claim meets a
    # holder, or by `status`: a claim that succeeds never needs it.
    from imglock.chain import ChainLink
    from imglock.formats.base import OpenImage
    from imglock.lock.discovery import Holder, LocalLocks
    from imglock.lock.fcntl_locks import RangeLock

#: Backoff between attempts while waiting: first delay and cap, in seconds.
#: Racing claimers can both lose, so the delay is jittered to break the tie.
BACKOFF_FIRST: Final = 0.001
BACKOFF_CAP: Final = 0.05
#: How many holders a conflict message names (the others are counted).
NAMED_HOLDERS: Final = 4
#: Why copy.copy, copy.deepcopy and pickle refuse a Claim.
_NOT_COPYABLE: Final = (
    "a Claim cannot be copied or pickled: its locks belong to descriptors that "
    "only the Claim that opened them may close"
)


def as_seconds(name: str, value: object) -> float:
    """*value* as a number of seconds for argument *name* (``inf``: forever).

    Raises UsageError (a ValueError) for anything else: a string, a bool,
    NaN, a negative number.
    """
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(None, f"{name} must be a number of seconds, not {value!r}")
    number = float(value)
    if math.isnan(number) or number < 0:
        raise UsageError(None, f"{name} must be a number of seconds >= 0, not {value!r}")
    return number


def as_path(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """*path* as a str: str, bytes and path-like objects are all accepted."""
    try:
        return os.fsdecode(path)
    except TypeError:
        raise UsageError(None, f"not a path: {path!r}") from None


def as_mode(mode: Mode | str) -> Mode:
    """*mode* as a :class:`Mode`, from its name (``"exclusive"``...) or itself."""
    try:
        return Mode(mode)
    except ValueError:
        names = ", ".join(m.value for m in Mode)
        raise UsageError(None, f"unknown claim mode {mode!r} ({names})") from None


# A NamedTuple, not a dataclass: as immutable, and far cheaper to define at start-up.
class ClaimSpec(NamedTuple):
    """One image to claim, and how."""

    path: str
    mode: Mode = Mode.EXCLUSIVE
    #: None probes the format; a name turns probing off.
    format: str | None = None
    #: Follow the backing file the image's header names (False when a QEMU
    #: command line names the backing node itself, or none).
    backing: bool = True
    #: Likewise for a qcow2 external data file.
    data_file: bool = True
    #: What the file is to the VM: "top", or "backing"/"data-file" for a node
    #: a QEMU command line names itself (see chain.ChainLink.role).
    role: str = "top"


class _Member:
    """One file of a claim: an open image and the mode it is claimed in."""

    __slots__ = (
        "depth",
        "flock",
        "image",
        "mode",
        "named",
        "observer",
        "record_dir",
        "record_name",
        "record_problem",
        "recorded_as",
        "role",
    )

    def __init__(
        self, image: OpenImage, mode: Mode, named: bool = False, role: str = "top", depth: int = 0
    ) -> None:
        self.image = image
        self.mode = mode
        #: Named by the caller, not only by an image header (see _write_records).
        self.named = named
        #: What the file is to the image the caller named: "top", "backing"
        #: or "data-file", and how many backing steps below it (chain.ChainLink).
        self.role = role
        self.depth = depth
        self.record_dir = ""
        self.record_name = ""
        #: The owner this file's holder record names, while there is one.
        self.recorded_as: Owner | None = None
        #: Why no holder record was written for this file, if none was.
        self.record_problem: str | None = None
        #: ``--flock auto`` as decided for this file (protocol.flock_layer_for_file),
        #: once a claim has asked.
        self.flock: Layer | None = None
        #: A second open file description of the lock target, holding nothing:
        #: where the lock check looks from (protocol.verify); -1 until it has.
        self.observer = -1

    def observe(self) -> int:
        """The observer descriptor, opened on first use (see protocol.verify).

        Opened through /proc/self/fd, so it is the very file the claim
        holds even if its path now leads elsewhere; close-on-exec, so no
        command inherits it.
        """
        if self.observer < 0:
            fd, filename = self.image.lock_target
            try:
                self.observer = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise LockLost(
                    filename, f"lock lost: cannot look at the file: {reason(exc.errno)}", exc.errno
                ) from None
        return self.observer

    def replaced(self) -> str | None:
        """Why the path no longer leads to the file claimed, or None while it does.

        Compares inode numbers only: a remount of the same filesystem at
        the same place (``umount -l``, then mount) changes st_dev but is
        the same file.  A lock file (``--lockspace``) removed or replaced
        counts too: another claimer would make a new one and lock that.
        """
        checks = [
            (self.image.filename, self.image.st.st_ino, "the path now leads to another file",
             "the path no longer exists"),
        ]  # fmt: skip
        lock_fd, lock_name = self.image.lock_target
        if lock_fd != self.image.fd:
            with contextlib.suppress(OSError):  # a mount gone away: the lock test decides
                checks.append(
                    (lock_name, os.fstat(lock_fd).st_ino, "its lock file was replaced",
                     "its lock file was removed")
                )  # fmt: skip
        for path, inode, replaced, removed in checks:
            try:
                now = os.stat(path).st_ino
            except FileNotFoundError:
                return removed
            except OSError:
                return None  # cannot look (a hung mount): the lock test decides
            if now != inode:
                return replaced
        return None

    def close(self) -> None:
        """Close the image's descriptors and the observer; never raises.

        A descriptor of a mount that has gone away (a crashed GlusterFS
        client: ENOTCONN; a reconnected one with strict locks: EBADFD; a
        dead NFS server: EIO) may fail to close, but it is closed all the
        same, and its locks are gone with the server's view of it.
        """
        observer, self.observer = self.observer, -1
        with contextlib.suppress(OSError):
            if observer >= 0:
                os.close(observer)
        for _attempt in ("lock file", "image"):  # a failed close still closes the next one
            with contextlib.suppress(OSError):
                self.image.close()
                break


class Claim:
    """A claim on one or more images and everything they depend on.

    Created unclaimed; :meth:`acquire` takes it (all or nothing), and
    :meth:`release` gives it back and closes every descriptor.  As a context
    manager it acquires on entry if needed and releases on exit.

    The locks belong to the open descriptors (OFD locks), not to this
    object: a process forked while the claim is held shares them, and the
    image stays claimed until the last process holding the descriptors
    closes them or exits.  The claim is owned by the process that opened it
    (:attr:`process`).  :meth:`release` (or leaving a ``with`` block) in any
    other process, such as a forked child, only closes that process's own
    copies of the descriptors: the owner's claim is untouched.  In the owner,
    release closes the descriptors rather than unlocking them, so a child
    that still holds them keeps the image claimed (``imglock status`` names
    it) until it exits.
    """

    __slots__ = (
        "backoff_cap",
        "command",
        "held",
        "layers",
        "lockspace",
        "members",
        "owner_pid",
        "process",
        "record",
        "specs",
        "wait",
    )

    def __init__(
        self,
        specs: Sequence[ClaimSpec],
        wait: float = 0.0,
        layers: Layer = Layer.IMGLOCK | Layer.QEMU,
        lockspace: str | None = None,
        record: bool = True,
        owner_pid: int | None = None,
        command: list[str] | None = None,
        backoff_cap: float = BACKOFF_CAP,
    ) -> None:
        self.specs = specs
        self.wait = as_seconds("wait", wait)
        self.layers = layers
        self.lockspace = lockspace
        self.record = record
        #: The pid the lock offset names; default: this process.
        self.owner_pid = owner_pid
        #: The command line written to holder records; default: this process's.
        self.command = command
        #: The longest pause between attempts while waiting (a migration handoff
        #: polls faster: every millisecond of it is guest downtime).
        self.backoff_cap = backoff_cap
        self.members: list[_Member] = []
        #: The process that opened the descriptors: the only one whose
        #: release may end the claim (see the class docstring).
        self.process = os.getpid()
        #: True while the locks are held.
        self.held = False

    def __repr__(self) -> str:
        return (
            f"Claim(specs={self.specs!r}, wait={self.wait!r}, layers={self.layers!r}, "
            f"lockspace={self.lockspace!r}, held={self.held!r})"
        )

    @property
    def fds(self) -> list[int]:
        """Every descriptor that carries a lock of this claim (for a child to inherit)."""
        return [m.image.lock_target[0] for m in self.members]

    @property
    def descriptors(self) -> set[int]:
        """Every descriptor the claim has open: images, lock files, and the lock check's."""
        return {
            fd
            for m in self.members
            for fd in (m.image.fd, m.image.lock_target[0], m.observer)
            if fd >= 0
        }

    @property
    def images(self) -> list[tuple[str, Mode]]:
        """(filename, mode) of every file claimed, top images first."""
        return [(m.image.filename, m.mode) for m in self.members]

    def open(self) -> Self:
        """Open every image (and its chain) without claiming anything yet.

        ``imglock run`` opens first, so that the command it starts inherits
        the descriptors the claim is then taken on.
        """
        if not self.members:
            try:
                self.members = self._open_members()
            except ImageError as exc:
                # A chain that cannot be followed here (a backing file of
                # another host's path) of an image someone holds: who holds
                # it is the answer, as it would be with the chain in place.
                conflict = self._conflict_at_top()
                if conflict is None:
                    raise
                raise conflict from exc
            self.process = os.getpid()
        return self

    def _conflict_at_top(self) -> LockConflict | None:
        """Who holds a named image in a way that refuses this claim, if anyone.

        Looked at, never claimed: a claim that is about to fail must not
        show as a holder, even for a moment, to a ``status`` run meanwhile.
        """
        from imglock.formats import open_image
        from imglock.lock.discovery import survey

        for spec in self.specs:
            try:
                image = open_image(spec.path, "raw")
            except ImglockError:
                continue  # the top itself cannot be opened: the chain's error says so
            member = _Member(image, spec.mode, True, spec.role)
            try:
                self._attach_lockspace(member)
                fd, filename = image.lock_target
                found = survey(
                    fd, filename, os.fstat(fd),
                    record_dir=member.record_dir, record_name=member.record_name,
                )  # fmt: skip
                rivals = [h for h in found.holders if _refuses(h, spec.mode)]
            except (ImglockError, OSError):
                continue  # no better answer than the chain's error
            finally:
                member.close()
            if rivals:
                text = f"cannot claim {spec.mode.value}: held " + ", ".join(
                    h.describe() for h in rivals[:NAMED_HOLDERS]
                )
                return LockConflict(image.filename, text, rivals)
        return None

    def prepare(self) -> Self:
        """Open the images and settle now all that :meth:`acquire` needs besides locks.

        That is the descriptors, which lock commands the kernel has (one
        lock test), this host's identity, and which lock layers each file
        takes; each costs a system call or a file read, and through a
        network filesystem a round trip.  A migration destination prepares
        before the switch-over, so that the guest's downtime holds only the
        lock calls themselves.
        """
        from imglock.lock import fcntl_locks

        self.open()
        Owner.current(self.owner_pid)  # hashes the host name, once
        for member in self.members:
            fd, filename = member.image.lock_target
            if fd >= 0:
                fcntl_locks.ensure_commands(fd, filename)
                if self._layers_of(member) & Layer.FLOCK_EVERYWHERE:
                    import portalocker  # noqa: F401  (some 20 ms to load)
        import random  # noqa: F401  (the jitter between attempts, should the first one fail)

        return self

    def _layers_of(self, member: _Member) -> Layer:
        """The claim's layers as they apply to *member*'s file (``--flock auto`` decided)."""
        if Layer.FLOCK not in self.layers:
            return self.layers
        if member.flock is None:
            fd = member.image.lock_target[0]
            member.flock = flock_layer_for_file(fd) if fd >= 0 else Layer(0)
        return self.layers & ~Layer.FLOCK | member.flock

    def file_keys(self) -> set[tuple[int, int]]:
        """(st_dev, st_ino) of every open file of the claim: images and lock files."""
        keys = set()
        for member in self.members:
            keys.add((member.image.st.st_dev, member.image.st.st_ino))
            lock_fd = member.image.lock_target[0]
            if lock_fd >= 0 and lock_fd != member.image.fd:
                with contextlib.suppress(OSError):  # a mount gone away: nothing to find by it
                    st = os.fstat(lock_fd)
                    keys.add((st.st_dev, st.st_ino))
        return keys

    @property
    def owned_here(self) -> bool:
        """Whether this process is the one that opened the claim (not a forked copy)."""
        return self.process == os.getpid()

    def acquire(self) -> Self:
        """Claim every image, waiting up to :attr:`wait` seconds; raise LockConflict if not.

        A claimer that waits takes a place in the queue of the image that
        holds it up (one image at a time, so that waiters on several images
        never wait for each other in a circle), and from then on defers only
        to those ahead of it there; claimers that arrive later queue behind.
        """
        if self.held:
            return self
        opened_here = not self.members
        self.open()
        deadline = time.monotonic() + max(self.wait, 0.0)
        delay = min(BACKOFF_FIRST, self.backoff_cap)
        queued: _Queued | None = None
        try:
            while True:
                try:
                    self._claim_all(queued)
                    self._leave(queued)
                    return self
                except (LockConflict, _Contended) as exc:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._leave(queued)
                        if isinstance(exc, _Contended):
                            place = queued.place if queued and queued.member is exc.member else None
                            raise _named_conflict(exc.member, exc.conflict, place) from None
                        raise
                    if isinstance(exc, _Contended) and (
                        queued is None or queued.member is not exc.member
                    ):
                        self._leave(queued)
                        queued = None  # (enqueue may fail: hold no place meanwhile)
                        queued = self._enqueue(exc.member)
                    import random  # only a claim that waits needs the jitter

                    time.sleep(min(remaining, delay * random.uniform(0.5, 1.5)))
                    delay = min(delay * 2, self.backoff_cap)
        except BaseException:
            self._leave(queued)
            if opened_here:
                self.close()
            raise

    def _enqueue(self, member: _Member) -> _Queued:
        from imglock.lock import protocol

        fd, filename = member.image.lock_target
        owner = Owner.current(self.owner_pid)
        return _Queued(member, protocol.enqueue(fd, filename, member.mode, owner))

    @staticmethod
    def _leave(queued: _Queued | None) -> None:
        if queued is None:
            return
        from imglock.lock import protocol

        fd, filename = queued.member.image.lock_target
        if fd >= 0:
            # A place that cannot be given up dies with the descriptor.
            with contextlib.suppress(LockError):
                protocol.leave(fd, filename, queued.place)

    def _claim_all(self, queued: _Queued | None = None) -> None:
        owner = Owner.current(self.owner_pid)
        taken: list[_Member] = []
        # A waiter tries the file it waits for first: the others are taken
        # only once it has that one, not again and again while it waits.
        members = self.members
        if queued is not None:
            members = [queued.member, *(m for m in members if m is not queued.member)]
        try:
            for member in members:
                place = queued.place if queued and queued.member is member else None
                try:
                    member.image.driver.claim(
                        member.image, member.mode, self._layers_of(member), owner, place
                    )
                except ProtocolConflict as exc:
                    raise _Contended(member, exc) from None
                taken.append(member)
                faults.point("claim:member")
        except BaseException:
            for member in taken:
                member.image.driver.release(member.image)
            raise
        faults.point("claim:taken")
        self.held = True
        if self.record:
            self._write_records(owner)
            faults.point("claim:recorded")

    def _open_members(self) -> list[_Member]:
        """Open every image of every chain once, with the strongest mode asked of it."""
        by_file: dict[tuple[int, int], _Member] = {}
        try:
            for spec in self.specs:
                for image, mode, link in _chain_modes(spec):
                    named = link.role == "top"
                    role = spec.role if named else link.role
                    key = (image.st.st_dev, image.st.st_ino)
                    known = by_file.get(key)
                    if known is None:
                        by_file[key] = _Member(image, mode, named, role, link.depth)
                        self._attach_lockspace(by_file[key])
                        continue
                    image.close()  # a second open would conflict with the first
                    known.named |= named
                    known.mode = strongest(known.mode, mode)
        except BaseException:
            for member in by_file.values():
                member.image.close()
            raise
        return list(by_file.values())

    def _attach_lockspace(self, member: _Member) -> None:
        member.record_dir, member.record_name = attach(member.image, self.lockspace)

    def _write_records(self, owner: Owner) -> None:
        for member in self.members:
            self._write_record(member, owner)

    def _write_record(self, member: _Member, owner: Owner) -> None:
        record = records.make_record(
            member.image.filename, owner, member.mode.value, self.command, member.image.st.st_ino
        )
        # A backing file is named by an image header, which anyone who can
        # write the image controls: its record goes only into a record
        # directory that is already there, never into a new one.
        create = member.named or self.lockspace is not None
        member.record_problem = records.write(
            member.record_dir, member.record_name, record, create=create
        )
        member.recorded_as = owner if member.record_problem is None else None

    # -- following a VM's block graph (imglock.run.graph) ------------------

    def add_file(self, path: str, mode: Mode, role: str = "top") -> _Member:
        """Open one more file and claim it in *mode*, alone (no chain is followed).

        For a file a running VM opened: its block graph lists every file of
        a chain itself.  The descriptor stays with this process.  Raises
        LockConflict naming the holder (nothing is held then), ImageError
        if the file cannot be opened.
        """
        from imglock.formats import open_image

        # Only the bytes matter here: never probe what a VM may be writing.
        image = open_image(path, "raw")
        member = _Member(image, mode, False, role)
        try:
            self._attach_lockspace(member)
            owner = Owner.current(self.owner_pid)
            try:
                image.driver.claim(image, mode, self._layers_of(member), owner)
            except ProtocolConflict as exc:
                raise _named_conflict(member, exc) from None
        except BaseException:
            image.close()
            raise
        self.members.append(member)
        if self.record:
            self._write_record(member, owner)
        return member

    def drop_file(self, member: _Member) -> None:
        """Unclaim one file that the VM has closed, and close our descriptor.

        An explicit unlock (case 4 of the lifetime rule in imglock(7)): the
        VM may still hold a descriptor it inherited at start, but its block
        layer has closed the file and no longer uses it.
        """
        self.members.remove(member)
        try:
            member.image.driver.release(member.image)
        finally:
            member.close()
            _remove_record(member)

    def qemu_holds_its_bytes(self) -> None:
        """The wrapped QEMU runs now, and holds QEMU's bytes on descriptors of its own.

        They were tested before it started (Layer.QEMU_TEST); from now on
        they are QEMU's (Layer.QEMU_HELD), so later claims and mode changes
        (a migration handoff, a block job that makes QEMU write a backing
        file) judge the imglock layer only, and never meet QEMU as a rival.
        """
        if Layer.QEMU_TEST not in self.layers:
            return
        self.layers = self.layers & ~Layer.QEMU_TEST | Layer.QEMU_HELD
        for member in self.members:
            held = member.image.held
            if held is not None and Layer.QEMU_TEST in held.layers:
                member.image.held = Held(
                    held.mode,
                    held.layers & ~Layer.QEMU_TEST | Layer.QEMU_HELD,
                    held.owner,
                    held.ranges,  # the same: both mark QEMU's bytes as the holder's
                    held.flock,
                )

    def change_file_mode(self, member: _Member, mode: Mode) -> None:
        """Turn one file's claim into one in *mode* on the same descriptor.

        Never unclaimed in between (see protocol.change_mode).  Raises
        LockConflict naming the holder; the old mode is kept then.
        """
        from imglock.lock import protocol

        held = member.image.held
        if held is None or held.mode is mode:
            member.mode = mode
            return
        fd, filename = member.image.lock_target
        try:
            member.image.held = protocol.change_mode(fd, filename, held, mode)
        except ProtocolConflict as exc:
            raise _named_conflict(member, exc, mode=mode) from None
        member.mode = mode
        if self.record and member.recorded_as is not None:
            self._write_record(member, held.owner)

    def verify(self) -> list[str]:
        """Check that every lock of this claim is still held; raise LockLost if not.

        Each file's bytes are looked at from a second open file description
        (see protocol.verify): a check never takes a byte, so a lock the
        server forgot is reported, never quietly taken again.  A path that
        no longer leads to the file claimed (the image, or its lock file,
        replaced or removed) is reported as a loss too: a claimer arriving
        now would lock the new file.

        After a loss the claim stays as it is (release() it; a new claim
        goes through the whole protocol again).  Returns one line for each
        lock found in the way that is held outside imglock's protocol
        while the claim's own are intact: not a loss, but worth a word.
        """
        from imglock.lock import protocol

        notices = []
        for member in list(self.members) if self.held else ():
            held = member.image.held
            if held is None:
                continue
            why = member.replaced()
            if why is not None:
                raise LockLost(
                    member.image.filename, f"image replaced: {why}; the claim holds the old file"
                )
            fd, filename = member.image.lock_target
            for lock in protocol.verify(fd, filename, held, member.observe()):
                notices.append(_intruder(member, lock))
        return notices

    def watch(
        self,
        on_loss: Callable[[LockLost], None],
        *,
        interval: float = 5.0,
        deadline: float | None = DEFAULT_DEADLINE,
        on_stall: Callable[[float], None] | None = None,
        on_intact: Callable[[], None] | None = None,
    ) -> LockWatch:
        """Check this claim every *interval* seconds in a background thread.

        ``on_loss(exc)`` is called once, from that thread, when a lock is
        lost (see :meth:`verify`), and the watch ends.  A check that has not
        completed after *deadline* seconds (a server that hangs) calls
        ``on_stall(deadline)``, and ``on_intact()`` once a check completes
        with the claim intact.  Stop it with the returned watch's ``stop()``.
        """
        interval = as_seconds("interval", interval)
        if deadline is not None:
            deadline = as_seconds("deadline", deadline)
        return LockWatch(
            self.verify,
            interval,
            on_loss,
            deadline,
            on_stall or _ignore,
            on_intact or _ignore,
        ).start()

    def release(self, *, close: bool = True) -> None:
        """End the claim: close every descriptor, and remove the holder records.

        Idempotent.  The locks go with the descriptors; a process that
        inherited them (a forked child, a command's background child) keeps
        the image claimed until it closes them too.  In a process other than
        the owner (:attr:`process`) only that process's descriptors are closed.

        ``close=False`` is the explicit unlock of a migration source whose
        QEMU has inactivated its images: the locks are dropped for every
        process sharing the descriptors, which are kept for a later
        :meth:`acquire` (the guest may be resumed here), and so are the
        holder records, until :meth:`remove_records` (a record whose lock is
        gone names no holder: ``status`` flags it as stale).  Outside the
        owner process it does nothing.
        """
        if not self.owned_here:
            self.held = False
            if close:
                self.close()
            return
        if not close:
            self._unlock()
            return
        self.held = False
        members, self.members = self.members, []
        try:
            for member in members:
                member.close()
                faults.point("release:unlocked")
                with contextlib.suppress(OSError):  # a record on a mount gone away
                    _remove_record(member)
        finally:
            for member in members:
                member.close()

    def _unlock(self) -> None:
        """Drop every lock, keep the descriptors and records (case 3 of the lifetime rule)."""
        held, self.held = self.held, False
        for member in self.members if held else ():
            try:
                member.image.driver.release(member.image)
            except LockError:
                member.image.held = None  # a dead mount: its locks are gone with it
            faults.point("release:unlocked")

    def remove_records(self) -> None:
        """Remove the holder records of a claim that is no longer held here.

        After ``release(close=False)``: a migration source removes them once
        the destination has had time to take over, so that their removal is
        not file system traffic at the destination's critical moment.
        Does nothing while the claim is held.
        """
        if not self.held and self.owned_here:
            for member in self.members:
                _remove_record(member)

    def write_records(self) -> None:
        """Write the holder records of a claim taken without them (``record=False``).

        A migration destination claims without records, so that only the
        locks are between the switch-over and the guest running again, and
        writes them once the guest runs.  Does nothing unless held here.
        """
        if self.held and self.owned_here:
            self._write_records(Owner.current(self.owner_pid))

    def relabel(self, pid: int, command: list[str] | None = None) -> None:
        """Name process *pid* as the holder (case 2 of the lifetime rule).

        For a command that handed the image to another process (a daemon it
        forked, a background child) before exiting: the lock offset and the
        holder records then name the process that actually uses the image,
        on every host.  The claim stays held throughout.
        """
        if not self.owned_here:
            return
        if not self.held:  # a later acquire (a migration destination's) names *pid*
            self.owner_pid = pid
            self.command = command if command is not None else self.command
            return
        new = Owner.current(pid)
        for member in self.members:
            held = member.image.held
            if held is None or held.owner == new:
                continue
            fd, filename = member.image.lock_target
            from imglock.lock import protocol

            member.image.held = protocol.relabel(fd, filename, held, new)
            if self.record:
                record = records.make_record(
                    member.image.filename,
                    new,
                    member.mode.value,
                    command or self.command,
                    member.image.st.st_ino,
                )
                problem = records.write(member.record_dir, member.record_name, record, create=False)
                _remove_record(member)  # the old owner's
                member.recorded_as = new if problem is None else None
                member.record_problem = problem
        self.owner_pid = pid
        if command is not None:
            self.command = command

    def close(self) -> None:
        """Close every descriptor (which drops any lock still on them)."""
        members, self.members = self.members, []
        self.held = False
        for member in members:
            member.close()

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    # A copy would share the descriptor numbers: collecting it would close
    # the original's descriptors (and so drop its locks) while the original
    # still says held, and the original's release would then close whatever
    # reuses those numbers.  A claim is one object in one process.
    def __copy__(self) -> NoReturn:
        raise TypeError(_NOT_COPYABLE)

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError(_NOT_COPYABLE)

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise TypeError(_NOT_COPYABLE)

    def __del__(self) -> None:
        # A claim dropped without release must not leak descriptors (and so locks).
        for member in getattr(self, "members", ()):
            member.close()


def _refuses(holder: Holder, mode: Mode) -> bool:
    """Whether *holder* is in the way of a claim in *mode* (by its mode or QEMU's perms)."""
    if mode is Mode.EXCLUSIVE:
        return True
    if holder.layer == "imglock" and holder.mode is not None:
        return conflicts(mode, Mode(holder.mode))
    if holder.layer == "qemu":
        return "write" in holder.perms or "write" in holder.unshared
    return holder.mode == "exclusive"


def _ignore(*_args: object) -> None:
    """A hook the caller did not ask for."""


def _intruder(member: _Member, lock: RangeLock) -> str:
    """One line on a lock in *member*'s way that is held outside imglock's protocol."""
    from imglock.lock.discovery import survey

    fd, filename = member.image.lock_target
    found = survey(
        fd, filename, os.fstat(fd), record_dir=member.record_dir, record_name=member.record_name
    )
    own = member.image.held.owner.id if member.image.held is not None else None
    others = [h for h in found.holders if h.owner != own]
    who = _blocking_holder(others, lock).describe() if others else "by another process"
    return (
        f"{member.image.filename}: a lock outside imglock's protocol is in the way at byte "
        f"{lock.start:#x}, held {who}; the claim's own locks are intact"
    )


def _remove_record(member: _Member) -> None:
    """Remove *member*'s holder record, if it has one."""
    owner, member.recorded_as = member.recorded_as, None
    if owner is not None:
        records.remove(member.record_dir, member.record_name, owner)


def _chain_modes(spec: ClaimSpec) -> Iterable[tuple[OpenImage, Mode, ChainLink]]:
    """The images of *spec*'s chain: (image, mode, its link in the chain).

    The top image is claimed as asked, backing files shared, and an external
    data file like the image it belongs to.  Only the top image is named by
    the caller; the others are named by image headers, which are untrusted.
    """
    from imglock.chain import open_chain  # only claims follow chains; `status` never does

    chain = open_chain(spec.path, spec.format, backing=spec.backing, data_file=spec.data_file)
    for link in chain.links:
        if link.role == "backing":
            yield link.image, Mode.SHARED, link
        else:
            yield link.image, spec.mode if link.depth == 0 else Mode.SHARED, link


class _Queued(NamedTuple):
    """Where a waiting claim stands in line: one member's queue."""

    member: _Member
    place: Place


class _Contended(Exception):
    """One member lost to a holder.  Named only once the wait runs out: naming
    surveys the image (every lock, /proc, the records), far dearer than a retry."""

    def __init__(self, member: _Member, conflict: ProtocolConflict) -> None:
        super().__init__(member, conflict)
        self.member = member
        self.conflict = conflict


def _named_conflict(
    member: _Member, exc: ProtocolConflict, place: Place | None = None, mode: Mode | None = None
) -> LockConflict:
    """Turn a bare conflict into one that names who holds the image, and who waits ahead.

    *mode* is the mode asked for, when not the member's own (a mode change).
    """
    mode = mode or member.mode
    from imglock.lock.discovery import survey
    from imglock.lock.protocol import conflicts

    fd, filename = member.image.lock_target
    found = survey(
        fd,
        filename,
        os.fstat(fd),
        record_dir=member.record_dir,
        record_name=member.record_name,
    )
    holders = found.holders
    if member.image.held is not None:  # a mode change: our own bytes are no rival
        own = member.image.held.owner.id
        holders = [h for h in holders if h.owner != own]
    # Ahead: conflicting waiters before the claimer's place, or all of them
    # for a claimer that never queued (any of them would go first).
    ahead = [
        w
        for w in found.waiting
        if conflicts(mode, Mode(w.mode or mode))
        and (place is None or (w.place is not None and w.place < place.offset))
    ]
    image = member.image.filename
    text = f"cannot claim {mode.value}"
    if holders:
        first = _blocking_holder(holders, exc.lock)
        # Several imglock holders (shared readers, shared writers) are all in
        # the way: name each of them, up to a few.
        named = [first]
        if first.layer == "imglock":
            named += [h for h in holders if h is not first and h.layer == "imglock"]
            named = named[:NAMED_HOLDERS]
        text += ": held " + ", ".join(h.describe() for h in named)
        if len(holders) > len(named):
            text += f" and {len(holders) - len(named)} more"
    elif not ahead:
        text += ": held by another process"
    if ahead:
        text += f"; {len(ahead)} waiting ahead, first {ahead[0].describe()}"
    return LockConflict(image, text, holders, ahead)


def _blocking_holder(found: Sequence[Holder], lock: RangeLock) -> Holder:
    """The holder worth naming: the one whose lock was in the way, else a writer."""
    for holder in found:
        if holder.owner is not None and holder.mode is not None:
            byte, _length = holder_range(Mode(holder.mode), Owner.from_id(holder.owner))
            if lock.start <= byte < lock.end:
                return holder
    if lock.end <= IMGLOCK_START:  # QEMU's bytes, or a foreign lock
        for holder in found:
            if holder.range is not None and holder.range == (lock.start, lock.end):
                return holder
        for holder in found:
            if holder.layer == "qemu":
                return holder
    for holder in found:
        if holder.mode == Mode.EXCLUSIVE.value or "write" in holder.perms:
            return holder
    return found[0]


def claim(
    path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
    mode: Mode | str = Mode.EXCLUSIVE,
    *,
    wait: float = 0.0,
    format: str | None = None,
    qemu_locks: bool = True,
    flock: str = "auto",
    lockspace: str | None = None,
    record: bool = True,
) -> Claim:
    """Claim *path* (and its backing chain) and return the held :class:`Claim`.

    *mode* is "exclusive" (one writer), "shared" (readers) or "shared-write"
    (writers that share the disk on purpose, like QEMU's ``share-rw=on``);
    backing files are always claimed shared.  *wait* is how long to keep
    trying while someone else holds it, in seconds (``math.inf``: until it
    is free).  With *qemu_locks*, QEMU's own lock bytes are held too, so
    that qemu-img and qemu-system refuse the image meanwhile.
    With *flock* "auto" (or "on", "off"), a whole-file flock(2) is held
    too where the filesystem keeps flock apart from fcntl locks (or
    everywhere, or nowhere), so that crosvm, hyperkit and alioth see the
    claim.  *path* may be a str, bytes or a path-like object.
    Raises LockConflict (with ``.holders``) if the image stays held,
    FormatError/ImageError/ChainError if it cannot be read, and UsageError
    (also a ValueError) for a bad argument (a *wait* that is not a number of
    seconds >= 0, an unknown *mode*).

    The claim is owned by the calling process; see :class:`Claim` for what
    a forked child may do with it.
    """
    from imglock.lock.protocol import flock_layer

    if flock not in ("auto", "on", "off"):
        raise UsageError(None, f"unknown flock policy {flock!r} (auto, on, off)")
    layers = Layer.IMGLOCK | (Layer.QEMU if qemu_locks else Layer(0)) | flock_layer(flock)
    spec = ClaimSpec(as_path(path), as_mode(mode), format)
    return Claim([spec], wait=wait, layers=layers, lockspace=lockspace, record=record).acquire()


def inspect(
    path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
    *,
    lockspace: str | None = None,
    local: LocalLocks | None = None,
) -> ImageReport:
    """Who holds *path* (any file), and the header facts that matter for it; takes no lock."""
    from imglock.formats import open_for_locks

    image = open_for_locks(as_path(path))
    try:
        return inspect_image(image, lockspace=lockspace, local=local)
    finally:
        image.close()
