"""Reading a QEMU system emulator command line the way QEMU reads it.

``imglock run`` needs three things from the command it wraps: the disk
images the VM will open (to claim them), whether it is the destination of
a live migration (``-incoming``), and a way to add its own options (``-S``
and a private QMP monitor) without disturbing the user's.

The parsing follows QEMU 7.2 (``softmmu/vl.c``, ``util/qemu-option.c``,
``util/keyval.c``, ``blockdev.c``):

* Options are looked up by exact name; ``--name`` is the same as ``-name``.
  There is no ``-name=value`` form and no ``--`` end-of-options marker.
  An option that takes an argument takes the next element as it is, even
  when it starts with ``-``.  An element that does not start with ``-`` is
  a disk image, as if given with ``-hda``.
* ``-drive`` is parsed with QEMU's "QemuOpts" syntax: ``key=value`` pairs
  split at single commas, ``,,`` stands for a comma inside a value, a later
  key replaces an earlier one, and a bare ``name`` means ``name=on``
  (``noname`` means ``name=off``).  There is no implied key: ``-drive
  disk.img`` is an error in QEMU, not a file name.
* ``-blockdev`` is either JSON (when the argument starts with ``{``; QEMU
  also accepts single-quoted strings there) or "keyval" syntax: dotted keys
  build nested objects (``file.filename=...``), numeric parts build lists
  (``children.0.driver=...``), ``,,`` escapes a comma, and a first element
  without ``=`` is the ``driver``.
* The legacy options ``-hda``/``-hdb``/``-hdc``/``-hdd``, ``-cdrom``,
  ``-fda``/``-fdb``, ``-mtdblock``, ``-sd`` and ``-pflash`` take a file
  name verbatim (no comma escaping).  ``-pflash`` is included because
  UEFI variable stores are written per VM.  ``-bios``, ``-kernel``,
  ``-initrd``, ``-dtb`` and ``-option-rom`` are read once into memory
  and are not block devices, so they are not images here.
* ``-snapshot`` makes every drive (not ``-blockdev`` nodes) ``snapshot=on``
  unless the drive says ``snapshot=off``; ``-set drive.ID.KEY=VALUE``
  changes a drive defined earlier on the line.

Images behind ``-readconfig`` files cannot be seen; :func:`find_images`
refuses such command lines instead of under-claiming.

The functions here take QEMU's own argument vector: the exec-wrappers
that may stand in front of it (``env``, ``sudo``, ``taskset``,
``numactl``...) are taken off first, by :mod:`imglock.qemu.prefixes`,
which knows each one's option syntax and refuses to guess.
"""

from __future__ import annotations

import enum
import functools
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final

from imglock.errors import UsageError
from imglock.lock.protocol import Mode
from imglock.qemu import drivers as _drivers
from imglock.qemu.drivers import LOCAL_FILE_MEMBERS

# Judging a program by its name needs none of the parser: ``imglock run``
# imports these from imglock.qemu.names, and this module only for QEMU.
from imglock.qemu.names import QEMU_PROGRAM_NAMES as QEMU_PROGRAM_NAMES
from imglock.qemu.names import QEMU_SYSTEM_PREFIX as QEMU_SYSTEM_PREFIX
from imglock.qemu.names import is_qemu as is_qemu

# --------------------------------------------------------------------------
# Errors


class QemuOptionError(UsageError):
    """A QEMU option that QEMU itself would reject, or that imglock cannot follow.

    :attr:`option` is the option as written (``"-drive"``), :attr:`argument`
    its argument (``None`` for an option without one).
    """

    def __init__(self, option: str, argument: str | None, message: str) -> None:
        self.option = option
        self.argument = argument
        shown = option if argument is None else f"{option} {argument}"
        super().__init__(None, f"QEMU option {shown}: {message}")


# --------------------------------------------------------------------------
# The option table of qemu-system-* (qemu-options.hx, QEMU 7.2 and older)

#: Options that take no argument.  Removed ones are kept so that old
#: command lines still scan correctly.
QEMU_FLAG_OPTIONS: Final = frozenset(
    {
        "h", "help", "version", "audio-help", "snapshot", "usb", "nographic",
        "portrait", "full-screen", "win2k-hack", "no-fd-bootchk", "no-acpi",
        "no-hpet", "singlestep", "one-insn-per-tb", "preconfig", "S", "s",
        "enable-kvm", "xen-attach", "xen-domid-restrict", "no-reboot",
        "no-shutdown", "daemonize", "only-migratable", "nodefaults",
        "no-user-config", "async-teardown", "enable-sync-profile",
        "mem-prealloc", "semihosting", "old-param", "virtfs_synth",
        # removed before 7.2
        "curses", "sdl", "no-quit", "alt-grab", "ctrl-grab", "enable-fips",
        "no-frame", "rtc-td-hack", "localtime", "show-cursor", "nodefconfig",
        "no-kvm", "no-kvm-irqchip", "no-kvm-pit", "no-kvm-pit-reinjection",
        "std-vga", "tdf", "enable-nesting", "xen-create",
    }
)  # fmt: skip

