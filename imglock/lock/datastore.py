"""What a datastore does to a lost lock: the settings that decide whether it is silent.

Sharing locks is not enough: a lock manager may also drop a holder's locks
and let the holder carry on as if it still had them.  A GlusterFS brick
restart erases every lock, and unless ``client.strict-locks`` is on the
clients reopen their descriptors without them; an NFSv4 client with
``recover_lost_locks`` re-takes locks it lost with its lease; a CephFS
client that reconnects after an eviction (kernel ``recover_session=clean``,
ceph-fuse ``client_reconnect_stale``) opens files again with none.  And
every such filesystem hands a silent host's locks to others after a time
of its own (GlusterFS ``network.ping-timeout``, the NFSv4 lease, the CephFS
session timeouts): a lock check that hangs must pause the guest before it.

Here, per filesystem, those settings are read where this host can read
them (mount options, the GlusterFS client's ``.meta`` tree, the gluster and
ceph command-line tools, /proc and /sys) and judged: safe, unsafe (with
the exact command that fixes it), or not read (with how to check it).
Reading and judging are apart, so that the judgement can be checked on any
values.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from imglock.lock import procfs
from imglock.lock.mounts import Mount

#: A GlusterFS FUSE client's view of its own translator graph (meta translator).
GLUSTER_META_GRAPH: Final = ".meta/graphs/active"
#: Client translators are named VOLUME-client-N.
GLUSTER_CLIENT_XLATOR: Final = re.compile(r"^(?P<volume>.+)-client-\d+$")
#: The NFS client's per-mount statistics (NFSv4 mounts show their lease there).
MOUNTSTATS: Final = "/proc/self/mountstats"
#: The NFS server's lease time, on the server itself.
NFSD_LEASE_TIME: Final = "/proc/fs/nfsd/nfsv4leasetime"
#: The NFS client module parameter (Linux 3.12 on).
RECOVER_LOST_LOCKS: Final = "/sys/module/nfs/parameters/recover_lost_locks"
#: ceph-fuse admin sockets, at the default run directory.
CEPH_ADMIN_SOCKETS: Final = "/var/run/ceph/*client*.asok"
#: How long a cluster's command-line tool may take to answer.
TOOL_TIMEOUT: Final = 10.0
#: Where root's tools live, in case PATH lacks them.
SBIN_PATH: Final = "/usr/local/sbin:/usr/sbin:/sbin"


@dataclass(frozen=True)
class Reading:
    """A setting's value as this host read it, or None and how to read it."""

    value: str | None
    #: Where the value came from; with no value, how an operator reads it.
    source: str


@dataclass(frozen=True)
class Setting:
    """One setting of a datastore that decides what a lost lock does, judged."""

    name: str
    value: str | None
    #: False: a lost lock may pass silently, or locks are not shared at all;
    #: None: not read, so not judged.
    safe: bool | None
    why: str
    #: The exact command that makes it safe (None unless it is unsafe).
    fix: str | None
    #: Where the value was read ("" when it was not).
    source: str
    #: How to read it, when this host could not (None when it could).
    check: str | None = None


@dataclass(frozen=True)
class Rule:
    """What a setting's values mean: the unsafe ones, and why either way."""

    name: str
    #: Values (lower case) that make a lost lock silent or keep locks local.
    unsafe: frozenset[str]
    bad: str
    good: str
    fix: str

    def judge(self, reading: Reading) -> Setting:
        if reading.value is None:
            return Setting(self.name, None, None, f"unsafe if {self.bad}", None, "", reading.source)
        if reading.value.lower() in self.unsafe:
            return Setting(self.name, reading.value, False, self.bad, self.fix, reading.source)
        return Setting(self.name, reading.value, True, self.good, None, reading.source)


