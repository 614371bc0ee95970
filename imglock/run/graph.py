"""Following a running QEMU's block graph: the claim stays what QEMU has open.

A VM's disks change while it runs: management tools hot-plug disks
(``blockdev-add`` + ``device_add``), take snapshots, mirror and commit,
stream, change and eject media, all through QMP.  The claim taken at start
from the command line would soon be wrong: files QEMU now writes would be
unclaimed, and files it has closed still claimed.

So the wrapper asks QEMU, through its private monitor, which files its
block graph holds and how it uses each:

* ``query-named-block-nodes`` gives every node's driver and file name; the
  protocol nodes (drivers ``file``, ``host_device``, ``host_cdrom``) are
  the files QEMU has open;
* ``x-debug-query-block-graph`` gives every edge into a node with the
  permissions its parent holds (``perm``) and lets others have
  (``shared-perm``).  A file some parent writes is claimed **exclusive**, or **shared-write**
  when every parent shares writes (a raw disk behind a ``share-rw=on``
  device); a file only read is claimed **shared**, or shared-write when
  its readers let others write (a read-only ``share-rw=on`` device); a
  file no parent uses at all (QEMU takes none of its own lock bytes on it
  either) is not claimed.

The claim is then reconciled with that: new files are claimed, modes are
changed on the same descriptor (never unclaimed in between), and files
QEMU closed are released.  QEMU sends no event for ``blockdev-add``, so
the graph is read every :data:`DEFAULT_INTERVAL` seconds, and at once on
the events that come with a change (block jobs, trays, device removal).
Meanwhile QEMU's own lock bytes protect a new file against other QEMUs
and qemu-img: only an imglock claimer that leaves QEMU's bytes alone could
slip in, and the wrapper then finds the file held, and stops the guest.

A file that cannot be claimed (someone else holds it) stops the guest with
QMP ``stop`` and one message naming the holder, as a lost lock does; the
wrapper never resumes it.  Files claimed after start are held by the
wrapper's descriptors only (QEMU did not inherit them): if the wrapper is
killed, their imglock claim ends with it, while QEMU's own bytes remain.
"""

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, NamedTuple

from imglock.errors import ImglockError, LockConflict
from imglock.lock.protocol import Mode, strongest
from imglock.qemu.cmdline import iter_options, parse_qemu_opts
from imglock.qemu.drivers import LOCAL_FILE_MEMBERS
from imglock.qemu.monitor import CommandFailed, Monitor, MonitorClosed, call_hook
from imglock.run.guest import GuestControl
from imglock.run.session import ClaimSession

#: Seconds between two readings of the graph when no event came.
DEFAULT_INTERVAL: Final = 0.5

#: Events that come with a change of the graph (qapi/block-core.json,
#: qapi/job.json, qapi/qdev.json): read it at once.
GRAPH_EVENTS: Final = frozenset(
    {
        "BLOCK_JOB_COMPLETED",
        "BLOCK_JOB_CANCELLED",
        "BLOCK_JOB_READY",
        "BLOCK_JOB_ERROR",
        "JOB_STATUS_CHANGE",
        "DEVICE_TRAY_MOVED",
        "DEVICE_DELETED",
    }
)

#: ``query-named-block-nodes`` reads every node's image information, and
#: Debian 12's QEMU 7.2 crashes when a node is not in a state to give it:
#:
#: * once a ``block-stream`` job has concluded and waits for its manager to
#:   dismiss it (libvirt's ``virsh blockpull`` leaves it so), a node it left
#:   behind is dereferenced (SIGSEGV);
#: * while ``blockdev-create`` makes a qcow2 image, the job opens it on a
#:   node of its own whose header is not read yet, and
#:   ``qcow2_get_specific_info`` aborts on its version 0 (``Assertion
#:   `false' failed``).  libvirt makes every external snapshot's overlay
#:   so (``virsh snapshot-create-as --disk-only``).
#:
#: A running stream may conclude between two commands of ours, so the nodes
#: are not read at all while a stream or create job exists, nor while any
#: job has concluded; they are read once it is gone (JOB_STATUS_CHANGE).
#: Until then the claim stays what it was.
UNSAFE_JOB_TYPES: Final = frozenset({"stream", "create"})
UNSAFE_JOB_STATUSES: Final = frozenset({"concluded"})