#: Options known to take an argument.  Options in neither table are
#: treated by :func:`_scan_arguments` with a heuristic (see there).
QEMU_ARG_OPTIONS: Final = frozenset(
    {
        "machine", "M", "cpu", "accel", "smp", "numa", "add-fd", "set",
        "global", "boot", "m", "mem-path", "k", "audio", "audiodev",
        "soundhw", "device", "name", "uuid", "fda", "fdb", "hda", "hdb",
        "hdc", "hdd", "cdrom", "blockdev", "drive", "mtdblock", "sd",
        "pflash", "fsdev", "virtfs", "iscsi", "usbdevice", "display",
        "spice", "rotate", "vga", "vnc", "g", "prom-env", "acpitable",
        "smbios", "netdev", "nic", "net", "chardev", "tpmdev", "bios",
        "kernel", "append", "initrd", "dtb", "compat", "fw_cfg", "serial",
        "parallel", "monitor", "qmp", "qmp-pretty", "mon", "debugcon",
        "pidfile", "gdb", "d", "D", "dfilter", "seed", "L", "xen-domid",
        "action", "loadvm", "option-rom", "rtc", "icount", "watchdog",
        "watchdog-action", "echr", "incoming", "chroot", "runas", "sandbox",
        "readconfig", "writeconfig", "trace", "plugin", "msg",
        "dump-vmstate", "object", "semihosting-config", "tb-size",
        "balloon", "overcommit", "realtime", "qtest", "qtest-log", "bt",
        "run-with", "mem-share",
    }
)  # fmt: skip

#: Legacy options whose argument is an image file name, and the -drive
#: options QEMU adds for them (HD_OPTS, CDROM_OPTS... in softmmu/vl.c).
LEGACY_IMAGE_OPTIONS: Final[Mapping[str, Mapping[str, str]]] = {
    "-hda": {"media": "disk"},
    "-hdb": {"media": "disk"},
    "-hdc": {"media": "disk"},
    "-hdd": {"media": "disk"},
    "-cdrom": {"media": "cdrom"},
    "-fda": {},
    "-fdb": {},
    "-mtdblock": {},
    "-sd": {},
    "-pflash": {},
}

#: What :attr:`DriveImage.source` says for a bare image argument.
POSITIONAL_SOURCE: Final = "image argument"


@dataclass(frozen=True)
class _Argument:
    """One option as QEMU sees it: ``name`` is ``-drive`` (never ``--drive``),
    or None for a bare image argument; ``index`` is its position in argv."""

    index: int
    name: str | None
    value: str | None


def _scan_arguments(argv: Sequence[str]) -> tuple[_Argument, ...]:
    """``argv[1:]`` split into options the way QEMU's ``lookup_opt`` does (see :func:`_split`).

    A run asks one command line for its images, ``-incoming``, ``-S``, its
    chardevs and its root directory: it is split once.
    """
    return _split(tuple(argv))


@functools.lru_cache(maxsize=8)
def _split(argv: tuple[str, ...]) -> tuple[_Argument, ...]:
    return tuple(_split_arguments(argv))


def _split_arguments(argv: Sequence[str]) -> Iterator[_Argument]:
    """Split ``argv[1:]`` into options the way QEMU's ``lookup_opt`` does.

    An option in neither table (one newer than this table) is taken to
    have an argument unless the next element starts with ``-``: nearly all
    options added in recent QEMU releases take one, and guessing "flag" for
    such an option would turn its argument into a phantom image.
    """
    i = 1
    while i < len(argv):
        element = argv[i]
        if not element.startswith("-"):
            yield _Argument(i, None, element)
            i += 1
            continue
        name = element[2:] if element.startswith("--") else element[1:]
        if not name:
            raise QemuOptionError(element, None, "invalid option")
        option = f"-{name}"
        if name in QEMU_FLAG_OPTIONS:
            takes_argument = False
        elif name in QEMU_ARG_OPTIONS:
            takes_argument = True
            if i + 1 >= len(argv):
                raise QemuOptionError(option, None, "requires an argument")
        else:
            takes_argument = i + 1 < len(argv) and not argv[i + 1].startswith("-")
        if takes_argument:
            yield _Argument(i, option, argv[i + 1])
            i += 2
        else:
            yield _Argument(i, option, None)
            i += 1


# --------------------------------------------------------------------------
# QemuOpts syntax (-drive, -chardev, -set...)


def escape_value(value: str) -> str:
    """Escape ``value`` for use inside a QEMU option argument (``,`` → ``,,``)."""
    return value.replace(",", ",,")


def format_qemu_opts(pairs: Sequence[tuple[str, str]]) -> str:
    """Join ``(key, value)`` pairs into one option argument, escaping commas.

    The inverse of :func:`parse_qemu_opts` (keys must not contain ``=`` or
    ``,``).
    """
    return ",".join(f"{key}={escape_value(value)}" for key, value in pairs)


def _read_value(text: str, pos: int) -> tuple[str, int]:
    """Read a value from ``pos`` to the next single comma; return it and the
    position after that comma."""
    out: list[str] = []
    while pos < len(text):
        comma = text.find(",", pos)
        if comma < 0:
            out.append(text[pos:])
            return "".join(out), len(text)
        out.append(text[pos:comma])
        if text.startswith(",,", comma):
            out.append(",")
            pos = comma + 2
        else:
            return "".join(out), comma + 1
    return "".join(out), pos


def _strcspn(text: str, pos: int, chars: str) -> int:
    """Index of the first character of ``chars`` at or after ``pos`` (or len)."""
    end = len(text)
    for char in chars:
        found = text.find(char, pos)
        if 0 <= found < end:
            end = found
    return end


