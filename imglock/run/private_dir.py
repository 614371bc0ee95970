"""The private directory of a wrapped QEMU's monitor socket.

``imglock run`` gives QEMU a QMP monitor of its own, on a socket in a
directory that only its user can enter (mode 0700), in the temporary
directory.  The wrapper, or the watcher it hands a daemonized QEMU over
to, removes the directory when QEMU ends; one that was killed (SIGKILL,
the OOM killer) cannot.  So each wrapped QEMU's start first removes the
directories it can prove stale: named after a wrapper process that is
gone, holding nothing but a socket on which no QEMU listens any more.
Anything else is left alone.

A directory's name holds the wrapper's pid and its PID namespace: hosts
or containers that share a temporary directory but not their pids (each
its own PID namespace) never judge each other's directories, since a pid
means nothing outside its namespace.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import stat
import tempfile
from typing import Final

PREFIX: Final = "imglock-"
SOCKET_NAME: Final = "qmp.sock"
#: ``imglock-PIDNS-PID-RANDOM``: the PID namespace (its inode) and the pid
#: of the wrapper that made it.  Linux pids have at most 7 digits; anyone
#: may make a longer name in /tmp.
_NAME: Final = re.compile(r"imglock-(\d{1,20})-([1-9]\d{0,6})-[A-Za-z0-9_]+\Z")
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def make() -> str:
    """A new private directory (mode 0700) named after this process."""
    return tempfile.mkdtemp(prefix=f"{PREFIX}{_pid_namespace()}-{os.getpid()}-")


def _pid_namespace() -> int:
    """This process's PID namespace (0 where /proc does not say: such names are never swept)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def sweep(parent: str | None = None) -> list[str]:
    """Remove the stale private directories of killed wrappers in *parent*; their names.

    Never fails: a directory that cannot be looked at is left as it is.
    """
    parent = parent or tempfile.gettempdir()
    removed: list[str] = []
    namespace = str(_pid_namespace())
    if namespace == "0":
        return removed
    try:
        parent_fd = os.open(parent, _DIR_FLAGS)
    except OSError:
        return removed
    try:
        for name in os.listdir(parent_fd):
            match = _NAME.match(name)
            if (
                match
                and match[1] == namespace
                and not _alive(int(match[2]))
                and _remove_if_stale(parent, parent_fd, name)
            ):
                removed.append(os.path.join(parent, name))
    except OSError:
        pass
    finally:
        os.close(parent_fd)
    return removed


def _alive(pid: int) -> bool:
    """Whether process *pid* exists (a reused pid counts: the directory is then kept)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: it exists, as another user's
    return True


def _remove_if_stale(parent: str, parent_fd: int, name: str) -> bool:
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError:
        return False  # a symbolic link, a file, gone already: not ours to touch
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != 0o700:
            return False
        entries = os.listdir(fd)
        if entries not in ([], [SOCKET_NAME]):
            return False
        if entries:
            if not stat.S_ISSOCK(os.stat(SOCKET_NAME, dir_fd=fd, follow_symlinks=False).st_mode):
                return False
            if _listened_on(os.path.join(parent, name, SOCKET_NAME)):
                return False  # the daemonized QEMU of a killed watcher: still running
            os.unlink(SOCKET_NAME, dir_fd=fd)
        os.rmdir(name, dir_fd=parent_fd)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _listened_on(path: str) -> bool:
    """Whether a process listens on the unix socket at *path* (connecting never waits)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as sock:
        try:
            sock.connect(path)
        except OSError as exc:
            return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    return True
