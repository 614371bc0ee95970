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
pre-created file or symlink is replaced, never written through.  A record
takes the group and mode that follow from the image's
(:mod:`imglock.lock.ownership`): whoever may not open the image may not
read it; and a record whose owner or mode would let in anyone the image
keeps out is not believed, since it may say anything.
"""

import contextlib
import errno
import os
import pwd
import re
import stat
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Final, NamedTuple

try:  # json's own escaping function, without loading the json package
    from _json import encode_basestring_ascii as quote
except ImportError:  # pragma: no cover - a Python built without _json
    from json.encoder import py_encode_basestring_ascii as quote

from imglock import faults
from imglock.lock import ownership
from imglock.lock.identity import Owner, hostname

RECORD_DIR: Final = ".imglock"
RECORD_SUFFIX: Final = ".json"
#: Records larger than this are not records.
RECORD_MAX_BYTES: Final = 64 * 1024
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Keys of QEMU options whose values are secrets, never written to a record.
_SECRET_KEYS: Final = ("data=", "password=", "password-secret=", "key-secret=")
#: The same keys in QEMU's JSON syntax, with their string values.
_JSON_SECRET: Final = r'("(?:data|password|password-secret|key-secret)"\s*:\s*)"(?:[^"\\]|\\.)*"'
#: A password in a URL's user info: scheme://user:PASSWORD@host.
_URL_PASSWORD: Final = r"(://[^/@:\s]*:)[^/@\s]*@"
#: The key in rbd's filename syntax: rbd:pool/image:id=admin:key=KEY:mon_host=...
_RBD_KEY: Final = r"(:key=)(?:\\.|[^:\\,])*"


class Record(NamedTuple):
    """One holder's details, as written beside the image."""

    image: str
    owner: int
    mode: str
    host: str
    pid: int
    user: str
    command: str
    since: str
    #: The inode number of the file that carries the claim's locks (the
    #: image, or its lock file in a lockspace): a record whose inode is not
    #: that file's now was written for a file since replaced or removed.
    inode: int | None = None

    def to_json(self) -> dict[str, Any]:
        return self._asdict()


def record_name(image_name: str, owner: Owner) -> str:
    """The record's file name: the image's own name and the owner id in hex."""
    return f"{image_name}.{owner.id:014x}{RECORD_SUFFIX}"


def redact(argv: list[str]) -> str:
    """The command line as one string, secret values replaced by '***'.

    Covers QEMU's option syntax (``,,`` is a comma inside a value), its JSON
    syntax (``-object '{"qom-type":"secret","data":...}'``, ``json:{...}``),
    passwords in URLs (``https://user:PASSWORD@host``) and rbd's ``:key=``.
    """
    out = []
    for arg in argv:
        parts = _option_parts(arg)
        for i, part in enumerate(parts):
            for key in _SECRET_KEYS:
                if part.startswith(key):
                    parts[i] = key + "***"
        text = ",".join(parts)
        # Each pattern is compiled on first use; most command lines need none.
        if '"' in text:
            text = re.sub(_JSON_SECRET, r'\1"***"', text)
        if "://" in text:
            text = re.sub(_URL_PASSWORD, r"\1***@", text)
        if "rbd:" in text:
            text = re.sub(_RBD_KEY, r"\1***", text)
        out.append(text)
    return " ".join(out)


def _option_parts(arg: str) -> list[str]:
    """*arg* cut at the commas that separate QEMU options, each part as written."""
    parts: list[str] = []
    start = i = 0
    while i < len(arg):
        if arg[i] != ",":
            i += 1
            continue
        run = i
        while i < len(arg) and arg[i] == ",":
            i += 1
        if (i - run) % 2:  # ",," is a comma in a value; an odd run ends the option
            parts.append(arg[start : i - 1])
            start = i
    parts.append(arg[start:])
    return parts