def parse_qemu_opts(text: str, implied_key: str | None = None) -> list[tuple[str, str]]:
    """Split an option argument in QEMU's QemuOpts syntax into ``(key, value)`` pairs.

    ``implied_key`` names a first element written without ``=`` (``-chardev
    socket,...`` implies ``backend``); ``-drive`` has none, so there a bare
    ``name`` is the short form of ``name=on`` and ``noname`` of
    ``name=off``, as QEMU (deprecated, still accepted by 7.2) reads it.
    Pairs keep their order and repetitions; QEMU lets the last one win.
    """
    pairs: list[tuple[str, str]] = []
    pos = 0
    implied = implied_key
    while pos < len(text):
        end = _strcspn(text, pos, "=,")
        if end < len(text) and text[end] == "=":
            key = text[pos:end]
            value, pos = _read_value(text, end + 1)
        elif implied is not None:
            key = implied
            value, pos = _read_value(text, pos)
        else:
            # A name never has escaped commas: it ends at the first one.
            key = text[pos:end]
            pos = min(end + 1, len(text))
            key, value = (key[2:], "off") if key.startswith("no") else (key, "on")
        implied = None
        pairs.append((key, value))
    return pairs


# --------------------------------------------------------------------------
# keyval syntax (-blockdev)

# The patterns below are compiled (and cached by re) on first use: most
# command lines never need them, and compiling costs start-up time.

#: A QAPI name as keyval accepts it for a key fragment, with the optional
#: ``__RFQDN_`` prefix of downstream extensions.
_QAPI_NAME: Final = r"(?:__[A-Za-z][A-Za-z0-9.-]*_)?[A-Za-z][A-Za-z0-9_-]*"
_LIST_INDEX: Final = r"[0-9]+"
_HELP_WORDS: Final = frozenset({"help", "?"})


def parse_keyval(text: str, implied_key: str | None = None) -> dict[str, Any]:
    """Parse QEMU's keyval syntax (``-blockdev``) into nested dicts and lists.

    ``a.b=1`` builds ``{"a": {"b": "1"}}``; keys whose parts are all
    numbers build lists (``children.0.x=...``); a later value for the same
    key replaces the earlier one.  Values stay strings, as QEMU's keyval
    input does.  ``implied_key`` names the first element when it has no
    ``=`` (``driver`` for ``-blockdev``).  Raises ValueError with QEMU's
    wording for what QEMU rejects.
    """
    root: dict[str, Any] = {}
    pos = 0
    implied = implied_key
    while pos < len(text):
        end = _strcspn(text, pos, "=,")
        if end > pos and (end == len(text) or text[end] != "="):
            if text[pos:end] in _HELP_WORDS:
                raise ValueError("help is not an option")
            if implied is not None:
                root[implied] = text[pos:end]
                implied = None
                pos = min(end + 1, len(text))
                continue
        implied = None
        key = text[pos:end]
        parts = key.split(".")
        for n, part in enumerate(parts):
            if not (re.fullmatch(_QAPI_NAME, part) or (n and re.fullmatch(_LIST_INDEX, part))):
                raise ValueError(f"Invalid parameter '{key}'")
        if end == len(text) or text[end] != "=":
            raise ValueError(f"Expected '=' after parameter '{key}'")
        value, pos = _read_value(text, end + 1)
        _insert_dotted(root, parts, value)
    result: dict[str, Any] = _listify(root, "")
    return result


def _listify(node: dict[str, Any], prefix: str) -> Any:
    """Turn dicts keyed 0..n-1 into lists, as keyval does for array members."""
    for key, value in node.items():
        if isinstance(value, dict):
            node[key] = _listify(value, f"{prefix}{key}.")
    numeric = [key for key in node if re.fullmatch(_LIST_INDEX, key)]
    if not numeric:
        return node
    if len(numeric) != len(node):
        raise ValueError(f"Parameters '{prefix}*' used inconsistently")
    items: list[Any] = []
    for index in range(len(node)):
        if str(index) not in node:
            raise ValueError(f"Parameter '{prefix}{index}' missing")
        items.append(node[str(index)])
    return items


def _dequote_json(text: str) -> str:
    """Rewrite QEMU's single-quoted JSON strings as double-quoted ones.

    QEMU's JSON parser takes ``'...'`` as a string (with ``\\'`` for a
    quote); Python's does not.
    """
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == '"':
            j = i + 1
            while j < len(text) and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif char == "'":
            j = i + 1
            chunk: list[str] = []
            while j < len(text) and text[j] != "'":
                if text[j] == "\\" and j + 1 < len(text):
                    chunk.append("'" if text[j + 1] == "'" else text[j : j + 2])
                    j += 2
                else:
                    chunk.append('\\"' if text[j] == '"' else text[j])
                    j += 1
            out.append('"' + "".join(chunk) + '"')
            i = j + 1
        else:
            out.append(char)
            i += 1
    return "".join(out)


