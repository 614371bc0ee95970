"""imglock.qemu.cmdline: finding images in QEMU command lines, and adding options.

The first part checks the parser on its own; the last part starts a real
QEMU with the same command lines and compares what QEMU opened
(``query-named-block-nodes``) with what :func:`find_images` found.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qemu_vm import NONE_MACHINE, TINY_PC, QemuVMs

from imglock.errors import UsageError
from imglock.qemu.cmdline import (
    QMP_CHARDEV_ID,
    DriveImage,
    QemuOptionError,
    Role,
    escape_value,
    find_images,
    format_qemu_opts,
    has_freeze_cpu,
    is_qemu,
    migration_incoming,
    parse_blockdev,
    parse_keyval,
    parse_qemu_opts,
    path_has_protocol,
    qmp_socket_args,
    with_extra_args,
)

QEMU = "/usr/bin/qemu-system-x86_64"


def images(*args: str) -> list[DriveImage]:
    return find_images([QEMU, *args])


def one(*args: str) -> DriveImage:
    found = images(*args)
    assert len(found) == 1, found
    return found[0]


# --------------------------------------------------------------------------
# is_qemu


@pytest.mark.parametrize(
    "argv0",
    ["qemu-system-x86_64", "/usr/bin/qemu-system-aarch64", "qemu-kvm", "/usr/libexec/qemu-kvm",
     "kvm", "qemu", "./qemu-system-x86_64-microvm"],
)  # fmt: skip
def test_is_qemu(argv0: str) -> None:
    assert is_qemu([argv0, "-m", "64"])


@pytest.mark.parametrize(
    "argv",
    [[], ["qemu-img", "info", "x"], ["qemu-nbd", "x"], ["qemu-storage-daemon"],
     ["qemu-system-"], ["/usr/bin/env", "qemu-system-x86_64"], ["sudo", "qemu-kvm"],
     ["myqemu"], ["qemu-system-x86_64/"]],
)  # fmt: skip
def test_is_not_qemu(argv: list[str]) -> None:
    assert not is_qemu(argv)


# --------------------------------------------------------------------------
# QemuOpts syntax


def test_parse_qemu_opts_pairs_in_order() -> None:
    assert parse_qemu_opts("file=a.img,if=virtio,file=b.img") == [
        ("file", "a.img"),
        ("if", "virtio"),
        ("file", "b.img"),
    ]


def test_parse_qemu_opts_escaped_commas() -> None:
    assert parse_qemu_opts("file=a,,b,,,,c,format=raw") == [("file", "a,b,,c"), ("format", "raw")]
    assert parse_qemu_opts("file=x,,") == [("file", "x,")]


def test_parse_qemu_opts_equals_in_value_and_empty_value() -> None:
    assert parse_qemu_opts("file=a=b,serial=") == [("file", "a=b"), ("serial", "")]


def test_parse_qemu_opts_short_form_booleans() -> None:
    assert parse_qemu_opts("readonly,nosnapshot") == [("readonly", "on"), ("snapshot", "off")]


def test_parse_qemu_opts_trailing_comma_and_implied_key() -> None:
    assert parse_qemu_opts("a=1,") == [("a", "1")]
    assert parse_qemu_opts("socket,,x,id=c0", implied_key="backend") == [
        ("backend", "socket,x"),
        ("id", "c0"),
    ]


_KEY = st.text(alphabet=string.ascii_lowercase + string.digits + "-_.", min_size=1, max_size=12)
# Any text QEMU could get in argv: no NUL, no lone surrogates.
_VALUE = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30)


@given(st.lists(st.tuples(_KEY, _VALUE), max_size=6))
@settings(max_examples=300)
def test_qemu_opts_round_trip(pairs: list[tuple[str, str]]) -> None:
    assert parse_qemu_opts(format_qemu_opts(pairs)) == pairs


@given(_VALUE.filter(bool))
@settings(max_examples=200)
def test_escaped_drive_file_names_come_back_unchanged(name: str) -> None:
    filename = "/images/" + name
    image = one("-drive", f"file={escape_value(filename)},format=qcow2,if=none")
    assert image.filename == filename
    assert image.format == "qcow2"


# --------------------------------------------------------------------------
# keyval syntax and -blockdev


def test_parse_keyval_nests_dotted_keys_and_builds_lists() -> None:
    parsed = parse_keyval(
        "driver=quorum,children.0.driver=file,children.0.filename=/a,"
        "children.1.driver=file,children.1.filename=/b,vote-threshold=1"
    )
    assert parsed == {
        "driver": "quorum",
        "children": [{"driver": "file", "filename": "/a"}, {"driver": "file", "filename": "/b"}],
        "vote-threshold": "1",
    }


def test_parse_keyval_implied_driver_and_escapes() -> None:
    assert parse_blockdev("qcow2,file.filename=/a,,b,node-name=n") == {
        "driver": "qcow2",
        "file": {"filename": "/a,b"},
        "node-name": "n",
    }


def test_parse_keyval_last_value_wins() -> None:
    assert parse_keyval("filename=/a,filename=/b") == {"filename": "/b"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("driver=file,read-only", "Expected '=' after parameter 'read-only'"),
        ("driver=file,x", "Expected '=' after parameter 'x'"),
        (",driver=file", "Invalid parameter ''"),
        ("1x=2", "Invalid parameter '1x'"),
        ("a..b=1", "Invalid parameter 'a..b'"),
        ("filename=/a,filename.x=1", "Parameters 'filename.*' used inconsistently"),
        ("file.x=1,file=2", "Parameters 'file.*' used inconsistently"),
        ("c.0=a,c.2=b", "Parameter 'c.1' missing"),
        ("c.0=a,c.x=b", "Parameters 'c.*' used inconsistently"),
    ],
)
def test_parse_keyval_rejects_what_qemu_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("*", r"\*")):
        parse_keyval(text)


def test_parse_blockdev_json_and_single_quoted_json() -> None:
    expected = {"driver": "file", "filename": "/x'y\"z", "read-only": True}
    assert parse_blockdev(json.dumps(expected)) == expected
    assert parse_blockdev("{'driver': 'file', 'filename': '/x\\'y\"z', 'read-only': true}") == (
        expected
    )


# --------------------------------------------------------------------------
# find_images: -drive and the legacy options


def test_drive_with_escaped_comma_format_and_interface() -> None:
    image = one("-m", "64", "-drive", "file=/vm/a,,b.qcow2,format=qcow2,if=virtio")
    assert image == DriveImage(
        filename="/vm/a,b.qcow2",
        format="qcow2",
        read_only=False,
        snapshot=False,
        source="-drive",
        argument="file=/vm/a,,b.qcow2,format=qcow2,if=virtio",
    )
    assert not image.shared
    assert image.local and image.role == Role.TOP and image.implicit_backing


@pytest.mark.parametrize(
    ("spelling", "read_only"),
    [("readonly=on", True), ("readonly=off", False), ("readonly=yes", True),
     ("readonly=true", True), ("readonly=y", True), ("readonly=n", False),
     ("read-only=on", True), ("readonly", True), ("noreadonly", False), ("", False)],
)  # fmt: skip
def test_drive_read_only_spellings(spelling: str, read_only: bool) -> None:
    image = one("-drive", f"file=/vm/a.raw,format=raw,{spelling}".rstrip(","))
    assert image.read_only is read_only
    assert image.shared is read_only


@pytest.mark.parametrize(
    "bad",
    ["readonly=maybe", "readonly=ON", "readonly=on,read-only=on", "media=floppy",
     "format=raw,driver=raw", "snapshot=2", ",if=none"],
)  # fmt: skip
def test_drive_options_qemu_rejects(bad: str) -> None:
    with pytest.raises(QemuOptionError, match=r"QEMU option -drive") as info:
        images("-drive", f"{bad},file=/vm/a.raw")
    assert isinstance(info.value, UsageError)
    assert info.value.option == "-drive"


def test_snapshot_drive_is_shared() -> None:
    image = one("-drive", "file=/vm/a.qcow2,snapshot=on")
    assert image.snapshot and not image.read_only and image.shared


def test_global_snapshot_applies_to_drives_unless_they_say_off() -> None:
    found = images(
        "-drive", "file=/vm/a.qcow2", "-hda", "/vm/b.qcow2",
        "-drive", "file=/vm/c.qcow2,snapshot=off",
        "-blockdev", "driver=file,filename=/vm/d.raw,node-name=d", "-snapshot",
    )  # fmt: skip
    assert [(i.filename, i.snapshot) for i in found] == [
        ("/vm/a.qcow2", True),
        ("/vm/b.qcow2", True),
        ("/vm/c.qcow2", False),
        ("/vm/d.raw", False),  # -snapshot is a -drive thing
    ]


def test_cdrom_media_is_read_only_even_when_asked_otherwise() -> None:
    image = one("-drive", "file=/iso/x.iso,media=cdrom,readonly=off")
    assert image.cdrom and image.read_only and image.shared


def test_legacy_options() -> None:
    found = images(
        "-hda", "/vm/a,b.img", "-hdb", "/vm/b.img", "-hdc", "/vm/c.img", "-hdd", "/vm/d.img",
        "-cdrom", "/iso/e.iso", "-fda", "/vm/f.img", "-fdb", "/vm/g.img",
        "-mtdblock", "/vm/h.img", "-sd", "/vm/i.img", "-pflash", "/vm/VARS.fd",
    )  # fmt: skip
    assert [(i.source, i.filename, i.shared) for i in found] == [
        ("-hda", "/vm/a,b.img", False),  # no comma escaping in legacy options
        ("-hdb", "/vm/b.img", False),
        ("-hdc", "/vm/c.img", False),
        ("-hdd", "/vm/d.img", False),
        ("-cdrom", "/iso/e.iso", True),
        ("-fda", "/vm/f.img", False),
        ("-fdb", "/vm/g.img", False),
        ("-mtdblock", "/vm/h.img", False),
        ("-sd", "/vm/i.img", False),
        ("-pflash", "/vm/VARS.fd", False),
    ]
    assert all(i.format is None for i in found)


def test_bare_arguments_are_images_and_option_arguments_are_not() -> None:
    found = images(
        "-name", "vm.img", "-append", "-hda /boot.img", "disk.img", "-kernel", "/boot/vmlinuz",
        "-bios", "/fw.bin", "--hdb", "second.img",
    )  # fmt: skip
    assert [(i.source, i.filename) for i in found] == [
        ("image argument", "disk.img"),
        ("-hdb", "second.img"),
    ]


def test_double_dash_options() -> None:
    image = one("--drive", "file=/vm/a.raw,format=raw", "--S")
    assert image.filename == "/vm/a.raw"
    assert has_freeze_cpu([QEMU, "--S"])


def test_empty_drives_open_nothing() -> None:
    assert images("-drive", "if=ide,media=cdrom", "-cdrom", "", "-drive", "if=none,id=x") == []


@pytest.mark.parametrize(
    ("filename", "local", "protocol", "expected_name"),
    [
        ("nbd:localhost:10809", False, "nbd", "nbd:localhost:10809"),
        ("nbd://host/export", False, "nbd", "nbd://host/export"),
        ("iscsi://host/iqn.x/0", False, "iscsi", "iscsi://host/iqn.x/0"),
        ("rbd:pool/image", False, "rbd", "rbd:pool/image"),
        ("fat:rw:/srv/dir", False, "fat", "fat:rw:/srv/dir"),
        ("file:/vm/a.img", True, None, "/vm/a.img"),
        ("host_device:/dev/sdb", True, None, "/dev/sdb"),
        ("./odd:name.img", True, None, "./odd:name.img"),
        ("/vm/odd:name.img", True, None, "/vm/odd:name.img"),
        ("/dev/fdset/3", False, "fdset", "/dev/fdset/3"),
    ],
)
def test_drive_file_protocols(
    filename: str, local: bool, protocol: str | None, expected_name: str
) -> None:
    image = one("-drive", f"file={filename},format=raw")
    assert (image.local, image.protocol, image.filename) == (local, protocol, expected_name)


def test_path_has_protocol() -> None:
    assert path_has_protocol("nbd:x")
    assert path_has_protocol("a:b")
    assert not path_has_protocol("./a:b")
    assert not path_has_protocol("/a:b")
    assert not path_has_protocol("plain")


def test_drive_json_filename() -> None:
    local = {"driver": "qcow2", "file": {"driver": "file", "filename": "/vm/j.qcow2"}}
    image = one("-drive", "if=none,file=" + escape_value("json:" + json.dumps(local)))
    assert (image.filename, image.format, image.local) == ("/vm/j.qcow2", "qcow2", True)
    flat = {"driver": "raw", "file.driver": "file", "file.filename": "/vm/j.raw"}
    image = one("-drive", "if=none,file=" + escape_value("json:" + json.dumps(flat)))
    assert (image.filename, image.format) == ("/vm/j.raw", "raw")
    remote = {"driver": "raw", "file": {"driver": "nbd", "server": {"type": "unix", "path": "/s"}}}
    image = one("-drive", "if=none,file=" + escape_value("json:" + json.dumps(remote)))
    assert not image.local and image.protocol == "nbd"
    assert image.filename.startswith("json:{")


def test_drive_dotted_block_options() -> None:
    image = one("-drive", "if=none,driver=qcow2,file.driver=file,file.filename=/vm/d.qcow2")
    assert (image.filename, image.format) == ("/vm/d.qcow2", "qcow2")
    image = one("-drive", "if=none,file.filename=nbd:x,format=raw")
    # A dict's filename takes no protocol prefix: QEMU opens a local "nbd:x".
    assert (image.filename, image.local) == ("nbd:x", True)


def test_drive_with_protocol_driver() -> None:
    image = one("-drive", "if=none,driver=host_device,filename=/dev/sdz")
    assert (image.filename, image.format, image.local) == ("/dev/sdz", None, True)
    image = one("-drive", "if=none,driver=null-co")
    assert (image.local, image.protocol) == (False, "null-co")


def test_set_changes_an_earlier_drive() -> None:
    image = one("-drive", "id=d0,file=/vm/a.raw", "-set", "drive.d0.readonly=on")
    assert image.read_only
    image = one("-drive", "id=d0,file=/vm/a.raw", "-set", "drive.d0.file=/vm/b,c.raw")
    assert image.filename == "/vm/b,c.raw"  # -set takes the rest verbatim
    set_device = ("-device", "virtio-blk,id=x", "-set", "device.x.serial=abc")
    assert one("-drive", "file=/a", *set_device).filename == "/a"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-set", "drive.d0.readonly=on", "-drive", "id=d0,file=/a"], 'no drive "d0"'),
        (["-set", "nonsense"], "can't parse"),
        (["-drive", "file=/a", "-set", "device.x.drive=d0"], 'no device "x"'),
        (["-readconfig", "/etc/vm.cfg"], "configuration file"),
        (["-drive"], "requires an argument"),
        (["-", "x"], "invalid option"),
        (["--", "x"], "invalid option"),
    ],
)
def test_command_lines_that_cannot_be_followed(args: list[str], message: str) -> None:
    with pytest.raises(QemuOptionError, match=message):
        images(*args)


def test_unknown_options_heuristic() -> None:
    # An unknown option followed by a value takes it (most new options do).
    assert images("-frobnicate", "level=3", "-hda", "/a") == [one("-hda", "/a")]
    # Followed by another option it is a flag, and that option still counts.
    assert [i.filename for i in images("-frobnicate", "-hda", "/a")] == ["/a"]


# --------------------------------------------------------------------------
# find_images: -blockdev graphs


def test_blockdev_keyval_inline() -> None:
    image = one(
        "-blockdev",
        "driver=qcow2,node-name=disk,file.driver=file,file.filename=/vm/a.qcow2,read-only=on",
    )
    assert (image.filename, image.format, image.read_only, image.source) == (
        "/vm/a.qcow2",
        "qcow2",
        True,
        "-blockdev",
    )
    assert image.implicit_backing


def test_blockdev_json_inline() -> None:
    spec = {"driver": "raw", "node-name": "d", "file": {"driver": "file", "filename": "/vm/r"}}
    image = one("-blockdev", json.dumps(spec))
    assert (image.filename, image.format, image.read_only) == ("/vm/r", "raw", False)


def test_blockdev_node_name_references_libvirt_style() -> None:
    storage = {"driver": "file", "filename": "/vm/top.qcow2", "node-name": "libvirt-2-storage",
               "auto-read-only": True, "discard": "unmap"}  # fmt: skip
    base_storage = {"driver": "file", "filename": "/vm/base.qcow2",
                    "node-name": "libvirt-1-storage", "auto-read-only": True}  # fmt: skip
    base = {"node-name": "libvirt-1-format", "read-only": True, "driver": "qcow2",
            "file": "libvirt-1-storage", "backing": None}  # fmt: skip
    top = {"node-name": "libvirt-2-format", "read-only": False, "driver": "qcow2",
           "file": "libvirt-2-storage", "backing": "libvirt-1-format"}  # fmt: skip
    found = images(*(arg for spec in (base_storage, base, storage, top)
                     for arg in ("-blockdev", json.dumps(spec))))  # fmt: skip
    by_name = {i.filename: i for i in found}
    assert set(by_name) == {"/vm/top.qcow2", "/vm/base.qcow2"}
    top_image, base_image = by_name["/vm/top.qcow2"], by_name["/vm/base.qcow2"]
    assert (top_image.role, top_image.format, top_image.shared) == (Role.TOP, "qcow2", False)
    assert not top_image.implicit_backing  # the command line names the backing node
    assert (base_image.role, base_image.format, base_image.shared) == (
        Role.BACKING,
        "qcow2",
        True,
    )
    assert not base_image.implicit_backing  # "backing": null
    # Reported against the option that defines the file node.
    assert json.loads(top_image.argument)["node-name"] == "libvirt-2-storage"


def test_blockdev_keyval_references_and_empty_backing() -> None:
    found = images(
        "-blockdev", "driver=file,node-name=f0,filename=/vm/x.qcow2",
        "-blockdev", "driver=qcow2,node-name=d0,file=f0,backing=",
    )  # fmt: skip
    assert [(i.filename, i.format, i.implicit_backing) for i in found] == [
        ("/vm/x.qcow2", "qcow2", False)
    ]


def test_blockdev_read_only_format_over_a_named_file_node_is_shared() -> None:
    image = one(
        "-blockdev", "driver=file,node-name=f,filename=/vm/a.raw",
        "-blockdev", "driver=raw,node-name=r,file=f,read-only=on",
    )  # fmt: skip
    assert image.read_only and image.format == "raw"


def test_blockdev_data_file_and_filters() -> None:
    found = images(
        "-blockdev",
        "driver=throttle,node-name=t,throttle-group=g,file.driver=qcow2,"
        "file.file.driver=file,file.file.filename=/vm/d.qcow2,"
        "file.data-file.driver=file,file.data-file.filename=/vm/d.data",
    )
    assert [(i.filename, i.format, i.role) for i in found] == [
        ("/vm/d.qcow2", "qcow2", Role.TOP),
        ("/vm/d.data", None, Role.DATA_FILE),
    ]


def test_blockdev_quorum_children() -> None:
    found = images(
        "-blockdev",
        "driver=quorum,node-name=q,vote-threshold=1,"
        "children.0.driver=raw,children.0.file.driver=file,children.0.file.filename=/vm/q0,"
        "children.1.driver=file,children.1.filename=/vm/q1",
    )
    assert [(i.filename, i.format) for i in found] == [("/vm/q0", "raw"), ("/vm/q1", None)]


def test_blockdev_network_nodes_are_not_local() -> None:
    image = one(
        "-blockdev",
        "driver=qcow2,node-name=n,file.driver=nbd,file.server.type=unix,file.server.path=/s",
    )
    assert not image.local and image.protocol == "nbd" and image.format == "qcow2"
    assert json.loads(image.filename.removeprefix("json:"))["server"]["path"] == "/s"


def test_backing_node_shared_by_two_overlays_is_listed_once() -> None:
    found = images(
        "-blockdev", "driver=qcow2,node-name=base,read-only=on,file.driver=file,"
        "file.filename=/vm/base.qcow2",
        "-blockdev", "driver=qcow2,node-name=a,file.driver=file,file.filename=/vm/a.qcow2,"
        "backing=base",
        "-blockdev", "driver=qcow2,node-name=b,file.driver=file,file.filename=/vm/b.qcow2,"
        "backing=base",
    )  # fmt: skip
    assert [(i.filename, i.role, i.shared) for i in found] == [
        ("/vm/a.qcow2", Role.TOP, False),
        ("/vm/base.qcow2", Role.BACKING, True),
        ("/vm/b.qcow2", Role.TOP, False),
    ]


def test_a_file_used_writable_once_is_exclusive() -> None:
    found = images("-drive", "file=/vm/a.raw,readonly=on", "-hda", "/vm/a.raw")
    assert len(found) == 1 and not found[0].shared


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-blockdev", "driver=qcow2,node-name=d,file=nowhere"], "node-name=nowhere"),
        (["-blockdev", "driver=file,filename=/a,node-name=f",
          "-blockdev", "driver=file,filename=/b,node-name=f"], "Duplicate nodes"),
        (["-blockdev", "driver=qcow2,node-name=a,file=b",
          "-blockdev", "driver=qcow2,node-name=b,file=a"], "loop"),
        (["-blockdev", "node-name=x,filename=/a"], "'driver' is missing"),
        (["-blockdev", "driver=file,node-name=x"], "'filename' is missing"),
        (["-blockdev", '{"driver": "file", "filename": "/a", "read-only": "on"}'],
         "expected: boolean"),
        (["-blockdev", ' {"driver": "file", "filename": "/a"}'], "Invalid parameter"),
        (["-blockdev", ' {"driver": "file"}'], "Invalid parameter value for 'driver'"),
        (["-blockdev", '{"driver": "file",'], "JSON"),
    ],
)  # fmt: skip
def test_blockdev_errors(args: list[str], message: str) -> None:
    with pytest.raises(QemuOptionError, match=message):
        images(*args)


# --------------------------------------------------------------------------
# -incoming, -S and extra options


def test_migration_incoming() -> None:
    assert migration_incoming([QEMU, "-m", "64"]) is None
    assert migration_incoming([QEMU, "-incoming", "unix:/run/a.sock"]) == "unix:/run/a.sock"
    assert migration_incoming([QEMU, "-incoming", "tcp:0:4444", "--incoming", "defer"]) == "defer"
    assert migration_incoming([QEMU, "-append", "-incoming"]) is None


def test_has_freeze_cpu() -> None:
    assert has_freeze_cpu([QEMU, "-m", "64", "-S"])
    assert not has_freeze_cpu([QEMU, "-append", "-S", "-name", "S"])
    assert not has_freeze_cpu([QEMU, "-s"])


def test_with_extra_args_appends_a_private_monitor_and_S() -> None:
    argv = [QEMU, "-qmp", "unix:/run/user.qmp,server=on,wait=off", "-m", "64"]
    extended = with_extra_args(argv, qmp_socket="/run/imglock,x.qmp", freeze_cpu=True)
    assert extended[: len(argv)] == argv
    assert extended[len(argv) :] == [
        "-chardev", f"socket,id={QMP_CHARDEV_ID},path=/run/imglock,,x.qmp,server=on,wait=off",
        "-mon", f"chardev={QMP_CHARDEV_ID},mode=control", "-S",
    ]  # fmt: skip
    assert with_extra_args([QEMU, "-S"], freeze_cpu=True) == [QEMU, "-S"]
    assert with_extra_args(argv) == argv


def test_with_extra_args_avoids_the_users_chardev_ids() -> None:
    argv = [QEMU, "-chardev", f"socket,id={QMP_CHARDEV_ID},path=/x",
            "-chardev", f"id={QMP_CHARDEV_ID}2,backend=null"]  # fmt: skip
    extended = with_extra_args(argv, qmp_socket="/run/q")
    assert extended[-3:] == [
        f"socket,id={QMP_CHARDEV_ID}3,path=/run/q,server=on,wait=off",
        "-mon",
        f"chardev={QMP_CHARDEV_ID}3,mode=control",
    ]


def test_with_extra_args_refuses_what_would_break() -> None:
    with pytest.raises(QemuOptionError, match="requires an argument"):
        with_extra_args([QEMU, "-m"], qmp_socket="/run/q")
    with pytest.raises(UsageError, match="too long"):
        qmp_socket_args("/" + "x" * 107)
    with pytest.raises(UsageError, match="no command"):
        with_extra_args([], freeze_cpu=True)


# --------------------------------------------------------------------------
# Against a real QEMU: what it opens is what find_images finds

LOCAL_DRIVERS = ("file", "host_device", "host_cdrom")


def _qemu_opened(vms: QemuVMs, args: list[str], under: Path) -> dict[str, bool]:
    """Start QEMU with ``args``; return {file name: read-only} of its file nodes under ``under``."""
    vm = vms.start(args)
    monitor = vm.connect()
    nodes: list[dict[str, Any]] = monitor.call(
        monitor.monitor.execute("query-named-block-nodes", {"flat": True})
    )
    vm.terminate()
    return {
        node["file"]: bool(node["ro"])
        for node in nodes
        if node["drv"] in LOCAL_DRIVERS and node["file"].startswith(str(under))
    }


def vm_log_hint(case: str) -> str:
    return f"QEMU opened no file for {case!r}"


@pytest.fixture
def disk_files(tmp_path: Path, qemu_img: Any) -> dict[str, Path]:
    files = {}
    for name in ("a.raw", "b,c.raw", "iso.raw", "base.raw"):
        files[name] = tmp_path / name
        files[name].write_bytes(b"\0" * 65536)
    files["top.qcow2"] = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", files["base.raw"], "-F", "raw",
             files["top.qcow2"])  # fmt: skip
    files["other.qcow2"] = tmp_path / "other.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", files["other.qcow2"], "1M")
    return files


CROSS_CHECKS: dict[str, list[str]] = {
    "drive with escaped comma": [*NONE_MACHINE, "-drive", "if=none,format=raw,file={b,,c.raw}"],
    "read-only drive": [*NONE_MACHINE, "-drive", "if=none,format=raw,readonly=on,file={a.raw}"],
    "snapshot drive": [*NONE_MACHINE, "-drive", "if=none,snapshot=on,file={top.qcow2}"],
    "global snapshot": [*NONE_MACHINE, "-snapshot", "-drive", "if=none,format=raw,file={a.raw}"],
    "cdrom drive": [*NONE_MACHINE, "-drive", "if=none,media=cdrom,format=raw,file={iso.raw}"],
    "qcow2 with backing": [*NONE_MACHINE, "-drive", "if=none,format=qcow2,file={top.qcow2}"],
    "-set": [*NONE_MACHINE, "-drive", "if=none,id=d0,format=raw,file={a.raw}",
             "-set", "drive.d0.readonly=on"],
    "legacy options": [*TINY_PC, "-hda", "{a.raw}", "-cdrom", "{iso.raw}", "-fda", "{b,c.raw}"],
    "bare image argument": [*TINY_PC, "{a.raw}"],
    "blockdev keyval": [*NONE_MACHINE, "-blockdev",
                        "qcow2,node-name=d,file.driver=file,file.filename={other.qcow2}"],
    "blockdev json backing": [*NONE_MACHINE, "-blockdev", json.dumps(
        {"driver": "qcow2", "node-name": "t",
         "file": {"driver": "file", "filename": "{top.qcow2}"},
         "backing": {"driver": "raw", "file": {"driver": "file", "filename": "{base.raw}"}}})],
    "blockdev references": [*NONE_MACHINE,
                            "-blockdev", "driver=file,node-name=f,filename={other.qcow2}",
                            "-blockdev", "driver=qcow2,node-name=q,file=f"],
    "drive json filename": [*NONE_MACHINE, "-drive", "if=none,file=" + escape_value(
        'json:{"driver":"raw","file":{"driver":"file","filename":"{a.raw}"}}')],
}  # fmt: skip


@pytest.mark.qemu
@pytest.mark.parametrize("case", sorted(CROSS_CHECKS))
def test_find_images_agrees_with_qemu(
    case: str, qemu_vms: QemuVMs, disk_files: dict[str, Path], tmp_path: Path
) -> None:
    args = list(CROSS_CHECKS[case])
    for name, path in disk_files.items():
        # Fill in file names; "{b,,c.raw}" is the escaped spelling of "b,c.raw".
        escaped = "{" + escape_value(name) + "}"
        args = [a.replace(escaped, escape_value(str(path))) for a in args]
        args = [a.replace("{" + name + "}", str(path)) for a in args]
    opened = _qemu_opened(qemu_vms, args, tmp_path)
    found = [i for i in find_images([QEMU, *args]) if i.local]
    # QEMU opens backing files named in image headers itself; imglock's
    # chain reader follows those, find_images only reports what the
    # command line names.
    implied_backing = {str(disk_files["base.raw"])} if case in (
        "qcow2 with backing", "snapshot drive") else set()  # fmt: skip
    assert opened, vm_log_hint(case)
    assert {i.filename for i in found} | implied_backing == set(opened)
    for image in found:
        assert (image.read_only or image.snapshot) == opened[image.filename], image


@pytest.mark.qemu
@pytest.mark.parametrize(
    "drive",
    ["if=none,format=raw,readonly=maybe,file={a}", "if=none,format=raw,media=floppy,file={a}",
     "if=none,format=raw,driver=raw,file={a}"],
)  # fmt: skip
def test_qemu_rejects_what_find_images_rejects(
    drive: str, qemu_vms: QemuVMs, disk_files: dict[str, Path]
) -> None:
    args = [*NONE_MACHINE, "-drive", drive.replace("{a}", str(disk_files["a.raw"]))]
    with pytest.raises(QemuOptionError):
        find_images([QEMU, *args])
    vm = qemu_vms.start(args)
    assert vm.wait(10) == 1
    assert "-drive" in vm.log()


def test_network_driver_members_are_data_not_node_references() -> None:
    rbd = '{"driver":"rbd","pool":"vms","image":"vm1","server":[{"host":"mon1","port":"6789"}]}'
    iscsi = '{"driver":"iscsi","portal":"h:3260","target":"iqn.2016-09.org.example:t","lun":1}'
    found = images("-blockdev", rbd, "-blockdev", iscsi, "-hda", "/vm/a.raw")
    expected = [(False, "rbd"), (False, "iscsi"), (True, None)]
    assert [(i.local, i.protocol) for i in found] == expected


def test_blkdebug_image_is_a_node_reference() -> None:
    image = one("-blockdev", '{"driver":"blkdebug","image":{"driver":"file","filename":"/a"}}')
    assert image.filename == "/a" and image.local


def test_explicit_backing_and_data_file_replace_the_header() -> None:
    storage = '{"driver":"file","filename":"/vm/top.qcow2","node-name":"s"}'
    null = one("-blockdev", storage, "-blockdev", '{"driver":"qcow2","file":"s","backing":null}')
    assert not null.implicit_backing and null.implicit_data_file
    base = '{"driver":"file","filename":"/vm/base.qcow2","node-name":"b"}'
    top, backing = images(
        "-blockdev", base, "-blockdev", storage,
        "-blockdev", '{"driver":"qcow2","file":"s","backing":{"driver":"raw","file":"b"}}',
    )  # fmt: skip
    assert (top.filename, top.implicit_backing, top.mode) == ("/vm/top.qcow2", False, "exclusive")
    assert (backing.filename, backing.role, backing.mode) == ("/vm/base.qcow2", "backing", "shared")
    data = '{"driver":"qcow2","file":"s","data-file":{"driver":"file","filename":"/vm/d.raw"}}'
    top, data_file = images("-blockdev", storage, "-blockdev", data)
    assert top.implicit_backing and not top.implicit_data_file
    assert (data_file.role, data_file.mode) == ("data-file", "exclusive")


@pytest.mark.parametrize(
    "device",
    [
        "virtio-blk-pci,drive=d0,share-rw=on",
        "scsi-hd,drive=d0,share-rw",
        '{"driver":"virtio-blk-pci","drive":"d0","share-rw":true}',
    ],
)
def test_a_device_with_share_rw_makes_its_image_shared_write(device: str) -> None:
    image = one("-drive", "file=/vm/cluster.raw,format=raw,if=none,id=d0", "-device", device)
    assert image.share_rw and image.mode == "shared-write"


def test_share_rw_reaches_the_file_and_data_file_of_a_node_but_not_its_backing() -> None:
    found = images(
        "-blockdev", '{"driver":"file","filename":"/vm/base.raw","node-name":"b"}',
        "-blockdev", '{"driver":"qcow2","node-name":"q","file":{"driver":"file",'
        '"filename":"/vm/q.qcow2"},"backing":"b"}',
        "-device", "virtio-blk-pci,drive=q,id=disk0",
        "-set", "device.disk0.share-rw=on",
    )  # fmt: skip
    assert [(i.filename, i.mode) for i in found] == [
        ("/vm/q.qcow2", "shared-write"),
        ("/vm/base.raw", "shared"),
    ]


def test_a_file_used_exclusive_and_shared_write_is_exclusive() -> None:
    (image,) = images(
        "-drive", "file=/vm/a.raw,format=raw,if=none,id=d0",
        "-device", "virtio-blk-pci,drive=d0,share-rw=on",
        "-drive", "file=/vm/a.raw,format=raw,if=none,id=d1",
        "-device", "virtio-blk-pci,drive=d1",
    )  # fmt: skip
    assert image.mode == "exclusive"


def test_blkreplay_image_is_a_node_reference() -> None:
    image = one("-blockdev", "driver=blkreplay,node-name=r,image.driver=qcow2,"
                "image.file.driver=file,image.file.filename=/vm/replayed.qcow2")  # fmt: skip
    assert (image.filename, image.local, image.format) == ("/vm/replayed.qcow2", True, "qcow2")


def test_libblkio_io_uring_is_a_local_file_and_device_endpoints_are_not() -> None:
    found = images(
        "-blockdev", "driver=io_uring,node-name=u,filename=/dev/vg/disk",
        "-blockdev", "driver=virtio-blk-vhost-user,node-name=v,path=/run/vhost/disk.sock",
        "-blockdev", "driver=nvme-io_uring,node-name=n,filename=/dev/ng0n1",
    )  # fmt: skip
    assert [(i.filename, i.local, i.protocol) for i in found] == [
        ("/dev/vg/disk", True, None),
        ("/run/vhost/disk.sock", False, "virtio-blk-vhost-user"),
        ("/dev/ng0n1", False, "nvme-io_uring"),
    ]


def test_backing_options_on_a_drive_keep_the_backing_file_of_the_header() -> None:
    image = one("-drive", "file=/vm/top.qcow2,format=qcow2,if=none,backing.node-name=base")
    assert image.implicit_backing
    with pytest.raises(QemuOptionError, match=r"Parameter 'backing\.file' is missing"):
        images("-blockdev", "driver=qcow2,node-name=t,backing.driver=qcow2,"
               "backing.node-name=b,file.driver=file,file.filename=/vm/top.qcow2")  # fmt: skip
