"""Holder records: what a lock offset cannot carry (host name, command, since).

A record is a small JSON file in a ``.imglock`` directory beside the image
(or in the lockspace), one per holder, named after the image and the
holder's owner id.  The lock is the truth: a record whose lock is gone is
stale, shown as such and never obeyed, so a crash that leaves a record
behind blocks nothing.

Records are written defensively, because the directory may be writable by
others: the directory is opened without following symlinks and must belong
to this user or root (or carry the sticky bit); the file is created under a
random name with O_EXCL|O_NOFOLLOW and renamed over the final name, so a
pre-created file or symlink is replaced, never written through.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Final

from imglock.identity import Owner, hostname

RECORD_DIR: Final = ".imglock"
RECORD_SUFFIX: Final = ".json"
#: Records larger than this are not records.
RECORD_MAX_BYTES: Final = 64 * 1024
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Keys of QEMU options whose values are secrets, never written to a record.
_SECRET_KEYS: Final = ("data=", "password=", "password-secret=", "key-secret=")
#: Test seam (imglock.faults): make every record write fail with this errno.
_fail_writes_with: int | None = None


@dataclass(frozen=True, slots=True)
class Record:
    """One holder's details, as written beside the image."""

    image: str
    owner: int
    mode: str
    host: str
    pid: int
    user: str
    command: str
    since: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def record_name(image_name: str, owner: Owner) -> str:
    """The record's file name: the image's own name and the owner id in hex."""
    return f"{image_name}.{owner.id:014x}{RECORD_SUFFIX}"


def redact(argv: list[str]) -> str:
    """The command line as one string, secret values replaced by '***'."""
    out = []
    for arg in argv:
        parts = arg.split(",")
        for i, part in enumerate(parts):
            for key in _SECRET_KEYS:
                if part.startswith(key):
                    parts[i] = key + "***"
        out.append(",".join(parts))
    return " ".join(out)


def now_iso() -> str:
    """The current time as ISO 8601 UTC with seconds, like '2026-11-26T10:00:00Z'."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def make_record(image: str, owner: Owner, mode: str, argv: list[str] | None = None) -> Record:
    import pwd

    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    return Record(
        image=image,
        owner=owner.id,
        mode=mode,
        host=hostname(),
        pid=owner.pid,
        user=user,
        command=redact(list(argv if argv is not None else sys.argv)),
        since=now_iso(),
    )


def _trusted_dir(fd: int) -> bool:
    """A directory we may write into: ours or root's, or sticky like /tmp."""
    st = os.fstat(fd)
    if st.st_uid in (os.geteuid(), 0) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return True
    return bool(st.st_mode & stat.S_ISVTX)


@contextlib.contextmanager
def _record_dir(directory: str, create: bool) -> Iterator[int | None]:
    """Open ``directory/.imglock`` without following symlinks; None if unusable."""
    try:
        parent = os.open(directory, _DIR_FLAGS & ~os.O_NOFOLLOW)
    except OSError:
        yield None
        return
    try:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(RECORD_DIR, 0o755, dir_fd=parent)
        try:
            fd = os.open(RECORD_DIR, _DIR_FLAGS, dir_fd=parent)
        except OSError:
            yield None
            return
        try:
            yield fd
        finally:
            os.close(fd)
    finally:
        os.close(parent)


def write(directory: str, image_name: str, record: Record) -> str | None:
    """Write *record*; return the reason it was not written, or None on success.

    A record is a courtesy: a full disk, a read-only filesystem or an
    untrusted directory means the claim goes on without one.
    """
    name = record_name(image_name, Owner.from_id(record.owner))
    data = json.dumps(record.to_json(), sort_keys=True).encode()
    try:
        with _record_dir(directory, create=True) as dfd:
            if dfd is None:
                return f"cannot open {directory}/{RECORD_DIR}"
            if not _trusted_dir(dfd):
                return f"{directory}/{RECORD_DIR} is writable by others; no record written"
            tmp = f".{name}.{secrets.token_hex(6)}"
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
                dir_fd=dfd,
            )
            try:
                try:
                    if _fail_writes_with is not None:
                        raise OSError(_fail_writes_with, os.strerror(_fail_writes_with))
                    os.write(fd, data)
                finally:
                    os.close(fd)
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
    except OSError as exc:
        return f"no record written: {os.strerror(exc.errno or errno.EIO)}"
    return None


def remove(directory: str, image_name: str, owner: Owner) -> None:
    """Remove this holder's record, if it is there."""
    with _record_dir(directory, create=False) as dfd:
        if dfd is not None:
            with contextlib.suppress(OSError):
                os.unlink(record_name(image_name, owner), dir_fd=dfd)


def _read_one(dfd: int, name: str) -> Record | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > RECORD_MAX_BYTES:
            return None
        raw = os.read(fd, RECORD_MAX_BYTES)
    finally:
        os.close(fd)
    try:
        data = json.loads(raw)
        return Record(
            image=str(data["image"]),
            owner=int(data["owner"]),
            mode=str(data["mode"]),
            host=str(data["host"]),
            pid=int(data["pid"]),
            user=str(data["user"]),
            command=str(data["command"]),
            since=str(data["since"]),
        )
    except (ValueError, KeyError, TypeError):
        return None


def read_all(directory: str, image_name: str) -> list[Record]:
    """Every well-formed record of *image_name* in *directory*; bad ones are skipped."""
    prefix = image_name + "."
    found: list[Record] = []
    with _record_dir(directory, create=False) as dfd:
        if dfd is None:
            return found
        try:
            names = os.listdir(dfd)
        except OSError:
            return found
        for name in names:
            rest = name[len(prefix) :]
            if not (name.startswith(prefix) and rest.endswith(RECORD_SUFFIX)):
                continue
            if len(rest) != 14 + len(RECORD_SUFFIX):
                continue
            record = _read_one(dfd, name)
            if record is not None:
                found.append(record)
    return found