def _parse_json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = json.loads(_dequote_json(text))
        except ValueError as exc:
            raise ValueError(f"JSON parse error: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("JSON value is not an object")
    return value


def parse_blockdev(text: str) -> dict[str, Any]:
    """Parse a ``-blockdev`` argument: JSON if it starts with ``{``, else keyval.

    The result is the BlockdevOptions object as QEMU sees it; in the
    keyval form every scalar is a string.
    """
    if text.startswith("{"):
        return _parse_json_object(text)
    return parse_keyval(text, implied_key="driver")


def _crumple(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Nest dotted keys (``file.filename``) the way the block layer does."""
    root: dict[str, Any] = {}
    for key, value in flat.items():
        _insert_dotted(root, key.split("."), value)
    return root


def _insert_dotted(root: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set ``root[a][b][c] = value`` for the key ``a.b.c``, refusing a key used both ways."""
    cursor = root
    for n, part in enumerate(parts[:-1]):
        inner = cursor.setdefault(part, {})
        if not isinstance(inner, dict):
            raise ValueError(f"Parameters '{'.'.join(parts[: n + 1])}.*' used inconsistently")
        cursor = inner
    if isinstance(cursor.get(parts[-1]), dict):
        raise ValueError(f"Parameters '{'.'.join(parts)}.*' used inconsistently")
    cursor[parts[-1]] = value


def _flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --------------------------------------------------------------------------
# Block drivers

#: The block driver table (imglock.qemu.drivers, from QEMU's schema).
LOCAL_PROTOCOL_DRIVERS: Final = frozenset(LOCAL_FILE_MEMBERS)
NONLOCAL_DRIVERS: Final = _drivers.NONLOCAL_DRIVERS | _drivers.ENDPOINT_DRIVERS
FORMAT_DRIVERS: Final = _drivers.FORMAT_DRIVERS

#: How a file name prefix ``proto:`` maps to a local driver (the file
#: drivers strip their own prefix).
_LOCAL_PREFIXES: Final = {"file": "file", "host_device": "host_device", "host_cdrom": "host_cdrom"}

#: QEMU's file driver opens ``/dev/fdset/N`` from a set passed with
#: ``-add-fd``: a file descriptor, not a path imglock can open.
FDSET_PREFIX: Final = "/dev/fdset/"


class Role(enum.StrEnum):
    """The role of an image in what a VM opens (:attr:`DriveImage.role`)."""

    TOP = "top"
    BACKING = "backing"
    DATA_FILE = "data-file"


_BOOL_TRUE: Final = frozenset({"on", "yes", "true", "y"})
_BOOL_FALSE: Final = frozenset({"off", "no", "false", "n"})


#: What a block driver name (a QAPI enum value) can look like.
_DRIVER_NAME: Final = r"[A-Za-z0-9][A-Za-z0-9_+-]*"


def child_keys(driver: object) -> tuple[str, ...]:
    """The members of a node of *driver* that hold child nodes (none for a protocol)."""
    return _drivers.child_members(driver)


def path_has_protocol(filename: str) -> bool:
    """Whether QEMU reads ``filename`` as ``protocol:rest``: a ``:`` before any ``/``."""
    end = _strcspn(filename, 0, ":/")
    return end < len(filename) and filename[end] == ":"


@dataclass(frozen=True, kw_only=True)
class _Inherited:
    """What a file inherits from the way down the graph to it (see :class:`DriveImage`)."""

    format: str | None = None
    role: Role = Role.TOP
    implicit_backing: bool = True
    implicit_data_file: bool = True
    share_rw: bool = False


@dataclass(frozen=True, kw_only=True)
class DriveImage(_Inherited):
    """One file that a QEMU command line makes QEMU open as a block device.

    :attr:`filename` is as written on the command line (relative names
    are relative to QEMU's working directory).  For an image that is not
    a local file (:attr:`local` false) it is the QEMU file name or a
    ``json:`` description, and :attr:`protocol` names the driver
    (``"nbd"``, ``"fdset"``...).

    :attr:`format` is the format driver that reads the file (``"qcow2"``,
    ``"raw"``...) or None when QEMU probes it.  :attr:`role` is
    :attr:`Role.TOP` for what a device uses, :attr:`Role.BACKING` for a
    backing node the command line names itself (``-blockdev ...,backing=``)
    and :attr:`Role.DATA_FILE` for a qcow2 external data file named on the
    command line (read it as raw data, never probe it).
    :attr:`implicit_backing` is true when QEMU opens the backing chain
    recorded in the image header; it is false when the command line sets
    ``backing`` itself (the nodes it names are listed as their own
    entries).  :attr:`implicit_data_file` likewise: false when the command
    line sets the format node's ``data-file`` itself.

    :attr:`share_rw` is true when a guest device using it says
    ``share-rw=on`` (libvirt's ``<shareable/>``): QEMU then lets other
    writers in, and the image is claimed shared-write (see :attr:`mode`).

    :attr:`source` is the option it came from (``"-drive"``,
    ``"-blockdev"``, ``"-hda"``, ``"image argument"``...) and
    :attr:`argument` that option's argument, for messages.
    """

    filename: str
    read_only: bool
    snapshot: bool
    source: str
    argument: str = ""
    local: bool = True
    protocol: str | None = None
    cdrom: bool = False

    @property
    def mode(self) -> Mode:
        """How the VM uses the file: the mode imglock claims it in.

        A backing node named on the command line is only read.  A device
        with ``share-rw=on`` shares writes with other VMs (even when it
        only reads, it must let them write).
        """
        if self.role == Role.BACKING:
            return Mode.SHARED
        if self.share_rw:
            return Mode.SHARED_WRITE
        return Mode.SHARED if self.shared else Mode.EXCLUSIVE

    @property
    def shared(self) -> bool:
        """Whether a shared claim suffices: read-only, ``snapshot=on`` or a CD-ROM.

        QEMU never writes such a file (``snapshot=on`` writes to a
        temporary overlay), so several VMs may use it at once.
        """
        return self.read_only or self.snapshot or self.cdrom


# --------------------------------------------------------------------------
# From options to block graphs


@dataclass
class _Root:
    """One option that opens block nodes, before walking its graph."""

    source: str
    argument: str
    index: int
    node: dict[str, Any]
    snapshot: bool = False
    cdrom: bool = False
    #: The ``id`` of a -drive: what a ``-device ...,drive=ID`` names.
    drive_id: str | None = None
    #: JSON -blockdev: QEMU checks member types strictly (a boolean must be
    #: a JSON boolean); keyval and -drive values are strings.
    strict_types: bool = False


@dataclass
class _Drive:
    """A -drive (or legacy image option) as QemuOpts, still open to ``-set``."""

    source: str
    argument: str
    index: int
    opts: dict[str, str]
    drive_id: str | None


@dataclass(frozen=True, kw_only=True)
class _Context(_Inherited):
    """What a walk down the graph carries to each file it reaches."""

    root: _Root
    read_only: bool = False


def _option_bool(value: object, key: str) -> bool:
    """A boolean as QemuOpts and keyval spell it, or a JSON boolean."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value in _BOOL_TRUE:
            return True
        if value in _BOOL_FALSE:
            return False
    raise ValueError(f"Parameter '{key}' expects 'on' or 'off'")


def _node_from_filename(filename: str) -> dict[str, Any]:
    """The protocol node QEMU opens for a legacy file name string."""
    if path_has_protocol(filename):
        prefix, rest = filename.split(":", 1)
        driver = _LOCAL_PREFIXES.get(prefix)
        if driver is not None:
            return {"driver": driver, "filename": rest}
        return {"driver": prefix, "filename": filename}
    return {"driver": "file", "filename": filename}


def _drive_root(drive: _Drive, global_snapshot: bool) -> _Root | None:
    """Turn a drive's QemuOpts into a block graph (None for an empty drive)."""
    opts = dict(drive.opts)
    if "" in opts:
        raise ValueError("an option without a name (a stray comma?)")
    if "readonly" in opts and "read-only" in opts:
        raise ValueError("'read-only' and its alias 'readonly' can't be used at the same time")
    read_only_text = opts.pop("readonly", opts.pop("read-only", "off"))
    read_only = _option_bool(read_only_text, "read-only")
    media = opts.pop("media", "disk")
    if media not in ("disk", "cdrom"):
        raise ValueError(f"'{media}' invalid media")
    snapshot_text = opts.pop("snapshot", None)
    snapshot = global_snapshot if snapshot_text is None else _option_bool(snapshot_text, "snapshot")
    if "format" in opts and "driver" in opts:
        raise ValueError("Cannot specify both 'driver' and 'format'")
    driver = opts.pop("format", opts.pop("driver", None))
    filename = opts.pop("file", "")
    node = _crumple(opts)
    node["driver"] = driver
    if media == "cdrom":
        read_only = True
    node["read-only"] = read_only
    if filename.startswith("json:"):
        described = _crumple(_flatten(_parse_json_object(filename[len("json:") :])))
        if driver is not None and described.get("driver", driver) != driver:
            raise ValueError("the format and the driver of the json: file name differ")
        node = {**described, **{k: v for k, v in node.items() if v is not None}}
    elif driver in LOCAL_PROTOCOL_DRIVERS or driver in NONLOCAL_DRIVERS:
        if filename:
            node.setdefault("filename", filename)
    elif filename or isinstance(node.get("file"), dict):
        child = _node_from_filename(filename) if filename else {}
        extra = node.get("file")
        if isinstance(extra, dict):
            child.update(extra)
        node["file"] = child
    else:
        return None  # a drive with no medium: an empty CD-ROM or floppy
    return _Root(
        drive.source, drive.argument, drive.index, node, snapshot=snapshot,
        cdrom=media == "cdrom", drive_id=drive.drive_id,
    )  # fmt: skip


@dataclass
class _Graph:
    """Every block node of a command line, walked from its roots to its files."""

    roots: list[_Root]
    #: Drive ids and node names that a device uses with share-rw=on.
    shared_writes: frozenset[str] = frozenset()
    by_name: dict[str, dict[str, Any]] = field(default_factory=dict, init=False)
    owner: dict[str, _Root] = field(default_factory=dict, init=False)
    referenced: set[str] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        for root in self.roots:
            self._register(root.node, root)

    def _register(self, node: dict[str, Any], root: _Root) -> None:
        name = node.get("node-name")
        if isinstance(name, str):
            if name in self.by_name:
                raise _RootError(root, f"Duplicate nodes with node-name='{name}'")
            self.by_name[name] = node
            self.owner[name] = root
        for key in child_keys(node.get("driver")):
            for child in _children(node.get(key)):
                if isinstance(child, dict):
                    self._register(child, root)
                elif isinstance(child, str) and child:
                    self.referenced.add(child)

    def images(self) -> list[DriveImage]:
        found: list[DriveImage] = []
        self.visited: set[int] = set()
        for root in self.roots:
            name = root.node.get("node-name")
            if isinstance(name, str) and name in self.referenced:
                continue  # reached from the node that uses it
            self._walk(root.node, self._root_context(root), found, ())
        for root in self.roots:
            # Referenced, yet not reached from any unreferenced node: only
            # nodes that refer to each other in a circle are left.
            if id(root.node) not in self.visited:
                self._walk(root.node, self._root_context(root), found, ())
        return found

    def _root_context(self, root: _Root) -> _Context:
        return _Context(root=root, share_rw=root.drive_id in self.shared_writes)

    def _walk(
        self,
        node: object,
        ctx: _Context,
        found: list[DriveImage],
        path: tuple[int, ...],
    ) -> None:
        if node is None:
            return
        if isinstance(node, str):
            if node == "":
                return  # "backing": "" is QEMU's deprecated spelling of null
            target = self.by_name.get(node)
            if target is None:
                raise _RootError(ctx.root, f"Cannot find device= nor node-name={node}")
            # Name the option that defines the node in what is reported.
            ctx = replace(ctx, root=self.owner[node])
            node = target
        if not isinstance(node, dict):
            raise _RootError(ctx.root, f"a block node must be an object, not {node!r}")
        if id(node) in path:
            raise _RootError(ctx.root, "the block nodes refer to each other in a loop")
        path = (*path, id(node))
        self.visited.add(id(node))
        if node.get("node-name") in self.shared_writes:
            ctx = replace(ctx, share_rw=True)
        read_only = ctx.read_only
        if "read-only" in node:
            flag = node["read-only"]
            if ctx.root.strict_types and not isinstance(flag, bool):
                raise _RootError(
                    ctx.root, "Invalid parameter type for 'read-only', expected: boolean"
                )
            try:
                read_only = _option_bool(flag, "read-only") or read_only
            except ValueError as exc:
                raise _RootError(ctx.root, str(exc)) from None
        driver = node.get("driver")
        if driver is None and "filename" in node:
            driver = "file"  # a dict's filename takes no protocol prefix
        valid = isinstance(driver, str) and re.fullmatch(_DRIVER_NAME, driver)
        if driver is not None and not valid:
            raise _RootError(ctx.root, f"Invalid parameter value for 'driver': {driver!r}")
        if isinstance(driver, str) and driver in LOCAL_FILE_MEMBERS:
            member = LOCAL_FILE_MEMBERS[driver]
            filename = node.get(member)
            if not isinstance(filename, str):
                raise _RootError(ctx.root, f"Parameter '{member}' is missing")
            local = not filename.startswith(FDSET_PREFIX)
            found.append(self._image(ctx, filename, read_only, driver, local=local))
            return
        keys = child_keys(driver)
        has_children = any(key in node for key in keys)
        if driver is not None and not has_children:
            # A server, a device endpoint (libblkio's "path"), or nothing.
            filename = node.get("filename", node.get("path"))
            if not isinstance(filename, str):
                # A node without a file name is described as QEMU would.
                filename = "json:" + json.dumps(node, sort_keys=True)
            found.append(self._image(ctx, filename, read_only, driver, local=False))
            return
        is_format = driver in FORMAT_DRIVERS or driver is None
        for key in keys:
            if key not in node:
                continue
            if key in _HEADER_CHILDREN and _options_only(node[key]):
                if ctx.root.source == "-blockdev":  # checked against the schema there
                    missing = "file" if "driver" in node[key] else "driver"
                    raise _RootError(ctx.root, f"Parameter '{key}.{missing}' is missing")
                continue  # -drive: the header's file, with options (backing.node-name=...)
            if key == "backing":
                # A backing node is only read, whatever its users share.
                child_ctx = replace(
                    ctx, format=None, read_only=True, role=Role.BACKING, implicit_backing=True,
                    implicit_data_file=True, share_rw=False,
                )  # fmt: skip
            elif key == "data-file":
                child_ctx = replace(ctx, format=None, read_only=read_only, role=Role.DATA_FILE)
            elif key == "file" and is_format:
                # An explicit "backing" (a node name, or null for none) or
                # "data-file" replaces what the image header names.
                child_ctx = replace(
                    ctx,
                    format=driver,
                    read_only=read_only,
                    implicit_backing=_options_only(node.get("backing", {})),
                    implicit_data_file=_options_only(node.get("data-file", {})),
                )
            elif is_format:
                child_ctx = replace(ctx, format=None, read_only=read_only)
            else:
                child_ctx = replace(ctx, read_only=read_only)
            for child in _children(node[key]):
                self._walk(child, child_ctx, found, path)

    @staticmethod
    def _image(
        ctx: _Context, filename: str, read_only: bool, driver: str, *, local: bool
    ) -> DriveImage:
        protocol = None if local else ("fdset" if driver == "file" else driver)
        inherited = {f.name: getattr(ctx, f.name) for f in fields(_Inherited)}
        return DriveImage(
            filename=filename,
            read_only=read_only,
            snapshot=ctx.root.snapshot,
            source=ctx.root.source,
            argument=ctx.root.argument,
            local=local,
            protocol=protocol,
            cdrom=ctx.root.cdrom or driver == "host_cdrom",
            **inherited,
        )


#: Members whose file an image header names (QEMU opens it unless the
#: command line names a node or null instead).
_HEADER_CHILDREN: Final = ("backing", "data-file")


def _options_only(child: object) -> bool:
    """Whether a ``backing``/``data-file`` member only adds options to the file
    the header names (``backing.node-name=b``), rather than naming a node of
    its own (a node-name reference, an object with a file, or null)."""
    if not isinstance(child, dict) or "file" in child or "filename" in child:
        return False
    driver = child.get("driver")
    return driver is None or driver in FORMAT_DRIVERS


class _RootError(Exception):
    def __init__(self, root: _Root, message: str) -> None:
        super().__init__(message)
        self.root = root


def _children(value: object) -> list[object]:
    return list(value) if isinstance(value, list) else [value]


_ROLE_RANK: Final = {Role.TOP: 0, Role.DATA_FILE: 1, Role.BACKING: 2}


def _merge(images: list[DriveImage]) -> list[DriveImage]:
    """One entry per file name, in order of first use.

    A file used twice (a backing node shared by two overlays, or named by
    two options) is shared only if every use is, and shared-write only if
    every use is shared or shared-write.
    """
    merged: dict[tuple[str, bool], DriveImage] = {}
    for image in images:
        key = (image.filename, image.local)
        seen = merged.get(key)
        if seen is None:
            merged[key] = image
            continue
        # A use that is not shared has all three flags false, so the
        # conjunctions make the merged entry exclusive.
        combined = replace(
            seen,
            read_only=seen.read_only and image.read_only,
            snapshot=seen.snapshot and image.snapshot,
            cdrom=seen.cdrom and image.cdrom,
            role=min(seen.role, image.role, key=_ROLE_RANK.__getitem__),
            implicit_backing=seen.implicit_backing or image.implicit_backing,
            implicit_data_file=seen.implicit_data_file or image.implicit_data_file,
            share_rw=(seen.share_rw or image.share_rw)
            and seen.mode != Mode.EXCLUSIVE
            and image.mode != Mode.EXCLUSIVE,
        )
        if seen.shared and image.shared and not combined.shared:
            # Shared both times, for different reasons (read-only, snapshot).
            combined = replace(combined, read_only=True)
        merged[key] = combined
    return list(merged.values())


# --------------------------------------------------------------------------
# Public entry points


def find_images(argv: Sequence[str]) -> list[DriveImage]:
    """The files a QEMU command line opens as block devices, in order of first use.

    Looks at ``-drive``, ``-blockdev`` (keyval and JSON, node-name
    references included), the legacy image options (see
    :data:`LEGACY_IMAGE_OPTIONS`), bare image arguments, ``-snapshot`` and
    ``-set drive.ID.KEY=VALUE``.  Files that are not local (``nbd:``,
    ``json:`` with a network driver, ``/dev/fdset/N``...) are included
    with :attr:`DriveImage.local` false so that the caller can say why it
    cannot lock them.  A file reached several ways is listed once (see
    :func:`_merge`); different spellings of one file are not merged, so a
    caller should compare resolved paths.

    Raises :class:`QemuOptionError` for what QEMU itself would reject, and
    for ``-readconfig``, whose drives imglock cannot see.
    """
    drives: list[_Drive] = []
    blockdevs: list[_Root] = []
    order: list[_Drive | _Root] = []
    devices: list[dict[str, Any]] = []
    global_snapshot = False
    for arg in _scan_arguments(argv):
        option = arg.name or POSITIONAL_SOURCE
        value = arg.value
        if arg.name == "-readconfig":
            raise QemuOptionError(
                option, value, "imglock cannot see the drives of a configuration file; "
                "name the images to claim explicitly",
            )  # fmt: skip
        if arg.name == "-snapshot":
            global_snapshot = True
            continue
        if value is None:
            continue
        if arg.name is None or arg.name in LEGACY_IMAGE_OPTIONS:
            extra = LEGACY_IMAGE_OPTIONS.get(arg.name or "-hda", {})
            if value:
                drive = _Drive(option, value, arg.index, {**extra, "file": value}, None)
                drives.append(drive)
                order.append(drive)
        elif arg.name == "-drive":
            pairs = parse_qemu_opts(value)
            ids = [v for k, v in pairs if k == "id"]
            drive = _Drive(
                option, value, arg.index, {k: v for k, v in pairs if k != "id"},
                ids[0] if ids else None,
            )  # fmt: skip
            drives.append(drive)
            order.append(drive)
        elif arg.name == "-blockdev":
            try:
                node = parse_blockdev(value)
            except ValueError as exc:
                raise QemuOptionError(option, value, str(exc)) from None
            if not isinstance(node.get("driver"), str):
                raise QemuOptionError(option, value, "Parameter 'driver' is missing")
            root = _Root(option, value, arg.index, node, strict_types=value.startswith("{"))
            blockdevs.append(root)
            order.append(root)
        elif arg.name == "-device":
            devices.append(_parse_device(value))
        elif arg.name == "-set":
            _apply_set(value, drives, devices)
    roots: list[_Root] = []
    for entry in order:
        if isinstance(entry, _Root):
            roots.append(entry)
            continue
        try:
            drive_root = _drive_root(entry, global_snapshot)
        except ValueError as exc:
            raise QemuOptionError(entry.source, entry.argument, str(exc)) from None
        if drive_root is not None:
            roots.append(drive_root)
    try:
        images = _Graph(roots, _shared_writes(devices)).images()
    except _RootError as exc:
        raise QemuOptionError(exc.root.source, exc.root.argument, str(exc)) from None
    return _merge(images)


def _parse_device(text: str) -> dict[str, Any]:
    """A ``-device`` argument as a dictionary (QemuOpts, or JSON since QEMU 7.0).

    Only ``id``, ``drive`` and ``share-rw`` matter here; a device QEMU
    would reject is QEMU's to report.
    """
    if text.startswith("{"):
        try:
            return _parse_json_object(text)
        except ValueError as exc:
            raise QemuOptionError("-device", text, str(exc)) from None
    return dict(parse_qemu_opts(text, implied_key="driver"))


def _shared_writes(devices: list[dict[str, Any]]) -> frozenset[str]:
    """The drive ids and node names that a device uses with ``share-rw=on``."""
    names: set[str] = set()
    for device in devices:
        drive = device.get("drive")
        try:
            share_rw = _option_bool(device.get("share-rw", False), "share-rw")
        except ValueError as exc:
            raise QemuOptionError("-device", str(device.get("driver")), str(exc)) from None
        if share_rw and isinstance(drive, str) and drive:
            names.add(drive)
    return frozenset(names)


def _apply_set(text: str, drives: list[_Drive], devices: list[dict[str, Any]]) -> None:
    """Apply ``-set GROUP.ID.KEY=VALUE`` to a drive or device defined earlier.

    Like QEMU, the whole rest after the first ``=`` is the value (no comma
    splitting); groups other than ``drive`` and ``device`` open no images
    and are skipped.
    """
    match = re.fullmatch(r"([^.=]+)\.([^.=]+)\.([^=]*)=(.*)", text, re.DOTALL)
    if match is None:
        raise QemuOptionError("-set", text, f'can\'t parse: "{text}"')
    group, drive_id, key, value = match.groups()
    if group == "device":
        for device in reversed(devices):
            if device.get("id") == drive_id:
                device[key] = value
                return
        raise QemuOptionError("-set", text, f'there is no device "{drive_id}" defined')
    if group != "drive":
        return
    for drive in reversed(drives):
        if drive.drive_id == drive_id:
            drive.opts[key] = value
            return
    raise QemuOptionError("-set", text, f'there is no drive "{drive_id}" defined')


def iter_options(argv: Sequence[str]) -> Iterator[tuple[str, str | None]]:
    """(option, argument) of every option of a QEMU command line, as QEMU splits them.

    Options are named with one dash (``--chroot`` gives ``-chroot``);
    bare image arguments are left out.
    """
    for arg in _scan_arguments(argv):
        if arg.name is not None:
            yield arg.name, arg.value


def migration_incoming(argv: Sequence[str]) -> str | None:
    """The ``-incoming`` URI (``unix:/path``, ``tcp:...``, ``defer``...), or None.

    QEMU uses the last one given.
    """
    uri = None
    for arg in _scan_arguments(argv):
        if arg.name == "-incoming":
            uri = arg.value
    return uri


def has_freeze_cpu(argv: Sequence[str]) -> bool:
    """Whether the command line has ``-S`` (start with the guest paused)."""
    return any(arg.name == "-S" for arg in _scan_arguments(argv))


#: chardev id of the monitor that :func:`with_extra_args` adds.
QMP_CHARDEV_ID: Final = "imglock-qmp"

#: Longest unix socket path (sun_path is 108 bytes with the NUL).
UNIX_PATH_MAX: Final = 107


def qmp_socket_args(path: str | os.PathLike[str], chardev_id: str = QMP_CHARDEV_ID) -> list[str]:
    """The options that give QEMU one more QMP monitor, listening on ``path``.

    ``-chardev socket,id=ID,path=PATH,server=on,wait=off -mon
    chardev=ID,mode=control``: the long form of ``-qmp
    unix:PATH,server=on,wait=off`` (QEMU 7.2 spelling) with an id of our
    own, so the ``compat_monitorN`` ids of the user's ``-qmp``/``-monitor``
    options stay as they were.  ``wait=off``: QEMU does not wait for a
    client before it starts the VM.
    """
    text = os.fspath(path)
    if len(os.fsencode(text)) > UNIX_PATH_MAX:
        raise UsageError(text, f"too long for a unix socket path (max {UNIX_PATH_MAX} bytes)")
    chardev = format_qemu_opts([("id", chardev_id), ("path", text), ("server", "on"),
                                ("wait", "off")])  # fmt: skip
    return ["-chardev", f"socket,{chardev}", "-mon", f"chardev={chardev_id},mode=control"]


@dataclass(frozen=True)
class ManagerMonitor:
    """A control monitor whose listening socket a manager passed as a descriptor.

    ``-chardev socket,id=ID,fd=N,server=on,wait=off`` with ``-mon
    chardev=ID,mode=control``: how libvirt gives QEMU its monitor.
    """

    chardev_id: str
    fd: int
    #: Where the ``-chardev`` argument is in argv.
    index: int


def manager_monitors(argv: Sequence[str]) -> list[ManagerMonitor]:
    """The control monitors of *argv* on listening sockets passed as descriptors."""
    control: set[str] = set()
    for arg in _scan_arguments(argv):
        if arg.name == "-mon" and arg.value is not None:
            options = dict(parse_qemu_opts(arg.value, "chardev"))
            if options.get("mode") == "control" and "chardev" in options:
                control.add(options["chardev"])
    found = []
    for arg in _scan_arguments(argv):
        if arg.name != "-chardev" or arg.value is None:
            continue
        options = dict(parse_qemu_opts(arg.value, "backend"))
        fd = options.get("fd", "")
        if (options.get("backend") == "socket" and options.get("id") in control
                and fd.isdigit() and options.get("server") in ("on", "yes", "true")):  # fmt: skip
            found.append(ManagerMonitor(options["id"], int(fd), arg.index + 1))
    return found


def with_monitor_fd(argv: Sequence[str], monitor: ManagerMonitor, fd: int) -> list[str]:
    """*argv* with *monitor*'s chardev listening on descriptor *fd* instead."""
    args = list(argv)
    options = parse_qemu_opts(args[monitor.index], "backend")
    args[monitor.index] = ",".join(
        ["socket", format_qemu_opts([(k, str(fd) if k == "fd" else v)
                                     for k, v in options if k != "backend"])]
    )  # fmt: skip
    return args


def _chardev_ids(argv: Sequence[str]) -> set[str]:
    ids: set[str] = set()
    for arg in _scan_arguments(argv):
        if arg.name == "-chardev" and arg.value is not None:
            ids.update(v for k, v in parse_qemu_opts(arg.value, "backend") if k == "id")
    return ids


def with_extra_args(
    argv: Sequence[str],
    *,
    qmp_socket: str | os.PathLike[str] | None = None,
    freeze_cpu: bool = False,
) -> list[str]:
    """``argv`` with a private QMP monitor on ``qmp_socket`` and/or ``-S`` added.

    The options go at the end, so the user's options (and the numbering of
    the monitors they create) are untouched; ``-S`` is not repeated when
    present.  The command line is scanned first: a last option missing its
    argument would otherwise swallow ours.
    """
    args = list(argv)
    if not args:
        raise UsageError(None, "no command to run")
    taken = _chardev_ids(args)
    if qmp_socket is not None:
        chardev_id = QMP_CHARDEV_ID
        serial = 1
        while chardev_id in taken:
            serial += 1
            chardev_id = f"{QMP_CHARDEV_ID}{serial}"
        args += qmp_socket_args(qmp_socket, chardev_id)
    if freeze_cpu and not has_freeze_cpu(argv):
        args.append("-S")
    return args