@dataclass(frozen=True)
class Handover:
    """A time after which the server lets other hosts have a silent host's locks.

    Safe when it is longer than the lock-check deadline: a check that hangs
    then pauses the guest before the locks can go elsewhere.  *what* says
    what happens after N seconds.
    """

    name: str
    what: str
    #: The command that sets it, with {seconds} for the value.
    fix: str
    #: Its default, which a fix sets unless the deadline asks for more.
    default: int
    #: What 0 means, where it turns the timer off.
    zero: str | None = None

    def judge(self, reading: Reading, deadline: float) -> Setting:
        rule = f"the lock-check deadline ({deadline:g} s) must be shorter"
        if reading.value is None:
            return Setting(self.name, None, None, f"{self.what}; {rule}", None, "", reading.source)
        try:
            seconds = float(reading.value.split()[0])
        except (ValueError, IndexError):
            why = f"not a number of seconds; {self.what}; {rule}"
            return Setting(self.name, reading.value, None, why, None, reading.source)
        if seconds == 0 and self.zero is not None:
            return Setting(self.name, reading.value, True, self.zero, None, reading.source)
        what = self.what.replace("N s", f"{seconds:g} s")
        if seconds <= deadline:
            why = f"{what}: {rule}, so a hung check cannot pause the guest in time"
            shorter = f"a lock-check deadline under {seconds:g} s"
            if math.isinf(deadline):  # a check that may hang for ever: no timeout outlasts it
                fix = shorter
            else:
                enough = max(self.default, math.ceil(2 * deadline))
                fix = f"{self.fix.format(seconds=enough)} (or {shorter})"
            return Setting(self.name, reading.value, False, why, fix, reading.source)
        return Setting(self.name, reading.value, True, f"{what}; {rule}, and is", None,
                       reading.source)  # fmt: skip


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _mount_flag(mount: Mount, name: str) -> Reading:
    return Reading("set" if mount.option(name) is not None else "unset", "mount options")


def _remount(mount: Mount, option: str) -> str:
    point = shlex.quote(mount.mount_point)
    source = shlex.quote(mount.source)
    return f"umount {point} && mount -t {mount.fstype} -o {option} {source} {point}"


# -- GlusterFS -------------------------------------------------------------


def gluster_rules(volume: str) -> tuple[Rule, Handover]:
    volume = shlex.quote(volume)
    return (
        Rule(
            "client.strict-locks", frozenset({"off"}),
            bad="off: a brick restart erases every lock and the clients reopen their "
            "descriptors without them; a lock check that re-takes them succeeds, and "
            "another host may already have written",
            good="a client whose brick restarted refuses to reopen descriptors that held "
            "locks: a lost lock is an error (EBADFD), never a silent re-take",
            fix=f"gluster volume set {volume} client.strict-locks on",
        ),
        Handover(
            "network.ping-timeout",
            "after N s without an answer from a hung brick the client disconnects and "
            "the brick drops its locks",
            fix=f"gluster volume set {volume} network.ping-timeout {{seconds}}",
            default=42,
            zero="0: the client never gives up on a hung brick, which keeps its locks "
            "(every call through the mount hangs meanwhile)",
        ),
    )  # fmt: skip


def gluster_settings(
    volume: str, strict_locks: Reading, ping_timeout: Reading, deadline: float
) -> list[Setting]:
    """GlusterFS: ``client.strict-locks`` and ``network.ping-timeout`` of *volume*."""
    strict, ping = gluster_rules(volume)
    return [strict.judge(strict_locks), ping.judge(ping_timeout, deadline)]


@dataclass(frozen=True)
class GlusterMeta:
    """What a GlusterFS FUSE client shows of its client translators in .meta."""

    volume: str
    #: The first client translator's directory (one per brick; all alike).
    xlator: str
    #: client.strict-locks of each, as the mount's graph was built.
    strict_locks: tuple[str, ...]
    #: The live ping timeout (the options file keeps the one the graph was built with).
    ping_timeout: str | None


def read_gluster_meta(mount_point: str) -> GlusterMeta | None:
    """The client translators of a GlusterFS mount, from its virtual .meta tree."""
    graph = os.path.join(mount_point, GLUSTER_META_GRAPH)
    try:
        xlators = [name for name in sorted(os.listdir(graph)) if GLUSTER_CLIENT_XLATOR.match(name)]
    except OSError:
        return None
    strict: list[str] = []
    ping = None
    for xlator in xlators:
        strict_file = _read(os.path.join(graph, xlator, "options", "strict-locks"))
        if strict_file is not None:
            strict.append(strict_file)
        for line in (_read(os.path.join(graph, xlator, "private")) or "").splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "ping_timeout":
                ping = value.strip()
    if not xlators:
        return None
    match = GLUSTER_CLIENT_XLATOR.match(xlators[0])
    assert match is not None
    return GlusterMeta(match["volume"], os.path.join(graph, xlators[0]), tuple(strict), ping)