#: A create job may also start between our ``query-jobs`` and our
#: ``query-named-block-nodes``: another monitor's command can run between
#: two of ours.  It always writes through a node that was added just before
#: (``blockdev-add``) and that nothing uses yet, since a node in use does
#: not let it write.  So the nodes are not read while the graph has a node
#: with no parent that appeared less than this many seconds ago: far longer
#: than a manager takes from its ``blockdev-add`` to its ``blockdev-create``
#: (milliseconds for libvirt), and short enough to delay following the
#: graph by about a second at most.  A node left unused for longer (a
#: ``-blockdev`` no device uses) no longer holds the reading back.
NEW_UNUSED_NODE_SECONDS: Final = 1.0

#: One reading of QEMU's block graph: ``x-debug-query-block-graph``'s graph
#: and ``query-named-block-nodes``' nodes.
GraphReading = tuple[Mapping[str, Any], list[Mapping[str, Any]]]

#: Run states in which QEMU's images may be inactive (qapi/run-state.json):
#: an incoming migration, and an outgoing one from its last phase on.
INACTIVE_RUNSTATES: Final = frozenset({"inmigrate", "finish-migrate", "postmigrate"})

#: Protocol drivers whose nodes are local files (block/file-posix.c, and
#: libblkio's io_uring): the block driver table's.
FILE_DRIVERS: Final = frozenset(LOCAL_FILE_MEMBERS)

#: BlockPermission names as x-debug-query-block-graph spells them.
PERM_WRITE: Final = "write"

#: QEMU's file driver opens ``/dev/fdset/N`` from descriptors passed with
#: ``add-fd``: not a path imglock can open.
FDSET_PREFIX: Final = "/dev/fdset/"


def open_file_keys(pid: int) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every file process *pid* has open (its /proc fd table)."""
    keys = set()
    directory = f"/proc/{pid}/fd"
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            with contextlib.suppress(OSError):  # closed meanwhile
                st = os.stat(entry.path)
                keys.add((st.st_dev, st.st_ino))
    return keys


def qemu_root(argv: Sequence[str]) -> str | None:
    """The directory a QEMU command line makes QEMU chroot into, or None.

    ``-chroot DIR`` (QEMU 7.2) or ``-run-with chroot=DIR`` (QEMU 8.1 on);
    the last one given wins, as QEMU reads them.
    """
    root = None
    for name, value in iter_options(argv):
        if name == "-chroot":
            root = value
        elif name == "-run-with" and value is not None:
            root = dict(parse_qemu_opts(value)).get("chroot", root)
    return root


#: Why the claim does not follow a QEMU that runs in another root directory.
CHROOTED: Final = (
    "QEMU runs chrooted in {root}: the file names of its block graph are not this host's, so "
    "the claim stays what the command line named (QEMU's own lock bytes still guard files it "
    "opens later)"
)


class OpenFile(NamedTuple):
    """A file QEMU's block graph holds open, and how QEMU uses it."""

    filename: str
    mode: Mode
    #: The protocol node's name (``#block123`` when QEMU named it).
    node: str


def _file_name(node: Mapping[str, Any]) -> str | None:
    name = node.get("file")
    if not isinstance(name, str) or not name:
        return None
    if name.startswith("json:"):
        # A file node opened with extra options is described as json:{...}.
        with contextlib.suppress(ValueError):
            described = json.loads(name[len("json:") :])
            inner = described.get("filename") if isinstance(described, dict) else None
            return inner if isinstance(inner, str) else None
        return None
    return name


def open_files(graph: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]]) -> list[OpenFile]:
    """The local files of a QEMU block graph, each in the mode QEMU uses it.

    *graph* is what ``x-debug-query-block-graph`` returns, *nodes* what
    ``query-named-block-nodes`` does.  A file on two nodes (opened twice)
    is listed once, in the stronger mode.
    """
    ids = {
        n.get("name"): n.get("id")
        for n in graph.get("nodes", ())
        if isinstance(n, dict) and n.get("type") == "block-driver"
    }
    perms: dict[object, set[str]] = {}
    shared: dict[object, set[str]] = {}
    for edge in graph.get("edges", ()):
        if not isinstance(edge, dict):
            continue
        child = edge.get("child")
        perms.setdefault(child, set()).update(edge.get("perm") or ())
        others = set(edge.get("shared-perm") or ())
        shared[child] = shared[child] & others if child in shared else others
    found: dict[str, OpenFile] = {}
    for node in nodes:
        if node.get("drv") not in FILE_DRIVERS:
            continue
        filename = _file_name(node)
        name = node.get("node-name")
        if filename is None or filename.startswith(FDSET_PREFIX) or not isinstance(name, str):
            continue
        key = ids.get(name)
        used = perms.get(key, set())
        if not used:
            continue  # opened, but used by no one: QEMU locks none of its bytes either
        writes_shared = PERM_WRITE in shared.get(key, set())
        if PERM_WRITE in used:
            mode = Mode.SHARED_WRITE if writes_shared else Mode.EXCLUSIVE
        else:
            # A reader that lets others write (a read-only device with
            # share-rw=on, a drive with no device) sits beside writers that
            # share the file, not beside readers who need it unchanged.
            mode = Mode.SHARED_WRITE if writes_shared else Mode.SHARED
        seen = found.get(filename)
        found[filename] = OpenFile(filename, strongest(seen.mode, mode) if seen else mode, name)
    return list(found.values())