def now_iso() -> str:
    """The current time as ISO 8601 UTC with seconds, like '2026-11-26T10:00:00Z'."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def make_record(
    image: str, owner: Owner, mode: str, argv: list[str] | None = None, inode: int | None = None
) -> Record:
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
        inode=inode,
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
        # O_PATH: a directory its writer may search but not list (0711, as
        # Debian's /var/lib/libvirt/images for libvirt-qemu) still holds its
        # .imglock; the descriptor serves only to reach that by name.
        parent = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
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


def write(directory: str, image_name: str, record: Record, *, create: bool = True) -> str | None:
    """Write *record*; return the reason it was not written, or None on success.

    A record is a courtesy: a full disk, a read-only filesystem or an
    untrusted directory means the claim goes on without one.  Without
    *create*, the record directory is used only if it already exists.
    """
    name = record_name(image_name, Owner.from_id(record.owner))
    data = _json_text(record).encode()
    try:
        image = os.stat(os.path.join(directory, image_name))  # or its lock file
        with _record_dir(directory, create=create) as dfd:
            if dfd is None:
                if create:
                    return f"cannot open {directory}/{RECORD_DIR}"
                return f"no {directory}/{RECORD_DIR} to write into"
            if not _trusted_dir(dfd):
                return f"{directory}/{RECORD_DIR} is writable by others; no record written"
            tmp = f".{name}.{os.urandom(6).hex()}"
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dfd,
            )
            try:
                try:
                    failure = faults.record_failure()
                    if failure is not None:
                        raise failure
                    ownership.adopt(fd, image, owner=False)
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


def _json_text(record: Record) -> str:
    """*record* exactly as ``json.dumps(record.to_json(), sort_keys=True)`` writes it.

    A record holds only strings and integers, so it is written here rather
    than by the json package, whose import would cost every ``imglock run``
    more than writing the record does.  Strings are quoted by json's own
    escaping function.
    """
    members = (
        f"{quote(key)}: {_json_value(value, quote)}"
        for key, value in sorted(record.to_json().items())
    )
    return "{" + ", ".join(members) + "}"


def _json_value(value: str | int | None, quote: Callable[[str], str]) -> str:
    if value is None:
        return "null"
    return quote(value) if isinstance(value, str) else str(int(value))


def remove(directory: str, image_name: str, owner: Owner) -> None:
    """Remove this holder's record, if it is there."""
    with _record_dir(directory, create=False) as dfd:
        if dfd is not None:
            with contextlib.suppress(OSError):
                os.unlink(record_name(image_name, owner), dir_fd=dfd)


def _read_one(dfd: int, name: str, image: os.stat_result) -> Record | None:
    # Deliberately lazy: the json package costs more than most commands, and
    # only an image with records (a held one, or a stale record) needs it.
    import json

    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > RECORD_MAX_BYTES:
            return None
        if ownership.excess(st, image) is not None:
            return None  # written or loosened by someone the image keeps out
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
            inode=int(data["inode"]) if data.get("inode") is not None else None,
        )
    except (ValueError, KeyError, TypeError):
        return None


#: A record's name past its image's name: ".", the owner id in hex, ".json".
_NAME_TAIL: Final = 1 + 14 + len(RECORD_SUFFIX)


class RecordDirs:
    """Which images have records, each directory listed once: for surveys of many images.

    Without it every image costs a listing of its record directory, and a
    datastore of N images with M records costs N listings of M names.
    """

    def __init__(self) -> None:
        self._images: dict[str, frozenset[str]] = {}
        self._by_path: dict[str, dict[str, list[tuple[str, Record]]]] = {}

    def has_records(self, directory: str, image_name: str) -> bool:
        images = self._images.get(directory)
        if images is None:
            images = self._images[directory] = _images_with_records(directory)
        return image_name in images

    def naming(self, directory: str, path: str) -> list[tuple[str, Record]]:
        """The records in *directory* written for a file claimed as *path*,
        each with the name of the file it speaks for.

        A lockspace names its lock files after the file's identity, not its
        path: the records of a file since replaced at *path* are found only
        by the path they name.  Every record of the directory is read, once.
        """
        by_path = self._by_path.get(directory)
        if by_path is None:
            by_path = self._by_path[directory] = _records_by_path(directory)
        return by_path.get(os.path.abspath(path), [])


def _record_files(dfd: int | None) -> list[tuple[str, str]]:
    """(record's name, name of the file it speaks for) of every record in the
    records directory open as *dfd*; none if it cannot be listed."""
    try:
        names = os.listdir(dfd) if dfd is not None else []
    except OSError:
        return []
    return [
        (name, name[:-_NAME_TAIL])
        for name in names
        if len(name) > _NAME_TAIL and name.endswith(RECORD_SUFFIX)
    ]


def _images_with_records(directory: str) -> frozenset[str]:
    with _record_dir(directory, create=False) as dfd:
        return frozenset(file_name for _, file_name in _record_files(dfd))


def _records_by_path(directory: str) -> dict[str, list[tuple[str, Record]]]:
    """Every well-formed record in *directory*, by the absolute path it names."""
    found: dict[str, list[tuple[str, Record]]] = {}
    with _record_dir(directory, create=False) as dfd:
        for name, file_name in _record_files(dfd):
            try:
                spoken_for = os.stat(os.path.join(directory, file_name))
            except OSError:
                continue  # nothing to judge the record by: believe it not
            assert dfd is not None  # a record was listed through it
            record = _read_one(dfd, name, spoken_for)
            if record is not None:
                found.setdefault(os.path.abspath(record.image), []).append((file_name, record))
    return found


def read_all(directory: str, image_name: str, index: RecordDirs | None = None) -> list[Record]:
    """Every well-formed record of *image_name* in *directory*; bad ones are skipped.

    With *index*, a directory without records of the image is not opened.
    Records that hand out more than the image does (ownership.excess) are
    skipped as bad ones: their writer may not open the image.
    """
    prefix = image_name + "."
    found: list[Record] = []
    if index is not None and not index.has_records(directory, image_name):
        return found
    try:
        image = os.stat(os.path.join(directory, image_name))  # or its lock file
    except OSError:
        return found  # nothing to judge the records by: believe none
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
            record = _read_one(dfd, name, image)
            if record is not None:
                found.append(record)
    return found