def _tool(argv: Sequence[str]) -> str | None:
    """The output of a cluster's tool, or None if it is missing, fails or hangs."""
    path = shutil.which(argv[0], path=os.pathsep.join([os.environ.get("PATH", ""), SBIN_PATH]))
    if path is None:
        return None
    try:
        proc = subprocess.run(
            [path, *argv[1:]], capture_output=True, text=True, timeout=TOOL_TIMEOUT,
            stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _gluster_get(volume: str, option: str) -> str | None:
    out = _tool(["gluster", "--mode=script", "volume", "get", volume, option])
    for line in (out or "").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == option:
            return fields[1]
    return None


def read_gluster(mount: Mount, deadline: float) -> list[Setting]:
    meta = read_gluster_meta(mount.mount_point)
    volume = meta.volume if meta else mount.source.partition(":")[2].strip("/") or mount.source
    get = f"gluster volume get {shlex.quote(volume)}"
    # The volume's setting, when this host's gluster tool can tell it,
    # decides: mounted clients apply a `volume set` at once, but their .meta
    # options keep the value they were mounted with.
    configured = _gluster_get(volume, "client.strict-locks")
    # Several bricks, several client translators: an unsafe one decides.
    built = None
    if meta is not None and meta.strict_locks:
        built = "off" if "off" in meta.strict_locks else meta.strict_locks[0]
    if configured is not None:
        note = (
            f" (this mount's graph was built with {built})"
            if built not in (None, configured)
            else ""
        )
        strict = Reading(configured, f"{get} client.strict-locks{note}")
    elif meta is not None and built is not None:
        strict = Reading(
            built,
            f"{meta.xlator}/options/strict-locks, as the mount was made (a later volume set "
            f"applies without showing there: `{get} client.strict-locks` on a server tells)",
        )
    else:
        strict = Reading(None, f"run `{get} client.strict-locks` on a server of the volume")
    if meta is not None and meta.ping_timeout is not None:
        ping = Reading(meta.ping_timeout, f"{meta.xlator}/private")
    else:
        value = _gluster_get(volume, "network.ping-timeout")
        how = f"{get} network.ping-timeout"
        ping = Reading(value, how if value else f"run `{how}` on a server of the volume")
    return gluster_settings(volume, strict, ping, deadline)


# -- NFS ---------------------------------------------------------------------

LOCAL_LOCKS: Final = "locks stay on this host: other hosts never see them"


def nfs_settings(
    mount: Mount, lease_time: Reading, recover_lost_locks: Reading, deadline: float
) -> list[Setting]:
    """NFS: lock sharing options; for NFSv4 the lease time and ``recover_lost_locks``."""
    settings = [
        Rule(
            "nolock", frozenset({"set"}), bad=f"set: {LOCAL_LOCKS}",
            good="locks go to the lock manager", fix=_remount(mount, "lock"),
        ).judge(_mount_flag(mount, "nolock")),
        Rule(
            "local_lock", frozenset({"posix", "all"}), bad=f"posix or all: {LOCAL_LOCKS}",
            good="fcntl locks go to the server", fix=_remount(mount, "local_lock=none"),
        ).judge(Reading(mount.option("local_lock") or "none", "mount options")),
    ]  # fmt: skip
    if mount.fstype != "nfs4":
        return settings
    lease = Handover(
        "lease_time",
        "a client that stops renewing its lease (a dead, hung or cut-off host) keeps its "
        "locks N s; then the server gives them to others",
        fix="on the server: lease-time={seconds} under [nfsd] in /etc/nfs.conf, then restart nfsd",
        default=90,
    )
    recover = Rule(
        "recover_lost_locks", frozenset({"y", "1"}),
        bad="Y: a client whose lease expired re-takes the locks it lost as if nothing "
        "happened; another host may have held them meanwhile",
        good="locks lost with an expired lease stay lost: the holder's calls fail (EIO)",
        fix=f"echo N > {RECOVER_LOST_LOCKS}"
        " (and `options nfs recover_lost_locks=N` in /etc/modprobe.d/ to keep it)",
    )  # fmt: skip
    return [*settings, lease.judge(lease_time, deadline), recover.judge(recover_lost_locks)]


def parse_lease_time(mountstats: str, mount_point: str) -> str | None:
    """The lease time the NFSv4 client of *mount_point* was given, from mountstats."""
    escaped = mount_point.replace("\\", "\\134").replace(" ", "\\040")
    current = None
    for line in mountstats.splitlines():
        fields = line.split()
        if fields[:1] == ["device"]:
            current = fields[4] if len(fields) > 4 and fields[3] == "on" else None
        elif current == escaped and fields[:1] == ["nfsv4:"]:
            for item in " ".join(fields[1:]).split(","):
                key, _, value = item.partition("=")
                if key.strip() == "lease_time":
                    return value.strip()
    return None


def read_nfs(mount: Mount, deadline: float) -> list[Setting]:
    lease = parse_lease_time(_read(MOUNTSTATS) or "", mount.mount_point)
    lease_time = (
        Reading(lease, MOUNTSTATS) if lease else Reading(
            None,
            f"`grep lease_time {MOUNTSTATS}` on a client, or `cat {NFSD_LEASE_TIME}` on the server",
        )
    )  # fmt: skip
    recover = _read(RECOVER_LOST_LOCKS)
    recover_lost_locks = (
        Reading(recover, RECOVER_LOST_LOCKS) if recover else Reading(
            None, f"`cat {RECOVER_LOST_LOCKS}` once the nfs module is loaded"
        )
    )  # fmt: skip
    return nfs_settings(mount, lease_time, recover_lost_locks, deadline)


# -- CephFS ------------------------------------------------------------------

#: What reconnecting after an eviction does to a holder (kernel client, ceph-fuse).
KERNEL_RECONNECT: Final = (
    "clean: an evicted client reconnects by itself without its locks; once the stale ones "
    "are released, a re-take succeeds and writes go through again"
)
FUSE_RECONNECT: Final = (
    "true: an evicted client reconnects by itself without its locks; its old descriptors "
    "fail, but newly opened ones write again"
)
#: What staying evicted does.
STAYS_EVICTED: Final = "an evicted client stays cut off (EIO) until it is remounted"


def ceph_settings(
    mount: Mount,
    reconnect_stale: Reading,
    session_timeout: Reading,
    session_autoclose: Reading,
    deadline: float,
    fs_name: str | None = None,
) -> list[Setting]:
    """CephFS: how a client comes back after an eviction, and the MDS session timeouts."""
    if mount.fstype == "ceph":
        recover = Rule(
            "recover_session",
            frozenset({"clean"}),
            bad=KERNEL_RECONNECT,
            good=STAYS_EVICTED,
            fix=_remount(mount, "recover_session=no"),
        ).judge(Reading(mount.option("recover_session") or "no", "mount options"))
    else:
        recover = Rule(
            "client_reconnect_stale",
            frozenset({"true", "1", "yes"}),
            bad=FUSE_RECONNECT,
            good=STAYS_EVICTED,
            fix="ceph config set client client_reconnect_stale false, then remount",
        ).judge(reconnect_stale)
    fs = shlex.quote(fs_name or _ceph_fs_name(mount) or "FSNAME")
    timeout = Handover(
        "session_timeout",
        "after N s without a word from a client the MDS marks its session stale",
        fix=f"ceph fs set {fs} session_timeout {{seconds}}",
        default=60,
    )
    autoclose = Handover(
        "session_autoclose",
        "a dead or hung client's locks stay held N s; then the MDS closes its session "
        "and gives them to others (to free a dead host's images sooner, once it is "
        f"known dead: `ceph tell mds.{fs}:0 client evict id=SESSION`, "
        f"the session from `ceph tell mds.{fs}:0 client ls`)",
        fix=f"ceph fs set {fs} session_autoclose {{seconds}}",
        default=300,
    )
    return [
        recover, timeout.judge(session_timeout, deadline),
        autoclose.judge(session_autoclose, deadline),
    ]  # fmt: skip


def _ceph_fs_name(mount: Mount) -> str | None:
    """The file system's name, from the mount options or the new-style source."""
    for option in ("fs", "mds_namespace", "client_fs"):
        if mount.option(option):
            return mount.option(option)
    # user@fsid.fsname=/path
    head = mount.source.partition("=")[0]
    if "@" in head and "." in head:
        return head.rpartition(".")[2]
    return None


@dataclass(frozen=True)
class CephClient:
    """The ``ceph-fuse`` process that serves a mount: where to ask it, and its cluster."""

    #: Its admin socket (a unix socket it listens on), if one was found.
    admin_socket: str | None
    #: ``-c``/``--conf`` of its command line, for the ``ceph`` tool; None: the default.
    conf: str | None
    #: ``--client_fs``/``--client_mds_namespace`` of its command line.
    fs: str | None


def _option_value(argv: Sequence[str], names: Sequence[str]) -> str | None:
    """The value of the first of *names* in *argv* (``--opt VALUE`` or ``--opt=VALUE``)."""
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(f"{name}="):
                return arg[len(name) + 1 :]
    return None


def _listening_sockets(pid: int) -> list[str]:
    """Paths of the unix sockets process *pid* has open (from /proc/net/unix)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    paths = []
    for line in (_read("/proc/net/unix") or "").splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes:
            paths.append(fields[7])
    return paths


def ceph_fuse_client(mount_point: str) -> CephClient | None:
    """The ``ceph-fuse`` process serving *mount_point*, as this host sees it."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        argv = procfs.argv(int(entry.name))
        if not argv or os.path.basename(argv[0]) != "ceph-fuse" or mount_point not in argv:
            continue
        sockets = [s for s in _listening_sockets(int(entry.name)) if s.endswith(".asok")]
        return CephClient(
            sockets[0] if sockets else None,
            _option_value(argv, ("-c", "--conf")),
            _option_value(argv, ("--client_fs", "--client-fs", "--client_mds_namespace")),
        )
    return None


def read_ceph(mount: Mount, deadline: float) -> list[Setting]:
    client = ceph_fuse_client(mount.mount_point) if mount.fstype != "ceph" else None
    conf = ["--conf", client.conf] if client is not None and client.conf else []
    fs = _ceph_fs_name(mount) or (client.fs if client is not None else None)
    how_fs = f"`ceph fs get {fs or 'FSNAME'}`"
    mdsmap: dict[str, object] = {}
    if fs is not None:
        out = _tool(["ceph", *conf, "--connect-timeout", "5", "fs", "get", fs, "--format=json"])
        try:
            mdsmap = json.loads(out or "{}").get("mdsmap", {})
        except (ValueError, AttributeError):
            mdsmap = {}

    def session(name: str) -> Reading:
        if name in mdsmap:
            return Reading(str(mdsmap[name]), f"ceph fs get {fs}")
        return Reading(None, f"{how_fs} shows {name}")

    reconnect = Reading(
        None, "`ceph daemon client.NAME config get client_reconnect_stale` on this host"
    )
    if mount.fstype != "ceph":
        socket = client.admin_socket if client is not None else None
        if socket is None:
            found = glob.glob(CEPH_ADMIN_SOCKETS)
            socket = found[0] if len(found) == 1 else None
        if socket is not None:
            out = _tool(["ceph", "--admin-daemon", socket, "config", "get",
                         "client_reconnect_stale"])  # fmt: skip
            try:
                value = json.loads(out or "{}").get("client_reconnect_stale")
            except (ValueError, AttributeError):
                value = None
            if value is not None:
                reconnect = Reading(str(value), socket)
    return ceph_settings(
        mount, reconnect, session("session_timeout"), session("session_autoclose"), deadline, fs
    )


# -- every filesystem ----------------------------------------------------------


def cluster_settings(mount: Mount) -> list[Setting]:
    """GFS2 and OCFS2: ``localflocks`` keeps every lock on this host."""
    return [
        Rule(
            "localflocks", frozenset({"set"}), bad=f"set: {LOCAL_LOCKS}",
            good="locks go through the cluster's DLM", fix=_remount(mount, "defaults"),
        ).judge(_mount_flag(mount, "localflocks"))
    ]  # fmt: skip


def settings(mount: Mount, deadline: float) -> list[Setting]:
    """The settings of *mount*'s filesystem that decide whether a lost lock is silent."""
    if mount.fstype == "fuse.glusterfs":
        return read_gluster(mount, deadline)
    if mount.fstype in ("nfs", "nfs4"):
        return read_nfs(mount, deadline)
    if mount.fstype in ("ceph", "fuse.ceph-fuse"):
        return read_ceph(mount, deadline)
    if mount.fstype in ("gfs2", "ocfs2"):
        return cluster_settings(mount)
    return []