@dataclass
class GraphReader:
    """Asks a QEMU which files its block graph holds (see :func:`open_files`).

    ``query-named-block-nodes`` makes QEMU stat every image in its main
    loop, where a hung network filesystem would stop its monitor (and so
    the guest's management) from answering; ``x-debug-query-block-graph``
    does no I/O.  So the nodes are asked for only when the graph differs
    from the last reading's.

    Nor are they asked for when the query could crash QEMU
    (:data:`UNSAFE_JOB_TYPES`, :data:`NEW_UNUSED_NODE_SECONDS`): then
    :meth:`read` returns None, and a later reading asks again.
    """

    #: The (graph, nodes) of the last reading.
    known: GraphReading | None = None
    #: Each node that no parent uses, with when (time.monotonic) it was first seen so.
    unused_since: dict[str, float] = field(default_factory=dict)

    async def read(self, monitor: Monitor) -> list[OpenFile] | None:
        """The files QEMU holds now, or None if its nodes cannot be asked for now."""
        graph = await monitor.block_graph()
        if self.known is not None and self.known[0] == graph:
            return open_files(graph, self.known[1])
        if self._has_new_unused_node(graph) or any(
            kind in UNSAFE_JOB_TYPES or status in UNSAFE_JOB_STATUSES
            for kind, status in await monitor.jobs()
        ):
            return None
        nodes = await monitor.named_block_nodes()
        self.known = (graph, nodes)
        return open_files(graph, nodes)

    def _has_new_unused_node(self, graph: Mapping[str, Any]) -> bool:
        now = time.monotonic()
        unused = unused_nodes(graph)
        self.unused_since = {name: self.unused_since.get(name, now) for name in unused}
        return any(now - since < NEW_UNUSED_NODE_SECONDS for since in self.unused_since.values())


def unused_nodes(graph: Mapping[str, Any]) -> set[str]:
    """The names of the block nodes of *graph* (``x-debug-query-block-graph``) no parent uses."""
    children = {edge.get("child") for edge in graph.get("edges", ()) if isinstance(edge, dict)}
    return {
        node["name"]
        for node in graph.get("nodes", ())
        if isinstance(node, dict)
        and node.get("type") == "block-driver"
        and isinstance(node.get("name"), str)
        and node.get("id") not in children
    }


