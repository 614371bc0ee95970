"""One open file of a claim and the locks held on it: the library's one route to the protocol.

Every lock a claim takes, tests, moves or drops goes through
:class:`ClaimedImage`, and through it to :mod:`imglock.lock.protocol`:
format drivers open and parse images, and lock nothing.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from imglock.errors import LockError, LockLost
from imglock.formats import OpenImage
from imglock.lock import fcntl_locks, flock, protocol
from imglock.lock.fcntl_locks import RangeLock, reason
from imglock.lock.identity import Owner
from imglock.lock.lockspace import LockTarget, open_target
from imglock.lock.protocol import Held, Layer, Mode, Place

if TYPE_CHECKING:
    from imglock.lock.discovery import Survey


@dataclass(eq=False)
class ClaimedImage(OpenImage):
    """An open image as a claim holds it: the file that carries its locks, and what it holds."""

    #: The image itself, or its lock file in a lockspace.
    target: LockTarget = field(kw_only=True, repr=False)
    #: The locks held on the target for the claim, while it holds any.
    held: Held | None = field(default=None, kw_only=True)
    #: ``--flock auto`` as decided for this file (protocol.flock_layer_for_file),
    #: once a claim has asked.
    flock: Layer | None = field(default=None, kw_only=True, repr=False)
    #: A second open file description of the target, holding nothing:
    #: where the lock check looks from (protocol.verify); -1 until it has.
    observer: int = field(default=-1, kw_only=True, repr=False)
    #: (mode, owner) of the intent byte taken ahead of an attempt
    #: (protocol.announce: a migration destination), while it is held.
    intent: tuple[Mode, Owner] | None = field(default=None, kw_only=True, repr=False)

    @classmethod
    def open(cls, opened: OpenImage, lockspace: str | None) -> ClaimedImage:
        """*opened*, its descriptor taken over, with its locks on it or on its lock file
        in *lockspace*.  On failure *opened* is closed."""
        try:
            target = open_target(opened.fd, opened.filename, opened.st, lockspace)
        except BaseException:
            opened.close()
            raise
        # Every field of the open image, so that one added there is not lost here.
        taken_over = {f.name: getattr(opened, f.name) for f in fields(OpenImage)}
        return cls(**taken_over, target=target)

    @property
    def lock_target(self) -> tuple[int, str]:
        """(descriptor, name) of the file whose bytes are locked for this image."""
        return self.target.fd, self.target.filename

    def key(self) -> tuple[int, int]:
        """(st_dev, st_ino) of the image."""
        return self.st.st_dev, self.st.st_ino

    def lock_file_key(self) -> tuple[int, int] | None:
        """(st_dev, st_ino) of its lock file, if it has one that can be looked at."""
        if not self.target.lock_file or self.target.fd < 0:
            return None
        try:
            st = os.fstat(self.target.fd)
        except OSError:  # a mount gone away: nothing to find by it
            return None
        return st.st_dev, st.st_ino

    def descriptors(self) -> set[int]:
        """Every descriptor open for this file: the image's, the lock file's, the observer."""
        return {fd for fd in (self.fd, self.target.fd, self.observer) if fd >= 0}

    # -- taking and dropping ------------------------------------------------

    def layers_for(self, layers: Layer) -> Layer:
        """*layers* as they apply to this file (``--flock auto`` decided, once)."""
        if Layer.FLOCK not in layers:
            return layers
        if self.flock is None:
            fd = self.target.fd
            self.flock = protocol.flock_layer_for_file(fd) if fd >= 0 else Layer(0)
        return layers & ~Layer.FLOCK | self.flock

    def prepare(self, layers: Layer) -> None:
        """Settle now what taking the locks needs besides the lock calls themselves."""
        fd, filename = self.lock_target
        if fd >= 0:
            fcntl_locks.ensure_commands(fd, filename)
            if self.layers_for(layers) & Layer.FLOCK_EVERYWHERE:
                flock.load()

    def take(self, mode: Mode, layers: Layer, owner: Owner, place: Place | None = None) -> None:
        """Claim the file in *mode* (one attempt); ProtocolConflict with nothing new held.

        An intent announced for this very attempt (:meth:`announce`) is used, and kept.
        """
        fd, filename = self.lock_target
        announced = place is None and self.intent == (mode, owner)
        self.held = protocol.acquire(
            fd, filename, mode, self.layers_for(layers), owner, place, announced=announced
        )

    def announce(self, mode: Mode, owner: Owner) -> None:
        """Take the intent byte of a claim in *mode* ahead of the attempt (protocol.announce)."""
        fd, filename = self.lock_target
        if fd >= 0 and self.intent is None:
            protocol.announce(fd, filename, mode, owner)
            self.intent = (mode, owner)

    def rival(self, mode: Mode) -> RangeLock | None:
        """The first lock in the way of a claim in *mode*, looked at only (protocol.first_rival)."""
        fd, filename = self.lock_target
        return protocol.first_rival(fd, filename, mode) if fd >= 0 else None

    def withdraw(self) -> None:
        """Drop the intent byte :meth:`announce` took, if it is held."""
        fd, filename = self.lock_target
        intent, self.intent = self.intent, None
        if intent is not None and fd >= 0:
            protocol.withdraw(fd, filename, *intent)

    def drop(self) -> None:
        """Drop every lock held, keeping the descriptors (see the lifetime rule in protocol)."""
        fd, filename = self.lock_target
        try:
            if self.held is not None and fd >= 0:
                protocol.release(fd, filename, self.held)
        finally:
            self.held = None

    def change_mode(self, mode: Mode) -> None:
        """Turn the claim into one in *mode* on the same descriptor (protocol.change_mode)."""
        if self.held is not None and self.held.mode is not mode:
            fd, filename = self.lock_target
            self.held = protocol.change_mode(fd, filename, self.held, mode)

    def relabel(self, owner: Owner) -> None:
        """Name *owner* in the holder bytes (protocol.relabel)."""
        if self.held is not None and self.held.owner != owner:
            fd, filename = self.lock_target
            self.held = protocol.relabel(fd, filename, self.held, owner)

    def qemu_holds_its_bytes(self) -> None:
        """QEMU's bytes, tested before it ran, are now held by the QEMU that runs."""
        if self.held is not None:
            self.held = protocol.handed_to_qemu(self.held)

    def enqueue(self, mode: Mode, owner: Owner) -> Place:
        """Take a place at the end of the file's queue."""
        fd, filename = self.lock_target
        return protocol.enqueue(fd, filename, mode, owner)

    def leave(self, place: Place) -> None:
        """Give up a place in the queue; one that cannot be given up dies with the descriptor."""
        fd, filename = self.lock_target
        if fd >= 0:
            with contextlib.suppress(LockError):
                protocol.leave(fd, filename, place)

    # -- looking ------------------------------------------------------------

    def survey(self) -> Survey:
        """Who holds the file and who waits for it (looked at, nothing taken)."""
        # Deliberately lazy: discovery (every lock, /proc, the records) is
        # loaded when a claim meets someone; a claim that succeeds never
        # needs it, and `imglock run` starts without it.
        from imglock.lock import discovery

        target = self.target
        return discovery.survey(
            target.fd,
            target.filename,
            os.fstat(target.fd),
            record_dir=target.record_dir,
            record_name=target.record_name,
        )

    def verify(self) -> list[RangeLock]:
        """Check that every lock held is still held (protocol.verify); LockLost if not.

        Returns the rivals' locks seen in the way while the claim's are intact.
        """
        if self.held is None:
            return []
        why = self.replaced()
        if why is not None:
            raise LockLost(self.filename, f"image replaced: {why}; the claim holds the old file")
        fd, filename = self.lock_target
        return protocol.verify(fd, filename, self.held, self._observe())

    def _observe(self) -> int:
        """The observer descriptor, opened on first use (see protocol.verify).

        Opened through /proc/self/fd, so it is the very file the claim
        holds even if its path now leads elsewhere; close-on-exec, so no
        command inherits it.
        """
        if self.observer < 0:
            fd, filename = self.lock_target
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
            (self.filename, self.st.st_ino, "the path now leads to another file",
             "the path no longer exists"),
        ]  # fmt: skip
        if self.target.lock_file:
            with contextlib.suppress(OSError):  # a mount gone away: the lock test decides
                checks.append(
                    (self.target.filename, os.fstat(self.target.fd).st_ino,
                     "its lock file was replaced", "its lock file was removed")
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
        """Close every descriptor of the file (which drops its locks); never raises.

        A descriptor of a mount that has gone away (a crashed GlusterFS
        client: ENOTCONN; a reconnected one with strict locks: EBADFD; a
        dead NFS server: EIO) may fail to close, but it is closed all the
        same, and its locks are gone with the server's view of it.
        """
        self.held = self.intent = None
        observer, self.observer = self.observer, -1
        with contextlib.suppress(OSError):
            if observer >= 0:
                os.close(observer)
        with contextlib.suppress(OSError):
            self.target.close()
        with contextlib.suppress(OSError):
            super().close()