@dataclass
class GraphFollower:
    """Keeps a claim session equal to what the wrapped QEMU has open.

    Made before QEMU runs; :meth:`following` binds it to the session and
    to QEMU's pid once QEMU runs.
    """

    interval: float = DEFAULT_INTERVAL
    #: Keep what was claimed at start (images named with --image...).
    pin_start: bool = False
    events: Collection[str] = GRAPH_EVENTS
    session: ClaimSession | None = None
    #: QEMU's pid: its root directory and working directory name its files.
    pid: int = -1
    #: How to stop the guest when QEMU opens a file someone else holds.
    guest: GuestControl | None = None
    #: Files never released or weakened, whatever QEMU does with them.
    pinned: dict[tuple[int, int], Mode] | None = None
    #: Files that could not be claimed, so that each is reported once.
    refused: set[tuple[int, int]] = field(default_factory=set)
    skipped: set[str] = field(default_factory=set)
    #: Descriptors of files claimed here, to hand to QEMU: (fd, name).
    to_pass: list[tuple[int, str]] = field(default_factory=list)
    #: Names of descriptors QEMU keeps for files since closed.
    to_close: list[str] = field(default_factory=list)
    #: The names QEMU keeps our descriptors under, by file.
    passed: dict[tuple[int, int], str] = field(default_factory=dict)

    def following(self, session: ClaimSession, pid: int, guest: GuestControl) -> "GraphFollower":
        """This follower, what it has done so far kept, for *session* and QEMU's *pid*."""
        return replace(self, session=session, pid=pid, guest=guest)

    @property
    def _session(self) -> ClaimSession:
        assert self.session is not None, "following(): not bound to a running QEMU"
        return self.session

    async def follow(self, monitor: Monitor) -> None:
        """Reconcile now, then on every graph event and every :attr:`interval` seconds.

        Returns when QEMU closes its monitor.
        """
        listener = monitor.listen(self.events)
        reader = GraphReader()
        try:
            while True:
                try:
                    before = await monitor.query_status()
                    files = await reader.read(monitor)
                    after = await monitor.query_status()
                except MonitorClosed:
                    return
                # Around a migration QEMU's images are inactive, with no
                # permissions: that graph says nothing of what the VM uses.
                if files is not None and not {before.status, after.status} & INACTIVE_RUNSTATES:
                    await call_hook(lambda files=files: self.apply(files))  # type: ignore[misc]
                    await self._hand_over(monitor)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(listener.get(), self.interval)
                    listener.clear()  # one reading covers every event so far
        finally:
            monitor.unlisten(listener)

    async def _hand_over(self, monitor: Monitor) -> None:
        """Give QEMU the descriptors of files claimed here, and close those of files dropped.

        So that the claim on a file QEMU opened while running belongs to
        QEMU's descriptors, as the claims taken at start do: it lives on if
        the wrapper dies, and ``imglock status`` names QEMU.
        """
        # No lock is taken here: this runs on the monitor's event loop, which
        # a runner holding the claim lock may need (to stop the guest), and
        # only follow() itself, between two apply() calls, touches these.
        to_pass, self.to_pass = self.to_pass, []
        to_close, self.to_close = self.to_close, []
        for name in to_close:
            with contextlib.suppress(CommandFailed):  # not there (never passed): nothing to close
                await monitor.close_fd(name)
        for fd, name in to_pass:
            if name in self.passed.values():  # still claimed: not dropped since
                await monitor.pass_fd(fd, name)

    def _path(self, filename: str) -> str | None:
        """*filename* as this process can open it: relative names are QEMU's.

        None when QEMU runs in another root directory (chrooted by other
        means than its command line): its names are not this host's.
        """
        proc = f"/proc/{self.pid}"
        with contextlib.suppress(OSError):
            if os.readlink(f"{proc}/root") != "/":
                return None
        if os.path.isabs(filename):
            return filename
        try:
            return os.path.join(os.readlink(f"{proc}/cwd"), filename)
        except OSError:
            return filename

    def apply(self, files: Iterable[OpenFile]) -> None:
        """Claim, change and release files so that the claim matches *files*."""
        # Looked at before the claim is locked: a stat on a hung NFS mount
        # must not keep the runner from checking its locks meanwhile.
        seen: dict[tuple[int, int], tuple[str, Mode]] = {}
        #: The files QEMU has open, read from /proc once a path needs it.
        qemu_files: list[set[tuple[int, int]]] = []
        #: Files QEMU has open that cannot be looked at now (a shared
        #: filesystem gone away): whatever is claimed of them is kept.
        unseen: set[str] = set()
        for file in files:
            path = self._path(file.filename)
            if path is None:
                unseen.add(file.filename)
                self._skip(file.filename, "QEMU runs in another root directory")
                continue
            try:
                st = os.stat(path)
            except OSError as exc:
                unseen.update((file.filename, path))
                if not self._claimed(path):
                    self._skip(path, os.strerror(exc.errno or 0))
                continue
            key = self._file_qemu_has(path, st, qemu_files)
            if key is None:
                # The path leads elsewhere now (the image was replaced): what
                # QEMU has open is not there.  The lock check reports it.
                unseen.update((file.filename, path))
                continue
            mode = strongest(seen[key][1], file.mode) if key in seen else file.mode
            seen[key] = (path, mode)
        note = self._session.reporter.note
        with self._session.files() as claim:
            if claim is None:
                return  # a migration owns the claim now, or it is lost already
            if self.pinned is None:
                self.pinned = {}
                for member in claim.members if self.pin_start else ():
                    self.pinned[(member.image.st.st_dev, member.image.st.st_ino)] = member.mode
            wanted = {
                key: (path, strongest(self.pinned[key], mode) if key in self.pinned else mode)
                for key, (path, mode) in seen.items()
            }
            held = {(m.image.st.st_dev, m.image.st.st_ino): m for m in claim.members}
            # Claim and strengthen first, weaken and release after: a file
            # moving from one use to another is never unclaimed in between.
            for key, (path, mode) in wanted.items():
                current = held.get(key)
                try:
                    if current is None:
                        added = claim.add(path, mode)
                        name = f"imglock-{key[0]}:{key[1]}"
                        self.passed[key] = name
                        self.to_pass.append((added.image.lock_target[0], name))
                        note(f"QEMU opened {path}: claimed {mode.value}")
                    elif current.mode is not mode and strongest(current.mode, mode) is mode:
                        claim.change_mode(current, mode)
                        note(f"QEMU now uses {path} {mode.value}: claim changed")
                    else:
                        continue
                except LockConflict as exc:
                    self._refuse(key, exc)
                    continue
                except ImglockError as exc:
                    self._skip(path, exc.message)
                    continue
                self.refused.discard(key)
            for key, member in held.items():
                target = wanted.get(key)
                name = member.image.filename
                if target is None and key not in self.pinned:
                    if name in unseen or (self._path(name) or name) in unseen:
                        continue
                    passed = self.passed.pop(key, None)
                    if passed is not None:
                        self.to_close.append(passed)
                    try:
                        claim.drop(member)
                    except ImglockError as exc:
                        # The descriptor is closed all the same; QEMU has closed the file.
                        note(f"{exc} (while releasing a file QEMU closed)")
                        continue
                    note(f"QEMU closed {name}: claim released")
                elif target is not None and member.mode is not target[1]:
                    try:
                        # Weaker, or another kind of sharing (shared-write to shared).
                        claim.change_mode(member, target[1])
                    except LockConflict as exc:
                        self._refuse(key, exc)
                        continue
                    note(f"QEMU now uses {name} {target[1].value}: claim changed")

    def _claimed(self, path: str) -> bool:
        """Whether the claim holds a file by this path (which may not answer a stat now)."""
        return any(self._path(m.image.filename) == path for m in self._session.members())

    def _file_qemu_has(
        self, path: str, st: os.stat_result, qemu_files: list[set[tuple[int, int]]]
    ) -> tuple[int, int] | None:
        """The (st_dev, st_ino) of the file QEMU has open as *path* (*st*: the path's now).

        Usually the file at *path*, which the claim already knows.  A file
        the claim does not know yet is taken only if QEMU has it open: when
        the path now leads to another file (the image replaced under the
        VM), QEMU still writes the old one, which stays claimed; the new one
        is no one's here.  None when QEMU has nothing open under *path*.
        """
        key = self._known_file(path, st)
        if key in self._member_keys():
            return key
        if not qemu_files:
            qemu_files.append(open_file_keys(self.pid))
        if key in qemu_files[0]:
            return key
        for member in self._session.members():
            known = (member.image.st.st_dev, member.image.st.st_ino)
            if self._path(member.image.filename) == path and known in qemu_files[0]:
                return known
        return None

    def _member_keys(self) -> set[tuple[int, int]]:
        return {(m.image.st.st_dev, m.image.st.st_ino) for m in self._session.members()}

    def _known_file(self, path: str, st: os.stat_result) -> tuple[int, int]:
        """The (st_dev, st_ino) under which the claim knows the file at *path*.

        A filesystem mounted again at the same place (``umount -l``, then
        mount) gives its files a new st_dev: a file the claim holds under
        this very path with the same inode number is the same file, seen
        through the new mount, and must not be claimed a second time (the
        claim would meet itself as a rival).
        """
        key = (st.st_dev, st.st_ino)
        for member in self._session.members():
            known = (member.image.st.st_dev, member.image.st.st_ino)
            if known == key:
                return key
            if known[1] == st.st_ino and self._path(member.image.filename) == path:
                return known
        return key

    def _refuse(self, key: tuple[int, int], exc: LockConflict) -> None:
        if key in self.refused:
            return
        self.refused.add(key)
        guest = self.guest
        how = guest.pause(str(exc)) if guest is not None else "no way to pause it"
        self._session.reporter.error(
            f"{exc}; QEMU opened it while running: guest paused ({how}); "
            "it will not be resumed by imglock"
        )

    def _skip(self, path: str, why: str) -> None:
        if path not in self.skipped:
            self.skipped.add(path)
            self._session.reporter.note(f"QEMU opened {path}, which imglock cannot claim: {why}")
